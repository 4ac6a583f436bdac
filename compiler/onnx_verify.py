"""Check an exported file: its structure (one fused node per fused site), onnx.checker, and
onnxruntime's outputs against the PyTorch graph at the example inputs and a second sequence length.

Everything runs on the graph's flat inputs and outputs (the order of its placeholders and of its
output node), which is also the order the exporter gives the ONNX graph; inputs are fed by name.
A numeric mismatch is traced to its site by exporting a probe that returns every site's output.
"""
from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import sympy
import torch

from attnfx.errors import ExportError

from .onnx_lowering import NODE_KEY, SITE_KEY
from .onnx_plan import FUSED_OPS, SitePlan


@dataclass(frozen=True)
class Case:
    """Flat graph inputs to compare on, how the summary names them, and PyTorch's outputs if known."""

    label: str
    inputs: list[Any]
    expected: list[torch.Tensor] | None = None


def flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for a call `gm(*args, **kwargs)`."""
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(gm.graph.process_inputs(*bound.arguments.values()))


def placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


class _Recorder(torch.fx.Interpreter):
    """Runs the graph on flat inputs and keeps the outputs of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep = keep
        self.seen: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.seen[n.name] = out[0] if isinstance(out, (tuple, list)) else out
        return out


def run_torch(gm: torch.fx.GraphModule, inputs: list[Any], keep: Iterable[str] = ()) -> tuple[list, dict]:
    """(flat tensor outputs, outputs of the `keep` nodes by name) of the PyTorch graph."""
    recorder = _Recorder(gm, set(keep))
    with torch.no_grad():
        outputs = recorder.run(*inputs, enable_io_processing=False)
    return [o for o in _as_list(outputs) if isinstance(o, torch.Tensor)], recorder.seen


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def count_nodes(model: onnx.ModelProto, plans: list[SitePlan]) -> tuple[Counter, int]:
    """(fused nodes by op type, Softmax nodes); raises unless each fused site has exactly one node."""
    model = onnx.inliner.inline_local_functions(model)
    fused: Counter = Counter()
    per_node: Counter = Counter()
    softmax = 0
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            fused[node.op_type] += 1
            per_node[_metadata(node).get(NODE_KEY)] += 1
        softmax += node.op_type == "Softmax"
    for plan in plans:
        if plan.fused and per_node[plan.facts.node] != 1:
            raise ExportError(
                f"{plan.facts.label} ({plan.facts.module}): expected one {plan.op} node, "
                f"found {per_node[plan.facts.node]}"
            )
    stray = sum(per_node.values()) - sum(p.fused for p in plans)
    if stray:
        raise ExportError(f"{stray} fused attention node(s) in the ONNX graph belong to no planned site")
    return fused, softmax


def site_of_onnx_node(model: onnx.ModelProto, plans: list[SitePlan]) -> dict[str, SitePlan]:
    """ONNX node name -> site, to name the site in onnxruntime's error messages."""
    by_fx = {p.facts.node: p for p in plans}
    out = {}
    for node in model.graph.node:
        fx_name = _metadata(node).get(NODE_KEY)
        if fx_name in by_fx:
            out[node.name] = by_fx[fx_name]
    return out


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props if p.key in (SITE_KEY, NODE_KEY)}


def check_file(path: str) -> None:
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker (full check) rejected the export: {exc}") from exc


def session(path_or_bytes: str | bytes, sites: dict[str, SitePlan]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime could not load the export{_sites_named(str(exc), sites)}: {exc}") from exc


def run_onnx(sess: ort.InferenceSession, names: list[str], inputs: list[Any], sites: dict[str, SitePlan]) -> list:
    values = dict(zip(names, inputs))
    missing = [i.name for i in sess.get_inputs() if not isinstance(values.get(i.name), torch.Tensor)]
    if missing:
        raise ExportError(f"the ONNX graph's inputs {missing} match no tensor input of the PyTorch graph {names}")
    feed = {i.name: values[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
    try:
        return sess.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime failed to run the export{_sites_named(str(exc), sites)}: {exc}") from exc


def _sites_named(message: str, sites: dict[str, SitePlan]) -> str:
    hits = [p for name, p in sites.items() if re.search(rf"\b{re.escape(name)}\b", message)]
    return "".join(f" at {p.facts.label} ({p.facts.module}, {p.op})" for p in hits)


def difference(expected: torch.Tensor, got: np.ndarray) -> float:
    """Max |expected - got|; inf for a shape or dtype-class mismatch or a NaN on one side only."""
    actual = torch.from_numpy(np.asarray(got))
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    if not expected.is_floating_point():
        return 0.0 if torch.equal(expected.cpu(), actual.to(expected.dtype)) else math.inf
    e, a = expected.detach().cpu().double(), actual.double()
    d = torch.where((e == a) | (e.isnan() & a.isnan()), 0.0, (e - a).abs())
    return float(d.nan_to_num(nan=math.inf).max()) if d.numel() else 0.0


def worst_output(expected: list[torch.Tensor], got: list) -> tuple[int, float]:
    """(index, difference) of the output that differs most."""
    if len(expected) != len(got):
        raise ExportError(f"the ONNX graph has {len(got)} outputs, the PyTorch graph {len(expected)}")
    diffs = [difference(e, g) for e, g in zip(expected, got)]
    worst = max(range(len(diffs)), key=diffs.__getitem__, default=0)
    return worst, diffs[worst] if diffs else 0.0


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
            expected, _ = run_torch(gm, resized)
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


def localize(
    gm: torch.fx.GraphModule,
    plans: list[SitePlan],
    case: Case,
    atol: float,
    export_probe: Callable[[list[Any]], onnx.ModelProto],
) -> tuple[SitePlan, float] | None:
    """The first site (graph order) whose onnxruntime output differs from PyTorch's, with the difference.

    Later sites see the first one's error in their inputs, so the first is the one to blame.
    """
    if not plans:
        return None
    _, expected = run_torch(gm, case.inputs, keep={p.facts.node for p in plans})
    probe = export_probe(case.inputs)
    sess = session(probe.SerializeToString(), {})
    got = run_onnx(sess, placeholder_names(gm), case.inputs, {})
    for plan, value in zip(plans, got):
        diff = difference(expected[plan.facts.node], value)
        if not diff <= atol:
            return plan, diff
    return None
