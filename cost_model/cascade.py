"""The einsum cascade: attention as a short list of named-index stages.

Every site attnfx lifts is printed, priced and checked in this one form (for softmax FuseMax's
Cascade 4, the 3-pass softmax as eager PyTorch computes it; sigmoid and linear weights likewise as
written). Dims: b batch, h K/V head, g query head within its
group, m query, n key, e q/k feature, f v feature; query head = h * G + g.

`Cascade.einsums` is the same cascade in the notation of `attnfx.cost_model.catalog`, so the pass
analysis that prices the catalog's algorithms prices the site as written too (the algorithms
whose cascade is `AS_WRITTEN`: the model's own code), and the report prints its passes.

`evaluate()` runs a cascade stage by stage in plain torch: it is the oracle that every rule and
every kernel is tested against.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from .einsums import EinsumCascade
from .pass_count import PassAnalysis, analyze
from .spec import SCORE_TERMS, AttentionSpec, Kind

AS_WRITTEN = "as written"  # an algorithm's cascade that is the site's own (see `Cascade.einsums`)
# the ranks of the tensors a cascade reads (b, h and g implicit)
_SOURCE_RANKS = {"Q": "m,e", "K": "n,e", "V": "n,f", "BIAS": "m,n", "MASK": "m,n", "SLOPES": "", "DECAY": ""}


@dataclass(frozen=True)
class Stage:
    """One einsum of the cascade: `output = op(inputs)` over the named dims."""

    output: str
    kind: str  # "contract" | "map" | "reduce"
    op: str  # e.g. "bhgme,bhne->bhgmn", "mul scale", "max over n"
    inputs: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.output} = {self.kind}[{self.op}]({', '.join(self.inputs)})"

    @property
    def ranks(self) -> str:
        """The ranks of the output: a row statistic, the output rows, or a score-shaped value."""
        if self.kind == "reduce":
            return "m"
        return "m,f" if self.output == "AV" else "m,n"

    @property
    def verb(self) -> str:
        return "contract" if self.kind == "contract" else re.match(r"[a-z]+", self.op).group()


@dataclass(frozen=True)
class Cascade:
    """A site's attention as stages over named dims; printable and executable."""

    spec: AttentionSpec
    stages: tuple[Stage, ...]
    sources: tuple[str, ...] = ()  # fx node names the cascade was lifted from

    @property
    def dims(self) -> dict[str, int]:
        s = self.spec
        return {"b": s.batch, "h": s.kv_heads, "g": s.groups, "m": s.q_len, "n": s.kv_len,
                "e": s.head_dim, "f": s.value_dim}

    @property
    def inputs(self) -> tuple[str, ...]:
        produced = {st.output for st in self.stages}
        seen: list[str] = []
        for st in self.stages:
            for name in st.inputs:
                if name not in produced and name not in seen:
                    seen.append(name)
        return tuple(seen)

    @property
    def einsums(self) -> EinsumCascade:
        """The cascade as catalog Einsums (`S[m,n] = mul(QK[m,n])`), for the pass analysis."""
        ranks = {**_SOURCE_RANKS, **{st.output: st.ranks for st in self.stages}}
        lines = tuple(f"{st.output}[{st.ranks}] = {st.verb}({', '.join(f'{i}[{ranks[i]}]' for i in st.inputs)})"
                      for st in self.stages)
        return _einsum_cascade(f"{self.spec.kind.value} {AS_WRITTEN}", lines)

    @property
    def passes(self) -> PassAnalysis:
        return _analysis(self.einsums)

    def __str__(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.dims.items())
        lines = [f"cascade({dims}; {self.spec.dtype})"]
        lines += [f"  {st}" for st in self.stages]
        lines.append(f"  {self.passes}")
        return "\n".join(lines)


@lru_cache(maxsize=256)
def _einsum_cascade(name: str, lines: tuple[str, ...]) -> EinsumCascade:
    return EinsumCascade.of(name, *lines)


@lru_cache(maxsize=256)
def _analysis(cascade: EinsumCascade) -> PassAnalysis:
    return analyze(cascade)


def canonical_cascade(spec: AttentionSpec, sources: tuple[str, ...] = ()) -> Cascade:
    """The cascade that computes `spec` exactly as the spec's docstring orders it: its score terms
    (spec.SCORE_TERMS), then the 3-pass softmax, sigmoid weights, or linear attention's weights as
    written (O(M N))."""
    st: list[Stage] = [Stage("QK", "contract", "bhgme,bhne->bhgmn", ("Q", "K"))]
    score = "QK"

    def add(output: str, kind: str, op: str, *extra: str) -> None:
        nonlocal score
        st.append(Stage(output, kind, op, (score, *extra)))
        score = output

    for term in SCORE_TERMS:
        if term.present(spec):
            add(term.stage, "map", term.op(spec), *term.inputs)
    if spec.kind is Kind.SOFTMAX:
        st.append(Stage("GM", "reduce", "max over n", (score,)))
        st.append(Stage("SN", "map", "exp(s - GM)", (score, "GM")))
        st.append(Stage("SD", "reduce", "sum over n", ("SN",)))
        st.append(Stage("A", "map", "div", ("SN", "SD")))
        score = "A"
    elif spec.kind is Kind.SIGMOID:
        add("SG", "map", f"sigmoid(s + {spec.logit_bias:.6g}), 0 where excluded")
    else:
        if spec.decay:
            add("SW", "map", "mul decay[h,g]^(m + offset - n)", "DECAY")
        if spec.normalize:
            st.append(Stage("RS", "reduce", f"sum over n + {spec.norm_eps:g}", (score,)))
            add("AN", "map", "div", "RS")
    st.append(Stage("AV", "contract", "bhgmn,bhnf->bhgmf", (score, "V")))
    return Cascade(spec=spec, stages=tuple(st), sources=sources)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes 2^(-8(h+1)/H) (Press et al.), with the paper's rule for
    head counts that are not powers of two."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(heads))
    slopes = powers(closest)
    if closest != heads:
        slopes += powers(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def evaluate(cascade: Cascade, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Run `cascade` on `tensors` (Q, K, V and BIAS/MASK/SLOPES/DECAY as its stages name them).

    Computes in `compute_dtype` (float64 by default: an oracle should not share the kernels'
    rounding) and returns (B, H, M, F) in the spec's dtype. Rows with no visible key give 0 for
    softmax and sigmoid; linear attention follows its formula (0 / norm_eps).
    """
    run = _Run(cascade.spec, tensors, compute_dtype)
    for stage in cascade.stages:
        x = run.values.get(stage.inputs[0]) if stage.inputs else None
        handler = _STAGES.get(stage.output)
        if handler is None:
            raise ValueError(f"evaluate() does not know stage {stage}")
        run.values[stage.output] = handler(run, x)
    s = cascade.spec
    return run.values["AV"].reshape(s.batch, s.heads, s.q_len, s.value_dim).to(s.torch_dtype)


class _Run:
    """One evaluation: the spec, its tensors in the compute dtype, the excluded pairs so far, the
    stage values."""

    def __init__(self, spec: AttentionSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.spec, self.tensors, self.dtype = spec, tensors, dtype
        self.shape5 = (spec.batch, spec.kv_heads, spec.groups, spec.q_len, spec.kv_len)  # (b, h, g, m, n)
        self.m_idx = torch.arange(spec.q_len).view(-1, 1)
        self.n_idx = torch.arange(spec.kv_len).view(1, -1)
        self.keep = torch.ones(self.shape5, dtype=torch.bool)
        self.values: dict[str, torch.Tensor] = {}
        self.masked: torch.Tensor | None = None

    def per_pair(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A (B|1, H|1, M|1, N|1) input as (b, h, g, m, n)."""
        b, hk, g, m, n = self.shape5
        return self.tensors[name].to(dtype).expand(b, hk * g, m, n).reshape(self.shape5)

    def per_head(self, name: str) -> torch.Tensor:
        """An (H,) input as (1, h, g, 1, 1)."""
        return self.tensors[name].to(self.dtype).view(1, self.shape5[1], self.shape5[2], 1, 1)

    def band(self) -> torch.Tensor:
        s = self.spec
        offset = s.causal.offset(s.q_len, s.kv_len)
        band = self.n_idx <= self.m_idx + offset
        if s.window is not None:
            band = band & (self.n_idx > self.m_idx + offset - s.window)
        return band

    def exclude(self, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.keep = self.keep & keep
        return x

    def qk(self, _) -> torch.Tensor:
        s = self.spec
        q = self.tensors["Q"].to(self.dtype).reshape(*self.shape5[:4], s.head_dim)  # (b, h, g, m, e)
        return torch.einsum("bhgme,bhne->bhgmn", q, self.tensors["K"].to(self.dtype))

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        band = self.band()
        return self.exclude(band, x.masked_fill(~band, 0.0) if self.spec.kind is Kind.LINEAR else x)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        self.masked = x.masked_fill(~self.keep, -math.inf)  # the scores SN exponentiates
        return self.masked.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(self.dtype).min)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        den = self.values["SD"]
        return torch.where(den > 0, x / den.clamp_min(torch.finfo(self.dtype).tiny), 0.0)

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        power = self.per_head("DECAY") ** (self.m_idx + s.causal.offset(s.q_len, s.kv_len) - self.n_idx).to(self.dtype)
        return torch.where(self.keep, x * power, x)  # NOTE: outside the band power can be inf where x is 0


_STAGES = {
    "QK": _Run.qk,
    **{term.stage: term.evaluate for term in SCORE_TERMS},
    "GM": _Run.max,
    "SN": lambda r, x: torch.exp(r.masked - r.values["GM"]),
    "SD": lambda r, x: x.sum(dim=-1, keepdim=True),
    "A": _Run.normalise,
    "SG": lambda r, x: torch.sigmoid(x.masked_fill(~r.keep, -math.inf) + r.spec.logit_bias),
    "SW": _Run.decay,
    "RS": lambda r, x: x.sum(dim=-1, keepdim=True) + r.spec.norm_eps,
    "AN": lambda r, x: x / r.values["RS"],
    "AV": lambda r, x: torch.einsum("bhgmn,bhnf->bhgmf", x, r.tensors["V"].to(r.dtype)),
}
