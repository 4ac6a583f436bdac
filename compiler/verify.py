"""Numerical verification: every rewritten site is checked against the subgraph it replaces.

One run of the unrewritten graph on the example inputs records the tensors each replacement reads
and the output it must reproduce; each replacement then runs alone on those tensors. What is
compared is exactly what will run, with dropout off (a training graph's random masks cannot be
compared).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from attnfx.passes import ops

TOLERANCES = {  # (atol, rtol) per dtype: fp32 to the 1e-5 on activations of O(1)
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass(frozen=True)
class Check:
    ok: bool
    max_abs: float
    detail: str = ""


class _Recorder(Interpreter):
    """Runs the graph, keeping the values of `wanted` and skipping emitted (not yet wired) nodes."""

    def __init__(self, gm: GraphModule, wanted: set[Node], skip_emitted: bool) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.skip_emitted = skip_emitted
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        if self.skip_emitted and "attnfx_site" in n.meta and n.op == "call_function":
            return None
        if ops.kind(n) == "dropout":  # what is compared is the deterministic part: dropout off
            x = self.env[n.args[0]]
            value = (x, torch.ones_like(x, dtype=torch.bool)) if ops.target_name(n) == "native_dropout" else x
        else:
            value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value
        return value


def flat_inputs(gm: GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for a call `gm(*args, **kwargs)`."""
    codegen = gm.graph._codegen
    spec = codegen.pytree_info.in_spec if getattr(codegen, "pytree_info", None) else None
    if spec is None:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())
    return fx_pytree.tree_flatten_spec((args, kwargs), spec)


def run_graph(gm: GraphModule, inputs: list[Any], wanted: Iterable[Node] = (),
              skip_emitted: bool = False) -> tuple[dict[Node, Any], tuple[Any, ...]]:
    """Values of the `wanted` nodes and the graph's flat outputs (its output node's values, in order)
    for one no-grad run on flat `inputs`; nodes emitted but not yet wired in are skipped with `skip_emitted`."""
    recorder = _Recorder(gm, set(wanted), skip_emitted)
    with torch.no_grad():
        outputs = recorder.run(*inputs, enable_io_processing=False)
    return recorder.values, tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def record(gm: GraphModule, args: tuple, kwargs: dict, wanted: Iterable[Node] = (),
           skip_emitted: bool = True) -> tuple[dict[Node, Any], tuple[Any, ...]]:
    """`run_graph` on the inputs of a call `gm(*args, **kwargs)` (the example inputs), skipping
    emitted nodes unless `skip_emitted` is False."""
    return run_graph(gm, flat_inputs(gm, args, kwargs), wanted, skip_emitted)


def run_emitted(owner: GraphModule, nodes: tuple[Node, ...], output: Node, values: dict[Node, Any]) -> Any:
    """Run the emitted nodes alone, reading their outside inputs from `values`."""
    graph, env, inputs = Graph(), {}, []
    emitted = set(nodes)
    for node in nodes:
        for source in node.all_input_nodes:
            if source not in emitted and source not in env:
                env[source] = graph.placeholder(source.name)
                inputs.append(values[source])
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    with torch.no_grad():
        return GraphModule(owner, graph)(*inputs)


def external_inputs(nodes: tuple[Node, ...]) -> set[Node]:
    emitted = set(nodes)
    return {s for n in nodes for s in n.all_input_nodes if s not in emitted}


def deviation(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor | None:
    """|actual - expected| per element in float64, None when the shapes differ. Equal values (equal
    infinities, NaN on both sides) give 0; NaN on one side only, or integers that differ, give inf."""
    if tuple(actual.shape) != tuple(expected.shape):
        return None
    if not expected.is_floating_point():
        same = actual.to(expected.dtype) == expected
        return torch.where(same, 0.0, math.inf).double()
    a, e = actual.detach().double(), expected.detach().double()
    d = torch.where((a == e) | (a.isnan() & e.isnan()), 0.0, (a - e).abs())
    return d.nan_to_num(nan=math.inf)


def compare(actual: Any, expected: Any) -> Check:
    """Tree-wise comparison with tolerances for the expected tensors' dtypes."""
    a_leaves, e_leaves = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    if len(a_leaves) != len(e_leaves):
        return Check(False, math.inf, f"{len(a_leaves)} outputs instead of {len(e_leaves)}")
    worst = 0.0
    for a, e in zip(a_leaves, e_leaves):
        if not isinstance(e, torch.Tensor):
            if a != e:
                return Check(False, math.inf, f"non-tensor output {a!r} != {e!r}")
            continue
        diff = deviation(a, e)
        if diff is None:
            return Check(False, math.inf, f"shape {tuple(a.shape)} instead of {tuple(e.shape)}")
        if not e.is_floating_point():
            if diff.any():
                return Check(False, math.inf, "integer outputs differ")
            continue
        atol, rtol = TOLERANCES.get(e.dtype, TOLERANCES[torch.float32])
        if diff.numel():
            worst = max(worst, float(diff.max()))
        if not bool((diff <= atol + rtol * e.detach().double().abs().nan_to_num(0.0)).all()):
            return Check(False, worst, f"max abs error {worst:.3g} exceeds atol {atol:g} + rtol {rtol:g}")
    return Check(True, worst)
