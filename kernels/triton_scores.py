"""The score modifications every attnfx Triton kernel applies, in AttentionSpec's order.

One jitted function, shared by the forward, backward and decode kernels, so the three can never
disagree on what a mask means. Imported only by the Triton launchers (never by `attnfx.kernels`).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

@triton.jit
def tanh(x):
    """tanh through the sigmoid (tl has no tanh that also runs in the interpreter)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST widens bf16 operands to fp32 first: Triton's
    interpreter multiplies bf16 bit patterns (triton-lang/triton#11584), and bf16 products are
    exact in fp32, so the numbers are those of a bf16 MMA."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def modify_scores(
    qk, pos_m, row_ok, offs_n, stop_n, bias_rows, stride_bn, slope, kv_len,
    scale, softcap, window, offset,
    HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LENGTHS: tl.constexpr,
):
    """Scores (rows, cols) in natural units from raw dots `qk`, -inf wherever a key is not visible.

    pos_m: query position per row; row_ok: rows that exist; offs_n: key positions; keys at or past
    stop_n do not exist; bias_rows: per-row bias pointers (column stride stride_bn); slope: per-row
    ALiBi slope.
    """
    s = qk * scale
    if HAS_SOFTCAP:
        s = softcap * tanh(s / softcap)
    keep = row_ok[:, None] & (offs_n < stop_n)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_rows[:, None] + offs_n[None, :] * stride_bn, mask=keep, other=0)
        if BIAS_BOOL:
            keep = keep & (b != 0)
        else:
            s = s + b.to(tl.float32)
    if HAS_ALIBI:
        s = s + slope[:, None] * (offs_n[None, :] - pos_m[:, None]).to(tl.float32)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= pos_m[:, None] + offset)
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] > pos_m[:, None] + offset - window)
    if HAS_LENGTHS:
        keep = keep & (offs_n[None, :] < kv_len)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def softcap_grad(qk, scale, softcap):
    """d(softcap * tanh(x / softcap)) / dx at x = scale * qk."""
    t = tanh(qk * scale / softcap)
    return 1.0 - t * t


INTERPRETED = isinstance(mma, InterpretedFunction)


def dot_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """`mma`'s flags for a kernel whose dots take `dtype` operands: fp32 gets IEEE dots (an fp32
    model must not silently drop to TF32); bf16 is widened only under the interpreter."""
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST_DOTS=INTERPRETED and dtype == torch.bfloat16)
