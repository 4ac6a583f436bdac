"""What one attention site computes, independent of how the model spelled it: attnfx's foundation.

Every layer reads the meaning of a site from here and nowhere else: the matcher proves an
`AttentionSpec` from the graph, the cost model prices it, the kernels implement it (their op
arguments are `ScoreMods.op_args()`), and ONNX export reads it back. This module imports torch but
never torch.fx or triton. Everything is in canonical layout:

    q (B, H, M, E)   k (B, Hkv, N, E)   v (B, Hkv, N, F)   out (B, H, M, F),   H = Hkv * G

and the score of query m for key n, in this order:

    s = scale * <q[m], k[n]>
    s = softcap * tanh(s / softcap)              if softcap
    s = s + bias[b, h, m, n]                     if mask is ADDITIVE (bias or -inf/finfo.min mask)
    s = s + slopes[h] * (n - m)                  if alibi
    s = -inf where not keep[b, h, m, n]          if mask is BOOL (True keeps)
    s = -inf where n > m + offset                if causal (offset 0 top-left, N - M bottom-right)
    s = -inf where n <= m + offset - window      if window (needs causal)
    out = softmax(s, over n) @ v                 kind SOFTMAX
    out = sigmoid(s + logit_bias) @ v            kind SIGMOID (no row normalisation; excluded -> 0)

Linear attention (kind LINEAR) has no exclusions: q and k arrive feature-mapped (phi applied), and

    w[m, n] = scale * <q[m], k[n]> * keep(m, n) * decay[h] ** (m + offset - n)   (decay if `decay`)
    out = w @ v,  divided by (sum_n w[m, n] + norm_eps) if `normalize`

where keep is the causal band (1 inside, 0 outside) or all ones.

Each term of the score formula is declared once, in `SCORE_TERMS` (when a site has it, its cascade
stage, its float64 evaluation, its eager cost, whether variants must opt into it), and each scalar
modifier's op argument once, in `SCORE_ARGS`; the cascade, the cost model, the op schemas and the
variants' refusals read those tables.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch


class Causal(str, enum.Enum):
    """Where the causal diagonal sits when M != N."""

    NONE = "none"
    TOP_LEFT = "top_left"  # keep n <= m
    BOTTOM_RIGHT = "bottom_right"  # keep n <= m + (N - M): the last query sees every key

    def offset(self, q_len, kv_len):
        """Key n is visible from query m when n <= m + offset (ints, SymInts or sympy sizes)."""
        return kv_len - q_len if self is Causal.BOTTOM_RIGHT else 0

    def hides_keys(self, q_len: int | None) -> bool:
        """Whether the diagonal excludes any key from `q_len` query rows (None: not fixed). A
        bottom-right one over a single row (a decode step: that query sees every key) excludes
        none, so a kernel without that diagonal runs it unmasked."""
        return self is not Causal.NONE and not (self is Causal.BOTTOM_RIGHT and q_len == 1)


class Kind(str, enum.Enum):
    """What normalises the scores into weights."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    LINEAR = "linear"


class MaskInput(str, enum.Enum):
    """The kind of mask *tensor* a site passes (proven structure goes into `causal`/`window`)."""

    NONE = "none"
    BOOL = "bool"  # True = attend
    ADDITIVE = "additive"  # added to the scores: relative bias, ALiBi tensors, 0/-inf masks


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
DTYPE_BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The spec's name for a torch dtype attnfx can rewrite, else None."""
    return next((name for name, d in DTYPES.items() if d == dtype), None)


# The decode rule: M <= 16 queries over at least 4 * M keys is decode-shaped (split-KV kernels).
DECODE_MAX_Q = 16
DECODE_MIN_RATIO = 4


def is_decode_shape(q_len: int, kv_len: int) -> bool:
    return q_len <= DECODE_MAX_Q and kv_len >= DECODE_MIN_RATIO * q_len


@dataclass(frozen=True)
class OpArg:
    """One scalar argument of attnfx's score ops: its schema entry and its encoding of a
    `ScoreMods` field (`decode` raises ValueError naming the argument when it is not well-formed)."""

    name: str  # the ScoreMods field and the schema's argument name
    type: str  # the schema type: float | int | str
    encode: Callable[[Any], float | int | str]
    decode: Callable[[Any], Any]


def _causal_arg(value: str) -> Causal:
    try:
        return Causal(value)
    except ValueError:
        raise ValueError(f"causal must be one of {[c.value for c in Causal]}, got {value!r}") from None


def _window_arg(value: int) -> int | None:
    if value != -1 and value < 1:
        raise ValueError(f"window must be -1 (none) or >= 1, got {value}")
    return None if value == -1 else int(value)


def _softcap_arg(value: float) -> float | None:
    if value < 0 or math.isnan(value):
        raise ValueError(f"softcap must be 0 (none) or positive, got {value}")
    return float(value) or None


# The scalar arguments every score op takes after (q, k, v, bias, alibi_slopes), in schema order.
SCORE_ARGS: tuple[OpArg, ...] = (
    OpArg("scale", "float", float, float),
    OpArg("causal", "str", lambda c: c.value, _causal_arg),
    OpArg("window", "int", lambda w: -1 if w is None else int(w), _window_arg),
    OpArg("softcap", "float", lambda c: float(c or 0.0), _softcap_arg),
)
SCORE_SCHEMA = ", ".join(f"{a.type} {a.name}" for a in SCORE_ARGS)  # "float scale, str causal, ..."
# the leading arguments of every attnfx score op (attention, sigmoid, flex, bounded)
SCORE_OP_SCHEMA = f"Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, {SCORE_SCHEMA}"


@dataclass(frozen=True)
class ScoreMods:
    """The scalar score modifiers of a site, and their one encoding as custom-op arguments
    (`SCORE_ARGS`: -1 = no window, 0.0 = no softcap)."""

    scale: float = 1.0
    causal: Causal = Causal.NONE
    window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (self.window < 1 or self.causal is Causal.NONE):
            raise ValueError(f"window must be >= 1 with a causal diagonal; got window={self.window}, "
                             f"causal={self.causal.value!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive, got {self.softcap}")

    def op_args(self) -> tuple:
        return tuple(a.encode(getattr(self, a.name)) for a in SCORE_ARGS)

    @classmethod
    def from_op_args(cls, *args: Any) -> "ScoreMods":
        """Decode op arguments in SCORE_ARGS order; ValueError naming the argument that is not
        well-formed. An op whose schema stops early (one that refuses the later modifiers) leaves
        them absent."""
        if len(args) > len(SCORE_ARGS):
            raise TypeError(f"ScoreMods takes {len(SCORE_ARGS)} op arguments, got {len(args)}")
        return cls(**{a.name: a.decode(value) for a, value in zip(SCORE_ARGS, args)})

    @classmethod
    def from_call(cls, arguments: dict[str, Any]) -> "ScoreMods":
        """Decode the score arguments of a call bound by name (those its schema has)."""
        return cls.from_op_args(*(arguments[a.name] for a in SCORE_ARGS if a.name in arguments))


@dataclass(frozen=True)
class EagerCost:
    """What an eager graph spends on one score term, in whole score tensors: `passes` reads and
    writes of them, `ew` elementwise ops and `exps` exponentials per element, one fresh output."""

    launches: int
    ew: int
    exps: int
    passes: int


@dataclass(frozen=True)
class ScoreTerm:
    """One term of the score formula (module docstring), declared once: when a site has it, its
    stage in the einsum cascade and that stage's float64 evaluation (`run` is the cascade's
    evaluator: `spec`, `dtype`, `m_idx`/`n_idx`, `per_pair`, `per_head`, `exclude`, `filter`),
    and what an eager graph spends on it. `name` is also the cost feature and the word refusals
    use. An `optional` term is refused by every variant that does not list it in what it takes."""

    name: str
    stage: str
    present: Callable[["AttentionSpec"], bool]
    op: Callable[["AttentionSpec"], str]
    evaluate: Callable[[Any, torch.Tensor], torch.Tensor]
    inputs: tuple[str, ...] = ()  # the tensors the stage reads besides the scores
    eager: EagerCost | None = None  # None: priced with the mask inputs (cost_model/algorithms.py)
    optional: bool = False
    linear: bool = False  # linear attention may have it


def _band_rule(spec: "AttentionSpec") -> str:
    rule = "n <= m" if spec.causal is Causal.TOP_LEFT else "n <= m + N - M"
    if spec.window is not None:
        rule += f" and n > m{'' if spec.causal is Causal.TOP_LEFT else ' + N - M'} - {spec.window}"
    return f"{'zero outside' if spec.kind is Kind.LINEAR else 'filter'} {rule}"


# Every term between the QK contraction and the weights, in the order the scores take them.
SCORE_TERMS: tuple[ScoreTerm, ...] = (
    ScoreTerm("scale", "S", lambda s: s.scale != 1.0, lambda s: f"mul {s.scale:.6g}",
              lambda run, x: x * run.spec.scale, eager=EagerCost(1, 1, 0, 1), linear=True),
    ScoreTerm("softcap", "SC", lambda s: s.softcap is not None, lambda s: f"softcap {s.softcap:g}",
              lambda run, x: run.spec.softcap * torch.tanh(x / run.spec.softcap),
              eager=EagerCost(3, 2, 1, 3), optional=True),
    ScoreTerm("additive_mask", "SB", lambda s: s.mask is MaskInput.ADDITIVE, lambda s: "add bhgmn",
              lambda run, x: x + run.per_pair("BIAS", run.dtype), inputs=("BIAS",)),
    ScoreTerm("alibi", "SA", lambda s: s.alibi, lambda s: "add slopes[h,g]*(n-m)",
              lambda run, x: x + run.per_head("SLOPES") * (run.n_idx - run.m_idx).to(run.dtype),
              inputs=("SLOPES",), optional=True),
    ScoreTerm("bool_mask", "SM", lambda s: s.mask is MaskInput.BOOL, lambda s: "keep where mask",
              lambda run, x: run.exclude(run.per_pair("MASK", torch.bool), x), inputs=("MASK",)),
    ScoreTerm("causal", "SF", lambda s: s.causal is not Causal.NONE, _band_rule,
              lambda run, x: run.filter(x), linear=True),
)


@dataclass(frozen=True)
class AttentionSpec:
    """The proven meaning of one attention site, with sizes at the example inputs."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: str = "float32"
    scale: float = 1.0
    causal: Causal = Causal.NONE
    window: int | None = None
    mask: MaskInput = MaskInput.NONE
    mask_shape: tuple[int, ...] | None = None  # 4-D, broadcastable to (B, H, M, N)
    softcap: float | None = None
    alibi: bool = False
    dynamic: frozenset[str] = field(default_factory=frozenset)  # e.g. {"batch", "q_len"}
    kind: Kind = Kind.SOFTMAX
    logit_bias: float = 0.0  # SIGMOID: added to every score before the sigmoid
    decay: bool = False  # LINEAR: per-head geometric decay operand
    normalize: bool = False  # LINEAR: divide by the row sum of the weights
    norm_eps: float = 0.0  # LINEAR: added to that row sum
    dropout_p: float = 0.0  # training-mode dropout on the weights (a fused variant draws its own mask)

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttentionSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"AttentionSpec.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if (self.mask is MaskInput.NONE) != (self.mask_shape is None):
            raise ValueError("mask_shape must be given exactly when a mask tensor is")
        if self.mask_shape is not None and len(self.mask_shape) != 4:
            raise ValueError(f"mask_shape must be 4-D, got {self.mask_shape}")
        self.mods  # validates scale/causal/window/softcap together
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.kind is not Kind.SIGMOID and self.logit_bias:
            raise ValueError("logit_bias is a sigmoid-attention field (a constant cancels in a softmax)")
        if self.kind is not Kind.LINEAR and (self.decay or self.normalize or self.norm_eps):
            raise ValueError("decay/normalize/norm_eps are linear-attention fields")
        if self.kind is Kind.LINEAR and (self.window is not None
                                         or any(t.present(self) and not t.linear for t in SCORE_TERMS)):
            raise ValueError("linear attention takes a causal band and a decay, no masks or score modifiers")

    @property
    def groups(self) -> int:
        """Query heads per K/V head (G): 1 for MHA, H for MQA."""
        return self.heads // self.kv_heads

    @property
    def is_decode(self) -> bool:
        return is_decode_shape(self.q_len, self.kv_len)

    @property
    def diagonal_hides_keys(self) -> bool:
        """`Causal.hides_keys` at this site's query length (a dynamic one is not fixed)."""
        return self.causal.hides_keys(None if "q_len" in self.dynamic else self.q_len)

    @property
    def element_size(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mods(self) -> ScoreMods:
        return ScoreMods(**{a.name: getattr(self, a.name) for a in SCORE_ARGS})

    def modifiers(self) -> tuple[str, ...]:
        """The optional score terms this site has: those a variant must say it takes."""
        return tuple(t.name for t in SCORE_TERMS if t.optional and t.present(self))

    def live_pairs(self) -> int:
        """(m, n) pairs per head that are not excluded by the causal/window structure."""
        if self.causal is Causal.NONE:
            return self.q_len * self.kv_len
        offset = self.causal.offset(self.q_len, self.kv_len)
        total = 0
        for m in range(self.q_len):
            hi = min(self.kv_len - 1, m + offset)
            lo = 0 if self.window is None else max(0, m + offset - self.window + 1)
            total += max(0, hi - lo + 1)
        return total

    def resized(self, q_len: int | None = None, kv_len: int | None = None) -> "AttentionSpec":
        """The same site at other lengths; mask dims that spanned the old lengths follow them."""
        q = self.q_len if q_len is None else q_len
        n = self.kv_len if kv_len is None else kv_len
        shape = self.mask_shape
        if shape is not None:
            b, h, m, k = shape
            shape = (b, h, q if m == self.q_len and m > 1 else m, n if k == self.kv_len and k > 1 else k)
        return replace(self, q_len=q, kv_len=n, mask_shape=shape)

    def describe(self) -> str:
        parts = [f"B={self.batch} H={self.heads}"]
        if self.kv_heads != self.heads:
            parts.append(f"Hkv={self.kv_heads}")
        parts.append(f"M={self.q_len} N={self.kv_len} E={self.head_dim}")
        if self.value_dim != self.head_dim:
            parts.append(f"F={self.value_dim}")
        parts.append(self.dtype)
        if self.kind is not Kind.SOFTMAX:
            parts.append(self.kind.value)
        parts.append(f"scale={self.scale:.6g}")
        if self.causal is not Causal.NONE:
            parts.append(f"causal={self.causal.value}")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.mask is not MaskInput.NONE:
            parts.append(f"mask={self.mask.value}{list(self.mask_shape or ())}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.alibi:
            parts.append("alibi")
        if self.logit_bias:
            parts.append(f"logit_bias={self.logit_bias:.6g}")
        if self.dropout_p:
            parts.append(f"dropout={self.dropout_p:g}")
        if self.decay:
            parts.append("decay")
        if self.normalize:
            parts.append("normalized" + (f"(eps={self.norm_eps:g})" if self.norm_eps else ""))
        return " ".join(parts)
