"""What every attnfx Triton launcher passes its kernel besides Q/K/V: the score modifications.

Kept free of triton imports: it turns a call's `ScoreTensors` and `ScoreMods` into the two bundles
`triton_scores.modify_scores` reads, `ScoreArgs` (runtime values) and `ScoreFlags` (compile-time
switches), so a kernel signature names each bundle once instead of their eighteen fields.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from attnfx.cost_model.spec import Causal, ScoreMods
from attnfx.errors import KernelUnavailable

from .attention_args import Dims, ScoreTensors, bias_4d, check_args, triton_refusal


class ScoreArgs(NamedTuple):
    """Runtime operands of the score modifications. Absent tensors are `q`, a pointer never read; a
    broadcast bias has stride 0 on its broadcast dims, so it is read in place."""

    bias: torch.Tensor
    bias_strides: tuple[int, int, int, int]  # (b, h, m, n)
    slopes: torch.Tensor
    kv_lengths: torch.Tensor
    scale: float
    softcap: float
    window: int
    offset: int  # key n is visible from query m when n <= m + offset
    logit_bias: float  # added before the sigmoid (sigmoid weights only)


class ScoreFlags(NamedTuple):
    """Which modifications a kernel is compiled with (a tl.constexpr)."""

    HAS_BIAS: bool
    BIAS_BOOL: bool
    HAS_ALIBI: bool
    HAS_SOFTCAP: bool
    CAUSAL: bool
    HAS_WINDOW: bool
    HAS_LENGTHS: bool


def checked_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, kernel: str) -> Dims:
    """Dims of a call a Triton kernel can take; KernelUnavailable naming the kernel and the reason otherwise."""
    dims = check_args(q, k, v, extras)
    reason = triton_refusal(q.dtype, dims.head_dim, dims.value_dim)
    if reason is not None:
        raise KernelUnavailable(f"attnfx {kernel} kernel: {reason}")
    return dims


def score_kwargs(q: torch.Tensor, dims: Dims, extras: ScoreTensors, mods: ScoreMods,
                 logit_bias: float = 0.0) -> dict[str, tuple]:
    """The kernel keyword arguments SC (ScoreArgs) and MODS (ScoreFlags) of one call."""
    d, bias = dims, extras.bias
    if bias is None:
        bias_t, strides = q, (0, 0, 0, 0)
    else:
        bias_t = bias_4d(bias)
        strides = bias_t.expand(d.batch, d.heads, d.q_len, d.kv_len).stride()
        if bias_t.dtype == torch.bool:
            bias_t = bias_t.view(torch.uint8)
    slopes, lengths = extras.alibi_slopes, extras.kv_lengths
    args = ScoreArgs(
        bias_t, tuple(strides),
        q if slopes is None else slopes.to(torch.float32).contiguous(),
        q if lengths is None else lengths.to(torch.int32).contiguous(),
        float(mods.scale), float(mods.softcap or 1.0), int(mods.window or 0), d.causal_offset(mods.causal),
        float(logit_bias),
    )
    flags = ScoreFlags(
        HAS_BIAS=bias is not None, BIAS_BOOL=bias is not None and bias.dtype == torch.bool,
        HAS_ALIBI=slopes is not None, HAS_SOFTCAP=mods.softcap is not None, CAUSAL=mods.causal is not Causal.NONE,
        HAS_WINDOW=mods.window is not None, HAS_LENGTHS=lengths is not None,
    )
    return dict(SC=args, MODS=flags)


def head_blocks(dims: Dims) -> tuple[int, int]:
    """Head dims padded to powers of two (>= 16 for tl.dot); the padding is masked on load."""
    return max(16, _next_pow2(dims.head_dim)), max(16, _next_pow2(dims.value_dim))


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()
