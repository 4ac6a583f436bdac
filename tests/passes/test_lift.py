"""The attention rule on its own: a few-line function is traced, lifted, and its roles or its refusal
asserted (no cost model, no emission)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnfx.passes.attention import lift
from attnfx.passes.mask_eval import MaskEvaluator
from attnfx.passes.site import Refusal
from graphs import only, rand, traced

B, H, M, N, E = 2, 3, 5, 7, 4


def lifted(fn, *args):
    gm = traced(fn, *args)
    return lift(only(gm, "softmax"), MaskEvaluator(gm))


def test_bhmd_matmul_lifts_to_canonical_roles() -> None:
    site = lifted(lambda q, k, v: F.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v,
                  rand(B, H, M, E), rand(B, H, N, E), rand(B, H, N, E))
    assert not isinstance(site, Refusal)
    # k as the contraction reads it: the model's own transpose, looked through when emitting
    assert (site.q.roles, site.k.roles, site.v.roles) == (("b0", "b1", "m", "e"), ("b0", "b1", "e", "n"),
                                                          ("b0", "b1", "n", "f"))
    assert site.out_roles == ("b0", "b1", "m", "f")
    assert (site.scale, site.modifiers, site.bias, site.masks) == (0.5, {}, (), ())


def test_query_head_key_score_layout_reads_the_query_axis_as_m() -> None:
    # scores laid out (batch, query, head, key): the query axis is not a head axis
    def attend(q, k, v):
        p = torch.einsum("txhi,tphi->txhp", q, k).softmax(-1)
        return torch.einsum("txhp,tphi->txhi", p, v)

    site = lifted(attend, rand(B, M, H, E), rand(B, N, H, E), rand(B, N, H, E))
    assert not isinstance(site, Refusal)
    assert site.q.roles == ("b0", "m", "b1", "e")
    assert site.k.roles == ("b0", "n", "b1", "e")
    spec = site.lowerings[-1].spec
    assert (spec.batch, spec.heads, spec.kv_heads, spec.q_len, spec.kv_len) == (B, H, H, M, N)


def test_softcap_and_scale_fold_into_canonical_order() -> None:
    site = lifted(lambda q, k, v: F.softmax(torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 30.0) * 30.0, -1) @ v,
                  rand(B, H, M, E), rand(B, H, N, E), rand(B, H, N, E))
    assert (site.scale, site.modifiers) == (pytest.approx(0.5), {"softcap": 30.0})


@pytest.mark.parametrize("fn,code,stage,message", [
    (lambda q, k, v: F.softmax(q @ k.transpose(-1, -2), -2) @ v, "SOFTMAX_AXIS", "softmax",
     "softmax over dim 2, which indexes the queries, not the keys"),
    (lambda q, k, v: (F.softmax(q @ k.transpose(-1, -2), -1) * 2.0) @ v, "PROBS_MODIFIED", "A",
     "applies mul to the weights after the softmax"),
    (lambda q, k, v: F.softmax((q @ k.transpose(-1, -2)).masked_fill(q[..., :1] > 0, 0.0), -1) @ v,
     "UNPROVEN_MASK", "mask", "sets scores to 0, which keeps them in the softmax: it is not an exclusion mask"),
    (lambda q, k, v: F.softmax(torch.relu(q @ k.transpose(-1, -2)), -1) @ v, "SCORE_OP_UNSUPPORTED", "S",
     "applies relu to the scores, which no attention variant computes"),
])
def test_near_misses_are_refused_with_code_stage_and_reason(fn, code, stage, message) -> None:
    refusal = lifted(fn, rand(B, H, M, E), rand(B, H, M, E), rand(B, H, M, E))
    assert isinstance(refusal, Refusal)
    assert (refusal.code.value, refusal.stage) == (code, stage)
    assert message in refusal.message


def test_lifting_does_not_change_the_graph() -> None:
    gm = traced(lambda q, k, v: F.softmax(q @ k.transpose(-1, -2) / math.sqrt(E), -1) @ v,
                rand(B, H, M, E), rand(B, H, N, E), rand(B, H, N, E))
    before = gm.code
    lift(only(gm, "softmax"), MaskEvaluator(gm))
    assert gm.code == before
