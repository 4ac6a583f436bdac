"""Linear attention (rule `attention.linear`): `(phi(Q) phi(K)^T * M) V`, written by hand with no
softmax, is lifted from its AV contraction and rewritten to attnfx::linear_attention (right to left
without a causal band, chunked Lightning with one); near-misses are kept with their reason, and
products that are not attention are not listed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import H, Projected, inputs

T = cases.T
EPS = 1e-6
LENGTHS = (T, 29, 64)  # the example length and two others, one past the chunk size


def phi(x):  # the elu + 1 feature map (Katharopoulos et al.)
    return F.elu(x) + 1


def keep(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def ages(t: int) -> torch.Tensor:
    i = torch.arange(t)
    return i.view(-1, 1) - i.view(1, -1)  # m - n


def lambdas() -> torch.Tensor:
    return torch.linspace(0.75, 0.95, H)


# -- positive spellings: (attend, causal, decay, normalize) ------------------------------------
def causal_elu_masked_fill_normalised(q, k, v):
    w = phi(q) @ phi(k).transpose(-2, -1)
    w = w.masked_fill(~keep(q.size(-2)), 0.0)
    return (w @ v) / (w.sum(-1, keepdim=True) + EPS)


def noncausal_identity(q, k, v):
    return (q @ k.transpose(-2, -1)) @ v * 1.0


def noncausal_relu_normalised_first(q, k, v):
    w = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    return (w / (w.sum(dim=-1, keepdim=True) + 1e-3)) @ v


def causal_exp_tril(q, k, v):
    w = torch.tril(torch.exp(q * 0.1) @ torch.exp(k * 0.1).transpose(-2, -1))
    return w @ v / math.sqrt(T)


def causal_einsum_where(q, k, v):
    w = torch.einsum("bhmd,bhnd->bhmn", phi(q), phi(k)) / math.sqrt(q.size(-1))
    w = torch.where(keep(q.size(-2)), w, 0.0)
    return torch.einsum("bhmn,bhnd->bhmd", w, v)


def causal_float_band_einsum_bshd(q, k, v):
    qs, ks, vs = (z.transpose(1, 2) for z in (q, k, v))  # (b, s, h, d)
    w = torch.einsum("bmhd,bnhd->bhmn", F.softmax(qs, dim=-1), F.softmax(ks, dim=-1))  # softmax over features
    w = w * torch.ones(q.size(-2), q.size(-2)).tril()
    out = torch.einsum("bhmn,bnhd->bmhd", w, vs) / (w.sum(-1).unsqueeze(-1).transpose(1, 2) + EPS)
    return out.transpose(1, 2)


def decay_pow_clamped(q, k, v):
    t = q.size(-2)
    d = lambdas().view(-1, 1, 1) ** ages(t).clamp_min(0) * (ages(t) >= 0)
    return ((torch.relu(q) @ torch.relu(k).transpose(-2, -1)) * 0.25 * d) @ v


def decay_retnet_exp_normalised(q, k, v):  # RetNet's gammas 1 - 2^(-5-h), as exp(log(gamma) * age)
    t = q.size(-2)
    log_gamma = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)))
    d = torch.exp(log_gamma.view(-1, 1, 1) * ages(t)).masked_fill(ages(t) < 0, 0.0)
    w = (phi(q) @ phi(k).transpose(-2, -1)) * d
    return (w @ v) / (w.sum(-1, keepdim=True) + EPS)


def decay_tril_of_pow(q, k, v):
    d = torch.tril(lambdas()[:, None, None] ** ages(q.size(-2)).float())
    w = torch.einsum("bhmd,bhnd->bhmn", phi(q), phi(k)) * d
    return torch.einsum("bhmn,bhnd->bhmd", w, v)


def gqa_causal_normalised(q, k, v):
    kf = phi(k[:, : H // 2]).repeat_interleave(2, dim=1)
    v2 = v[:, : H // 2].repeat_interleave(2, dim=1)
    w = (phi(q) @ kf.transpose(-2, -1)).masked_fill(~keep(q.size(-2)), 0)
    return (w @ v2) / (w.sum(-1, keepdim=True) + EPS)


def bmm_merged_heads_causal(q, k, v):
    b, h, t, d = q.shape
    qf, kf, vf = (z.reshape(b * h, t, d) for z in (phi(q), phi(k), v))
    w = torch.bmm(qf, kf.transpose(1, 2)) * d ** -0.5
    return torch.bmm(w * keep(t), vf).view(b, h, t, d)  # a boolean band multiplied in


POSITIVE = {
    "causal_elu_masked_fill_normalised": (causal_elu_masked_fill_normalised, True, False, True),
    "noncausal_identity": (noncausal_identity, False, False, False),
    "noncausal_relu_normalised_first": (noncausal_relu_normalised_first, False, False, True),
    "causal_exp_tril": (causal_exp_tril, True, False, False),
    "causal_einsum_where": (causal_einsum_where, True, False, False),
    "causal_float_band_einsum_bshd": (causal_float_band_einsum_bshd, True, False, True),
    "decay_pow_clamped": (decay_pow_clamped, True, True, False),
    "decay_retnet_exp_normalised": (decay_retnet_exp_normalised, True, True, True),
    "decay_tril_of_pow": (decay_tril_of_pow, True, True, False),
    "gqa_causal_normalised": (gqa_causal_normalised, True, False, True),
    "bmm_merged_heads_causal": (bmm_merged_heads_causal, True, False, False),
}
LINEAR_VARIANTS = ["attnfx_linear", "attnfx_lightning"]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", POSITIVE)
def test_linear_attention_is_rewritten_exactly(name: str) -> None:
    attend, causal, decay, normalize = POSITIVE[name]
    model = Projected(attend).eval()
    opt = attnfx.optimize(model, inputs(), variants=LINEAR_VARIANTS)  # at any shape, not by cost
    (entry,) = opt.report.entries
    assert (entry.rule, entry.status) == ("attention.linear", "REWRITTEN")
    assert entry.variant == ("attnfx_lightning" if causal else "attnfx_linear")
    spec = entry.spec
    assert (spec.kind.value, spec.causal.value, spec.decay, spec.normalize) == \
        ("linear", "top_left" if causal else "none", decay, normalize)
    (call,) = cases.op_calls(opt, "attnfx::linear_attention")
    assert (call.args[3] is not None) == decay
    squares = [n for n in opt.graph_module.graph.nodes if n.op == "call_function"
               and tuple(getattr(n.meta.get("val"), "shape", ()))[-2:] == (T, T)]
    assert not squares, f"O(N^2) tensors left in the rewritten graph: {squares}"
    for t in LENGTHS:
        x = inputs(t)
        with torch.no_grad():
            assert _relative_error(opt(*x), model(*x)) < 1e-4, t


def test_decay_is_read_from_the_models_tensor_or_proven_per_head() -> None:
    """A decay built from the model's own per-head tensor is passed as that tensor; RetNet's closed
    form 1 - 2^(-5-h) becomes its numbers."""
    opt = attnfx.optimize(Projected(decay_retnet_exp_normalised).eval(), inputs(), variants=LINEAR_VARIANTS)
    (call,) = cases.op_calls(opt, "attnfx::linear_attention")
    values = [n for n in opt.graph_module.graph.nodes if n.target is torch.tensor]
    assert len(values) == 1 and call.args[3] is values[0]
    expected = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(values[0].args[0], dtype=torch.float64), expected, rtol=1e-6, atol=0)


class LearnedDecay(nn.Module):
    """Per-head decay sigmoid(logit) as a parameter of the model, as RetNet-like models learn it."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.linspace(1.0, 3.0, H))
        self.inner = Projected(self.attend)

    def attend(self, q, k, v):
        d = torch.sigmoid(self.logit)[:, None, None] ** ages(q.size(-2)).clamp_min(0)
        w = (phi(q) @ phi(k).transpose(-2, -1)) * d.masked_fill(ages(q.size(-2)) < 0, 0.0)
        return (w @ v) / (w.sum(-1, keepdim=True) + EPS)

    def forward(self, x):
        return self.inner(x)


def test_a_trained_decay_is_kept_and_a_frozen_one_rewritten() -> None:
    model = LearnedDecay().eval()
    (entry,) = attnfx.optimize(model, inputs(), variants=LINEAR_VARIANTS).report.entries
    assert (entry.rule, entry.status, entry.reason_code) == ("attention.linear", "REFUSED", "DECAY_TRAINED")
    assert "logit" in entry.reason
    model.logit.requires_grad_(False)
    opt = attnfx.optimize(model, inputs(), variants=LINEAR_VARIANTS)
    assert opt.report.entries[0].status == "REWRITTEN"
    (call,) = cases.op_calls(opt, "attnfx::linear_attention")
    assert ops_name(call.args[3]) == "reshape"  # the sigmoid of the parameter, one value per head
    for t in LENGTHS:
        x = inputs(t)
        with torch.no_grad():
            assert _relative_error(opt(*x), model(*x)) < 1e-4


def ops_name(node) -> str:
    return node.target._opname if hasattr(node.target, "_opname") else str(node.target)


@pytest.mark.parametrize("name", ["causal_elu_masked_fill_normalised", "decay_retnet_exp_normalised",
                                  "noncausal_relu_normalised_first", "gqa_causal_normalised"])
def test_gradients_flow_through_a_rewritten_linear_site(name: str) -> None:
    model = Projected(POSITIVE[name][0])
    opt = attnfx.optimize(model, inputs(), variants=LINEAR_VARIANTS)
    assert opt.report.rewritten == 1
    for t in (T, 29):
        cases.check_gradients(model, opt, inputs(t))


def test_the_cost_model_prices_each_order_and_chooses_lightning_for_long_causal_sites() -> None:
    """Unrestricted at 512 tokens: eager (as written) and the chunked order are both priced with a
    predicted time, and the O(N) order wins; the explanation names the algorithms."""
    model = Projected(causal_elu_masked_fill_normalised).eval()
    opt = attnfx.optimize(model, inputs(512))
    (entry,) = opt.report.entries
    priced = {row.variant: row.algorithm for row in entry.candidates}
    assert priced == {"attnfx_lightning": "linear_chunked", "eager": "linear_eager"}
    assert (entry.status, entry.variant) == ("REWRITTEN", "attnfx_lightning")
    text = str(opt.report)
    assert "linear_chunked" in text and "linear_eager" in text and "attnfx_linear" in text


# -- near-misses: listed, kept, with their reason ------------------------------------------------
def feature_map_after_product(q, k, v):
    return torch.relu(q @ k.transpose(-2, -1)) @ v


def exp_of_product(q, k, v):  # softmax's numerator without its normaliser: not factorable
    w = torch.exp(q @ k.transpose(-2, -1) * 0.1).masked_fill(~keep(q.size(-2)), 0.0)
    return w @ v


def harmonic_decay(q, k, v):  # 1 / (1 + age): decays, but not geometrically
    t = q.size(-2)
    d = torch.where(ages(t) >= 0, 1.0 / (1.0 + ages(t).clamp_min(0).float()), 0.0)
    return ((phi(q) @ phi(k).transpose(-2, -1)) * d) @ v


def decay_without_a_band(q, k, v):  # lambda^|m - n|: symmetric, no causal band
    d = lambdas().view(-1, 1, 1) ** ages(q.size(-2)).abs()
    return ((phi(q) @ phi(k).transpose(-2, -1)) * d) @ v


def normaliser_over_queries(q, k, v):
    w = phi(q) @ phi(k).transpose(-2, -1)
    return (w @ v) / (w.sum(-2).unsqueeze(-1) + EPS)


def sliding_window(q, k, v):  # a band of 4 keys: not linear attention's causal band
    a = ages(q.size(-2))
    w = (phi(q) @ phi(k).transpose(-2, -1)).masked_fill((a < 0) | (a >= 4), 0.0)
    return w @ v


def weights_returned(q, k, v):
    w = (phi(q) @ phi(k).transpose(-2, -1)).masked_fill(~keep(q.size(-2)), 0.0)
    return w @ v, w


NEAR_MISSES = {
    "feature_map_after_product": (feature_map_after_product, "FEATURE_MAP_AFTER_PRODUCT", "applies relu to the product"),
    "exp_of_product": (exp_of_product, "FEATURE_MAP_AFTER_PRODUCT", "applies exp to the product"),
    "harmonic_decay": (harmonic_decay, "DECAY_NOT_GEOMETRIC", "not geometric in the age m - n"),
    "decay_without_a_band": (decay_without_a_band, "DECAY_NOT_GEOMETRIC", "a decay needs a top-left causal band"),
    "normaliser_over_queries": (normaliser_over_queries, "NORMALIZER_AXIS", "sums the weights over [queries]"),
    "sliding_window": (sliding_window, "UNPROVEN_MASK", "sliding window of 4 keys"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_linear_near_miss_is_kept_with_its_reason(name: str) -> None:
    attend, code, text = NEAR_MISSES[name]
    cases.check_kept(attend, "attention.linear", code, text, "attnfx::linear_attention", variants=LINEAR_VARIANTS)


def test_weights_returned_by_the_model_are_kept() -> None:
    model = Projected(weights_returned, returns_extra=True).eval()
    (entry,) = attnfx.optimize(model, inputs(), variants=LINEAR_VARIANTS).report.entries
    assert (entry.rule, entry.reason_code) == ("attention.linear", "PROBS_ESCAPE")
    assert "returned by the model" in entry.reason


def softmax_attention(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * cases.SCALE, dim=-1) @ v


def softmax_times_decay(q, k, v):  # a softmax present: the softmax rule's site (and its refusal)
    d = lambdas().view(-1, 1, 1) ** ages(q.size(-2)).clamp_min(0) * (ages(q.size(-2)) >= 0)
    return (F.softmax(q @ k.transpose(-2, -1) * cases.SCALE, dim=-1) * d) @ v


@pytest.mark.parametrize("attend, status", [(softmax_attention, "REWRITTEN"), (softmax_times_decay, "REFUSED")])
def test_weights_through_a_softmax_are_the_softmax_rules(attend, status: str) -> None:
    opt = attnfx.optimize(Projected(attend).eval(), inputs())
    assert [(e.rule, e.status) for e in opt.report.entries] == [("attention.softmax", status)]
    assert not cases.op_calls(opt, "attnfx::linear_attention")


class TwoProjections(nn.Module):
    """Matmul chains that are not attention: x W1 W2, and an MLP relu(x W1) W2."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(cases.C, 32) * 0.1)
        self.w2 = nn.Parameter(torch.randn(32, cases.C) * 0.1)

    def forward(self, x):
        return (x @ self.w1) @ self.w2 + torch.relu(x @ self.w1) @ self.w2


def test_products_of_projections_are_not_listed() -> None:
    model = TwoProjections().eval()
    opt = attnfx.optimize(model, inputs())
    assert opt.report.entries == []
    x = inputs(20)
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x))


def test_an_mlp_on_weights_passed_as_inputs_is_not_listed() -> None:
    """Found by the generate tests on Falcon through the backend, whose graphs take the weights as
    inputs: `gelu(x @ W1) @ W2` has keys and values with no batch or head axis, so it is no attention."""
    def mlp(x, w1, w2):
        return F.gelu(x @ w1) @ w2

    gm = torch.fx.symbolic_trace(mlp)
    args = (torch.randn(2, 12, cases.C), torch.randn(cases.C, 32) * 0.1, torch.randn(32, cases.C) * 0.1)
    opt = attnfx.optimize(gm, args)
    assert opt.report.entries == []
    torch.testing.assert_close(opt(*args), mlp(*args))


def test_the_compile_backend_rewrites_linear_attention() -> None:
    """torch.compile(backend="attnfx") lifts the same site from Dynamo's graph, decay included."""
    torch._dynamo.reset()
    model = Projected(decay_pow_clamped).eval()
    opt = torch.compile(model, backend="attnfx", options={"inductor": False, "variants": LINEAR_VARIANTS})
    x = inputs()
    with torch.no_grad():
        assert _relative_error(opt(*x), model(*x)) < 1e-4
    (report,) = attnfx.reports(model)
    (entry,) = report.entries
    assert (entry.rule, entry.status, entry.variant) == ("attention.linear", "REWRITTEN", "attnfx_lightning")
    assert entry.spec.decay
    torch._dynamo.reset()
