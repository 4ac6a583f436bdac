"""What the attention rule produces: a lifted site, or a refusal that says why not."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from torch.fx import Node

from attnfx.cost_model.spec import AttentionSpec, Causal, Kind

from .layout import Arranged, Contraction, Roles


class Reason(str, enum.Enum):
    """Why a softmax was not rewritten; stable codes for reports, tests and tooling."""

    LOG_SOFTMAX = "LOG_SOFTMAX"
    SOFTMAX_AXIS = "SOFTMAX_AXIS"
    PROBS_ESCAPE = "PROBS_ESCAPE"
    SCORES_ESCAPE = "SCORES_ESCAPE"
    MASK_AFTER_SOFTMAX = "MASK_AFTER_SOFTMAX"
    PROBS_MODIFIED = "PROBS_MODIFIED"
    SCALE_ON_VALUES = "SCALE_ON_VALUES"
    DROPOUT_TRAINING = "DROPOUT_TRAINING"
    NO_QK_CONTRACTION = "NO_QK_CONTRACTION"
    NO_AV_CONTRACTION = "NO_AV_CONTRACTION"
    PROBS_WRONG_AXIS = "PROBS_WRONG_AXIS"
    SCALE_NOT_SCALAR = "SCALE_NOT_SCALAR"
    SCORE_OP_UNSUPPORTED = "SCORE_OP_UNSUPPORTED"
    SCORE_ORDER = "SCORE_ORDER"
    UNPROVEN_MASK = "UNPROVEN_MASK"
    SCORE_DEPENDENT_MASK = "SCORE_DEPENDENT_MASK"
    VIEW_ON_SCORES = "VIEW_ON_SCORES"
    RANK_UNSUPPORTED = "RANK_UNSUPPORTED"
    DTYPE_UNSUPPORTED = "DTYPE_UNSUPPORTED"
    FEATURE_MAP_AFTER_PRODUCT = "FEATURE_MAP_AFTER_PRODUCT"
    DECAY_NOT_GEOMETRIC = "DECAY_NOT_GEOMETRIC"
    DECAY_TRAINED = "DECAY_TRAINED"
    NORMALIZER_AXIS = "NORMALIZER_AXIS"
    SOFTMAX_PRESENT = "SOFTMAX_PRESENT"
    NO_VARIANT = "NO_VARIANT"
    # why a bias term stays a dense tensor instead of ALiBi slopes (the site is still rewritten)
    ALIBI_NOT_LINEAR = "ALIBI_NOT_LINEAR"
    ALIBI_READS_DATA = "ALIBI_READS_DATA"
    ALIBI_SLOPE_AXIS = "ALIBI_SLOPE_AXIS"
    ALIBI_SHIFT_KEPT = "ALIBI_SHIFT_KEPT"
    ALIBI_SLOPES_NOT_FOUND = "ALIBI_SLOPES_NOT_FOUND"
    EAGER_FASTEST = "EAGER_FASTEST"
    VERIFICATION_FAILED = "VERIFICATION_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True)
class Refusal:
    """A falsy match result that carries its reason and the cascade stage that failed to lift."""

    code: Reason
    message: str
    stage: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.code.value} at {self.stage}: {self.message}"


@dataclass(frozen=True)
class MaskFacts:
    """What a site's keep-predicate was proven to be."""

    causal: Causal = Causal.NONE
    window: int | None = None
    key_padding: bool = False  # some conjunct reads data at (b, n) only
    unproven: tuple[str, ...] = ()  # conjuncts the proof could not place
    text: str = ""

    @property
    def structural(self) -> bool:
        """The whole mask is a causal/window band: a kernel flag can replace the tensor."""
        return not self.key_padding and not self.unproven and self.causal is not Causal.NONE


@dataclass(frozen=True)
class BiasTerm:
    """An additive tensor on the scores, times `coeff`; `roles` align its dims to the site's."""

    node: Node
    roles: Roles
    coeff: float = 1.0


@dataclass(frozen=True)
class Alibi:
    """A bias term proven to be ALiBi, and where its slopes are at run time."""

    term: BiasTerm
    source: Node | None  # the tensor holding the slopes (times term.coeff); None: `value`
    head_dim: int | None  # source's dim that indexes heads; None: one slope for every head
    value: float | None = None  # the slope, when the graph writes it as a number
    exact: bool = False  # the bias is slopes[h] * (n - m), with no per-row shift

    @property
    def text(self) -> str:
        where = f"{self.source.name}" if self.source is not None else f"the constant {self.value:g}"
        shift = "" if self.exact else " up to a constant per row, which the softmax cancels"
        return f"ALiBi: {self.term.node.name} is slopes[h] * (n - m){shift}; slopes read from {where}"


@dataclass(frozen=True)
class ScaleTerm:
    """A tensor the scores are multiplied (or divided) by, constant along the key axis, so it folds
    into q: one temperature per head (Swin V2's `logit_scale`), per query, or a run-time scalar."""

    node: Node
    roles: Roles
    divides: bool = False


@dataclass(frozen=True)
class MaskTerm:
    """A boolean tensor that excludes scores: kept where it equals `keep_when`."""

    node: Node
    roles: Roles
    keep_when: bool
    fill: float
    later_bias: int = 0  # bias terms from this index on were added after the mask: excluded scores
    # hold fill + those biases (fill + finfo.min overflows to -inf), which a lowering reproduces
    scaled_by: tuple[ScaleTerm, ...] = ()  # tensor scales applied after the mask: excluded scores
    # hold fill * those factors (-inf, or nan where a factor is 0), which the tensor lowering reproduces


@dataclass(frozen=True)
class Decay:
    """A linear site's per-head decay lambda (canonical heads H), proven from its decay mask:
    `values` when it is a number per head, else `exp_coeff`-free `source` (lambda = source) or
    lambda = exp(exp_coeff * source), `source` a tensor of the model holding one value per head."""

    values: tuple[float, ...] | None = None
    source: Node | None = None
    exp_coeff: float | None = None


@dataclass(frozen=True)
class Lowering:
    """One exact way to hand the site to a kernel: its spec and how to build the mask operand."""

    name: str  # "flag" (proven structure), "tensor" (mask as the model built it), "bias+flag", "key_keep"
    spec: AttentionSpec
    bias: tuple[BiasTerm, ...] = ()
    masks: tuple[MaskTerm, ...] = ()
    # "key_keep": the mask operand is the per-key keep mask (B|1, 1, 1, N) read from `masks` and
    # `bias` (all 0/exclusion terms), beside the proven causal/window flags; `fill` is the value
    # the model gives excluded scores, which decides rows that keep no key
    per_key: bool = False
    fill: float = -math.inf
    only: tuple[str, ...] = ()  # the variants that may take it (empty: any)
    alibi: Alibi | None = None  # the bias term passed as ALiBi slopes (with spec.alibi)


@dataclass
class Site:
    """One attention subgraph, lifted: canonical operands, score algebra and mask facts."""

    weights: Node  # the softmax or sigmoid that turns scores into weights
    qk: Contraction
    av: Contraction
    q: Arranged
    k: Arranged
    v: Arranged
    batch_roles: Roles
    out_roles: Roles
    scale: float
    scale_tensors: tuple[ScaleTerm, ...]  # folded into q
    softcap: float | None
    bias: tuple[BiasTerm, ...]
    masks: tuple[MaskTerm, ...]
    facts: MaskFacts
    structures: dict[Roles, tuple] = field(default_factory=dict)  # batch layouts -> sizes
    batch_sizes: tuple[int, ...] = ()  # canonical batch sizes at the example inputs
    dropout_p: float = 0.0  # training-mode dropout on the probabilities
    kind: Kind = Kind.SOFTMAX
    logit_bias: float = 0.0  # a sigmoid site's constant shift of every score
    decay: Decay | None = None  # a linear site's decay operand
    sink: BiasTerm | None = None  # a logit per row joining the softmax's normaliser only (attention sinks)
    lowerings: list[Lowering] = field(default_factory=list)
    alibi: Alibi | Refusal | None = None  # a bias term proven ALiBi, or why none is
    nodes: tuple[Node, ...] = ()  # the subgraph the rewrite replaces
