"""The mask proof on its own: a mask-building function is traced, evaluated symbolically, and the
facts classified for every length."""
from __future__ import annotations

import pytest
import torch

from attnfx.passes import ops
from attnfx.passes.mask_eval import MaskEvaluator
from attnfx.passes.mask_proof import classify, keep_predicate
from graphs import rand, traced


def facts(keep_fn, m: int = 6, n: int = 6):
    """Classify the keep-mask `keep_fn(scores)` builds over a (m, n) score matrix."""
    gm = traced(lambda s: s.masked_fill(~keep_fn(s), float("-inf")), rand(m, n))
    fill = next(n for n in gm.graph.nodes if ops.kind(n) == "masked_fill")
    mask_node, score = fill.args[1], fill.args[0]
    keep = keep_predicate(MaskEvaluator(gm).value(mask_node), ("m", "n"), fill_is_keep=True)
    q_len, kv_len = ops.shape(score)
    return classify(keep, ops.sym_expr(q_len), ops.sym_expr(kv_len))


def arange_mn(s):
    m, n = s.shape[-2:]
    return torch.arange(m)[:, None], torch.arange(n)[None, :]


@pytest.mark.parametrize("keep_fn,text", [
    (lambda s: torch.ones(s.shape[-2:], dtype=torch.bool).tril(), "causal top-left (n <= m)"),
    (lambda s: arange_mn(s)[1] <= arange_mn(s)[0], "causal top-left (n <= m)"),
    (lambda s: torch.subtract(arange_mn(s)[1], arange_mn(s)[0]) <= 0, "causal top-left (n <= m)"),
    (lambda s: torch.le(arange_mn(s)[1] - 2, arange_mn(s)[0] - 2), "causal top-left (n <= m)"),
    (lambda s: (arange_mn(s)[1] <= arange_mn(s)[0]) & (arange_mn(s)[1] > arange_mn(s)[0] - 3),
     "causal top-left (n <= m), sliding window of 3 keys"),
    (lambda s: arange_mn(s)[1] <= arange_mn(s)[0] + 1, "unproven: n <= m + 1"),
])
def test_square_masks(keep_fn, text) -> None:
    assert facts(keep_fn).text == text


def test_bottom_right_diagonal_of_a_kv_cache() -> None:
    def keep(s):
        m, n = s.shape[-2:]
        return torch.arange(n)[None, :] <= torch.arange(m)[:, None] + (n - m)

    assert facts(keep, 3, 8).text == "causal bottom-right (n <= m + N - M)"


def test_evaluating_a_mask_does_not_change_the_graph() -> None:
    gm = traced(lambda s: s.masked_fill(torch.ones(s.shape, dtype=torch.bool).triu(1), -1e9), rand(4, 4))
    before = gm.code
    fill = next(n for n in gm.graph.nodes if ops.kind(n) == "masked_fill")
    MaskEvaluator(gm).value(fill.args[1])
    assert gm.code == before
