"""The graph Dynamo hands a backend, as attnfx needs it: ATen-level, before autograd, plus real
inputs to verify the rewrite on.

Dynamo's graph calls torch functions on its flat inputs (parameters included). Re-tracing it with
`make_fx(pre_dispatch=True)` under Dynamo's own fake mode gives ATen ops whose sizes are Dynamo's
SymInts (so any guard the rewrite needs lands in Dynamo's ShapeEnv), and stays above autograd: the
AOTAutograd run that follows differentiates through the rewritten sites. Node metadata (module
paths, source lines) is carried over, so reports name the user's modules.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx.traceback as fx_traceback
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.proxy_tensor import make_fx

from .errors import AttnfxError


def aten_graph(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """`gm` traced to ATen ops before autograd, with the same flat inputs in the same order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [_fake_value(n) for n in placeholders]
    fake_mode = detect_fake_mode(example_inputs) or detect_fake_mode(fakes)
    if fake_mode is None:
        raise AttnfxError("Dynamo's graph carries no fake values to trace it with")

    def run(*args: Any) -> Any:
        with fx_traceback.preserve_node_meta():
            return Interpreter(gm).run(*args)

    with fake_mode:
        traced = make_fx(run, tracing_mode="symbolic", pre_dispatch=True, record_module_stack=True)(*fakes)
    for dynamo_input, aten_input in zip(placeholders, _placeholders(traced)):
        aten_input._rename(dynamo_input.name)  # reports read "l_kwargs_attention_mask_", not "arg3_1"
        aten_input.target = aten_input.name
    traced.graph.lint()
    traced.recompile()
    return traced


def _fake_value(node: Node) -> Any:
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise AttnfxError(f"Dynamo's input {node.name} has no example value")
    return value


def _placeholders(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def verification_inputs(gm: GraphModule, example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Real values to run `gm` on while verifying: SymInts at their example values, and a copy of
    every input the graph writes to (a static KV cache's `index_copy_`), so that verification
    never changes the user's state."""
    written = mutated_inputs(gm)
    values = []
    for index, value in enumerate(example_inputs):
        if isinstance(value, FakeTensor):
            raise AttnfxError("Dynamo passed fake example inputs; nothing could be verified on them")
        if isinstance(value, torch.SymInt):
            value = _example_int(value)
        elif isinstance(value, torch.Tensor) and index in written:
            value = value.detach().clone()
        values.append(value)
    return tuple(values)


def _example_int(value: torch.SymInt) -> int:
    hint = value.node.hint
    if hint is None:
        raise AttnfxError(f"the size {value} has no example value (data-dependent)")
    return int(hint)


def mutated_inputs(gm: GraphModule) -> set[int]:
    """Positions of the inputs an op of `gm` writes to, directly or through a view."""
    placeholders = _placeholders(gm)
    written: set[int] = set()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        for argument, value in zip(target._schema.arguments, node.args):
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, Node):
                base = _view_base(value)
                if base in placeholders:
                    written.add(placeholders.index(base))
    return written


def _view_base(node: Node) -> Node:
    """The node a chain of views (or in-place ops, which return their input) starts from."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args:
        schema = node.target._schema
        first = node.args[0]
        aliases = schema.returns and schema.returns[0].alias_info is not None
        if not aliases or not isinstance(first, Node):
            break
        node = first
    return node
