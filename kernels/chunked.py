"""attnfx::attention in plain torch, memory-bounded: the implementation a graph holding the op runs
on any device without a dedicated kernel (on CPU in particular).

The forward is the 1-pass cascade (FuseMax cascade 5) at chunk granularity: queries in blocks of
`mc`, keys in chunks of `nc`, a running (max, sum, out) per query row, so no score tensor larger
than `budget` elements (or B*H, if that is larger) is ever live. The backward recomputes the
weights chunk by chunk (from the saved log-sum-exp for softmax), with the same loop for every kind
of weights. Both accumulate in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from attnfx.cost_model.spec import ScoreMods
from attnfx.cost_model.tiles import SCORE_BUDGET, chunk_sizes

from .attention_args import ScoreTensors
from .score_mods import ChunkSite, add_bias_grad, chunk_scores, chunk_site, query_rows


def chunked_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, mods: ScoreMods,
    budget: int = SCORE_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,M,F) in q's dtype, lse (B,H,M) in the accumulation dtype; -inf for empty rows)."""
    site = chunk_site(q, k, v, extras, mods)
    d = site.dims
    mc, nc = chunk_sizes(d, budget)
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    lse = torch.empty(d.batch, d.heads, d.q_len, dtype=site.acc, device=q.device)
    for m0 in range(0, d.q_len, mc):
        m1 = min(m0 + mc, d.q_len)
        qr = query_rows(q, site, m0, m1)  # (b, hk, g*mc, e)
        shape = (d.batch, d.kv_heads, d.groups, m1 - m0)
        run_max = torch.full((*shape, 1), -math.inf, dtype=site.acc, device=q.device)
        run_sum = torch.zeros((*shape, 1), dtype=site.acc, device=q.device)
        acc = torch.zeros((*shape, d.value_dim), dtype=site.acc, device=q.device)  # (b, hk, g, mc, f)
        lo, hi = site.key_range(m0, m1)
        for n0 in range(lo, hi, nc):
            n1 = min(n0 + nc, hi)
            s, _ = chunk_scores(site, qr, k[:, :, n0:n1].to(site.acc), m0, m1, n0, n1)  # (b, hk, g, mc, nc)
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


class ChunkWeights(Protocol):
    """How one kind of attention turns a chunk of modified scores into weights, and back."""

    def block(self, m0: int, m1: int) -> Any:
        """Per-query-block state the two methods below read."""

    def weights(self, s: torch.Tensor, state: Any) -> torch.Tensor:
        """Weights (B, Hkv, G, mc, nc) from scores s (may work in place on s)."""

    def score_grad(self, p: torch.Tensor, dp: torch.Tensor, state: Any) -> torch.Tensor:
        """d loss / d scores from the weights p and d loss / d weights dp."""


class _SoftmaxWeights:
    """p = exp(s - lse); ds = p * (dp - delta), delta = rowsum(dO * O) - dLSE (so ds also carries
    the lse's gradient). Empty rows have lse = -inf: read as +inf, their p is 0."""

    def __init__(self, site: ChunkSite, grad_out, grad_lse, out, lse) -> None:
        self.site = site
        delta = (grad_out.to(site.acc) * out.to(site.acc)).sum(-1)  # (b, h, m)
        self.delta = delta if grad_lse is None else delta - grad_lse.to(site.acc)
        self.lse = lse.to(site.acc).masked_fill(lse == -math.inf, math.inf)

    def block(self, m0: int, m1: int):
        d = self.site.dims
        shape5 = (d.batch, d.kv_heads, d.groups, m1 - m0, 1)
        return self.lse[:, :, m0:m1].reshape(shape5), self.delta[:, :, m0:m1].reshape(shape5)

    def weights(self, s, state):
        return s.sub_(state[0]).exp_()

    def score_grad(self, p, dp, state):
        return p * (dp - state[1])


def chunked_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    extras: ScoreTensors, mods: ScoreMods, out: torch.Tensor, lse: torch.Tensor, bias_grad: bool,
    budget: int = SCORE_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) of attnfx::attention: dbias has bias's shape when `bias_grad`, else it is empty (0,)."""
    site = chunk_site(q, k, v, extras, mods)
    weights = _SoftmaxWeights(site, grad_out, grad_lse, out, lse)
    return recompute_backward(site, weights, grad_out, q, k, v, extras.bias if bias_grad else None, budget)


def recompute_backward(
    site: ChunkSite, kind: ChunkWeights, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, bias: torch.Tensor | None, budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) with the weights recomputed chunk by chunk; dbias has `bias`'s shape, or
    is empty (0,) when `bias` is None (no bias gradient wanted)."""
    d = site.dims
    mc, nc = chunk_sizes(d, budget)
    dq = q.new_empty(q.shape)
    dk = torch.zeros(k.shape, dtype=site.acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=site.acc, device=v.device)
    dbias = None if bias is None else torch.zeros(site.bias.shape, dtype=site.acc, device=q.device)
    for m0 in range(0, d.q_len, mc):
        m1 = min(m0 + mc, d.q_len)
        qr, dor = query_rows(q, site, m0, m1), query_rows(grad_out, site, m0, m1)  # (b, hk, g*mc, e|f)
        state = kind.block(m0, m1)
        dq_rows = torch.zeros_like(qr)
        lo, hi = site.key_range(m0, m1)
        for n0 in range(lo, hi, nc):
            n1 = min(n0 + nc, hi)
            kc, vc = k[:, :, n0:n1].to(site.acc), v[:, :, n0:n1].to(site.acc)  # (b, hk, nc, e|f)
            s, dterms = chunk_scores(site, qr, kc, m0, m1, n0, n1)
            p = kind.weights(s, state)  # (b, hk, g, mc, nc)
            p_rows = p.view(d.batch, d.kv_heads, -1, n1 - n0)
            dv[:, :, n0:n1] += p_rows.transpose(-1, -2) @ dor
            ds = kind.score_grad(p, (dor @ vc.transpose(-1, -2)).view_as(p), state)
            if dbias is not None:
                add_bias_grad(dbias, ds.reshape(d.batch, d.heads, m1 - m0, n1 - n0), m0, m1, n0, n1)
            if dterms is not None:
                ds = ds * dterms
            ds_rows = ds.view(d.batch, d.kv_heads, -1, n1 - n0)
            dq_rows += ds_rows @ kc
            dk[:, :, n0:n1] += ds_rows.transpose(-1, -2) @ qr
        dq[:, :, m0:m1] = (dq_rows * site.mods.scale).view(d.batch, d.heads, m1 - m0, d.head_dim).to(q.dtype)
    dbias_out = q.new_empty(0) if dbias is None else dbias.view(bias.shape).to(bias.dtype)
    return dq, (dk * site.mods.scale).to(k.dtype), dv.to(v.dtype), dbias_out
