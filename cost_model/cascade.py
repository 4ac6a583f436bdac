"""The einsum cascade: attention as a short list of named-index stages.

Every site attnfx lifts is printed, priced and checked in this one form (for softmax FuseMax's
Cascade 4, the 3-pass softmax as eager PyTorch computes it; sigmoid and linear weights likewise as
written). Dims: b batch, h K/V head, g query head within its
group, m query, n key, e q/k feature, f v feature; query head = h * G + g.

`evaluate()` runs a cascade stage by stage in plain torch: it is the oracle that every rule and
every kernel is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import AttentionSpec, Causal, Kind, MaskInput


@dataclass(frozen=True)
class Stage:
    """One einsum of the cascade: `output = op(inputs)` over the named dims."""

    output: str
    kind: str  # "contract" | "map" | "reduce"
    op: str  # e.g. "bhgme,bhne->bhgmn", "mul scale", "max over n"
    inputs: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.output} = {self.kind}[{self.op}]({', '.join(self.inputs)})"


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

    def __str__(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.dims.items())
        lines = [f"cascade({dims}; {self.spec.dtype})"]
        lines += [f"  {st}" for st in self.stages]
        return "\n".join(lines)


def canonical_cascade(spec: AttentionSpec, sources: tuple[str, ...] = ()) -> Cascade:
    """The cascade that computes `spec` exactly as the spec's docstring orders it: the 3-pass
    softmax, sigmoid weights, or linear attention's weights as written (O(M N))."""
    st: list[Stage] = [Stage("QK", "contract", "bhgme,bhne->bhgmn", ("Q", "K"))]
    score = "QK"

    def add(output: str, kind: str, op: str, *extra: str) -> None:
        nonlocal score
        st.append(Stage(output, kind, op, (score, *extra)))
        score = output

    if spec.scale != 1.0:
        add("S", "map", f"mul {spec.scale:.6g}")
    if spec.softcap is not None:
        add("SC", "map", f"softcap {spec.softcap:g}")
    if spec.mask is MaskInput.ADDITIVE:
        add("SB", "map", "add bhgmn", "BIAS")
    if spec.alibi:
        add("SA", "map", "add slopes[h,g]*(n-m)", "SLOPES")
    if spec.mask is MaskInput.BOOL:
        add("SM", "map", "keep where mask", "MASK")
    if spec.causal is not Causal.NONE:
        rule = "n <= m" if spec.causal is Causal.TOP_LEFT else "n <= m + N - M"
        if spec.window is not None:
            rule += f" and n > m{'' if spec.causal is Causal.TOP_LEFT else ' + N - M'} - {spec.window}"
        add("SF", "map", f"{'zero outside' if spec.kind is Kind.LINEAR else 'filter'} {rule}")
    if spec.key_padding:
        add("SP", "map", "filter n < kv_lengths[b]", "KV_LENGTHS")
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
    """Run `cascade` on `tensors` (Q, K, V and BIAS/MASK/SLOPES/KV_LENGTHS/DECAY as its stages name them).

    Computes in `compute_dtype` (float64 by default: an oracle should not share the kernels'
    rounding) and returns (B, H, M, F) in the spec's dtype. Rows with no visible key give 0 for
    softmax and sigmoid; linear attention follows its formula (0 / norm_eps).
    """
    s = cascade.spec
    b, hk, g, m, n = s.batch, s.kv_heads, s.groups, s.q_len, s.kv_len
    q = tensors["Q"].to(compute_dtype).reshape(b, hk, g, m, s.head_dim)  # (b, h, g, m, e)
    k = tensors["K"].to(compute_dtype)  # (b, h, n, e)
    v = tensors["V"].to(compute_dtype)  # (b, h, n, f)
    m_idx = torch.arange(m).view(m, 1)
    n_idx = torch.arange(n).view(1, n)
    keep = torch.ones(b, hk, g, m, n, dtype=torch.bool)
    values: dict[str, torch.Tensor] = {}
    for stage in cascade.stages:
        x = values.get(stage.inputs[0]) if stage.inputs else None
        if stage.output == "QK":
            out = torch.einsum("bhgme,bhne->bhgmn", q, k)
        elif stage.op.startswith("mul ") and stage.output == "S":
            out = x * s.scale
        elif stage.op.startswith("softcap"):
            out = s.softcap * torch.tanh(x / s.softcap)
        elif stage.output == "SB":
            bias = tensors["BIAS"].to(compute_dtype).expand(b, s.heads, m, n)
            out = x + bias.reshape(b, hk, g, m, n)
        elif stage.output == "SA":
            slopes = tensors["SLOPES"].to(compute_dtype).view(1, hk, g, 1, 1)
            out = x + slopes * (n_idx - m_idx).to(compute_dtype)
        elif stage.output == "SM":
            mask = tensors["MASK"].to(torch.bool).expand(b, s.heads, m, n)
            keep = keep & mask.reshape(b, hk, g, m, n)
            out = x
        elif stage.output == "SF":
            offset = s.causal.offset(m, n)
            band = n_idx <= m_idx + offset
            if s.window is not None:
                band = band & (n_idx > m_idx + offset - s.window)
            keep = keep & band
            out = x.masked_fill(~band, 0.0) if s.kind is Kind.LINEAR else x
        elif stage.output == "SP":
            lengths = tensors["KV_LENGTHS"].view(b, 1, 1, 1, 1)
            keep = keep & (n_idx < lengths)
            out = x
        elif stage.output == "GM":
            x = x.masked_fill(~keep, -math.inf)
            values[stage.inputs[0]] = x
            out = x.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(compute_dtype).min)
        elif stage.output == "SN":
            out = torch.exp(x - values["GM"])
        elif stage.output == "SD":
            out = x.sum(dim=-1, keepdim=True)
        elif stage.output == "A":
            den = values["SD"]
            out = torch.where(den > 0, x / den.clamp_min(torch.finfo(compute_dtype).tiny), 0.0)
        elif stage.output == "SG":
            out = torch.sigmoid(x.masked_fill(~keep, -math.inf) + s.logit_bias)
        elif stage.output == "SW":
            decay = tensors["DECAY"].to(compute_dtype).view(1, hk, g, 1, 1)
            power = decay ** (m_idx + s.causal.offset(m, n) - n_idx).to(compute_dtype)
            out = torch.where(keep, x * power, x)  # NOTE: outside the band power can be inf, x is 0
        elif stage.output == "RS":
            out = x.sum(dim=-1, keepdim=True) + s.norm_eps
        elif stage.output == "AN":
            out = x / values["RS"]
        elif stage.output == "AV":
            out = torch.einsum("bhgmn,bhnf->bhgmf", x, v)
        else:
            raise ValueError(f"evaluate() does not know stage {stage}")
        values[stage.output] = out
    result = values["AV"].reshape(b, s.heads, m, s.value_dim)
    return result.to(getattr(torch, s.dtype))
