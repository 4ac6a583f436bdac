"""The implementations an attention site can be replaced by, and what each one can take.

A variant turns canonical operands (q (B,H,M,E), k/v (B,Hkv,N,E|F), optional mask/slopes/lengths,
linear attention's decay) into a call `target(*args, **kwargs)`. The same call is emitted into an
fx graph by the rewriter and run eagerly by tests and verification, so what is verified is exactly
what runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from attnfx.cost_model.spec import AttentionSpec, Kind


@dataclass(frozen=True)
class Operands:
    """Canonical inputs of one site: fx nodes when emitting, tensors when running eagerly."""

    q: Any
    k: Any
    v: Any
    mask: Any = None  # bool (True = attend) or additive, 4-D, broadcastable to (B, H, M, N)
    slopes: Any = None  # (H,) ALiBi slopes
    kv_lengths: Any = None  # (B,) int, keys at n >= length are masked
    decay: Any = None  # (H,) linear attention's per-head decay, in (0, 1]


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


class Variant(Protocol):
    """An implementation a site can be rewritten to.

    `algorithm` names the cascade the cost model prices it with (see attnfx.cost_model).
    `refusal()` returns why it cannot take this site on this device, or None if it can.
    """

    name: str
    algorithm: str
    exact: bool
    description: str

    def refusal(self, spec: AttentionSpec, device: str) -> str | None: ...

    def call(self, spec: AttentionSpec, operands: Operands) -> Call: ...


@dataclass(frozen=True)
class OpVariant:
    """A variant that emits one of attnfx's custom ops: its refusal and its call are functions of
    the site's spec (and the device)."""

    name: str
    algorithm: str
    op: str  # the custom op it emits, e.g. "attnfx::attention"
    description: str
    refuse: Callable[[AttentionSpec, str], str | None]
    emit: Callable[[AttentionSpec, Operands], Call]
    exact: bool = True

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        if spec.dropout_p:
            return f"{self.op} has no dropout (sdpa fuses training dropout)"
        return self.refuse(spec, device)

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return self.emit(spec, operands)


def kind_refusal(variant: str, computes: Kind, spec: AttentionSpec) -> str | None:
    """Why a variant that computes one kind of weights cannot take a site of another (None: it can)."""
    if spec.kind is computes:
        return None
    return f"{variant} computes {computes.value} attention; this site's weights are {spec.kind.value}"
