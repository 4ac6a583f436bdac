"""Flash-attention backward in Triton: gradients recomputed block by block from the saved lse (or,
for sigmoid weights, from the scores alone).

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

from attnfx.cost_model.spec import ScoreMods
from attnfx.cost_model.tiles import flash_backward_blocks

from .attention_args import ScoreTensors, bias_4d
from .score_mods import key_bounds, modify_scores, score_grad, score_kwargs, score_rows
from .triton_launch import checked_dims, head_blocks
from .triton_tiles import dot_kwargs, load_tile, mma, query_block, row_stats, tile, weights_and_grad


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, QS, KS, VS, OS, DKS, DVS, SC, H, G, M, N, E, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    MODS: tl.constexpr, DOTS: tl.constexpr, SIGMOID: tl.constexpr,
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
    k = load_tile(K, KS, b, kvh, offs_n, offs_e, col_ok, E)
    v = load_tile(V, VS, b, kvh, offs_n, offs_f, col_ok, F)

    lo = 0
    if MODS.CAUSAL:
        lo = (tl.maximum(0, start_n - SC.offset) // BLOCK_M) * BLOCK_M  # rows above see none of these keys
    hi = M
    if MODS.HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - SC.offset + SC.window)

    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for g in range(0, G):
        h = kvh * G + g
        row_base = (b * H + h) * M
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            q = load_tile(Q, QS, b, h, offs_m, offs_e, row_ok, E)
            do = load_tile(DO, OS, b, h, offs_m, offs_f, row_ok, F)
            lse, delta = row_stats(Lse, Delta, row_base, offs_m, row_ok, SIGMOID)
            rows = score_rows(SC, MODS, b, h, offs_m, row_ok)
            qk = mma(q, tl.trans(k), DOTS)  # (m, n)
            s = modify_scores(qk, offs_m, row_ok, offs_n, N, rows, SC, MODS)
            p, ds = weights_and_grad(s, mma(do, tl.trans(v), DOTS), lse, delta, SC, SIGMOID)
            dv += mma(tl.trans(p.to(do.dtype)), do, DOTS)
            ds = score_grad(ds, qk, SC, MODS)
            dk += mma(tl.trans(ds.to(q.dtype)), q, DOTS)
    tl.store(tile(DK, DKS, b, kvh, offs_n, offs_e), (dk * SC.scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_e < E)[None, :])
    tl.store(tile(DV, DVS, b, kvh, offs_n, offs_f), dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_f < F)[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DBias, QS, KS, VS, OS, DQS, DBS, SC, H, G, M, N, E, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    MODS: tl.constexpr, DOTS: tl.constexpr, SIGMOID: tl.constexpr, BIAS_GRAD: tl.constexpr,
):
    b, h, kvh, start_m, offs_m, row_ok = query_block(H, G, M, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_f = tl.arange(0, BLOCK_F)
    q = load_tile(Q, QS, b, h, offs_m, offs_e, row_ok, E)
    do = load_tile(DO, OS, b, h, offs_m, offs_f, row_ok, F)
    lse, delta = row_stats(Lse, Delta, (b * H + h) * M, offs_m, row_ok, SIGMOID)
    rows = score_rows(SC, MODS, b, h, offs_m, row_ok)
    lo, hi = key_bounds(start_m, BLOCK_M, BLOCK_N, N, SC, MODS)

    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        k = load_tile(K, KS, b, kvh, offs_n, offs_e, col_ok, E)
        v = load_tile(V, VS, b, kvh, offs_n, offs_f, col_ok, F)
        qk = mma(q, tl.trans(k), DOTS)  # (m, n)
        s = modify_scores(qk, offs_m, row_ok, offs_n, N, rows, SC, MODS)
        _, ds = weights_and_grad(s, mma(do, tl.trans(v), DOTS), lse, delta, SC, SIGMOID)
        if BIAS_GRAD:
            tl.atomic_add(tile(DBias, DBS, b, h, offs_m, offs_n), ds, mask=row_ok[:, None] & col_ok[None, :])
        ds = score_grad(ds, qk, SC, MODS)
        dq += mma(ds.to(k.dtype), k, DOTS)
    tl.store(tile(DQ, DQS, b, h, offs_m, offs_e), (dq * SC.scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_e < E)[None, :])


def flash_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    extras: ScoreTensors, mods: ScoreMods, out: torch.Tensor, lse: torch.Tensor, bias_grad: bool, *,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) of attnfx::attention: dbias has bias's shape when `bias_grad`, else it is empty (0,)."""
    # NOTE: delta = rowsum(dO * O) - dLSE makes ds = p * (dp - delta) also carry the lse's gradient.
    delta = (grad_out.float() * out.float()).sum(-1)  # (b, h, m)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    lse = lse.float().masked_fill(lse == float("-inf"), float("inf")).contiguous()  # empty rows: p = 0
    return _launch(grad_out, q, k, v, extras, mods, (lse, delta), None, bias_grad, "flash backward",
                   block_m, block_n)


def sigmoid_flash_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors,
    mods: ScoreMods, logit_bias: float, bias_grad: bool, *, block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) of attnfx::sigmoid_attention, dbias as for flash_backward."""
    return _launch(grad_out, q, k, v, extras, mods, (q, q), logit_bias, bias_grad, "sigmoid backward",
                   block_m, block_n)


def _launch(grad_out, q, k, v, extras: ScoreTensors, mods: ScoreMods, stats: tuple, logit_bias: float | None,
            bias_grad: bool, kernel: str, block_m: int | None, block_n: int | None):
    """Both backward launches, with softmax weights (stats = (lse, delta)) or sigmoid weights
    (logit_bias given; stats are placeholders never read)."""
    d = checked_dims(q, k, v, extras, kernel=kernel)
    bm, bn, warps = flash_backward_blocks(max(d.head_dim, d.value_dim))
    bm, bn = block_m or bm, block_n or bn
    be, bf = head_blocks(d)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    bias = extras.bias
    dbias = torch.zeros(bias_4d(bias).shape, dtype=torch.float32, device=q.device) if bias_grad else q.new_empty(0)
    dbias_strides = dbias.expand(d.batch, d.heads, d.q_len, d.kv_len).stride() if bias_grad else (0, 0, 0, 0)
    common = dict(
        H=d.heads, G=d.groups, M=d.q_len, N=d.kv_len, E=d.head_dim, F=d.value_dim,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, BLOCK_F=bf, **dot_kwargs(q.dtype),
        **score_kwargs(q, d, extras, mods, logit_bias or 0.0), SIGMOID=logit_bias is not None,
        num_warps=warps, num_stages=1,
    )
    strides = (q.stride(), k.stride(), v.stride(), grad_out.stride())
    _bwd_dkdv_kernel[(triton.cdiv(d.kv_len, bn), d.batch * d.kv_heads)](
        q, k, v, grad_out, *stats, dk, dv, *strides, dk.stride(), dv.stride(), **common)
    _bwd_dq_kernel[(triton.cdiv(d.q_len, bm), d.batch * d.heads)](
        q, k, v, grad_out, *stats, dq, dbias, *strides, dq.stride(), tuple(dbias_strides),
        BIAS_GRAD=bias_grad, **common)
    dbias_out = dbias.view(bias.shape).to(bias.dtype) if bias_grad else dbias
    return dq, dk, dv, dbias_out
