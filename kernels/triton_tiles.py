"""The small jitted helpers attnfx's Triton kernels share: tile pointers and loads, dots, the
program's query block, and the weights with their gradient (softmax or sigmoid). The score terms
they apply live in score_mods.py. Imported only by the Triton launchers (never by `attnfx.kernels`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


class DotFlags(NamedTuple):
    """`mma`'s compile-time flags (a tl.constexpr)."""

    PRECISION: str
    UPCAST: bool


@triton.jit
def mma(a, b, DOTS: tl.constexpr):
    """tl.dot with fp32 accumulation. DOTS.UPCAST widens bf16 operands to fp32 first: Triton's
    interpreter multiplies bf16 bit patterns (triton-lang/triton#11584), and bf16 products are
    exact in fp32, so the numbers are those of a bf16 MMA."""
    if DOTS.UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOTS.PRECISION)


@triton.jit
def query_block(H, G, M, BLOCK_M: tl.constexpr):
    """(b, h, K/V head, first row, rows, rows that exist) of a program over (query block, batch * query head)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return b, h, h // G, start_m, offs_m, offs_m < M


@triton.jit
def tile(base, strides, b, h, rows, cols):
    """Pointers to x[b, h, rows, cols] (rows down, cols across) of a 4-D tensor with `strides`."""
    return base + b * strides[0] + h * strides[1] + rows[:, None] * strides[2] + cols[None, :] * strides[3]


@triton.jit
def load_tile(base, strides, b, h, rows, cols, rows_ok, n_cols):
    """x[b, h, rows, cols], 0 in rows that do not exist and at cols >= n_cols (head-dim padding)."""
    return tl.load(tile(base, strides, b, h, rows, cols), mask=rows_ok[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def tile_t(base, strides, b, h, rows, cols):
    """Pointers to x[b, h, rows, cols] transposed: cols down, rows across."""
    return base + b * strides[0] + h * strides[1] + rows[None, :] * strides[2] + cols[:, None] * strides[3]


@triton.jit
def row_stats(Lse, Delta, base, offs_m, row_ok, SIGMOID: tl.constexpr):
    """The softmax backward's per-row (lse, delta) (+inf lse past the last row: p = 0); sigmoid
    weights read none."""
    if SIGMOID:
        lse = tl.zeros(offs_m.shape, dtype=tl.float32)
        delta = lse
    else:
        lse = tl.load(Lse + base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + base + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def weights_and_grad(s, dp, lse, delta, SC, SIGMOID: tl.constexpr):
    """Recomputed weights p and d loss / d scores from d loss / d weights `dp`: sigmoid(s + logit_bias)
    with ds = dp p (1 - p), or exp(s - lse) with ds = p (dp - delta), delta = rowsum(dO O) - dLSE."""
    if SIGMOID:
        p = tl.sigmoid(s + SC.logit_bias)
        ds = dp * p * (1.0 - p)
    else:
        p = tl.exp(s - lse[:, None])
        ds = p * (dp - delta[:, None])
    return p, ds


INTERPRETED = isinstance(mma, InterpretedFunction)


def dot_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The kernel keyword argument DOTS for dots of `dtype` operands: fp32 gets IEEE dots (an fp32
    model must not silently drop to TF32); bf16 is widened only under the interpreter."""
    return dict(DOTS=DotFlags("ieee" if dtype == torch.float32 else "tf32", INTERPRETED and dtype == torch.bfloat16))
