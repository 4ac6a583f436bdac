"""Near-miss mutations: programs that look like attention but are not exact softmax attention.

Each must be left as written (never REWRITTEN) and, when reported, carry one of `codes` (empty: any
documented code). A mutation is data: what it requires of the rest of the block, how many
softmax-like sites the block then has, and hooks that the block writer calls at fixed points
(values, score ops, normalisation, probabilities, AV). Generated source may use the constants the
program header defines (H, D, C, PAST, TABLE, W).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

Hook = Callable[..., Any]
EXPLICIT = ("F.softmax", "torch.softmax", "method", "module", "posdim")
PLAIN_HEADS = {"layout": ("matmul", "einsum", "ellipsis"), "gqa": ("none", "repeat_kv", "repeat_interleave")}
SOFTCAPPED = {"softcap": (20.0, 5.0)}


@dataclass(frozen=True)
class Mutation:
    codes: frozenset[str]
    requires: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    sites: tuple[int, ...] = (1,)
    values: Hook | None = None  # (w) -> None, on v in (b, n, kv, d)
    scores: Hook | None = None  # (w, ops) -> None, edits the list of score ops
    softmax: Mapping[str, Any] = field(default_factory=dict)  # write_softmax arguments
    normalise: Hook | None = None  # (w) -> p: replaces the softmax
    probs: Hook | None = None  # (w, p) -> p
    transposed_av: bool = False
    sink_slice: str = "[..., :-1]"  # how a block with a sink drops the sink's weight after the softmax


def _future(w) -> str:
    """A top-left causal exclusion (m, n), aligned to the scores."""
    name = w.fresh("future")
    w.line(f"{name} = torch.ones(m, n, dtype=torch.bool, device=x.device).triu(1)  # (m, n) excluded")
    return w.align(name, "mn")


def _last(op: Callable) -> Hook:
    return lambda w, ops: ops.append(("mutation", op))


def _first(op: Callable) -> Hook:
    return lambda w, ops: ops.insert(0, ("mutation", op))


def _before_softcap(op: Callable) -> Hook:
    def insert(w, ops) -> None:
        ops.insert(next(i for i, (label, _) in enumerate(ops) if label == "softcap"), ("mutation", op))
    return insert


def _return_probs(w, p: str) -> str:
    w.extras.append(p)
    return p


def _renormalise(w, p: str) -> str:
    w.line(f"p = {p} / ({p}.sum(dim={w.dim('n')}, keepdim=True) + 1e-6)")
    return "p"


def _scale_probs(w, p: str) -> str:
    w.init("self.gate = nn.Parameter(torch.rand(H, 1, 1) + 0.5)")
    w.line(f"p = {p} * {w.align('self.gate', 'hmn')}")
    return "p"


def _mask_probs(w, p: str) -> str:
    w.line(f"p = {p}.masked_fill({_future(w)}, 0.0)")
    return "p"


def _key_temperature(w) -> None:
    w.init("self.key_temperature = nn.Parameter(torch.rand(TABLE) + 0.5)")
    w.line(f"s = s * {w.align('self.key_temperature[:n]', 'n')}  # one temperature per key: not q-foldable")


def _early_bias(w) -> None:
    w.init("self.early_bias = nn.Parameter(torch.randn(H, TABLE, TABLE) * 0.5)")
    w.line(f"s = s + {w.align('self.early_bias[:, :m, :n]', 'hmn')}")


def _multiplicative(w) -> None:
    w.line("keep = torch.ones(m, n, dtype=torch.bool, device=x.device).tril()")
    w.line(f"s = s * {w.align('keep.to(s.dtype)', 'mn')}")


def _return_scores(w) -> None:
    w.line("scores = s")
    w.extras.append("scores")


def _sigmoid_renormalised(w) -> str:
    """A sigmoid alone is sigmoid attention (rewritten); divided by its row sum it is not."""
    w.line("p = torch.sigmoid(s)")
    w.line(f"p = p / p.sum(dim={w.dim('n')}, keepdim=True)")
    return "p"


def _relu_normalised(w) -> str:
    w.line("p = F.relu(s)")
    w.line(f"p = p / (p.sum(dim={w.dim('n')}, keepdim=True) + 1e-6)")
    return "p"


def _value_row_for_sink(w) -> None:
    w.line("v = torch.cat([v, torch.ones_like(v[:, :1])], dim=1)  # a value row that the sink's weight weighs")


def _codes(*codes: str) -> frozenset[str]:
    return frozenset(codes)


MUTATIONS: dict[str, Mutation] = {
    "softmax_queries": Mutation(_codes("SOFTMAX_AXIS"), softmax={"key_role": "m", "max_role": "m"}),
    "softmax_heads": Mutation(_codes("SOFTMAX_AXIS"), PLAIN_HEADS, softmax={"key_role": "h", "max_role": "h"}),
    "mask_after_softmax": Mutation(_codes("MASK_AFTER_SOFTMAX"), probs=_mask_probs),
    "probs_scaled": Mutation(_codes("PROBS_MODIFIED"), probs=_scale_probs),
    "probs_returned": Mutation(_codes("PROBS_ESCAPE"), probs=_return_probs),
    "probs_renormalised": Mutation(_codes("PROBS_ESCAPE", "PROBS_MODIFIED"), probs=_renormalise),
    "key_temperature": Mutation(_codes("SCALE_NOT_SCALAR"), scores=_first(_key_temperature)),
    "log_softmax": Mutation(_codes("LOG_SOFTMAX"), {"softmax": EXPLICIT}, softmax={"log": True}),
    "topk_mask": Mutation(_codes("SCORE_DEPENDENT_MASK"), scores=_last(
        lambda w: w.line(f"s = s.masked_fill(s < s.topk(1, dim={w.dim('n')}).values, float('-inf'))"))),
    "threshold_mask": Mutation(_codes("SCORE_DEPENDENT_MASK"), scores=_last(
        lambda w: w.line(f"s = s.masked_fill(s < s.mean(dim={w.dim('n')}, keepdim=True), float('-inf'))"))),
    "sigmoid_renormalised": Mutation(_codes("PROBS_ESCAPE", "PROBS_MODIFIED"), {"softmax": ("F.softmax",),
                                     "upcast": ("none",)}, sites=(0, 1), normalise=_sigmoid_renormalised),
    "relu_normalised": Mutation(_codes("FEATURE_MAP_AFTER_PRODUCT"), {"softmax": ("F.softmax",), "upcast": ("none",)},
                                sites=(0, 1),  # the linear rule lists it when it reads a map after QK
                                normalise=_relu_normalised),
    "relu_scores": Mutation(_codes("SCORE_OP_UNSUPPORTED"), scores=_last(lambda w: w.line("s = F.relu(s)"))),
    "zero_fill": Mutation(_codes("UNPROVEN_MASK"), scores=_last(
        lambda w: w.line(f"s = s.masked_fill({_future(w)}, 0.0)"))),
    "scale_on_values": Mutation(_codes("SCALE_ON_VALUES"), values=lambda w: w.line("v = v * 0.5")),
    "mask_before_softcap": Mutation(_codes("SCORE_ORDER"), SOFTCAPPED, scores=_before_softcap(
        lambda w: w.line(f"s = s.masked_fill({_future(w)}, float('-inf'))"))),
    "bias_before_softcap": Mutation(_codes("SCORE_ORDER"), SOFTCAPPED, scores=_before_softcap(_early_bias)),
    "scores_returned": Mutation(_codes("SCORES_ESCAPE"), scores=_last(_return_scores)),
    "multiplicative_mask": Mutation(_codes("SCALE_NOT_SCALAR"), scores=_last(_multiplicative)),
    "probs_transposed_av": Mutation(_codes("PROBS_WRONG_AXIS"), {"projection": ("separate", "fused"),
                                    "layout": ("matmul",), "gqa": PLAIN_HEADS["gqa"]}, transposed_av=True),
    "sink_not_sliced": Mutation(_codes("SCORE_OP_UNSUPPORTED"), {"sink": ("per_head", "per_query"),
                                "layout": ("matmul", "ellipsis"), "gqa": ("none", "repeat_interleave", "broadcast")},
                                values=_value_row_for_sink, sink_slice=""),
    "sink_sliced_first": Mutation(_codes("NO_AV_CONTRACTION"), {"sink": ("per_head", "per_query")},
                                  sink_slice="[..., 1:]"),
    "wrong_max_axis": Mutation(_codes(), {"softmax": ("hw_amax", "hw_max_values", "hw_max_indexed", "hw_detached")},
                               sites=(0, 1), softmax={"max_role": "m"}),
}
