"""Flash-attention forward in Triton: FuseMax cascade 5 (1-pass online softmax, deferred division),
and FlashSigmoid with the same loop (SIGMOID: weights sigmoid(s + logit_bias), no row statistics).

One program per (query block, batch * query head). It streams the K/V blocks its rows can see
(blocks above the causal diagonal or before the window are never loaded), keeps a running max /
sum / unnormalised output in fp32, divides once at the end and stores the log-sum-exp for the
backward. GQA/MQA read the shared K/V head in place (h // G).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnfx.cost_model.spec import ScoreMods
from attnfx.cost_model.tiles import flash_blocks

from .attention_args import ScoreTensors
from .score_mods import key_bounds, modify_scores, score_kwargs, score_rows
from .triton_launch import checked_dims, head_blocks
from .triton_tiles import dot_kwargs, load_tile, mma, query_block, tile, tile_t


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse, QS, KS, VS, OS, SC, H, G, M, N, E, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    MODS: tl.constexpr, DOTS: tl.constexpr, SIGMOID: tl.constexpr,
):
    b, h, kvh, start_m, offs_m, row_ok = query_block(H, G, M, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_f = tl.arange(0, BLOCK_F)
    q = load_tile(Q, QS, b, h, offs_m, offs_e, row_ok, E)  # (m, e)
    rows = score_rows(SC, MODS, b, h, offs_m, row_ok)
    lo, hi = key_bounds(start_m, BLOCK_M, BLOCK_N, N, SC, MODS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)  # running unnormalised output
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(tile_t(K, KS, b, kvh, offs_n, offs_e),
                     mask=(offs_n < N)[None, :] & (offs_e < E)[:, None], other=0.0)  # (e, n)
        s = modify_scores(mma(q, kt, DOTS), offs_m, row_ok, offs_n, N, rows, SC, MODS)
        if SIGMOID:
            p = tl.sigmoid(s + SC.logit_bias)  # excluded keys: 0
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, VS, b, kvh, offs_n, offs_f, offs_n < N, F)  # (n, f)
        if SIGMOID:
            acc += mma(p.to(v.dtype), v, DOTS)
        else:
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOTS)
            m_i = m_new

    out_ptrs = tile(Out, OS, b, h, offs_m, offs_f)
    if SIGMOID:
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_f < F)[None, :])
    else:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_f < F)[None, :])
        tl.store(Lse + (b * H + h) * M + offs_m, lse, mask=row_ok)


def flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, mods: ScoreMods, *,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attnfx::attention's forward on one Triton launch: (out (B,H,M,F), lse (B,H,M) fp32)."""
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    return _launch(q, k, v, extras, mods, lse, None, "flash forward", block_m, block_n), lse


def sigmoid_flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, mods: ScoreMods, logit_bias: float, *,
    block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """attnfx::sigmoid_attention's forward on one Triton launch: out (B,H,M,F)."""
    return _launch(q, k, v, extras, mods, q, logit_bias, "sigmoid forward", block_m, block_n)


def _launch(q, k, v, extras: ScoreTensors, mods: ScoreMods, lse: torch.Tensor, logit_bias: float | None,
            kernel: str, block_m: int | None, block_n: int | None) -> torch.Tensor:
    """Run the kernel with softmax weights (logit_bias None; lse written) or sigmoid weights."""
    d = checked_dims(q, k, v, extras, kernel=kernel)
    bm, bn, warps = flash_blocks(max(d.head_dim, d.value_dim))
    bm, bn = block_m or bm, block_n or bn
    be, bf = head_blocks(d)
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    grid = (triton.cdiv(d.q_len, bm), d.batch * d.heads)
    _flash_fwd_kernel[grid](
        q, k, v, out, lse, q.stride(), k.stride(), v.stride(), out.stride(),
        H=d.heads, G=d.groups, M=d.q_len, N=d.kv_len, E=d.head_dim, F=d.value_dim,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, BLOCK_F=bf, **dot_kwargs(q.dtype),
        **score_kwargs(q, d, extras, mods, logit_bias or 0.0), SIGMOID=logit_bias is not None,
        num_warps=warps, num_stages=2,
    )
    return out
