"""The attention grammar: every dimension a generated program varies along, as data.

A `Program` is one or two attention blocks; each `Block` records every choice drawn for it, so a
program prints, compares and reproduces from its fields alone. `draw_program` draws one through a
`Chooser` (hypothesis in CI, a seeded random generator by hand); options are listed simplest first.
A new attention kind (linear, sigmoid) is a new `kind` option with its own block fields and writer.
"""
from __future__ import annotations

from dataclasses import dataclass

from .choices import Chooser
from .mutations import MUTATIONS

H, D = 4, 8  # query heads, head dim
C = H * D
PAST = 3  # cached keys before the new ones in a KV-cache block
TABLE = 40  # reach of buffers and learned position tables (every drawn length stays below it)
WINDOW = 4
SQRT_D = D ** -0.5

PROJECTIONS = ("separate", "fused", "cross", "cache")
LAYOUTS = ("matmul", "einsum", "bmm", "baddbmm", "ellipsis")
QK_SPELLINGS = {"matmul": ("at", "matmul", "mT", "pre_transposed")}
GQA = ("repeat_kv", "repeat_interleave", "broadcast")
EINSUM_LETTERS = ("bhmndg", "thxpiu", "zyxwvu", "BHQKDG")
EINSUM_Q_LAYOUTS = ("bmhd", "bhmd")
EINSUM_SCORES = ("bhmn", "bmhn")
SOFTCAPS = (None, 20.0, 5.0)
SINKS = ("none", "per_head", "per_query")  # a learned logit column joining the keys (gpt-oss, StreamingLLM)
SOFTCAP_SPELLINGS = ("tanh_div", "method", "cap_first", "mul_inverse")
PLACEMENTS = ("scores", "q", "k", "none", "after_mask", "after_softcap")
SCALE_VALUES = (SQRT_D, 1.0, 0.3, 2.0, -0.5)
SCALE_FORMS = ("literal", "shape", "const0d", "buffer", "parameter", "attribute", "per_head")
EXCLUSIONS = {
    "causal": ("tril", "triu", "arange", "buffer", "buffer_4d", "full_triu"),
    "causal_br": ("triu_symbolic", "tril_symbolic", "arange_symbolic", "triu_literal", "cache_position"),
    "window": ("arange", "tril_triu", "outside"),
    "padding": ("eq0", "bool", "hf_additive", "hf_4d", "from_data"),
}
BIASES = {
    "alibi": ("relative", "bloom", "symmetric"),
    "relpos": ("table", "embedding"),
    "abspos": ("slice", "slice_4d"),
}
CACHE_ONLY = ("triu_literal", "cache_position")  # literal offsets equal N - M only with a fixed past
NOT_CACHE = ("from_data",)  # a mask computed from the keys' source has no entries for cached keys
DIRECT_ADDITIVE = ("full_triu", "hf_additive", "hf_4d")  # spellings that build an additive mask
FINITE_ONLY = ("hf_additive", "hf_4d")  # (1 - mask) * fill: 0 * -inf would be nan
FILLS = ("-inf", "finfo_min", "-1e9", "-1e4")
MASK_APPLY = ("masked_fill", "where", "additive", "additive_scaled")
BIAS_APPLY = ("add", "radd", "iadd")
EXPLICIT_SOFTMAX = ("F.softmax", "torch.softmax", "method", "module", "posdim")
HANDWRITTEN_SOFTMAX = ("hw_amax", "hw_max_values", "hw_max_indexed", "hw_logsumexp", "hw_nomax", "hw_detached")
UPCASTS = ("none", "float", "dtype_arg")
DROPOUTS = ("none", "module", "functional")
DTYPES = ("float32", "bfloat16")
EXAMPLE_SHAPES = ((2, 12, 9), (3, 7, 16))  # (batch, query length, memory length)
EDGE_SHAPES = ((1, 1, 1), (2, 1, 5), (1, 6, 1), (1, 2, 3))
KV_HEADS = (H, 2, 1)

# Every named choice and all its options (the draws below narrow and weight them).
DIMENSIONS: dict[str, tuple] = {
    "blocks": (1, 2), "dtype": DTYPES, "padding_side": ("right", "left"), "edge_shape": EDGE_SHAPES,
    "kind": ("positive", "near_miss"), "mutation": tuple(MUTATIONS), "projection": PROJECTIONS, "kv_heads": KV_HEADS,
    "layout": LAYOUTS, "gqa": ("none",) + GQA, "qk": ("default",) + QK_SPELLINGS["matmul"],
    "einsum.letters": EINSUM_LETTERS, "einsum.q_layout": EINSUM_Q_LAYOUTS, "einsum.scores": EINSUM_SCORES,
    "softcap": SOFTCAPS, "softcap.spelling": SOFTCAP_SPELLINGS, "sink": SINKS, "terms": (0, 1, 2), "term": (*EXCLUSIONS, *BIASES),
    **{f"{family}.spelling": spellings for family, spellings in {**EXCLUSIONS, **BIASES}.items()},
    "mask.apply": MASK_APPLY, "mask.fill": FILLS, "bias.apply": BIAS_APPLY, "scale.placement": PLACEMENTS,
    "scale.value": SCALE_VALUES, "scale.form": SCALE_FORMS, "scale.op": ("mul", "div"),
    "softmax": EXPLICIT_SOFTMAX + HANDWRITTEN_SOFTMAX, "upcast": UPCASTS, "dropout": DROPOUTS, "out_proj": (True, False),
}


@dataclass(frozen=True)
class Scale:
    placement: str  # see PLACEMENTS; "none": the scores are not scaled
    value: float = 1.0  # what the scores are multiplied by
    form: str = "literal"  # how the model holds the factor
    op: str = "mul"  # "div" divides by 1 / value


@dataclass(frozen=True)
class Term:
    """One mask or bias on the scores; `apply` and `fill` only for exclusion masks."""

    family: str
    spelling: str
    apply: str = "add"
    fill: str = ""

    @property
    def is_bias(self) -> bool:
        return self.family in BIASES

    @property
    def reads_key_mask(self) -> bool:
        """Whether the mask comes from the model's padding-mask input (else from the data itself)."""
        return self.family == "padding" and self.spelling != "from_data"


@dataclass(frozen=True)
class Einsum:
    letters: str  # the letters for roles b h m n d g, in that order
    q_layout: str
    scores: str


@dataclass(frozen=True)
class Block:
    mutation: str | None  # None: a positive (exact attention); else a near-miss from MUTATIONS
    projection: str
    kv_heads: int
    gqa: str  # "none" when kv_heads == H
    layout: str
    qk: str
    einsum: Einsum | None
    softcap: float | None
    softcap_spelling: str
    terms: tuple[Term, ...]
    scale: Scale
    sink: str  # see SINKS: concatenated to the scores before the softmax, its weight sliced off after
    softmax: str
    upcast: str
    dropout: str
    out_proj: bool

    @property
    def groups(self) -> int:
        return H // self.kv_heads

    @property
    def key_mask(self) -> str:
        """The model input holding this block's key padding (one per key length)."""
        return {"cross": "memory_mask", "cache": "cache_mask"}.get(self.projection, "attention_mask")

    @property
    def expected_sites(self) -> tuple[int, ...]:
        """How many report entries the block may have: one per softmax-like normalisation."""
        return MUTATIONS[self.mutation].sites if self.mutation else (1,)

    @property
    def handwritten(self) -> bool:
        return self.softmax in HANDWRITTEN_SOFTMAX


@dataclass(frozen=True)
class Program:
    blocks: tuple[Block, ...]
    dtype: str
    padding_side: str
    edge_shape: tuple[int, int, int]

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(batch, query length, memory length) for the example and the two checks after it."""
        return (*EXAMPLE_SHAPES, self.edge_shape)


def consistent(block: Block) -> bool:
    """Whether a block (edited, say by the shrinker) could have been drawn: the rules below, checked."""
    if block.layout in ("bmm", "baddbmm") and block.gqa == "broadcast":
        return False
    if (block.kv_heads == H) != (block.gqa == "none") or (block.layout == "einsum") != (block.einsum is not None):
        return False
    if block.scale.placement == "after_softcap" and not block.softcap:
        return False
    if block.scale.placement == "after_mask" and not block.terms:
        return False
    if block.scale.form == "per_head" and (block.scale.placement != "scores" or block.scale.value <= 0):
        return False
    if block.qk not in QK_SPELLINGS.get(block.layout, ("default",)):
        return False
    requires = MUTATIONS[block.mutation].requires if block.mutation else {}
    return all(getattr(block, name) in allowed for name, allowed in requires.items())


def draw_program(choose: Chooser) -> Program:
    blocks = tuple(draw_block(choose) for _ in range(choose("blocks", (1, 1, 2))))
    return Program(blocks=blocks, dtype=choose("dtype", DTYPES + ("float32",) * 3),
                   padding_side=choose("padding_side", ("right", "left")),
                   edge_shape=choose("edge_shape", EDGE_SHAPES))


def draw_block(choose: Chooser) -> Block:
    kind = choose("kind", ("positive", "positive", "near_miss"))
    mutation = choose("mutation", tuple(MUTATIONS)) if kind == "near_miss" else None
    with choose.require(MUTATIONS[mutation].requires if mutation else {}):
        return _draw_fields(choose, mutation)


def _draw_fields(choose: Chooser, mutation: str | None) -> Block:
    projection = choose("projection", PROJECTIONS)
    kv_heads = choose("kv_heads", KV_HEADS)
    layout = choose("layout", LAYOUTS)
    gqa_options = GQA if layout not in ("bmm", "baddbmm") else GQA[:2]
    gqa = choose("gqa", gqa_options) if kv_heads < H else choose("gqa", ("none",))
    einsum = None
    if layout == "einsum":
        einsum = Einsum(choose("einsum.letters", EINSUM_LETTERS), choose("einsum.q_layout", EINSUM_Q_LAYOUTS),
                        choose("einsum.scores", EINSUM_SCORES))
    qk = choose("qk", QK_SPELLINGS.get(layout, ("default",)))
    softcap = choose("softcap", SOFTCAPS)
    softcap_spelling = choose("softcap.spelling", SOFTCAP_SPELLINGS) if softcap else ""
    terms = _draw_terms(choose, projection)
    scale = _draw_scale(choose, softcap is not None, bool(terms))
    sink = choose("sink", ("none",) * 4 + SINKS[1:])
    softmax = choose("softmax", EXPLICIT_SOFTMAX * 3 + HANDWRITTEN_SOFTMAX)
    upcasts = UPCASTS if softmax in EXPLICIT_SOFTMAX and softmax != "module" else UPCASTS[:2]
    return Block(mutation=mutation, projection=projection, kv_heads=kv_heads, gqa=gqa, layout=layout, qk=qk,
                 einsum=einsum, softcap=softcap, softcap_spelling=softcap_spelling, terms=terms, scale=scale, sink=sink,
                 softmax=softmax, upcast=choose("upcast", upcasts), dropout=choose("dropout", DROPOUTS),
                 out_proj=choose("out_proj", (True, False)))


def _draw_terms(choose: Chooser, projection: str) -> tuple[Term, ...]:
    terms: list[Term] = []
    for _ in range(choose("terms", (0, 1, 2))):
        taken = {t.family for t in terms}
        banded = {"causal", "causal_br", "window"}
        families = [f for f in (*EXCLUSIONS, *BIASES) if f not in taken and not (f in banded and taken & banded)]
        family = choose("term", tuple(families))
        if family in BIASES:
            terms.append(Term(family, choose(f"{family}.spelling", BIASES[family]), choose("bias.apply", BIAS_APPLY)))
            continue
        spellings = tuple(s for s in EXCLUSIONS[family]
                          if s not in (NOT_CACHE if projection == "cache" else CACHE_ONLY))
        spelling = choose(f"{family}.spelling", spellings)
        apply = "direct" if spelling in DIRECT_ADDITIVE else choose("mask.apply", MASK_APPLY)
        finite = spelling in FINITE_ONLY or apply == "additive_scaled"
        terms.append(Term(family, spelling, apply, choose("mask.fill", FILLS[1:] if finite else FILLS)))
    return tuple(terms)


def _draw_scale(choose: Chooser, softcapped: bool, masked: bool) -> Scale:
    placements = [p for p in PLACEMENTS if (p != "after_softcap" or softcapped) and (p != "after_mask" or masked)]
    placement = choose("scale.placement", tuple(placements))
    if placement == "none":
        return Scale("none")
    values = SCALE_VALUES if placement in ("scores", "q", "k") else SCALE_VALUES[:-1]
    value = choose("scale.value", values)
    forms = tuple(f for f in SCALE_FORMS if (f != "shape" or value == SQRT_D)
                  and (f != "per_head" or (placement == "scores" and value > 0)))
    return Scale(placement, value, choose("scale.form", forms), choose("scale.op", ("mul", "div")))
