"""Sigmoid attention (rule `attention.sigmoid`): `sigmoid(QK-scores + b) @ V` is lifted like softmax
attention and rewritten to attnfx::sigmoid_attention; sigmoids that are not attention are not
listed, and sigmoid attention that no variant computes is kept with its reason."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnfx
from attnfx.kernels.variant import call_arguments
import attention_cases as cases
from attention_cases import Projected, inputs

T = cases.T


def scores(q, k):
    return q @ k.transpose(-2, -1) * cases.SCALE


def plain(q, k, v):
    return torch.sigmoid(scores(q, k)) @ v


def logit_bias(q, k, v):  # FlashSigmoid's b = -log(n), n the context length the model was built for
    return torch.sigmoid(scores(q, k) - math.log(T)) @ v


def bias_before_scale(q, k, v):  # the shift is scaled with the scores: sigmoid((s - 2) * 0.5)
    return torch.sigmoid((q @ k.transpose(-2, -1) - 2.0) * 0.5) @ v


def causal_masked_scores(q, k, v):
    s = scores(q, k).masked_fill(~cases.causal_keep(q.size(-2), q.device), float("-inf"))
    return torch.sigmoid(s - 1.0) @ v


def causal_zeroed_weights(q, k, v):  # zeroing a weight after the sigmoid is masking its score
    w = torch.sigmoid(scores(q, k))
    return torch.where(cases.causal_keep(q.size(-2), q.device), w, 0.0) @ v


def f_sigmoid_transposed(q, k, v):
    w = F.sigmoid(torch.einsum("bhmd,bhnd->bhnm", q, k) * cases.SCALE)
    return w.transpose(-2, -1) @ v


POSITIVE = {
    "plain": (plain, 0.0),
    "logit_bias": (logit_bias, -math.log(T)),
    "bias_before_scale": (bias_before_scale, -1.0),
    "causal_masked_scores": (causal_masked_scores, -1.0),
    "causal_zeroed_weights": (causal_zeroed_weights, 0.0),
    "f_sigmoid_transposed": (f_sigmoid_transposed, 0.0),
}


def _calls(opt, op: str) -> list:
    return [n for n in opt.graph_module.graph.nodes if getattr(n.target, "name", str)() == op]


@pytest.mark.parametrize("name", POSITIVE)
def test_sigmoid_attention_is_rewritten_exactly(name: str) -> None:
    attend, bias = POSITIVE[name]
    model = Projected(attend).eval()
    opt = attnfx.optimize(model, inputs(), variants=["attnfx_sigmoid_chunked"])  # at any shape, not by cost
    (entry,) = opt.report.entries
    assert (entry.rule, entry.status, entry.variant) == ("attention.sigmoid", "REWRITTEN", "attnfx_sigmoid_chunked")
    assert entry.spec.kind.value == "sigmoid" and entry.spec.logit_bias == pytest.approx(bias)
    (call,) = _calls(opt, "attnfx::sigmoid_attention")
    assert call.args[-1] == pytest.approx(bias)
    assert not [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.sigmoid.default]
    for t in (T, 20):  # the example length and another
        x = inputs(t)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x))


@pytest.mark.parametrize("attend", [causal_masked_scores, causal_zeroed_weights])
def test_causal_sigmoid_is_proven_causal(attend) -> None:
    """Both mask spellings are proven top-left causal; at 1024 tokens the in-kernel band (no mask
    tensor read) is predicted cheaper than the model's mask, and chosen."""
    model = Projected(attend).eval()
    opt = attnfx.optimize(model, inputs(1024), variants=["attnfx_sigmoid_chunked"])
    (entry,) = opt.report.entries
    assert entry.mask == "causal top-left (n <= m)"
    assert (entry.lowering, entry.spec.causal.value) == ("flag", "top_left")
    (call,) = _calls(opt, "attnfx::sigmoid_attention")
    arguments = call_arguments(call)
    assert arguments["bias"] is None and arguments["causal"] == "top_left"  # no mask tensor: the band is the kernel's
    x = inputs(1024)
    with torch.no_grad():  # unnormalised weights: each output sums ~500 terms, in another order
        torch.testing.assert_close(opt(*x), model(*x), rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_a_rewritten_sigmoid_site() -> None:
    model = Projected(logit_bias)
    opt = attnfx.optimize(model, inputs(), variants=["attnfx_sigmoid_chunked"])
    assert opt.report.rewritten == 1
    cases.check_gradients(model, opt, inputs())


def renormalised(q, k, v):
    w = torch.sigmoid(scores(q, k))
    return (w / w.sum(-1, keepdim=True)) @ v


def weights_times_tensor(q, k, v):
    return (torch.sigmoid(scores(q, k)) * torch.linspace(0, 1, k.size(-2))) @ v


def weights_zeroed_by_a_float_mask(q, k, v):
    w = torch.sigmoid(scores(q, k))
    return w.masked_fill(~cases.causal_keep(q.size(-2), q.device), 0.5) @ v


def softcap_after_shift(q, k, v):
    return torch.sigmoid(torch.tanh((scores(q, k) - 1.0) / 30.0) * 30.0) @ v


NEAR_MISSES = {
    "renormalised": (renormalised, "PROBS_ESCAPE", "the attention weights (sigmoid) are also used by"),
    "weights_times_tensor": (weights_times_tensor, "PROBS_MODIFIED", "applies mul to the weights after the sigmoid"),
    "weights_set_to_a_half": (weights_zeroed_by_a_float_mask, "MASK_AFTER_SOFTMAX",
                              "masks the weights after the sigmoid, which no attention variant computes"),
    "softcap_after_shift": (softcap_after_shift, "SCORE_ORDER", "softcap"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_sigmoid_near_miss_is_kept_with_its_reason(name: str) -> None:
    attend, code, text = NEAR_MISSES[name]
    cases.check_kept(attend, "attention.sigmoid", code, text, "attnfx::sigmoid_attention")


def swiglu_block(q, k, v):  # a SiLU gate on the values, then softmax attention
    gated = v * torch.sigmoid(v)
    return F.softmax(scores(q, k), dim=-1) @ gated


def gate_of_scores(q, k, v):  # a sigmoid gate multiplying the scores is not attention weights
    gate = torch.sigmoid(q.sum(-1, keepdim=True) * k.sum(-1, keepdim=True).transpose(-2, -1))
    return F.softmax(scores(q, k) + gate, dim=-1) @ v


def test_the_cost_model_picks_between_the_sigmoid_kernel_and_eager() -> None:
    """Without a restriction both are priced: the report lists each with a predicted time."""
    entry = attnfx.optimize(Projected(logit_bias).eval(), inputs()).report.entries[0]
    priced = {row.variant for row in entry.candidates}
    assert {"attnfx_sigmoid_chunked", "eager"} <= priced
    assert entry.variant in ("attnfx_sigmoid_chunked", None)


@pytest.mark.parametrize("attend", [swiglu_block, gate_of_scores])
def test_sigmoids_that_are_not_attention_are_not_listed(attend) -> None:
    opt = attnfx.optimize(Projected(attend).eval(), inputs())
    assert [e.rule for e in opt.report.entries] == ["attention.softmax"]
    assert sum(n.target is torch.ops.aten.sigmoid.default for n in opt.graph_module.graph.nodes) == 1
