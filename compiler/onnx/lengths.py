"""A second set of inputs for the onnxruntime check: the example at another sequence length, so a
dynamic export is checked where the capture's sizes no longer hold.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sympy
import torch

from .check import Case, torch_outputs


def second_length_case(gm: torch.fx.GraphModule, inputs: list[Any]) -> tuple[Case | None, str]:
    """(the inputs at another sequence length, "") or (None, why there is none).

    The free axes are the capture's own symbols (placeholder metadata), not the ONNX graph's: the
    exporter may leave axes symbolic that PyTorch pins. Every symbol but the batch (dim 0) is set to
    about half its size (within position tables), else to 1.5x when the graph's guards refuse that
    (e.g. a minimum image size); tensors are cut or tiled along those axes, so token ids and padding
    masks stay valid.
    """
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in gm.graph.nodes if n.op == "placeholder"]
    sizes: dict[sympy.Symbol, int] = {}
    batch = set()
    for shape, value in zip(shapes, inputs):
        for axis, size in enumerate(shape or ()):
            expr = _expr(size)
            if isinstance(expr, sympy.Symbol):
                sizes[expr] = int(value.shape[axis])
                if axis == 0:
                    batch.add(expr)
    free = {s: n for s, n in sizes.items() if s not in batch}
    if not free:
        return None, "no symbolic axis besides the batch"
    refusals = []
    for new in ({s: max(2, n // 2) if n > 2 else 3 for s, n in free.items()}, {s: n + n // 2 for s, n in free.items()}):
        resized = [_resized(shape, value, {**sizes, **new}, new.keys()) for shape, value in zip(shapes, inputs)]
        label = "second length (" + ", ".join(f"{s} {sizes[s]}->{n}" for s, n in new.items()) + ")"
        try:  # the graph's own guards say which lengths the model takes
            expected = torch_outputs(gm, resized)
        except Exception as exc:  # guards raise AssertionError, shape checks RuntimeError
            refusals.append(f"{label}: {str(exc).splitlines()[0]}")
            continue
        return Case(label, resized, expected), ""
    return None, "the PyTorch graph refuses " + "; ".join(refusals)


def _resized(shape: Any, value: Any, sizes: dict[sympy.Symbol, int], changed: Iterable[sympy.Symbol]) -> Any:
    changed = set(changed)
    for axis, size in enumerate(shape or ()):
        expr = _expr(size)
        if expr is not None and expr.free_symbols & changed:
            value = _resize(value, axis, int(expr.subs(sizes)))
    return value


def _expr(size: Any) -> sympy.Expr | None:
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    if size <= t.shape[axis]:
        return t.narrow(axis, 0, size)
    reps = -(-size // t.shape[axis])
    return torch.cat([t] * reps, dim=axis).narrow(axis, 0, size)


