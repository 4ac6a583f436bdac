"""What every attnfx Triton launcher passes its kernel besides Q/K/V: the score modifications.

Kept free of triton imports: it only turns tensors and flags into the keyword arguments of
`triton_scores.modify_scores`'s callers, with strides hidden from the callers of the launchers.
"""
from __future__ import annotations

from typing import Any

import torch

from attnfx.errors import KernelUnavailable

from .attention_args import Dims, bias_4d, check_args, triton_refusal


def checked_dims(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    causal: str,
    window: int,
    softcap: float,
    kernel: str,
) -> Dims:
    """Dims of a call a Triton kernel can take; KernelUnavailable naming the kernel and the reason otherwise."""
    dims = check_args(q, k, v, bias, alibi_slopes, kv_lengths, causal, window, softcap)
    reason = triton_refusal(q.dtype, dims.head_dim, dims.value_dim)
    if reason is not None:
        raise KernelUnavailable(f"attnfx {kernel} kernel: {reason}")
    return dims


def score_kwargs(
    q: torch.Tensor,
    dims: Dims,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    scale: float,
    causal: str,
    window: int,
    softcap: float,
) -> dict[str, Any]:
    """Kernel keyword arguments for the bias/ALiBi/softcap/causal/window/padding modifications.

    Absent tensors are replaced by `q` as a never-read placeholder pointer; a broadcast bias gets
    stride 0 on its broadcast dims, so it is read in place.
    """
    d = dims
    if bias is None:
        bias_t, strides = q, (0, 0, 0, 0)
    else:
        bias_t = bias_4d(bias)
        strides = bias_t.expand(d.batch, d.heads, d.q_len, d.kv_len).stride()
        if bias_t.dtype == torch.bool:
            bias_t = bias_t.view(torch.uint8)
    return dict(
        Bias=bias_t, stride_bb=strides[0], stride_bh=strides[1], stride_bm=strides[2], stride_bn=strides[3],
        Slopes=q if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous(),
        KvLen=q if kv_lengths is None else kv_lengths.to(torch.int32).contiguous(),
        scale=float(scale), softcap=float(softcap) if softcap else 1.0, window=int(window),
        offset=d.causal_offset(causal),
        HAS_BIAS=bias is not None, BIAS_BOOL=bias is not None and bias.dtype == torch.bool,
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=bool(softcap), CAUSAL=causal != "none",
        HAS_WINDOW=window != -1, HAS_LENGTHS=kv_lengths is not None,
    )


def head_blocks(dims: Dims) -> tuple[int, int]:
    """Head dims padded to powers of two (>= 16 for tl.dot); the padding is masked on load."""
    return max(16, _next_pow2(dims.head_dim)), max(16, _next_pow2(dims.value_dim))


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()
