"""Decide, per site, which ONNX operator it becomes and why.

Opset >= 23 has the standard `Attention` operator, which takes every site: what it has no attribute
for (ALiBi slopes, key lengths, a sliding window, a bottom-right diagonal with M != N: its `is_causal`
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

from .onnx_sites import SiteFacts

STANDARD_ATTENTION_OPSET = 23
ATTENTION = "Attention"
MHA = "MultiHeadAttention"
GQA = "GroupQueryAttention"
DECOMPOSED = "decomposed"
FUSED_OPS = (ATTENTION, MHA, GQA)
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
    """The export of one site at `opset`."""
    if opset >= STANDARD_ATTENTION_OPSET:
        return _plan_standard(facts)
    return _plan_contrib(facts)


def _plan_standard(f: SiteFacts) -> SitePlan:
    flag = f.causal == "top_left" or (f.causal == "bottom_right" and f.same_length)
    why = [_heads(f), f"scale={f.scale:.4g}"]
    if flag:
        why.append("is_causal=1")
    elif f.causal != "none":
        why.append("bottom-right causal as mask (ONNX is_causal is top-left; M and N may differ)")
    if f.softcap:
        why.append(f"softcap={f.softcap:g}")
    why += _mask_parts(f)
    if f.window >= 0:
        why.append(f"window={f.window} as mask")
    return SitePlan(f, ATTENTION, flag, "; ".join(why))


def _plan_contrib(f: SiteFacts) -> SitePlan:
    if f.dtype not in CONTRIB_DTYPES:
        return SitePlan(f, DECOMPOSED, False, f"contrib attention ops take float32/float16, not {f.dtype}")
    causal_self = f.causal != "none" and f.same_length
    if (f.softcap or f.kv_heads != f.heads) and causal_self and f.head_dim == f.value_dim:
        why = [_heads(f), f"scale={f.scale:.4g}", "causal self-attention (M = N)"]
        if f.softcap:
            why.append(f"softcap={f.softcap:g}")
        if f.window >= 0:
            why.append(f"local_window_size={f.window}")
        return SitePlan(f, GQA, True, "; ".join(why + _mask_parts(f, via="attention_bias")))
    if f.softcap:
        return SitePlan(
            f, DECOMPOSED, False,
            "softcap: MultiHeadAttention has none and GroupQueryAttention takes causal self-attention "
            "(M = N) with E = F only",
        )
    why = [_heads(f), f"scale={f.scale:.4g}"]
    if f.kv_heads != f.heads:
        why.append(
            f"GroupQueryAttention needs causal self-attention with E = F, so K/V heads repeated "
            f"x{f.heads // f.kv_heads} for MultiHeadAttention"
        )
    if causal_self:
        why.append("unidirectional=1")
    elif f.causal != "none":
        why.append(f"{f.causal} causal as attention_bias (unidirectional is exact only when M = N)")
    if f.window >= 0:
        why.append(f"window={f.window} as attention_bias")
    return SitePlan(f, MHA, causal_self, "; ".join(why + _mask_parts(f, via="attention_bias")))


def _heads(f: SiteFacts) -> str:
    return f"heads={f.heads}" if f.heads == f.kv_heads else f"GQA heads={f.heads}/{f.kv_heads}"


def _mask_parts(f: SiteFacts, via: str = "mask") -> list[str]:
    parts = []
    if f.mask != "none":
        parts.append(f"{f.mask} mask" if via == "mask" else f"{f.mask} mask as {via}")
    if f.alibi:
        parts.append(f"ALiBi from slopes as {via}")
    if f.kv_lengths:
        parts.append(f"key lengths as {via}")
    return parts
