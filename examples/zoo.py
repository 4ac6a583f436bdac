"""Model zoo for attnfx's tests and coverage benchmark.

``REGISTRY`` maps a name to a :class:`ZooModel`; ``UNSUPPORTED`` names architectures that were
tried and cannot be built or exported here, with the reason. The helpers below are what tests and
benchmarks share: exporting with dynamic shapes, counting softmax nodes, flattening outputs.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

import zoo_hf
import zoo_torch
from zoo_base import ZooModel, padding_mask

__all__ = ["REGISTRY", "UNSUPPORTED", "ZooModel", "padding_mask", "required", "dynamic_shapes",
           "export", "softmax_nodes", "output_tensors", "max_abs_diff", "SOFTMAX_TARGETS"]

REGISTRY: dict[str, ZooModel] = {m.name: m for m in (*zoo_hf.REQUIRED, *zoo_torch.REQUIRED,
                                                      *zoo_hf.BREADTH)}
UNSUPPORTED: dict[str, str] = {**zoo_hf.UNSUPPORTED, **zoo_torch.UNSUPPORTED}

SOFTMAX_TARGETS = (
    torch.ops.aten.softmax.int,
    torch.ops.aten._softmax.default,
    torch.ops.aten._safe_softmax.default,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def required() -> list[ZooModel]:
    """The architectures every release must cover (the test suite's core)."""
    return [m for m in REGISTRY.values() if m.required]


def dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``Dim.AUTO`` on every dimension of every tensor input; export keeps static what must be.

    Marking all dims (rather than naming batch and sequence per model) fits every layout in the
    zoo: seq-first MHA, (B, H, L, D) caches, (B, mels, frames) audio.
    """
    def spec(x: Any) -> Any:
        return {d: Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExportedProgram:
    """Capture as attnfx does: non-strict ``torch.export`` with dynamic dims."""
    dyn_args, dyn_kwargs = dynamic_shapes(args, kwargs)
    specs: Any = {**dict(zip(_positional_names(model, len(args)), dyn_args)), **dyn_kwargs}
    return torch.export.export(model, args, kwargs, dynamic_shapes=specs, strict=False)


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    """Names of ``model.forward``'s first ``count`` parameters (export keys dynamic_shapes by name)."""
    params = list(inspect.signature(model.forward).parameters)
    return params[:count]


def softmax_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Softmax nodes, plus SDPA nodes that already stand for an attention site."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in SOFTMAX_TARGETS]


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested, possibly ModelOutput) result, in pytree order."""
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference over all output tensors; raises if the structures differ."""
    xs, ys = output_tensors(a), output_tensors(b)
    if len(xs) != len(ys):
        raise ValueError(f"outputs differ in count: {len(xs)} vs {len(ys)}")
    worst = 0.0
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel():
            worst = max(worst, _max_abs(x.double(), y.double()))
    return worst


def _max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    """Max |x - y| where NaN matching NaN counts as equal and any other NaN as infinitely wrong."""
    both_nan = x.isnan() & y.isnan()
    diff = (x - y).abs().masked_fill(both_nan | (x == y), 0.0)
    return float("inf") if diff.isnan().any() else diff.max().item()
