"""Failures the attention fuzzer found (tests/fuzz/, benchmarks/fuzz.py), each as the smallest module
that shows it. A test marked xfail(strict) still fails on main; its fix removes the marker."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfx

B, T, H, D = 2, 12, 4, 8
C = H * D


def _x(b: int = B, t: int = T) -> torch.Tensor:
    return torch.randn(b, t, C, generator=torch.Generator().manual_seed(31 * t + b))


def _assert_matches_eager(model: nn.Module, opt: nn.Module, shapes=((B, T), (3, 7), (1, 1))) -> None:
    for b, t in shapes:
        x = _x(b, t)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


class Heads(nn.Module):
    """x (b, t, C) -> q, k, v (b, h, t, d) -> `attend` -> (b, t, C)."""

    def __init__(self, attend) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.attend = attend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        return self.attend(q, k, v).transpose(1, 2).reshape(b, t, C)


# -- a hand-written softmax is a softmax: the report must list it (was invisible) ------------------
def _amax(s):
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _max_values(s):
    e = (s - s.max(-1).values[..., None]).exp()
    return e / e.sum(-1, keepdim=True)


def _max_indexed(s):
    e = torch.exp(s - s.max(dim=-1, keepdim=True)[0])
    return e / torch.sum(e, dim=-1, keepdim=True)


def _logsumexp(s):
    return torch.exp(s - torch.logsumexp(s, -1, keepdim=True))


def _no_max(s):
    e = s.exp()
    return e / e.sum(-1, keepdim=True)


def _detached_max(s):
    e = torch.exp(s - s.amax(-1, keepdim=True).detach())
    return e.div(e.sum(-1, keepdim=True))


@pytest.mark.parametrize("normalise", [_amax, _max_values, _max_indexed, _logsumexp, _no_max, _detached_max],
                         ids=lambda f: f.__name__.strip("_"))
def test_handwritten_softmax_is_listed_in_the_report(normalise) -> None:
    model = Heads(lambda q, k, v: normalise(q @ k.transpose(-2, -1) * D ** -0.5) @ v).eval()
    opt = attnfx.optimize(model, (_x(),))
    assert len(opt.report.entries) == 1, opt.report
    _assert_matches_eager(model, opt)


class GroupedProjection(nn.Module):
    """x (b, t, C) -> q (b, t, H, D) and k, v (b, t, kv_heads, D)."""

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * kv_heads * D)
        self.kv_heads = kv_heads

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, D).unbind(2)
        return self.q(x).view(b, t, H, D), k, v


# -- scores laid out (batch, query, head, key) -----------------------------------------------------
class QueryHeadKeyScores(GroupedProjection):
    """einsum("txhi,tphi->txhp"): the scores' head axis comes after the query axis (the query axis was
    read as the head axis: at length 1 the re-specialisation raised 'heads (1) must be a multiple of
    kv_heads')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        k, v = (z.repeat_interleave(H // self.kv_heads, dim=2) for z in (k, v))
        p = torch.einsum("txhi,tphi->txhp", q, k).mul(D ** -0.5).softmax(-1)
        return torch.einsum("txhp,tphi->txhi", p, v).flatten(2)


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_query_head_key_scores_survive_respecialisation(kv_heads: int) -> None:
    model = QueryHeadKeyScores(kv_heads).eval()
    opt = attnfx.optimize(model, (_x(),))
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"], opt.report
    _assert_matches_eager(model, opt)


# -- GQA as a broadcast over a group dim, in an einsum whose operands are laid out queries-first ---------
class GroupedEinsum(GroupedProjection):
    """q (b, m, kv, g, d) against k, v (b, n, kv, d): GQA without repeating K and V (at query length 1
    the batch-layout check raised KeyError ('b0', 'b2', 'b1'))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        q = q.unflatten(2, (self.kv_heads, H // self.kv_heads))
        p = torch.einsum("bmkgd,bnkd->bkgmn", q, k).softmax(-1)
        return torch.einsum("bkgmn,bnkd->bmkgd", p, v).flatten(2)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_einsum_at_query_length_one_is_optimised(kv_heads: int) -> None:
    model = GroupedEinsum(kv_heads).eval()
    opt = attnfx.optimize(model, (_x(B, 1),))
    assert len(opt.report.entries) == 1, opt.report
    _assert_matches_eager(model, opt, shapes=((B, 1), (3, 1)))


# -- a scale on V is refused however V reaches the AV contraction ----------------------------------
def _scaled_values_merged_heads(q, k, v):
    b = q.shape[0]
    v = v * 0.5
    q, k, v = (z.reshape(b * H, -1, D) for z in (q, k, v))
    p = torch.bmm(q, k.transpose(1, 2)).mul(D ** -0.5).softmax(-1)
    return torch.bmm(p, v).view(b, H, -1, D)


def _scaled_values_repeated_heads(q, k, v, past: int = 0):
    """Found by the fuzzer (KNOWN_BROKEN scale_on_values): GQA's `repeat_interleave` between the scale
    and the merged-heads bmm hid the scale, so the near-miss was rewritten."""
    b = q.shape[0]
    k, v = k[:, :2], v[:, :2]  # 2 kv heads
    if past:
        cached = torch.ones(b, 2, past, D, dtype=v.dtype)
        k, v = torch.cat([cached, k], dim=2), torch.cat([cached, v], dim=2)
    v = v * 0.5
    k, v = k.repeat_interleave(H // 2, dim=1), v.repeat_interleave(H // 2, dim=1)
    q, k, v = (z.reshape(b * H, -1, D) for z in (q, k, v))
    p = torch.bmm(q, k.transpose(1, 2)).mul(D ** -0.5).softmax(-1)
    return torch.bmm(p, v).view(b, H, -1, D)


@pytest.mark.parametrize("attend", [_scaled_values_merged_heads, _scaled_values_repeated_heads,
                                    lambda q, k, v: _scaled_values_repeated_heads(q, k, v, past=3)],
                         ids=["reshape", "repeat_interleave", "repeat_interleave_after_cache_concat"])
def test_scale_on_values_behind_a_reshape_is_refused(attend) -> None:
    model = Heads(attend).eval()
    opt = attnfx.optimize(model, (_x(),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("REFUSED", "SCALE_ON_VALUES")], opt.report
    _assert_matches_eager(model, opt)


# -- a finite fill competes with a finite bias: rows whose every kept key is padded -------------------
class PaddedWindow(nn.Module):
    """Found by the long run (long3:131): a softcap, a sliding window filled with -1e9 plus HF's
    additive -1e9 key padding. With left padding a query's whole window can be padded; eager then spreads that row
    over every key (all scores are about -1e9), so the window must not become a kernel flag."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        s = torch.tanh(q @ k.transpose(-2, -1) / 5.0) * 5.0  # a softcap: SDPA cannot take the site
        s = s + (1.0 - attention_mask[:, None, None, :].to(s.dtype)) * -1e9
        window = torch.ones(t, t, dtype=torch.bool).tril().triu(-3)
        s = torch.where(window, s, -1e9)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, C)


def _left_padded(b: int, t: int, kept: int) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1:, : t - kept] = 0  # row 0 unpadded; the others keep only their last `kept` keys
    return mask


def test_finite_window_fill_with_an_additive_padding_bias_keeps_eager_on_padded_rows() -> None:
    model = PaddedWindow().eval()
    opt = attnfx.optimize(model, (_x(), _left_padded(B, T, 8)))
    entry, = opt.report.entries
    assert (entry.status, entry.lowering) == ("REWRITTEN", "tensor"), opt.report
    for b, t, kept in ((B, T, 8), (3, 7, 2), (2, 9, 1)):
        x, mask = _x(b, t), _left_padded(b, t, kept)
        with torch.no_grad():
            torch.testing.assert_close(opt(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
