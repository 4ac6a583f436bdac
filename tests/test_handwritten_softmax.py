"""Softmaxes written out by hand are attention like any other: rewritten when they are, listed with a
reason when they are not, and left in their own spelling unless rewritten."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import Projected, inputs


def scores(q, k):
    return q @ k.transpose(-2, -1) * cases.SCALE


def normalised(e, dim=-1):
    return e / e.sum(dim, keepdim=True)


FORMS = {
    "amax": lambda s: normalised(torch.exp(s - s.amax(-1, keepdim=True))),
    "max_values_indexed": lambda s: normalised(torch.exp(s - s.max(-1).values[..., None])),
    "max_keepdim_detached": lambda s: normalised(torch.exp(s - s.max(dim=-1, keepdim=True)[0].detach())),
    "logsumexp": lambda s: torch.exp(s - torch.logsumexp(s, -1, keepdim=True)),
    "no_max": lambda s: normalised(s.exp()),
    "times_reciprocal": lambda s: (lambda e: e * (1.0 / e.sum(-1, keepdim=True)))(torch.exp(s - s.amax(-1, True))),
}


@pytest.mark.parametrize("form", FORMS)
def test_hand_written_softmax_is_rewritten(form: str) -> None:
    model = Projected(lambda q, k, v: FORMS[form](scores(q, k)) @ v).eval()
    opt = attnfx.optimize(model, inputs(), variants=["sdpa"])
    (entry,) = opt.report.entries
    assert (entry.node, entry.status, entry.variant) == ("handwritten_softmax", "REWRITTEN", "sdpa"), opt.report
    assert not [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.exp.default]
    for t, b in ((12, 2), (29, 3), (1, 2)):
        with torch.no_grad():
            torch.testing.assert_close(opt(*inputs(t, b)), model(*inputs(t, b)), atol=1e-5, rtol=1e-5)


def test_normalised_over_the_queries_is_refused_and_keeps_its_spelling() -> None:
    model = Projected(lambda q, k, v: normalised(scores(q, k).exp(), dim=-2) @ v).eval()
    opt = attnfx.optimize(model, inputs(), variants=["sdpa"])
    (entry,) = opt.report.entries
    assert (entry.status, entry.reason_code) == ("REFUSED", "SOFTMAX_AXIS")
    assert entry.reason == "softmax over dim 2, which indexes the queries, not the keys"
    targets = [n.target for n in opt.graph_module.graph.nodes]
    assert torch.ops.aten.exp.default in targets and torch.ops.aten._softmax.default not in targets
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()))


def test_max_and_sum_over_different_dims_is_not_a_softmax() -> None:
    model = Projected(lambda q, k, v: (lambda s: (lambda e: e / e.sum(-1, keepdim=True))(
        torch.exp(s - s.amax(-2, keepdim=True))))(scores(q, k)) @ v).eval()
    opt = attnfx.optimize(model, inputs(), variants=["sdpa"])
    assert opt.report.entries == []


class NormaliserReturned(nn.Module):
    def forward(self, q, k, v):
        s = scores(q, k)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        z = e.sum(-1, keepdim=True)
        return (e / z) @ v, z


def test_intermediate_used_elsewhere_is_listed_with_its_reason() -> None:
    args = tuple(torch.randn(2, 3, 5, 4) for _ in range(3))
    opt = attnfx.optimize(NormaliserReturned(), args)
    (entry,) = opt.report.entries
    assert (entry.status, entry.reason_code) == ("REFUSED", "PROBS_ESCAPE")
    assert entry.reason == "a softmax written out by hand, whose intermediate sum_1 is also used by output"
