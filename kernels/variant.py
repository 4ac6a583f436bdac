"""The implementations an attention site can be replaced by, and what each one can take.

A variant turns canonical operands (q (B,H,M,E), k/v (B,Hkv,N,E|F), optional mask/slopes,
linear attention's decay) into a call `target(*args, **kwargs)`. The same call is emitted into an
fx graph by the rewriter and run eagerly by tests and verification, so what is verified is exactly
what runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from torch._ops import OpOverload
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from attnfx.cost_model.spec import AttentionSpec, Kind, ScoreMods


@dataclass(frozen=True)
class Operands:
    """Canonical inputs of one site: fx nodes when emitting, tensors when running eagerly."""

    q: Any
    k: Any
    v: Any
    mask: Any = None  # bool (True = attend) or additive, 4-D, broadcastable to (B, H, M, N)
    slopes: Any = None  # (H,) ALiBi slopes
    decay: Any = None  # (H,) linear attention's per-head decay, in (0, 1]
    fill: float = -math.inf  # the value excluded scores receive: what rows that keep no key compute


@dataclass(frozen=True)
class Call:
    """`target(*args, **kwargs)`, then `[output_index]` when the op returns a tuple."""

    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_index: int | None = None

    def run(self) -> Any:
        out = self.target(*self.args, **self.kwargs)
        return out if self.output_index is None else out[self.output_index]


@dataclass(frozen=True)
class CallSite:
    """An attention call read back from a graph by the variant that emits its op, so what reads a
    rewritten graph (ONNX export) needs no table of op names: its operand nodes and what it computes.

    The attention output is the call's value, or `call[output_index]` when the op returns a tuple.
    """

    operands: Operands  # fx nodes (None where the call passes none)
    mods: ScoreMods
    kind: Kind = Kind.SOFTMAX
    output_index: int | None = None
    dropout: float = 0.0  # training-mode dropout probability on the weights


def call_arguments(node: Node) -> dict[str, Any]:
    """An op call's arguments by schema name, defaults filled in; ValueError if they do not bind."""
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if bound is None:
        raise ValueError(f"{node.name}: cannot bind the arguments of {node.target}")
    return bound.kwargs


class Variant(Protocol):
    """An implementation a site can be rewritten to.

    `algorithm` names the cascade the cost model prices it with (see attnfx.cost_model).
    `refusal()` returns why it cannot take this site on this device, or None if it can.
    `read(node)` is the call site when `node` is a call of the op it emits (`op` names that op in
    messages), else None; variants that emit one op share one reader.
    """

    name: str
    op: str
    algorithm: str
    exact: bool
    description: str

    def refusal(self, spec: AttentionSpec, device: str) -> str | None: ...

    def call(self, spec: AttentionSpec, operands: Operands) -> Call: ...

    def read(self, node: Node) -> CallSite | None: ...


@dataclass(frozen=True)
class OpVariant:
    """A variant that emits one of attnfx's custom ops: its refusal and its call are functions of
    the site's spec (and the device); `read` is the op's reader, shared by the variants of one op."""

    name: str
    algorithm: str
    op: str  # the custom op it emits, e.g. "attnfx::attention"
    description: str
    refuse: Callable[[AttentionSpec, str], str | None]
    emit: Callable[[AttentionSpec, Operands], Call]
    read: Callable[[Node], CallSite | None]  # the call site of a call of `op`, else None
    exact: bool = True
    takes: tuple[str, ...] = ()  # the optional score terms (spec.SCORE_TERMS) it computes

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        if spec.dropout_p:
            return f"{self.op} has no dropout (sdpa fuses training dropout)"
        return self.refuse(spec, device) or untaken_modifier(self.op, spec, self.takes)

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return self.emit(spec, operands)


def untaken_modifier(variant: str, spec: AttentionSpec, takes: tuple[str, ...]) -> str | None:
    """Why a variant cannot take a site with an optional score term it does not list in `takes`
    (None: it takes them all), so a new term is refused everywhere until a variant computes it."""
    untaken = [name for name in spec.modifiers() if name not in takes]
    return f"{variant} has no {untaken[0]}" if untaken else None


def kind_refusal(variant: str, computes: Kind, spec: AttentionSpec) -> str | None:
    """Why a variant that computes one kind of weights cannot take a site of another (None: it can)."""
    if spec.kind is computes:
        return None
    return f"{variant} computes {computes.value} attention; this site's weights are {spec.kind.value}"


def calls_op(node: Node, op: str) -> bool:
    """Whether `node` calls the default overload of `op` ("attnfx::attention"). By name: building
    some models (Hugging Face's) re-creates the torch.ops objects, so identity is not stable."""
    name = getattr(node.target, "name", None)
    return node.op == "call_function" and isinstance(node.target, OpOverload) and callable(name) and name() == op


def score_op_reader(op: str, kind: Kind = Kind.SOFTMAX,
                    output_index: int | None = None) -> Callable[[Node], CallSite | None]:
    """The reader of `op`, whose arguments start like attnfx::attention's (q, k, v, bias,
    alibi_slopes, then spec.SCORE_ARGS)."""
    def read(node: Node) -> CallSite | None:
        if not calls_op(node, op):
            return None
        a = call_arguments(node)
        operands = Operands(a["q"], a["k"], a["v"], a["bias"], a["alibi_slopes"])
        mods = ScoreMods.from_call(a)
        return CallSite(operands, mods, kind, output_index)
    return read
