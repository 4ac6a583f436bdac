"""Flash-attention forward in Triton: FuseMax cascade 5 (1-pass online softmax, deferred division).

One program per (query block, batch * query head). It streams the K/V blocks its rows can see
(blocks above the causal diagonal, before the window or past the batch's key length are never
loaded), keeps a running max / sum / unnormalised output in fp32, divides once at the end and
stores the log-sum-exp for the backward. GQA/MQA read the shared K/V head in place (h // G).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import checked_dims, head_blocks, score_kwargs
from .triton_scores import dot_kwargs, mma, modify_scores


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_vf,
    stride_ob, stride_oh, stride_om, stride_of,
    Bias, Slopes, KvLen, stride_bb, stride_bh, stride_bm, stride_bn,
    H, G, M, N, E, F, scale, softcap, window, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kvh = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_f = tl.arange(0, BLOCK_F)
    row_ok = offs_m < M
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e < E)[None, :], other=0.0)  # (m, e)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    bias_rows = Bias + b * stride_bb + h * stride_bh + offs_m * stride_bm
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope += tl.load(Slopes + h)
    kv_len = N
    if HAS_LENGTHS:
        kv_len = tl.load(KvLen + b)

    hi = N
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + offset)  # NOTE: blocks above the diagonal are skipped
    if HAS_LENGTHS:
        hi = tl.minimum(hi, kv_len)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(0, start_m + offset - window + 1) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)  # running unnormalised output
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_e[:, None] * stride_ke,
                     mask=(offs_n < N)[None, :] & (offs_e < E)[:, None], other=0.0)  # (e, n)
        qk = mma(q, kt, DOT_PRECISION, UPCAST_DOTS)
        s = modify_scores(qk, offs_m, row_ok, offs_n, N, bias_rows, stride_bn, slope, kv_len,
                          scale, softcap, window, offset, HAS_BIAS, BIAS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
                          CAUSAL, HAS_WINDOW, HAS_LENGTHS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_f[None, :] * stride_vf,
                    mask=(offs_n < N)[:, None] & (offs_f < F)[None, :], other=0.0)  # (n, f)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOTS)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_f[None, :] * stride_of,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_f < F)[None, :])
    tl.store(Lse + bh.to(tl.int64) * M + offs_m, lse, mask=row_ok)


def flash_blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): smaller key blocks for wide heads to stay in registers."""
    if head_dim <= 64:
        return 64, 64, 4
    if head_dim <= 128:
        return 64, 64, 8
    return 64, 32, 8


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    scale: float,
    causal: str,
    window: int,
    softcap: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attnfx::attention's forward on one Triton launch: (out (B,H,M,F), lse (B,H,M) fp32)."""
    d = checked_dims(q, k, v, bias, alibi_slopes, kv_lengths, causal, window, softcap, kernel="flash forward")
    bm, bn, warps = flash_blocks(max(d.head_dim, d.value_dim))
    bm, bn = block_m or bm, block_n or bn
    be, bf = head_blocks(d)
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    lse = torch.empty(d.batch, d.heads, d.q_len, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(d.q_len, bm), d.batch * d.heads)
    _flash_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H=d.heads, G=d.groups, M=d.q_len, N=d.kv_len, E=d.head_dim, F=d.value_dim,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, BLOCK_F=bf, **dot_kwargs(q.dtype),
        num_warps=warps, num_stages=2,
        **score_kwargs(q, d, bias, alibi_slopes, kv_lengths, scale, causal, window, softcap),
    )
    return out, lse
