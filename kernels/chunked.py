"""attnfx::attention in plain torch, memory-bounded: the implementation a graph holding the op runs
on any device without a dedicated kernel (on CPU in particular).

The forward is the 1-pass cascade (FuseMax cascade 5) at chunk granularity: queries in blocks of
`mc`, keys in chunks of `nc`, a running (max, sum, out) per query row, so no score tensor larger
than `budget` elements (or B*H, if that is larger) is ever live. The backward recomputes the
probabilities chunk by chunk from the saved log-sum-exp. Both accumulate in fp32 (fp64 for fp64).
K and V are never copied per query head: a group's G query heads are stacked as G*mc rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention_args import Dims, accumulation_dtype, bias_4d, check_args

SCORE_BUDGET = 1 << 20  # elements of one (B, H, mc, nc) score chunk: 4 MiB in fp32, about L2-sized
KEY_CHUNK = 512


@dataclass(frozen=True)
class _Site:
    """One call's operands and score modifications, as the chunk loops read them."""

    dims: Dims
    bias: torch.Tensor | None  # (B|1, H|1, M|1, N|1)
    slopes: torch.Tensor | None  # (1, Hkv, G, 1, 1)
    lengths: torch.Tensor | None  # (B, 1, 1, 1, 1)
    scale: float
    causal: str
    window: int
    softcap: float
    acc: torch.dtype

    @property
    def offset(self) -> int:
        return self.dims.causal_offset(self.causal)

    def key_range(self, m0: int, m1: int) -> tuple[int, int]:
        """Keys [lo, hi) that any query in [m0, m1) can see under the causal/window structure."""
        lo, hi = 0, self.dims.kv_len
        if self.causal != "none":
            hi = max(0, min(hi, m1 + self.offset))
        if self.window != -1:
            lo = max(0, m0 + self.offset - self.window + 1)
        return lo, hi


def chunk_sizes(dims: Dims, budget: int = SCORE_BUDGET) -> tuple[int, int]:
    """(query block, key chunk) so that one score chunk holds at most max(budget, B*H) elements."""
    rows = dims.batch * dims.heads
    nc = max(1, min(dims.kv_len, KEY_CHUNK, budget // rows))
    mc = max(1, min(dims.q_len, budget // (rows * nc)))
    return mc, nc


def _site(q, k, v, bias, alibi_slopes, kv_lengths, scale, causal, window, softcap) -> _Site:
    d = check_args(q, k, v, bias, alibi_slopes, kv_lengths, causal, window, softcap)
    acc = accumulation_dtype(q.dtype)
    slopes = None if alibi_slopes is None else alibi_slopes.to(acc).view(1, d.kv_heads, d.groups, 1, 1)
    lengths = None if kv_lengths is None else kv_lengths.view(d.batch, 1, 1, 1, 1)
    b4 = None if bias is None else bias_4d(bias)
    return _Site(d, b4, slopes, lengths, scale, causal, window, softcap, acc)


def _rows(x: torch.Tensor, site: _Site, m0: int, m1: int) -> torch.Tensor:
    """Query-side rows [m0, m1) of x (B,H,M,D) stacked per K/V head: (B, Hkv, G*mc, D)."""
    d = site.dims
    return x[:, :, m0:m1].to(site.acc).reshape(d.batch, d.kv_heads, d.groups * (m1 - m0), x.shape[-1])


def _scores(site: _Site, qr: torch.Tensor, kc: torch.Tensor, m0: int, m1: int, n0: int, n1: int):
    """Modified scores (B, Hkv, G, mc, nc), -inf where masked, in the spec's order; and the softcap's
    derivative (or None) for the backward."""
    d = site.dims
    # NOTE: every op after the matmul works in place on its fresh (b, hk, g, mc, nc) result: the
    # chunk is the only score-sized tensor each step allocates.
    s = torch.matmul(qr, kc.transpose(-1, -2)).view(d.batch, d.kv_heads, d.groups, m1 - m0, n1 - n0)
    s.mul_(site.scale)
    dcap = None
    if site.softcap:
        t = s.div_(site.softcap).tanh_()
        dcap = 1 - t * t
        s = t.mul_(site.softcap)
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
    if site.causal != "none":
        band = cols <= rows + site.offset
        if site.window != -1:
            band = band & (cols > rows + site.offset - site.window)
        keep = band if keep is None else keep & band
    if site.lengths is not None:
        live = cols < site.lengths
        keep = live if keep is None else keep & live
    if keep is not None:
        s.masked_fill_(~keep, -math.inf)
    return s, dcap


def _bias_chunk(site: _Site, m0: int, m1: int, n0: int, n1: int) -> torch.Tensor:
    d, b = site.dims, site.bias
    rows = slice(m0, m1) if b.shape[2] > 1 else slice(None)
    cols = slice(n0, n1) if b.shape[3] > 1 else slice(None)
    chunk = b[:, :, rows, cols]
    hk, g = (d.kv_heads, d.groups) if b.shape[1] > 1 else (1, 1)
    return chunk.reshape(chunk.shape[0], hk, g, chunk.shape[2], chunk.shape[3])


def chunked_forward(
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
    budget: int = SCORE_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,M,F) in q's dtype, lse (B,H,M) in the accumulation dtype; -inf for empty rows)."""
    site = _site(q, k, v, bias, alibi_slopes, kv_lengths, scale, causal, window, softcap)
    d = site.dims
    mc, nc = chunk_sizes(d, budget)
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    lse = torch.empty(d.batch, d.heads, d.q_len, dtype=site.acc, device=q.device)
    for m0 in range(0, d.q_len, mc):
        m1 = min(m0 + mc, d.q_len)
        qr = _rows(q, site, m0, m1)  # (b, hk, g*mc, e)
        shape = (d.batch, d.kv_heads, d.groups, m1 - m0)
        run_max = torch.full((*shape, 1), -math.inf, dtype=site.acc, device=q.device)
        run_sum = torch.zeros((*shape, 1), dtype=site.acc, device=q.device)
        acc = torch.zeros((*shape, d.value_dim), dtype=site.acc, device=q.device)  # (b, hk, g, mc, f)
        lo, hi = site.key_range(m0, m1)
        for n0 in range(lo, hi, nc):
            n1 = min(n0 + nc, hi)
            s, _ = _scores(site, qr, k[:, :, n0:n1].to(site.acc), m0, m1, n0, n1)  # (b, hk, g, mc, nc)
            new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))
            safe = new_max.masked_fill(new_max == -math.inf, 0.0)
            p = s.sub_(safe).exp_()
            alpha = torch.exp(run_max - safe)
            run_sum = run_sum * alpha + p.sum(dim=-1, keepdim=True)
            pv = p.view(d.batch, d.kv_heads, -1, n1 - n0) @ v[:, :, n0:n1].to(site.acc)  # (b, hk, g*mc, f)
            acc = acc * alpha + pv.view_as(acc)
            run_max = new_max
        empty = run_sum == 0
        out[:, :, m0:m1] = (acc / run_sum.masked_fill(empty, 1.0)).view(d.batch, d.heads, m1 - m0, -1).to(q.dtype)
        row_lse = torch.where(empty, -math.inf, run_max + torch.log(run_sum.masked_fill(empty, 1.0)))
        lse[:, :, m0:m1] = row_lse.view(d.batch, d.heads, m1 - m0)
    return out, lse


def chunked_backward(
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
    budget: int = SCORE_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias): dbias has bias's shape when `bias_grad`, else it is empty (0,)."""
    site = _site(q, k, v, bias, alibi_slopes, kv_lengths, scale, causal, window, softcap)
    d = site.dims
    mc, nc = chunk_sizes(d, budget)
    # NOTE: delta = rowsum(dO * O) - dLSE makes ds = p * (dp - delta) also carry the lse's gradient.
    delta = (grad_out.to(site.acc) * out.to(site.acc)).sum(-1)  # (b, h, m)
    if grad_lse is not None:
        delta = delta - grad_lse.to(site.acc)
    lse_inf = lse.to(site.acc).masked_fill(lse == -math.inf, math.inf)  # empty rows: p = 0
    dq = q.new_empty(q.shape)
    dk = torch.zeros(k.shape, dtype=site.acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=site.acc, device=v.device)
    dbias = torch.zeros(site.bias.shape, dtype=site.acc, device=q.device) if bias_grad else None
    for m0 in range(0, d.q_len, mc):
        m1 = min(m0 + mc, d.q_len)
        qr, dor = _rows(q, site, m0, m1), _rows(grad_out, site, m0, m1)  # (b, hk, g*mc, e|f)
        shape5 = (d.batch, d.kv_heads, d.groups, m1 - m0, 1)
        row_lse, row_delta = lse_inf[:, :, m0:m1].reshape(shape5), delta[:, :, m0:m1].reshape(shape5)
        dq_rows = torch.zeros_like(qr)
        lo, hi = site.key_range(m0, m1)
        for n0 in range(lo, hi, nc):
            n1 = min(n0 + nc, hi)
            kc, vc = k[:, :, n0:n1].to(site.acc), v[:, :, n0:n1].to(site.acc)  # (b, hk, nc, e|f)
            s, dcap = _scores(site, qr, kc, m0, m1, n0, n1)
            p = s.sub_(row_lse).exp_()  # (b, hk, g, mc, nc)
            p_rows = p.view(d.batch, d.kv_heads, -1, n1 - n0)
            dv[:, :, n0:n1] += p_rows.transpose(-1, -2) @ dor
            ds = p * ((dor @ vc.transpose(-1, -2)).view_as(p) - row_delta)
            if dbias is not None:
                _add_bias_grad(dbias, ds.reshape(d.batch, d.heads, m1 - m0, n1 - n0), m0, m1, n0, n1)
            if dcap is not None:
                ds = ds * dcap
            ds_rows = ds.view(d.batch, d.kv_heads, -1, n1 - n0)
            dq_rows += ds_rows @ kc
            dk[:, :, n0:n1] += ds_rows.transpose(-1, -2) @ qr
        dq[:, :, m0:m1] = (dq_rows * scale).view(d.batch, d.heads, m1 - m0, d.head_dim).to(q.dtype)
    dbias_out = q.new_empty(0) if dbias is None else dbias.view(bias.shape).to(bias.dtype)
    return dq, (dk * scale).to(k.dtype), dv.to(v.dtype), dbias_out


def _add_bias_grad(dbias: torch.Tensor, ds: torch.Tensor, m0: int, m1: int, n0: int, n1: int) -> None:
    """Add a (B,H,mc,nc) chunk of score gradients into the bias's (possibly broadcast) shape."""
    summed = [i for i in range(4) if dbias.shape[i] == 1 and ds.shape[i] > 1]
    if summed:
        ds = ds.sum(dim=summed, keepdim=True)
    rows = slice(m0, m1) if dbias.shape[2] > 1 else slice(None)
    cols = slice(n0, n1) if dbias.shape[3] > 1 else slice(None)
    dbias[:, :, rows, cols] += ds
