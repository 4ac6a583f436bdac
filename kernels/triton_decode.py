"""Split-KV decode in Triton (Flash-Decoding): few queries (M <= 16) over a long K/V.

With M small, one program per (query block, head) would leave most of a GPU idle, so the keys are
cut into S splits. Pass 1 runs the 1-pass cascade on each (batch * K/V head, split, row block),
with a group's G query heads and M positions packed as G*M rows that share one K/V read, and stores
the *unnormalised* partial output with its running max and sum. Pass 2 merges the splits with the
associative (max, sum, out) rule: GM = max_s m_s, w_s = exp(m_s - GM),
out = sum_s w_s O_s / sum_s w_s l_s, and stores the lse the flash backward reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnfx.cost_model.spec import ScoreMods
from attnfx.cost_model.tiles import DECODE_BLOCK_N, MIN_SPLIT_BLOCKS

from .attention_args import Dims, ScoreTensors
from .score_mods import modify_scores, score_kwargs, score_rows
from .triton_launch import checked_dims, head_blocks
from .triton_tiles import dot_kwargs, load_tile, mma, tile_t


@triton.jit
def _decode_split_kernel(
    Q, K, V, OPart, MPart, LPart, QS, KS, VS, SC, H, G, M, N, E, F, R, S, split_len,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
    MODS: tl.constexpr, DOTS: tl.constexpr,
):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    hkv = H // G
    b = (bk // hkv).to(tl.int64)
    kvh = (bk % hkv).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # packed (g, m): row = g * M + m
    row_ok = rows < R
    pos_m = rows % M
    h = kvh * G + rows // M
    offs_e = tl.arange(0, BLOCK_E)
    offs_f = tl.arange(0, BLOCK_F)
    q = tl.load(Q + b * QS[0] + h[:, None] * QS[1] + pos_m[:, None] * QS[2] + offs_e[None, :] * QS[3],
                mask=row_ok[:, None] & (offs_e < E)[None, :], other=0.0)  # (r, e)
    score_row = score_rows(SC, MODS, b, h, pos_m, row_ok)

    lo = split * split_len
    stop = tl.minimum(lo + split_len, N)  # this split's keys are [lo, stop)
    hi = stop
    if MODS.CAUSAL:
        hi = tl.minimum(hi, M + SC.offset)  # the last query position sees keys n <= M - 1 + offset
    if MODS.HAS_WINDOW:
        lo = tl.maximum(lo, SC.offset - SC.window + 1)  # the first query position's window start

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(tile_t(K, KS, b, kvh, offs_n, offs_e), mask=(offs_n < stop)[None, :] & (offs_e < E)[:, None],
                     other=0.0)  # (e, n)
        s = modify_scores(mma(q, kt, DOTS), pos_m, row_ok, offs_n, stop, score_row, SC, MODS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, VS, b, kvh, offs_n, offs_f, offs_n < stop, F)  # (n, f)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOTS)
        m_i = m_new

    part = (bk.to(tl.int64) * S + split) * R + rows  # workspace row of (bk, split, row)
    tl.store(OPart + part[:, None] * F + offs_f[None, :], acc, mask=row_ok[:, None] & (offs_f < F)[None, :])
    tl.store(MPart + part, m_i, mask=row_ok)
    tl.store(LPart + part, l_i, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    OPart, MPart, LPart, Out, Lse, OS, H, G, M, F, R, S,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    bk = tl.program_id(0)
    hkv = H // G
    b = (bk // hkv).to(tl.int64)
    kvh = (bk % hkv).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    pos_m = rows % M
    h = kvh * G + rows // M
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = row_ok[:, None] & (offs_f < F)[None, :]
    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    for split in range(0, S):
        part = (bk.to(tl.int64) * S + split) * R + rows
        m_s = tl.load(MPart + part, mask=row_ok, other=float("-inf"))
        l_s = tl.load(LPart + part, mask=row_ok, other=0.0)
        o_s = tl.load(OPart + part[:, None] * F + offs_f[None, :], mask=f_ok, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_run = tl.exp(m_run - m_safe)
        w_s = tl.exp(m_s - m_safe)
        l_run = l_run * w_run + l_s * w_s
        acc = acc * w_run[:, None] + o_s * w_s[:, None]
        m_run = m_new
    empty = l_run == 0.0
    l_safe = tl.where(empty, 1.0, l_run)
    tl.store(Out + b * OS[0] + h[:, None] * OS[1] + pos_m[:, None] * OS[2] + offs_f[None, :] * OS[3],
             (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=f_ok)
    lse = tl.where(empty, float("-inf"), m_run + tl.log(l_safe))
    tl.store(Lse + (b * H + h) * M + pos_m, lse, mask=row_ok)


def split_count(programs: int, kv_len: int, sm_count: int, block_n: int = DECODE_BLOCK_N) -> int:
    """Splits per (batch * K/V head, row block): enough for about two programs per SM, but no
    split shorter than MIN_SPLIT_BLOCKS key blocks."""
    wanted = triton.cdiv(2 * sm_count, programs)
    longest = max(1, kv_len // (MIN_SPLIT_BLOCKS * block_n))
    return max(1, min(wanted, longest))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting only adds launches


def row_block(dims: Dims) -> int:
    """Packed (g, m) rows per program: all of a group's rows up to 64 (>= 16 for tl.dot)."""
    return max(16, min(64, 1 << (dims.groups * dims.q_len - 1).bit_length()))


def decode_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, mods: ScoreMods, *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attnfx::attention's forward by split-KV: (out (B,H,M,F), lse (B,H,M) fp32)."""
    d = checked_dims(q, k, v, extras, kernel="split-KV decode")
    rows = d.groups * d.q_len
    br = row_block(d)
    be, bf = head_blocks(d)
    row_blocks = triton.cdiv(rows, br)
    programs = d.batch * d.kv_heads * row_blocks
    splits = num_splits or split_count(programs, d.kv_len, _sm_count(q.device))
    split_len = triton.cdiv(triton.cdiv(d.kv_len, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    splits = triton.cdiv(d.kv_len, split_len)
    work = (d.batch * d.kv_heads, splits, rows)
    o_part = torch.empty(*work, d.value_dim, dtype=torch.float32, device=q.device)  # (bk, s, r, f)
    m_part = torch.empty(work, dtype=torch.float32, device=q.device)  # (bk, s, r)
    l_part = torch.empty(work, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(splits, d.batch * d.kv_heads, row_blocks)](
        q, k, v, o_part, m_part, l_part, q.stride(), k.stride(), v.stride(),
        H=d.heads, G=d.groups, M=d.q_len, N=d.kv_len, E=d.head_dim, F=d.value_dim, R=rows, S=splits,
        split_len=split_len, BLOCK_R=br, BLOCK_N=DECODE_BLOCK_N, BLOCK_E=be, BLOCK_F=bf,
        **dot_kwargs(q.dtype), **score_kwargs(q, d, extras, mods), num_warps=4, num_stages=2,
    )
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    lse = torch.empty(d.batch, d.heads, d.q_len, dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(d.batch * d.kv_heads, row_blocks)](
        o_part, m_part, l_part, out, lse, out.stride(),
        H=d.heads, G=d.groups, M=d.q_len, F=d.value_dim, R=rows, S=splits, BLOCK_R=br, BLOCK_F=bf,
        num_warps=4,
    )
    return out, lse
