"""Every score term attnfx's own kernels apply, in one place: the pure-torch chunk form and the
Triton form side by side, so a new term of the score formula (cost_model/spec.py, SCORE_TERMS) is
applied by every attnfx kernel through this module alone.

CPU: a call's operands are read once into a `ChunkSite`; `chunk_scores` then gives the modified
scores of one (query block, key chunk) in AttentionSpec's order, -inf where a key is excluded. K
and V are never copied per query head: a group's G query heads are stacked as G*mc rows.

Triton: `score_kwargs` turns a call's `ScoreTensors` and `ScoreMods` into the two bundles the
jitted `modify_scores` reads, `ScoreArgs` (runtime values) and `ScoreFlags` (compile-time
switches), so a kernel signature names each bundle once. One jitted function, shared by the
forward, backward and decode kernels, so none can disagree on what a mask means. The jitted
functions exist only where triton imports; only the Triton kernel modules use them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from attnfx.cost_model.spec import Causal, ScoreMods

from .attention_args import ATTENTION, Dims, ScoreTensors, accumulation_dtype, bias_4d, check_args, triton_importable

# The optional score terms (spec.SCORE_TERMS) this module applies: every variant whose kernels run
# through it takes them.
APPLIED = ("softcap", "alibi")


@dataclass(frozen=True)
class ChunkSite:
    """One call's operands and score modifications, as the chunk loops read them."""

    dims: Dims
    bias: torch.Tensor | None  # (B|1, H|1, M|1, N|1)
    slopes: torch.Tensor | None  # (1, Hkv, G, 1, 1)
    mods: ScoreMods
    acc: torch.dtype

    @property
    def offset(self) -> int:
        return self.dims.causal_offset(self.mods.causal)

    def key_range(self, m0: int, m1: int) -> tuple[int, int]:
        """Keys [lo, hi) that any query in [m0, m1) can see under the causal/window structure."""
        lo, hi = 0, self.dims.kv_len
        if self.mods.causal is not Causal.NONE:
            hi = max(0, min(hi, m1 + self.offset))
        if self.mods.window is not None:
            lo = max(0, m0 + self.offset - self.mods.window + 1)
        return lo, hi


def chunk_site(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, mods: ScoreMods,
               op: str = ATTENTION) -> ChunkSite:
    d = check_args(q, k, v, extras, op)
    acc = accumulation_dtype(q.dtype)
    slopes = None if extras.alibi_slopes is None else extras.alibi_slopes.to(acc).view(1, d.kv_heads, d.groups, 1, 1)
    bias = None if extras.bias is None else bias_4d(extras.bias)
    return ChunkSite(d, bias, slopes, mods, acc)


def query_rows(x: torch.Tensor, site: ChunkSite, m0: int, m1: int) -> torch.Tensor:
    """Query-side rows [m0, m1) of x (B,H,M,D) stacked per K/V head: (B, Hkv, G*mc, D)."""
    d = site.dims
    return x[:, :, m0:m1].to(site.acc).reshape(d.batch, d.kv_heads, d.groups * (m1 - m0), x.shape[-1])


def chunk_scores(site: ChunkSite, qr: torch.Tensor, kc: torch.Tensor, m0: int, m1: int, n0: int, n1: int):
    """Modified scores (B, Hkv, G, mc, nc), -inf where excluded, in the spec's order; and for the
    backward the derivative of the elementwise terms after the scale (the softcap's), or None."""
    d, mods = site.dims, site.mods
    # NOTE: every op after the matmul works in place on its fresh (b, hk, g, mc, nc) result: the
    # chunk is the only score-sized tensor each step allocates.
    s = torch.matmul(qr, kc.transpose(-1, -2)).view(d.batch, d.kv_heads, d.groups, m1 - m0, n1 - n0)
    s.mul_(mods.scale)
    dterms = None
    if mods.softcap:
        t = s.div_(mods.softcap).tanh_()
        dterms = 1 - t * t
        s = t.mul_(mods.softcap)
    rows = torch.arange(m0, m1, device=s.device).view(-1, 1)  # (mc, 1)
    cols = torch.arange(n0, n1, device=s.device).view(1, -1)  # (1, nc)
    keep = None
    if site.bias is not None:
        chunk = _bias_chunk(site, m0, m1, n0, n1)  # (B|1, Hkv|1, G|1, mc|1, nc|1)
        if chunk.dtype == torch.bool:
            keep = chunk
        else:
            s.add_(chunk.to(site.acc))
    if site.slopes is not None:
        s.add_(site.slopes * (cols - rows).to(site.acc))
    if mods.causal is not Causal.NONE:
        band = cols <= rows + site.offset
        if mods.window is not None:
            band = band & (cols > rows + site.offset - mods.window)
        keep = band if keep is None else keep & band
    if keep is not None:
        s.masked_fill_(~keep, -math.inf)
    return s, dterms


def _bias_chunk(site: ChunkSite, m0: int, m1: int, n0: int, n1: int) -> torch.Tensor:
    d, b = site.dims, site.bias
    rows = slice(m0, m1) if b.shape[2] > 1 else slice(None)
    cols = slice(n0, n1) if b.shape[3] > 1 else slice(None)
    chunk = b[:, :, rows, cols]
    hk, g = (d.kv_heads, d.groups) if b.shape[1] > 1 else (1, 1)
    return chunk.reshape(chunk.shape[0], hk, g, chunk.shape[2], chunk.shape[3])


def add_bias_grad(dbias: torch.Tensor, ds: torch.Tensor, m0: int, m1: int, n0: int, n1: int) -> None:
    """Add a (B,H,mc,nc) chunk of score gradients into the bias's (possibly broadcast) shape."""
    summed = [i for i in range(4) if dbias.shape[i] == 1 and ds.shape[i] > 1]
    if summed:
        ds = ds.sum(dim=summed, keepdim=True)
    rows = slice(m0, m1) if dbias.shape[2] > 1 else slice(None)
    cols = slice(n0, n1) if dbias.shape[3] > 1 else slice(None)
    dbias[:, :, rows, cols] += ds


class ScoreArgs(NamedTuple):
    """Runtime operands of the score modifications. Absent tensors are `q`, a pointer never read; a
    broadcast bias has stride 0 on its broadcast dims, so it is read in place."""

    bias: torch.Tensor
    bias_strides: tuple[int, int, int, int]  # (b, h, m, n)
    slopes: torch.Tensor
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
    slopes = extras.alibi_slopes
    args = ScoreArgs(
        bias_t, tuple(strides),
        q if slopes is None else slopes.to(torch.float32).contiguous(),
        float(mods.scale), float(mods.softcap or 1.0), int(mods.window or 0), d.causal_offset(mods.causal),
        float(logit_bias),
    )
    flags = ScoreFlags(
        HAS_BIAS=bias is not None, BIAS_BOOL=bias is not None and bias.dtype == torch.bool,
        HAS_ALIBI=slopes is not None, HAS_SOFTCAP=mods.softcap is not None, CAUSAL=mods.causal is not Causal.NONE,
        HAS_WINDOW=mods.window is not None,
    )
    return dict(SC=args, MODS=flags)


if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def tanh(x):
        """tanh through the sigmoid (tl has no tanh that also runs in the interpreter)."""
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def score_rows(SC, MODS: tl.constexpr, b, h, pos_m, row_ok):
        """What modify_scores reads per query row: (bias row pointers, ALiBi slope)."""
        bias_rows = SC.bias + b * SC.bias_strides[0] + h * SC.bias_strides[1] + pos_m * SC.bias_strides[2]
        slope = tl.zeros(pos_m.shape, dtype=tl.float32)
        if MODS.HAS_ALIBI:
            slope += tl.load(SC.slopes + h + 0 * pos_m, mask=row_ok, other=0.0)
        return bias_rows, slope

    @triton.jit
    def key_bounds(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N, SC, MODS: tl.constexpr):
        """Keys [lo, hi) the query block at start_m can see: blocks above the causal diagonal or before
        the window are skipped (lo is rounded down to a key block)."""
        hi = N
        if MODS.CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M + SC.offset)
        lo = 0
        if MODS.HAS_WINDOW:
            lo = (tl.maximum(0, start_m + SC.offset - SC.window + 1) // BLOCK_N) * BLOCK_N
        return lo, hi

    @triton.jit
    def modify_scores(qk, pos_m, row_ok, offs_n, stop_n, rows, SC, MODS: tl.constexpr):
        """Scores (rows, cols) in natural units from raw dots `qk`, -inf wherever a key is not visible.

        pos_m: query position per row; row_ok: rows that exist; offs_n: key positions; keys at or past
        stop_n do not exist; rows: score_rows' per-row (bias pointers, ALiBi slope).
        """
        bias_rows, slope = rows
        s = qk * SC.scale
        if MODS.HAS_SOFTCAP:
            s = SC.softcap * tanh(s / SC.softcap)
        keep = row_ok[:, None] & (offs_n < stop_n)[None, :]
        if MODS.HAS_BIAS:
            b = tl.load(bias_rows[:, None] + offs_n[None, :] * SC.bias_strides[3], mask=keep, other=0)
            if MODS.BIAS_BOOL:
                keep = keep & (b != 0)
            else:
                s = s + b.to(tl.float32)
        if MODS.HAS_ALIBI:
            s = s + slope[:, None] * (offs_n[None, :] - pos_m[:, None]).to(tl.float32)
        if MODS.CAUSAL:
            keep = keep & (offs_n[None, :] <= pos_m[:, None] + SC.offset)
            if MODS.HAS_WINDOW:
                keep = keep & (offs_n[None, :] > pos_m[:, None] + SC.offset - SC.window)
        return tl.where(keep, s, float("-inf"))

    @triton.jit
    def score_grad(ds, qk, SC, MODS: tl.constexpr):
        """d loss / d(the raw dot, scaled) from d loss / d(modified score) `ds`: the derivative of the
        elementwise terms (the softcap's 1 - tanh^2); the scale is applied once by the caller."""
        if MODS.HAS_SOFTCAP:
            t = tanh(qk * SC.scale / SC.softcap)
            ds = ds * (1.0 - t * t)
        return ds
