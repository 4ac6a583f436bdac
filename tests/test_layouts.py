"""Sites whose batch layout changes between contraction and softmax, and KV-cache decode."""
from __future__ import annotations

import torch

import attnfx
import attention_cases as cases
from attention_cases import DecodeStep, Projected, inputs


def test_scores_viewed_between_merged_and_split_heads_are_rewritten() -> None:
    model = Projected(cases.rebatched_scores).eval()
    opt = attnfx.optimize(model, inputs())
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN", opt.report
    assert (entry.spec.batch, entry.spec.heads) == (2, 4)  # the softmax's (B, H) layout is canonical
    assert entry.lowering == "flag"  # the causal mask added in the (B, H) view is proven
    for t, b in ((12, 2), (30, 3)):
        x = inputs(t, b)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


def decode_inputs(m: int, n_past: int, b: int = 2):
    g = torch.Generator().manual_seed(m * 100 + n_past)
    shape = (b, cases.H, n_past, cases.D)
    return torch.randn(b, m, cases.C, generator=g), torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_decode_step_with_bottom_right_causal_mask() -> None:
    model = DecodeStep().eval()
    opt = attnfx.optimize(model, decode_inputs(4, 28))
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN", opt.report
    assert entry.mask == "causal bottom-right (n <= m + N - M)"
    assert (entry.spec.q_len, entry.spec.kv_len) == (4, 32)
    # SDPA's is_causal is top-left: the proven bottom-right mask goes in as a tensor.
    assert ("sdpa", "flag", "SDPA's is_causal is top-left aligned and this site's diagonal is bottom-right with M != N") \
        in entry.unavailable
    for m, n_past in ((4, 28), (3, 61), (1, 17)):
        x = decode_inputs(m, n_past)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


class QueryHeadKeyScores(torch.nn.Module):
    """Scores laid out (batch, query, head, key), K/V grouped: the query axis is not a head axis."""

    def __init__(self, heads: int = 6, kv_heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.q = torch.nn.Linear(heads * dim, heads * dim)
        self.kv = torch.nn.Linear(heads * dim, 2 * kv_heads * dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.dim)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.dim).unbind(2)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        p = torch.einsum("txhi,tphi->txhp", q, k).mul(self.dim ** -0.5).softmax(-1)
        return torch.einsum("txhp,tphi->txhi", p, v).reshape(b, t, -1)


def test_query_head_key_score_layout_with_gqa_is_rewritten() -> None:
    torch.manual_seed(0)
    model = QueryHeadKeyScores().eval()
    x = torch.randn(2, 5, 48)
    opt = attnfx.optimize(model, (x,), variants=["sdpa"])
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN", opt.report
    assert (entry.spec.heads, entry.spec.kv_heads, entry.spec.q_len) == (6, 2, 5)
    for shape in ((2, 5), (3, 11), (1, 1)):  # (1, 1) is re-captured: length 1 was specialised
        x = torch.randn(*shape, 48)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)
