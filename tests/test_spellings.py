"""Every spelling of attention attnfx claims is rewritten, numerically exact at several lengths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfx
from attention_cases import Projected, ScaleBuffer, TrilBuffer, inputs
import attention_cases as cases

aten = torch.ops.aten


def sdpa_nodes(opt: attnfx.OptimizedModule) -> list[torch.fx.Node]:
    return [n for n in opt.graph_module.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


def assert_matches_eager(model: nn.Module, opt: nn.Module, lengths=(12, 7, 33), batches=(2, 2, 3)) -> None:
    for t, b in zip(lengths, batches):
        x = inputs(t, b)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


SPELLINGS = {
    "matmul_div": (cases.matmul_div, False),
    "matmul_mul": (cases.matmul_mul, False),
    "prescaled_q": (cases.prescaled_q, False),
    "prescaled_k": (cases.prescaled_k, False),
    "unscaled": (cases.unscaled, False),
    "einsum_bhmd": (cases.einsum_bhmd, False),
    "einsum_bshd": (cases.einsum_bshd, False),
    "bmm_merged_heads": (cases.bmm_merged_heads, False),
    "permuted_key": (cases.permuted_key, False),
    "transposed_av": (cases.transposed_av, False),
    "upcast_softmax": (cases.upcast_softmax, False),
    "softmax_module": (cases.softmax_module, False),
    "eval_dropout": (cases.eval_dropout, False),
    "scale_buffer": (ScaleBuffer(), False),
    "causal_tril_bool": (cases.causal_tril_bool, True),
    "causal_triu_additive": (cases.causal_triu_additive, True),
    "causal_arange_where": (cases.causal_arange_where, True),
    "causal_tril_buffer": (TrilBuffer(), True),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_spelling_is_rewritten_to_sdpa_and_exact(name: str) -> None:
    attend, causal = SPELLINGS[name]
    model = Projected(attend).eval()
    opt = attnfx.optimize(model, inputs())
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"], opt.report
    nodes = sdpa_nodes(opt)
    assert len(nodes) == 1
    assert nodes[0].args[5] is causal  # is_causal only where the mask is proven causal
    if causal:
        assert nodes[0].args[3] is None  # the mask tensor is gone
    assert not [n for n in opt.graph_module.graph.nodes if "softmax" in str(n.target)]
    assert_matches_eager(model, opt)


def test_scale_is_taken_exactly_from_the_graph() -> None:
    opt = attnfx.optimize(Projected(cases.matmul_div).eval(), inputs())
    (node,) = sdpa_nodes(opt)
    assert node.kwargs["scale"] == pytest.approx(0.25)
    opt = attnfx.optimize(Projected(cases.unscaled).eval(), inputs())
    (node,) = sdpa_nodes(opt)
    assert node.kwargs["scale"] == 1.0  # T5-style: SDPA's default 1/sqrt(d) would be wrong


def test_scale_buffer_is_read_at_run_time() -> None:
    model = Projected(ScaleBuffer()).eval()
    opt = attnfx.optimize(model, inputs())
    model.attend.scale.fill_(0.5)  # a learned temperature changes after optimisation
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


class PaddingMaskAttention(nn.Module):
    """BERT-style: an additive (B, 1, 1, T) padding mask built from the input's 0/1 attention_mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(cases.C, 3 * cases.C)

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, cases.H, cases.D).transpose(1, 2) for z in self.qkv(x).split(cases.C, -1))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return torch.softmax(q @ k.transpose(-2, -1) * cases.SCALE + mask, dim=-1) @ v


def test_additive_padding_mask_is_kept_exactly() -> None:
    model = PaddingMaskAttention().eval()
    (x,) = inputs()
    pad = torch.ones(2, 12)
    pad[1, 9:] = 0
    opt = attnfx.optimize(model, (x, pad))
    assert opt.report.rewritten == 1
    (node,) = sdpa_nodes(opt)
    assert node.args[3] is not None and node.args[5] is False
    assert opt.report.entries[0].spec.mask.value == "additive"
    x2, pad2 = inputs(20, 3)[0], torch.ones(3, 20)
    pad2[0, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(opt(x2, pad2), model(x2, pad2), atol=1e-5, rtol=1e-5)


class CrossAttention(nn.Module):
    """Queries from x (M tokens), keys and values from a memory of another length (N)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(cases.C, cases.C)
        self.kv = nn.Linear(cases.C, 2 * cases.C)

    def forward(self, x, memory):
        b, m, _ = x.shape
        n = memory.shape[1]
        q = self.q(x).view(b, m, cases.H, cases.D).transpose(1, 2)
        k, v = (z.view(b, n, cases.H, cases.D).transpose(1, 2) for z in self.kv(memory).chunk(2, dim=-1))
        p = torch.softmax(q @ k.transpose(-2, -1) * cases.SCALE, dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, m, cases.C)


def test_cross_attention_with_different_lengths() -> None:
    model = CrossAttention().eval()
    x, memory = torch.randn(2, 5, cases.C), torch.randn(2, 9, cases.C)
    opt = attnfx.optimize(model, (x, memory))
    assert opt.report.rewritten == 1
    spec = opt.report.entries[0].spec
    assert (spec.q_len, spec.kv_len) == (5, 9)
    x2, memory2 = torch.randn(3, 7, cases.C), torch.randn(3, 30, cases.C)
    with torch.no_grad():
        torch.testing.assert_close(opt(x2, memory2), model(x2, memory2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attend", [cases.gqa_repeat_interleave, cases.gqa_expand_reshape])
def test_gqa_repeats_fold_into_enable_gqa_without_copies(attend) -> None:
    model = Projected(attend).eval()
    opt = attnfx.optimize(model, inputs())
    (node,) = sdpa_nodes(opt)
    assert node.kwargs.get("enable_gqa") is True
    spec = opt.report.entries[0].spec
    assert (spec.heads, spec.kv_heads) == (4, 2)
    targets = {n.target for n in opt.graph_module.graph.nodes}
    assert aten.repeat_interleave.self_int not in targets and aten.expand.default not in targets
    assert_matches_eager(model, opt)


def test_mqa_by_broadcast_is_grouped() -> None:
    model = Projected(cases.mqa_broadcast).eval()
    opt = attnfx.optimize(model, inputs())
    assert opt.report.entries[0].spec.kv_heads == 1
    assert_matches_eager(model, opt)


def test_tiled_kv_repeat_is_not_folded_as_gqa() -> None:
    model = Projected(cases.kv_tiled_repeat).eval()
    opt = attnfx.optimize(model, inputs())
    assert opt.report.rewritten == 1
    assert opt.report.entries[0].spec.kv_heads == 4  # K/V stay materialised: h -> h % 2 is not grouping
    assert_matches_eager(model, opt)


def test_bfloat16_model_with_fp32_softmax_upcast() -> None:
    model = Projected(cases.upcast_softmax).eval().to(torch.bfloat16)
    x = inputs()[0].to(torch.bfloat16)
    opt = attnfx.optimize(model, (x,))
    assert opt.report.rewritten == 1
    assert opt.report.entries[0].spec.dtype == "bfloat16"
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=3e-2, rtol=3e-2)
