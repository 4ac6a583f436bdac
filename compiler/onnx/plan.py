"""Decide, per site, which ONNX operator it becomes and why.

Opset >= 23 has the standard `Attention` operator, which takes every site: what it has no attribute
for (ALiBi slopes, a sliding window, a bottom-right diagonal with M != N: its `is_causal`
is top-left without a KV cache) goes into its mask input, built in the graph.

Below 23 the choice is onnxruntime's com.microsoft contrib ops, used only where they are exact:
  GroupQueryAttention  causal self-attention only (M = N, E = F); takes GQA, softcap, window, bias.
  MultiHeadAttention   one K/V head per query head (GQA sites get K/V heads repeated); no softcap;
                       its `unidirectional` flag is top-left only when M = N (checked on ORT 1.31).
What neither expresses (softcap outside causal self-attention, dtypes other than fp32/fp16) is
emitted as the decomposed MatMul/Softmax subgraph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnfx.cost_model.spec import Causal, Kind, MaskInput
from attnfx.errors import ExportError

from .sites import SiteFacts

STANDARD_ATTENTION_OPSET = 23
ATTENTION = "Attention"
MHA = "MultiHeadAttention"
GQA = "GroupQueryAttention"
DECOMPOSED = "decomposed"
FUSED_OPS = (ATTENTION, MHA, GQA)
LOWERED = ("softcap", "alibi")  # the optional score terms (spec.SCORE_TERMS) lowering.py computes
CONTRIB_DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class SitePlan:
    """What one site becomes: `op`, whether its causal diagonal uses the op's own flag, and why."""

    facts: SiteFacts
    op: str
    causal_flag: bool  # the op's causal flag/semantics carry the diagonal; else it goes into the mask
    why: str

    @property
    def fused(self) -> bool:
        return self.op in FUSED_OPS


def plan_site(facts: SiteFacts, opset: int) -> SitePlan:
    """The export of one site at `opset`; ExportError for a site no ONNX operator computes."""
    if facts.spec.kind is not Kind.SOFTMAX:
        raise ExportError(
            f"{facts.label} ({facts.module or '<root>'}, {facts.op}): {facts.spec.kind.value} attention has no "
            "ONNX operator (Attention and onnxruntime's contrib attention ops normalise with a softmax)"
        )
    unlowered = [name for name in facts.spec.modifiers() if name not in LOWERED]
    if unlowered:
        raise ExportError(f"{facts.label} ({facts.module or '<root>'}, {facts.op}): attnfx's ONNX lowering has no "
                          f"{unlowered[0]}")
    if opset >= STANDARD_ATTENTION_OPSET:
        return _plan_standard(facts)
    return _plan_contrib(facts)


def _plan_standard(f: SiteFacts) -> SitePlan:
    s = f.spec
    flag = s.causal is Causal.TOP_LEFT or (s.causal is Causal.BOTTOM_RIGHT and f.same_length)
    why = [_heads(f), f"scale={s.scale:.4g}"]
    if flag:
        why.append("is_causal=1")
    elif s.causal is not Causal.NONE:
        why.append("bottom-right causal as mask (ONNX is_causal is top-left; M and N may differ)")
    if s.softcap:
        why.append(f"softcap={s.softcap:g}")
    why += _mask_parts(f)
    if s.window is not None:
        why.append(f"window={s.window} as mask")
    return SitePlan(f, ATTENTION, flag, "; ".join(why))


def _plan_contrib(f: SiteFacts) -> SitePlan:
    s = f.spec
    if s.torch_dtype not in CONTRIB_DTYPES:
        return SitePlan(f, DECOMPOSED, False, f"contrib attention ops take float32/float16, not {s.torch_dtype}")
    causal_self = s.causal is not Causal.NONE and f.same_length
    if (s.softcap or s.groups > 1) and causal_self and s.head_dim == s.value_dim:
        why = [_heads(f), f"scale={s.scale:.4g}", "causal self-attention (M = N)"]
        if s.softcap:
            why.append(f"softcap={s.softcap:g}")
        if s.window is not None:
            why.append(f"local_window_size={s.window}")
        return SitePlan(f, GQA, True, "; ".join(why + _mask_parts(f, via="attention_bias")))
    if s.softcap:
        return SitePlan(
            f, DECOMPOSED, False,
            "softcap: MultiHeadAttention has none and GroupQueryAttention takes causal self-attention "
            "(M = N) with E = F only",
        )
    why = [_heads(f), f"scale={s.scale:.4g}"]
    if s.groups > 1:
        why.append(
            f"GroupQueryAttention needs causal self-attention with E = F, so K/V heads repeated "
            f"x{s.groups} for MultiHeadAttention"
        )
    if causal_self:
        why.append("unidirectional=1")
    elif s.causal is not Causal.NONE:
        why.append(f"{s.causal.value} causal as attention_bias (unidirectional is exact only when M = N)")
    if s.window is not None:
        why.append(f"window={s.window} as attention_bias")
    return SitePlan(f, MHA, causal_self, "; ".join(why + _mask_parts(f, via="attention_bias")))


def _heads(f: SiteFacts) -> str:
    s = f.spec
    return f"heads={s.heads}" if s.groups == 1 else f"GQA heads={s.heads}/{s.kv_heads}"


def _mask_parts(f: SiteFacts, via: str = "mask") -> list[str]:
    s = f.spec
    parts = []
    if s.mask is not MaskInput.NONE:
        parts.append(f"{s.mask.value} mask" if via == "mask" else f"{s.mask.value} mask as {via}")
    if s.alibi:
        parts.append(f"ALiBi from slopes as {via}")
    return parts
