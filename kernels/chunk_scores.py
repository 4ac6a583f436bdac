"""The score chunks of attnfx's chunked CPU kernels (softmax and sigmoid alike).

A call's operands are read once into a `ChunkSite`; `chunk_scores` then gives the modified scores of
one (query block, key chunk) in AttentionSpec's order, -inf where a key is excluded. K and V are
never copied per query head: a group's G query heads are stacked as G*mc rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnfx.cost_model.spec import Causal, ScoreMods

from .attention_args import ATTENTION, Dims, ScoreTensors, accumulation_dtype, bias_4d, check_args


@dataclass(frozen=True)
class ChunkSite:
    """One call's operands and score modifications, as the chunk loops read them."""

    dims: Dims
    bias: torch.Tensor | None  # (B|1, H|1, M|1, N|1)
    slopes: torch.Tensor | None  # (1, Hkv, G, 1, 1)
    lengths: torch.Tensor | None  # (B, 1, 1, 1, 1)
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
    lengths = None if extras.kv_lengths is None else extras.kv_lengths.view(d.batch, 1, 1, 1, 1)
    bias = None if extras.bias is None else bias_4d(extras.bias)
    return ChunkSite(d, bias, slopes, lengths, mods, acc)


def query_rows(x: torch.Tensor, site: ChunkSite, m0: int, m1: int) -> torch.Tensor:
    """Query-side rows [m0, m1) of x (B,H,M,D) stacked per K/V head: (B, Hkv, G*mc, D)."""
    d = site.dims
    return x[:, :, m0:m1].to(site.acc).reshape(d.batch, d.kv_heads, d.groups * (m1 - m0), x.shape[-1])


def chunk_scores(site: ChunkSite, qr: torch.Tensor, kc: torch.Tensor, m0: int, m1: int, n0: int, n1: int):
    """Modified scores (B, Hkv, G, mc, nc), -inf where excluded, in the spec's order; and the softcap's
    derivative (or None) for the backward."""
    d, mods = site.dims, site.mods
    # NOTE: every op after the matmul works in place on its fresh (b, hk, g, mc, nc) result: the
    # chunk is the only score-sized tensor each step allocates.
    s = torch.matmul(qr, kc.transpose(-1, -2)).view(d.batch, d.kv_heads, d.groups, m1 - m0, n1 - n0)
    s.mul_(mods.scale)
    dcap = None
    if mods.softcap:
        t = s.div_(mods.softcap).tanh_()
        dcap = 1 - t * t
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
    if site.lengths is not None:
        live = cols < site.lengths
        keep = live if keep is None else keep & live
    if keep is not None:
        s.masked_fill_(~keep, -math.inf)
    return s, dcap


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
