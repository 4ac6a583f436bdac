"""A tiny language model whose attention is attnfx::attention trains like the one written by hand,
also after torch.export and a save/load round trip (the ops' CPU implementation runs throughout)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from attnfx.cost_model import AttentionSpec, Causal, alibi_slopes
from attnfx.kernels import Operands, get_variant

VOCAB, DIM, HEADS, KV_HEADS, SEQ = 32, 32, 4, 2, 24
HEAD_DIM = DIM // HEADS


def plain_attention(q, k, v, slopes):
    """What a model writes by hand: repeated K/V, explicit ALiBi bias, causal mask, softmax."""
    k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))  # (b, h, n, e)
    pos = torch.arange(q.shape[2])
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + slopes.view(-1, 1, 1) * (pos.view(1, -1) - pos.view(-1, 1))
    scores = scores.masked_fill(pos.view(1, -1) > pos.view(-1, 1), -math.inf)
    return scores.softmax(dim=-1) @ v


def fused_attention(q, k, v, slopes):
    """The call a rewrite to attnfx_chunked emits for the same site."""
    b, h, m, e = q.shape
    spec = AttentionSpec(b, h, k.shape[1], m, m, e, e, scale=1 / math.sqrt(e), causal=Causal.TOP_LEFT, alibi=True)
    return get_variant("attnfx_chunked").call(spec, Operands(q=q, k=k, v=v, slopes=slopes)).run()


class TinyLM(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.embed = nn.Embedding(VOCAB, DIM)
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * HEAD_DIM)
        self.out = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("slopes", alibi_slopes(HEADS))

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.embed(tokens)  # (b, t, d)
        q = self.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)  # (b, h, t, e)
        k, v = self.kv(x).view(b, t, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # (b, hk, t, e) each
        o = self.attend(q, k, v, self.slopes).transpose(1, 2).reshape(b, t, DIM)
        return self.head(x + self.out(o))  # (b, t, vocab)


def train(model: nn.Module, tokens: torch.Tensor, steps: int = 4) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fused_model_trains_like_the_plain_one_also_after_export_and_reload(tmp_path):
    torch.manual_seed(0)
    plain = TinyLM(plain_attention)
    fused = copy.deepcopy(plain)
    fused.attend = fused_attention
    tokens = torch.randint(0, VOCAB, (3, SEQ + 1))

    ep = torch.export.export(copy.deepcopy(fused), (tokens[:, :-1],))
    assert any(getattr(n.target, "name", str)() == "attnfx::attention" for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "tiny_lm.pt2")
    reloaded = torch.export.load(tmp_path / "tiny_lm.pt2").module()

    expected = train(plain, tokens)
    assert expected[-1] < expected[0] - 0.1  # it does learn
    for model in (fused, reloaded):
        assert train(model, tokens) == pytest.approx(expected, rel=1e-5, abs=1e-5)
