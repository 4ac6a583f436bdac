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
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import guard_scalar

from attnfx.passes import ops

from .errors import AttnfxError


def aten_graph(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """`gm` traced to ATen ops before autograd, with the same flat inputs in the same order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [_fake_value(n) for n in placeholders]
    # NOTE: the fake mode of Dynamo's example values, not the fresh one (same ShapeEnv) Dynamo
    # installs for backends: only the former knows the values of scalars Dynamo made inputs.
    fake_mode = next((v.fake_mode for v in fakes if isinstance(v, FakeTensor)), None)
    if fake_mode is None:
        raise AttnfxError("Dynamo's graph carries no fake tensors to trace it with")

    def run(*args: Any) -> Any:
        for traced_input, fake in zip(args, fakes):
            if isinstance(fake, FakeTensor) and fake.item_memo is not None:
                traced_input.item_memo = fake.item_memo  # make_fx re-fakes inputs and drops it
        with fx_traceback.preserve_node_meta():
            return _SpecializingFloats(gm).run(*args)

    with tracing(TracingContext(fake_mode)), fake_mode:
        traced = make_fx(run, tracing_mode="symbolic", pre_dispatch=True, record_module_stack=True)(*fakes)
    for dynamo_input, aten_input in zip(placeholders, _placeholders(traced)):
        aten_input._rename(dynamo_input.name)  # reports read "l_kwargs_attention_mask_", not "arg3_1"
        aten_input.target = aten_input.name
    traced.graph.lint()
    traced.recompile()
    return traced


_CONTRACTIONS = ("matmul", "einsum", "baddbmm")


def score_floats(gm: GraphModule) -> list[Node]:
    """The `item()` reads of Python floats Dynamo made graph inputs (it does with `dynamic=True`)
    that act on attention scores (a module's `scaling`, a softcap): the score ops a softmax reads,
    back to the Q.K^T contraction. A scale must be a known number for attnfx to prove the site."""
    found, seen = [], set()
    stack = [n for n in gm.graph.nodes if ops.kind(n) in ("softmax", "log_softmax")]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_method" and node.target == "item":
            found.append(node)
            continue
        if ops.kind(node) is None or ops.kind(node) in _CONTRACTIONS:
            continue  # only the elementwise and layout ops between the scores and the softmax
        stack.extend(node.all_input_nodes)
    return [n for n in found if _float_symbol(n) is not None]


def _float_symbol(item: Node) -> str | None:
    """The name of the SymFloat Dynamo reads a float input's value as (e.g. "zf3")."""
    source = item.args[0] if item.args else None
    value = source.meta.get("example_value") if isinstance(source, Node) else None
    memo = value.item_memo if isinstance(value, FakeTensor) and value.dtype.is_floating_point else None
    expr = getattr(getattr(memo, "node", None), "expr", None)
    return str(expr) if expr is not None and expr.is_symbol else None


def specialize_score_floats(gm: GraphModule) -> None:
    """Have Dynamo re-trace with the score floats as constants (guarded on their values), as it
    does itself for floats its compiler cannot take; a no-op once they are."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState

    names = [_float_symbol(n) for n in score_floats(gm)]
    pending = [name for name in names if not TensorifyState.should_specialize(name)]
    if pending:
        for name in pending:
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis


class _SpecializingFloats(Interpreter):
    """Reads the score floats Dynamo still passes as inputs (see `specialize_score_floats`) as
    their values, guarded like constants."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.score_floats = set(score_floats(gm))

    def run_node(self, n: Node) -> Any:
        if n in self.score_floats:
            return guard_scalar(self.env[n.args[0]].item_memo)
        return super().run_node(n)


def _fake_value(node: Node) -> Any:
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise AttnfxError(f"Dynamo's input {node.name} has no example value")
    return value


def _placeholders(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def verification_inputs(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Real values to run the graph on while verifying: SymInts at their example values."""
    values = []
    for value in example_inputs:
        if isinstance(value, FakeTensor):
            raise AttnfxError("Dynamo passed fake example inputs; nothing could be verified on them")
        values.append(_example_int(value) if isinstance(value, torch.SymInt) else value)
    return tuple(values)


def _example_int(value: torch.SymInt) -> int:
    hint = value.node.hint
    if hint is None:
        raise AttnfxError(f"the size {value} has no example value (data-dependent)")
    return int(hint)


_INPUT_COPY = "attnfx_input_copy"


def copy_written_inputs(gm: GraphModule) -> None:
    """Make every input the graph writes to (a static KV cache's `index_copy_`, its length
    counter's `add_`) a copy at the top of the graph, so that verification runs never change the
    user's state and each run starts from the same one. `drop_input_copies` undoes it."""
    placeholders = _placeholders(gm)
    for index in sorted(mutated_inputs(gm)):
        placeholder = placeholders[index]
        with gm.graph.inserting_after(placeholders[-1]):
            copy_ = gm.graph.call_function(torch.ops.aten.clone.default, (placeholder,))
        placeholder.replace_all_uses_with(copy_, delete_user_cb=lambda user: user is not copy_)
        copy_.meta.update(val=placeholder.meta.get("val"), **{_INPUT_COPY: True})
    gm.recompile()


def drop_input_copies(gm: GraphModule) -> None:
    """The graph writing to its inputs again, as Dynamo captured it."""
    for node in [n for n in gm.graph.nodes if n.meta.get(_INPUT_COPY)]:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()


def mutated_inputs(gm: GraphModule) -> set[int]:
    """Positions of the inputs an op of `gm` writes to, directly or through a view."""
    placeholders = _placeholders(gm)
    written: set[int] = set()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        for position, argument in enumerate(target._schema.arguments):
            value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
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
