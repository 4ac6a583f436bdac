"""Attention sinks (gpt-oss, StreamingLLM): a learned logit per head concatenated after the keys,
softmaxed with them and sliced off. That is attention whose normaliser also counts e^sink:
attention(q, k, v) * sigmoid(lse - sink), exact, through attnfx::attention's lse output."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfx

B, T, H, D = 2, 12, 4, 8
C = H * D


def _x(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, C, generator=torch.Generator().manual_seed(3 * t + b))


class Sinks(nn.Module):
    """gpt-oss's eager attention: causal mask, sinks expanded to (b, h, m, 1), cat, softmax, slice."""

    def __init__(self, variant: str = "sliced") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.sinks = nn.Parameter(torch.randn(H))
        self.query_sinks = nn.Parameter(torch.randn(T))  # "per_query": one sink logit per query position
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * D ** -0.5
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)
        if self.variant == "per_query":
            sinks = self.query_sinks[:t].reshape(1, 1, -1, 1).expand(b, H, -1, -1)
        combined = torch.cat([s, sinks], dim=-1)
        if self.variant == "scaled_after_cat":
            combined = combined * 0.5  # also scales the sink: still exact, but not the spelling matched
        p = torch.softmax(combined, dim=-1)
        if self.variant == "sink_kept":  # the sink's weight also weighs a value row of ones
            v = torch.cat([v, torch.ones(b, H, 1, D)], dim=2)
        else:
            p = p[..., :-1]
        return (p @ v).transpose(1, 2).reshape(b, t, C)


def _calls(opt, name: str) -> int:
    return sum(1 for n in opt.graph_module.graph.nodes if n.op == "call_function" and name in str(n.target))


def _assert_matches_eager(model: nn.Module, opt: nn.Module) -> None:
    for b, t in ((B, T), (3, 7), (1, 1)):
        x = _x(b, t)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["sliced", "per_query"])
def test_attention_sink_is_rewritten_with_the_lse(variant: str) -> None:
    """A sink per query is as exact as one per head: it only joins each row's normaliser."""
    model = Sinks(variant).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    entry, = opt.report.entries
    assert entry.status == "REWRITTEN", opt.report
    assert (_calls(opt, "attnfx.attention"), _calls(opt, "softmax"), _calls(opt, "aten.cat"),
            _calls(opt, "sigmoid")) == (1, 0, 0, 1)
    _assert_matches_eager(model, opt)


@pytest.mark.parametrize("variant", ["sink_kept", "scaled_after_cat"])
def test_sink_near_miss_is_kept(variant: str) -> None:
    model = Sinks(variant).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("REFUSED", "SCORE_OP_UNSUPPORTED")], \
        opt.report
    assert _calls(opt, "softmax") == 1
    _assert_matches_eager(model, opt)


class GptOss(Sinks):
    """gpt-oss's spelling: an additive causal mask, and the row max subtracted by hand before an
    explicit softmax (softmax(x - max x) is softmax(x)); `max_dim` -2 is a max over the queries."""

    def __init__(self, max_dim: int = -1) -> None:
        super().__init__()
        self.max_dim = max_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * D ** -0.5 + torch.full((t, t), float("-inf")).triu(1)
        combined = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)], dim=-1)
        combined = combined - combined.max(dim=self.max_dim, keepdim=True).values
        p = torch.softmax(combined, dim=-1, dtype=combined.dtype)
        return (p[..., :-1] @ v).transpose(1, 2).reshape(b, t, C)


def test_gpt_oss_sinks_with_a_hand_subtracted_max_are_rewritten() -> None:
    model = GptOss().eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"], opt.report
    assert (_calls(opt, "attnfx.attention"), _calls(opt, "softmax"), _calls(opt, "aten.max")) == (1, 0, 0)
    _assert_matches_eager(model, opt)


def test_max_over_the_queries_subtracted_is_kept() -> None:
    model = GptOss(max_dim=-2).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("REFUSED", "SCORE_DEPENDENT_MASK")], \
        opt.report
    assert _calls(opt, "softmax") == 1
    _assert_matches_eager(model, opt)
