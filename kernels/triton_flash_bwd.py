"""Flash-attention backward in Triton: gradients recomputed block by block from the saved lse.

Two launches, neither with atomics on Q/K/V gradients:
  * dK/dV: one program per (key block, batch * K/V head) loops over the G query heads of its group
    and their visible query blocks, so GQA's sum over the group happens in registers;
  * dQ (and dBias): one program per (query block, batch * query head) loops over its visible keys.
dBias is atomically added into an fp32 buffer of the bias's own (broadcast) shape, so a bias shared
over batch or heads is summed without materialising (B, H, M, N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_args import bias_4d
from .triton_launch import checked_dims, head_blocks, score_kwargs
from .triton_scores import dot_kwargs, mma, modify_scores, softcap_grad


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_vf,
    stride_ob, stride_oh, stride_om, stride_of,
    stride_dkb, stride_dkh, stride_dkn, stride_dke,
    stride_dvb, stride_dvh, stride_dvn, stride_dvf,
    Bias, Slopes, KvLen, stride_bb, stride_bh, stride_bm, stride_bn,
    H, G, M, N, E, F, scale, softcap, window, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bk = tl.program_id(1)
    hkv = H // G
    b = (bk // hkv).to(tl.int64)
    kvh = (bk % hkv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_f = tl.arange(0, BLOCK_F)
    col_ok = offs_n < N
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=col_ok[:, None] & (offs_e < E)[None, :], other=0.0)  # (n, e)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_f[None, :] * stride_vf,
                mask=col_ok[:, None] & (offs_f < F)[None, :], other=0.0)  # (n, f)
    kv_len = N
    if HAS_LENGTHS:
        kv_len = tl.load(KvLen + b)

    lo = 0
    if CAUSAL:
        lo = (tl.maximum(0, start_n - offset) // BLOCK_M) * BLOCK_M  # rows above see none of these keys
    hi = M
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - offset + window)
    if HAS_LENGTHS:
        hi = tl.where(start_n < kv_len, hi, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for g in range(0, G):
        h = kvh * G + g
        bias_base = Bias + b * stride_bb + h * stride_bh
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_ALIBI:
            slope += tl.load(Slopes + h)
        row_base = (b * H + h) * M
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                        mask=row_ok[:, None] & (offs_e < E)[None, :], other=0.0)  # (m, e)
            do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_f[None, :] * stride_of,
                         mask=row_ok[:, None] & (offs_f < F)[None, :], other=0.0)  # (m, f)
            lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))  # +inf: p = 0
            delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
            qk = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOTS)  # (m, n)
            s = modify_scores(qk, offs_m, row_ok, offs_n, N, bias_base + offs_m * stride_bm, stride_bn, slope,
                              kv_len, scale, softcap, window, offset, HAS_BIAS, BIAS_BOOL, HAS_ALIBI,
                              HAS_SOFTCAP, CAUSAL, HAS_WINDOW, HAS_LENGTHS)
            p = tl.exp(s - lse[:, None])
            dv += mma(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST_DOTS)
            dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOTS)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * softcap_grad(qk, scale, softcap)
            dk += mma(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST_DOTS)
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_e < E)[None, :])
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvn + offs_f[None, :] * stride_dvf,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_f < F)[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DBias,
    stride_qb, stride_qh, stride_qm, stride_qe,
    stride_kb, stride_kh, stride_kn, stride_ke,
    stride_vb, stride_vh, stride_vn, stride_vf,
    stride_ob, stride_oh, stride_om, stride_of,
    stride_dqb, stride_dqh, stride_dqm, stride_dqe,
    stride_db, stride_dh, stride_dm, stride_dn,
    Bias, Slopes, KvLen, stride_bb, stride_bh, stride_bm, stride_bn,
    H, G, M, N, E, F, scale, softcap, window, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
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
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_f[None, :] * stride_of,
                 mask=row_ok[:, None] & (offs_f < F)[None, :], other=0.0)  # (m, f)
    lse = tl.load(Lse + bh.to(tl.int64) * M + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * M + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    bias_rows = Bias + b * stride_bb + h * stride_bh + offs_m * stride_bm
    dbias_rows = DBias + b * stride_db + h * stride_dh + offs_m * stride_dm
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope += tl.load(Slopes + h)
    kv_len = N
    if HAS_LENGTHS:
        kv_len = tl.load(KvLen + b)

    hi = N
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + offset)
    if HAS_LENGTHS:
        hi = tl.minimum(hi, kv_len)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(0, start_m + offset - window + 1) // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                    mask=col_ok[:, None] & (offs_e < E)[None, :], other=0.0)  # (n, e)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_f[None, :] * stride_vf,
                    mask=col_ok[:, None] & (offs_f < F)[None, :], other=0.0)  # (n, f)
        qk = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOTS)  # (m, n)
        s = modify_scores(qk, offs_m, row_ok, offs_n, N, bias_rows, stride_bn, slope, kv_len,
                          scale, softcap, window, offset, HAS_BIAS, BIAS_BOOL, HAS_ALIBI, HAS_SOFTCAP,
                          CAUSAL, HAS_WINDOW, HAS_LENGTHS)
        p = tl.exp(s - lse[:, None])
        dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOTS)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.atomic_add(dbias_rows[:, None] + offs_n[None, :] * stride_dn, ds,
                          mask=row_ok[:, None] & col_ok[None, :])
        if HAS_SOFTCAP:
            ds = ds * softcap_grad(qk, scale, softcap)
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOTS)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_e < E)[None, :])


def backward_blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): the backward holds two (BLOCK_N, D) fp32 accumulators."""
    if head_dim <= 64:
        return 64, 64, 4
    if head_dim <= 128:
        return 32, 64, 8
    return 32, 32, 8


def flash_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: str,
    window: int,
    softcap: float,
    bias_grad: bool,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias): dbias has bias's shape when `bias_grad`, else it is empty (0,)."""
    d = checked_dims(q, k, v, bias, alibi_slopes, kv_lengths, causal, window, softcap, kernel="flash backward")
    bm, bn, warps = backward_blocks(max(d.head_dim, d.value_dim))
    bm, bn = block_m or bm, block_n or bn
    be, bf = head_blocks(d)
    # NOTE: delta = rowsum(dO * O) - dLSE makes ds = p * (dp - delta) also carry the lse's gradient.
    delta = (grad_out.float() * out.float()).sum(-1)  # (b, h, m)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    lse = lse.float().masked_fill(lse == float("-inf"), float("inf")).contiguous()  # empty rows: p = 0
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dbias = torch.zeros(bias_4d(bias).shape, dtype=torch.float32, device=q.device) if bias_grad else q.new_empty(0)
    dbias_strides = dbias.expand(d.batch, d.heads, d.q_len, d.kv_len).stride() if bias_grad else (0, 0, 0, 0)
    common = dict(
        H=d.heads, G=d.groups, M=d.q_len, N=d.kv_len, E=d.head_dim, F=d.value_dim,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, BLOCK_F=bf, **dot_kwargs(q.dtype),
        num_warps=warps, num_stages=1,
        **score_kwargs(q, d, bias, alibi_slopes, kv_lengths, scale, causal, window, softcap),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    _bwd_dkdv_kernel[(triton.cdiv(d.kv_len, bn), d.batch * d.kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(), **common)
    _bwd_dq_kernel[(triton.cdiv(d.q_len, bm), d.batch * d.heads)](
        q, k, v, grad_out, lse, delta, dq, dbias, *strides, *dq.stride(), *dbias_strides,
        BIAS_GRAD=bias_grad, **common)
    dbias_out = dbias.view(bias.shape).to(bias.dtype) if bias_grad else dbias
    return dq, dk, dv, dbias_out
