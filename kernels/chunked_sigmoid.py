"""attnfx::sigmoid_attention in plain torch, memory-bounded (FlashSigmoid at chunk granularity).

out = sigmoid(s + logit_bias) @ v needs no row statistics: each (query block, key chunk) of
weights is added into the output and dropped, so no score tensor larger than a chunk is live.
The backward recomputes the weights with the softmax kernel's loop (ds = dp p (1 - p)).
Both accumulate in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

from attnfx.cost_model.spec import ScoreMods
from attnfx.cost_model.tiles import SCORE_BUDGET, chunk_sizes

from .attention_args import ScoreTensors
from .score_mods import chunk_scores, chunk_site, query_rows
from .chunked import recompute_backward

SIGMOID_ATTENTION = "attnfx::sigmoid_attention"


def sigmoid_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, mods: ScoreMods, logit_bias: float,
    budget: int = SCORE_BUDGET,
) -> torch.Tensor:
    """out (B,H,M,F) in q's dtype; rows with no visible key are 0."""
    site = chunk_site(q, k, v, extras, mods, SIGMOID_ATTENTION)
    d = site.dims
    mc, nc = chunk_sizes(d, budget)
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    for m0 in range(0, d.q_len, mc):
        m1 = min(m0 + mc, d.q_len)
        qr = query_rows(q, site, m0, m1)  # (b, hk, g*mc, e)
        acc = torch.zeros(*qr.shape[:3], d.value_dim, dtype=site.acc, device=q.device)  # (b, hk, g*mc, f)
        lo, hi = site.key_range(m0, m1)
        for n0 in range(lo, hi, nc):
            n1 = min(n0 + nc, hi)
            s, _ = chunk_scores(site, qr, k[:, :, n0:n1].to(site.acc), m0, m1, n0, n1)  # (b, hk, g, mc, nc)
            p = s.add_(logit_bias).sigmoid_().view(d.batch, d.kv_heads, -1, n1 - n0)  # excluded: 0
            acc += p @ v[:, :, n0:n1].to(site.acc)
        out[:, :, m0:m1] = acc.view(d.batch, d.heads, m1 - m0, d.value_dim).to(q.dtype)
    return out


class _SigmoidWeights:
    """p = sigmoid(s + logit_bias); ds = dp p (1 - p)."""

    def __init__(self, logit_bias: float) -> None:
        self.logit_bias = logit_bias

    def block(self, m0: int, m1: int) -> None:
        return None

    def weights(self, s, state):
        return s.add_(self.logit_bias).sigmoid_()

    def score_grad(self, p, dp, state):
        return dp * p * (1 - p)


def sigmoid_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors,
    mods: ScoreMods, logit_bias: float, bias_grad: bool, budget: int = SCORE_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias): dbias has bias's shape when `bias_grad`, else it is empty (0,)."""
    site = chunk_site(q, k, v, extras, mods, SIGMOID_ATTENTION)
    bias = extras.bias if bias_grad else None
    return recompute_backward(site, _SigmoidWeights(logit_bias), grad_out, q, k, v, bias, budget)
