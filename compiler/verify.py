"""Numerical verification: every rewritten site is checked against the subgraph it replaces.

One run of the unrewritten graph on the example inputs records the tensors each replacement reads
and the output it must reproduce; each replacement then runs alone on those tensors. What is
compared is exactly what will run, with dropout off (a training graph's random masks cannot be
compared).
"""
from __future__ import annotations

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
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return list(args) + [kwargs[name] for name in placeholders[len(args):]]
    return fx_pytree.tree_flatten_spec((args, kwargs), spec)


def record(gm: GraphModule, args: tuple, kwargs: dict, wanted: Iterable[Node] = (),
           skip_emitted: bool = True) -> tuple[dict[Node, Any], Any]:
    """Values of `wanted` nodes and the graph's (flat) outputs for one call on the example inputs;
    nodes emitted but not yet wired in are skipped unless `skip_emitted` is False."""
    recorder = _Recorder(gm, set(wanted), skip_emitted)
    with torch.no_grad():
        outputs = recorder.run(*flat_inputs(gm, args, kwargs))
    return recorder.values, outputs


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
        if a.shape != e.shape:
            return Check(False, math.inf, f"shape {tuple(a.shape)} instead of {tuple(e.shape)}")
        if not e.is_floating_point():
            if not torch.equal(a, e):
                return Check(False, math.inf, "integer outputs differ")
            continue
        atol, rtol = TOLERANCES.get(e.dtype, TOLERANCES[torch.float32])
        a64, e64 = a.detach().double(), e.detach().double()
        both_nan = torch.isnan(a64) & torch.isnan(e64)
        diff = torch.where(both_nan, 0.0, (a64 - e64).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        if diff.numel():
            worst = max(worst, float(diff.max()))
        if not bool((diff <= atol + rtol * e64.abs().nan_to_num(0.0)).all()):
            return Check(False, worst, f"max abs error {worst:.3g} exceeds atol {atol:g} + rtol {rtol:g}")
    return Check(True, worst)
