"""Mask proofs: what attnfx proves about a mask from how the model builds it, for every length."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import attnfx
import attention_cases as cases
from attention_cases import Projected, inputs


def attend_with(keep_fn):
    def attend(q, k, v):
        t = q.size(-2)
        keep = keep_fn(t, q.device)
        s = (q @ k.transpose(-2, -1) * cases.SCALE).masked_fill(~keep, float("-inf"))
        return F.softmax(s, dim=-1) @ v
    return attend


def idx(t, device):
    i = torch.arange(t, device=device)
    return i[:, None], i[None, :]  # (m, 1), (1, n)


MASKS = {
    "tril_ones": (lambda t, d: torch.ones(t, t, dtype=torch.bool, device=d).tril(), "causal top-left (n <= m)"),
    "triu_negated": (lambda t, d: ~torch.ones(t, t, dtype=torch.bool, device=d).triu(1), "causal top-left (n <= m)"),
    "arange_le": (lambda t, d: idx(t, d)[1] <= idx(t, d)[0], "causal top-left (n <= m)"),
    "arange_lt_plus_one": (lambda t, d: idx(t, d)[1] < idx(t, d)[0] + 1, "causal top-left (n <= m)"),
    "sliding_window": (lambda t, d: (idx(t, d)[1] <= idx(t, d)[0]) & (idx(t, d)[1] > idx(t, d)[0] - 4),
                       "causal top-left (n <= m), sliding window of 4 keys"),
    "shifted_diagonal": (lambda t, d: idx(t, d)[1] <= idx(t, d)[0] + 2, "unproven: n <= m + 2"),
    "window_without_causal": (lambda t, d: (idx(t, d)[0] - idx(t, d)[1]).abs() < 3, "unproven: Abs(m - n) < 3"),
}


@pytest.mark.parametrize("name", MASKS)
def test_mask_is_proven_from_its_construction(name: str) -> None:
    keep_fn, expected = MASKS[name]
    model = Projected(attend_with(keep_fn)).eval()
    opt = attnfx.optimize(model, inputs(), variants=["sdpa"])  # SDPA takes a flag only for plain causal
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN"
    assert entry.mask == expected
    structural = expected.startswith("causal") and "window" not in expected
    assert entry.lowering == ("flag" if structural else "tensor")
    for t, b in ((12, 2), (29, 1)):
        x = inputs(t, b)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


class PaddedCausal(torch.nn.Module):
    """Causal and key padding combined, as HF builds it: kept as one tensor, both parts proven."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(cases.C, 3 * cases.C)

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, cases.H, cases.D).transpose(1, 2) for z in self.proj(x).split(cases.C, -1))
        m_idx, n_idx = idx(t, x.device)
        keep = (n_idx <= m_idx)[None, None] & attention_mask.bool()[:, None, None, :]
        bias = torch.where(keep, 0.0, torch.finfo(x.dtype).min)
        return F.softmax(q @ k.transpose(-2, -1) * cases.SCALE + bias, dim=-1) @ v


def test_causal_and_padding_are_both_named_and_the_mask_is_kept() -> None:
    model = PaddedCausal().eval()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding: query rows 0-2 see no key at all
    opt = attnfx.optimize(model, (inputs()[0], mask))
    (entry,) = opt.report.entries
    assert entry.mask == "causal top-left (n <= m), key padding read from attention_mask(b, n)"
    assert entry.lowering == "tensor" and entry.spec.mask.value == "additive"
    with torch.no_grad():  # fully masked rows keep eager's finfo.min semantics (uniform), exactly
        torch.testing.assert_close(opt(inputs()[0], mask), model(inputs()[0], mask), atol=1e-5, rtol=1e-5)


class SymbolicDiagonal(torch.nn.Module):
    """KV-cache code: new queries over past + new keys, the diagonal offset computed from the sizes."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.proj = torch.nn.Linear(cases.C, 3 * cases.C)

    def forward(self, x, past_k, past_v):
        b, m, _ = x.shape
        q, k, v = (z.view(b, m, cases.H, cases.D).transpose(1, 2) for z in self.proj(x).split(cases.C, -1))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        n = k.size(2)
        if self.spelling == "triu":
            excluded = torch.ones(m, n, dtype=torch.bool, device=x.device).triu(n - m + 1)
        else:
            excluded = ~torch.ones(m, n, dtype=torch.bool, device=x.device).tril(diagonal=n - m)
        s = (q @ k.transpose(-1, -2) * cases.SCALE).masked_fill(excluded, float("-inf"))
        return (F.softmax(s, -1) @ v).transpose(1, 2).reshape(b, m, cases.C)


@pytest.mark.parametrize("spelling", ["triu", "tril"])
def test_symbolic_diagonal_is_proven_bottom_right(spelling: str) -> None:
    def step(m, past, b=2):
        g = torch.Generator().manual_seed(m + past)
        return (torch.randn(b, m, cases.C, generator=g), torch.randn(b, cases.H, past, cases.D, generator=g),
                torch.randn(b, cases.H, past, cases.D, generator=g))

    model = SymbolicDiagonal(spelling).eval()
    opt = attnfx.optimize(model, step(4, 12))
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN", opt.report
    assert entry.mask == "causal bottom-right (n <= m + N - M)"
    # the proof offers the flag lowering (no mask tensor) to the variants that take a bottom-right diagonal
    assert [(c.variant, c.lowering) for c in entry.candidates if c.lowering == "flag"] == [
        ("attnfx_bounded", "flag"), ("attnfx_chunked", "flag")]
    for m, past in ((4, 12), (7, 30), (1, 9)):
        with torch.no_grad():
            torch.testing.assert_close(opt(*step(m, past)), model(*step(m, past)), atol=1e-5, rtol=1e-5)


class DecodeStep(torch.nn.Module):
    """One new query over a cache, its position counted from the cache length, as Hugging Face
    builds a decode step's mask: with one query row the mask reads no query index at all."""

    def __init__(self, last_visible: int = 0) -> None:
        super().__init__()
        self.last_visible = last_visible  # 0: the new key; -1: a near-miss that hides it
        self.proj = torch.nn.Linear(cases.C, 3 * cases.C)

    def forward(self, x, past_k, past_v):
        b, m, _ = x.shape
        q, k, v = (z.view(b, m, cases.H, cases.D).transpose(1, 2) for z in self.proj(x).split(cases.C, -1))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        position = past_k.size(2) + self.last_visible + torch.arange(m, device=x.device)
        keep = torch.arange(k.size(2), device=x.device)[None, :] <= position[:, None]
        bias = torch.where(keep, 0.0, torch.finfo(x.dtype).min)
        s = q @ k.transpose(-1, -2) * cases.SCALE + bias
        return (F.softmax(s, -1) @ v).transpose(1, 2).reshape(b, m, cases.C)


def decode_inputs(past: int, b: int = 2):
    g = torch.Generator().manual_seed(past)
    return (torch.randn(b, 1, cases.C, generator=g), torch.randn(b, cases.H, past, cases.D, generator=g),
            torch.randn(b, cases.H, past, cases.D, generator=g))


def _decode_through_the_backend(model: torch.nn.Module) -> list:
    """Compile `model` with the backend (Dynamo keeps the one query row static, as in generate()'s
    decode graphs), check it against eager at a few cache lengths, return its graphs' sites."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnfx", options={"inductor": False, "variants": ["sdpa"]})
    for past in (12, 13, 30):
        with torch.no_grad():
            torch.testing.assert_close(compiled(*decode_inputs(past)), model(*decode_inputs(past)),
                                       atol=1e-5, rtol=1e-5)
    return [e for report in attnfx.reports(compiled) for e in report.entries]


def test_a_decode_steps_diagonal_is_proven_and_runs_sdpa_without_a_mask() -> None:
    entries = _decode_through_the_backend(DecodeStep().eval())
    assert len(entries) == 2  # a static cache length, then one graph for every later length
    for entry in entries:
        assert entry.status == "REWRITTEN"
        assert entry.mask == "causal bottom-right (n <= m + N - M)"
        assert (entry.variant, entry.lowering, entry.spec.mask.value) == ("sdpa", "flag", "none")
        assert not entry.spec.diagonal_hides_keys


def test_a_decode_mask_that_hides_the_new_key_is_not_a_diagonal() -> None:
    entries = _decode_through_the_backend(DecodeStep(last_visible=-1).eval())
    static, dynamic = (e.mask for e in entries)
    assert static == "unproven: n <= m + 11"  # N - M is 12
    assert re.fullmatch(r"unproven: n <= m \+ s\d+ - 1", dynamic), dynamic  # N - M is the cache length s
    assert all((e.lowering, e.spec.mask.value) == ("tensor", "additive") for e in entries)
