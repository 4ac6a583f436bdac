"""Tensor temperatures on the scores: a factor constant along the key axis (one per head, as in Swin
V2's cosine attention, or one per query) scales each query's row of scores, which is q scaled by it;
a factor that varies along the keys is not a softmax temperature and is kept."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attention_cases as cases
import attnfx
from attnfx.kernels import VARIANTS

B, T, H, D = 2, 12, 4, 8
C = H * D
TABLE = 32


def _x(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, C, generator=torch.Generator().manual_seed(7 * t + b))


class Temperature(nn.Module):
    """Multi-head attention whose scores are multiplied by `self.temperature(s, x)`."""

    def __init__(self, temperature, masked: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(H, 1, 1)) + 0.3 * torch.randn(H, 1, 1))
        self.query_gate = nn.Linear(C, H)
        self.key_scale = nn.Parameter(torch.rand(TABLE) + 0.5)
        self.signed = nn.Parameter(torch.randn(H, 1, 1))
        self.temperature = temperature
        self.masked = masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        if self.masked:
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        s = self.temperature(self, s, x)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, C)


def swin_v2(m, s, x):
    """Swin V2: a learned per-head logit scale, clamped, then exponentiated: (H, 1, 1)."""
    return s * torch.clamp(m.logit_scale, max=math.log(1.0 / 0.01)).exp()


def per_head_divided(m, s, x):
    return s / m.logit_scale.exp()


def per_query(m, s, x):
    """One temperature per query, computed from the input: (b, h, m, 1)."""
    return s * F.softplus(m.query_gate(x)).transpose(1, 2).unsqueeze(-1)


def per_key(m, s, x):
    return s * m.key_scale[: s.shape[-1]]


def signed_per_head(m, s, x):
    """A factor of either sign: after -inf masks, excluded scores become +inf (nan weights), as in eager."""
    return s * m.signed


def scalar_parameter(m, s, x):
    """A run-time scalar (a Parameter: it may change after optimisation) after the mask."""
    return s / m.signed[0, 0, 0]


def biased_per_head(m, s, x):
    """A bias, then a per-head factor: the bias would be rescaled per head, which no variant takes."""
    return (s + m.key_scale[: s.shape[-1]]) * m.logit_scale.exp()


def _fused_calls(opt) -> int:
    graph = opt.graph_module.graph
    return sum(1 for n in graph.nodes if n.op == "call_function"
               and ("scaled_dot_product" in str(n.target) or any(v.read(n) is not None for v in VARIANTS)))


def _softmaxes(opt) -> int:
    return sum(1 for n in opt.graph_module.graph.nodes if n.op == "call_function" and "softmax" in str(n.target))


def _assert_matches_eager(model: nn.Module, opt: nn.Module) -> None:
    for b, t in ((B, T), (3, 7), (1, 1)):
        x = _x(b, t)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("temperature, masked", [(swin_v2, False), (per_head_divided, False), (per_query, False),
                                                 (swin_v2, True), (per_query, True), (signed_per_head, True),
                                                 (scalar_parameter, True)],
                         ids=["swin_v2", "per_head_divided", "per_query", "swin_v2_after_mask",
                              "per_query_after_mask", "signed_per_head_after_mask", "scalar_parameter_after_mask"])
def test_temperature_constant_along_keys_folds_into_q(temperature, masked: bool) -> None:
    model = Temperature(temperature, masked).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"], opt.report
    assert (_fused_calls(opt), _softmaxes(opt)) == (1, 0)
    _assert_matches_eager(model, opt)


@pytest.mark.parametrize("temperature, masked, code", [
    (per_key, False, "SCALE_NOT_SCALAR"),
    (biased_per_head, False, "SCORE_ORDER"),
], ids=["per_key", "per_head_after_bias"])
def test_temperature_near_miss_is_kept(temperature, masked: bool, code: str) -> None:
    model = Temperature(temperature, masked).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("REFUSED", code)], opt.report
    assert (_fused_calls(opt), _softmaxes(opt)) == (0, 1)
    _assert_matches_eager(model, opt)


class ScaledAfterSoftcap(nn.Module):
    """`tanh(s / c) * c * k`: a softcap of c * k on scores scaled by k (k > 0); k <= 0 is kept."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        s = torch.tanh((q @ k.transpose(-2, -1)) / 5.0) * 5.0 * self.factor
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, C)


def test_float_scale_after_softcap_is_a_wider_softcap() -> None:
    model = ScaledAfterSoftcap(D ** -0.5).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"], opt.report
    assert opt.report.entries[0].spec.softcap == pytest.approx(5.0 * D ** -0.5)
    assert (_fused_calls(opt), _softmaxes(opt)) == (1, 0)
    _assert_matches_eager(model, opt)


def test_negative_scale_after_softcap_is_kept() -> None:
    model = ScaledAfterSoftcap(-0.5).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("REFUSED", "SCORE_ORDER")], opt.report
    _assert_matches_eager(model, opt)


@pytest.mark.parametrize("attend", [cases.per_query_scale, cases.per_head_scale, cases.scale_after_softcap],
                         ids=lambda f: f.__name__)
def test_former_near_misses_are_exact_attention(attend) -> None:
    """q / |q| per query, a per-head linspace, a scale after a softcap: once refused, all exact."""
    model = cases.Projected(attend).eval()
    opt = attnfx.optimize(model, cases.inputs())
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"], opt.report
    assert (_fused_calls(opt), _softmaxes(opt)) == (1, 0)
    for t, b in ((12, 2), (5, 3)):
        x = cases.inputs(t, b)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
