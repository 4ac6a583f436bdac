"""SDPA calls already in the model are re-examined: a dense mask the model builds that is proven
causal becomes the kernel's causal flag (verified like any rewrite); other SDPA calls stay."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnfx
from attnfx.kernels.variant import call_arguments

B, T, H, D = 2, 12, 4, 8
C = H * D


def _x(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, C, generator=torch.Generator().manual_seed(5 * t + b))


def bool_tril(t, x):
    return torch.ones(t, t, dtype=torch.bool, device=x.device).tril()


def additive_triu(t, x):
    """Hugging Face's spelling: finfo.min above the diagonal, broadcast over batch and heads."""
    return torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]


def arange_4d(t, x):
    positions = torch.arange(t, device=x.device)
    return (positions[None, :] <= positions[:, None]).expand(x.shape[0], 1, t, t)


def key_padding(t, x):
    """Keys whose input row is all negative are masked: data, not structure."""
    keep = (x.sum(-1) > -100)[:, None, None, :]
    return keep & torch.ones(t, t, dtype=torch.bool).tril()


class MaskedSdpa(nn.Module):
    def __init__(self, make_mask) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.make_mask = make_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.make_mask(t, x))
        return out.transpose(1, 2).reshape(b, t, C)


def _sdpa_calls(opt) -> list[torch.fx.Node]:
    return [n for n in opt.graph_module.graph.nodes if "scaled_dot_product" in str(n.target)]


def _assert_matches_eager(model: nn.Module, opt: nn.Module) -> None:
    for b, t in ((B, T), (3, 7), (1, 1)):
        x = _x(b, t)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_mask", [bool_tril, additive_triu, arange_4d], ids=lambda f: f.__name__)
def test_proven_causal_mask_becomes_the_causal_flag(make_mask) -> None:
    model = MaskedSdpa(make_mask).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    entry, = opt.report.entries
    assert (entry.status, entry.variant, entry.lowering) == ("REWRITTEN", "sdpa", "flag"), opt.report
    call, = _sdpa_calls(opt)
    arguments = call_arguments(call)
    assert (arguments["is_causal"], arguments["attn_mask"]) == (True, None), call
    assert all(str(n.target) not in ("aten.tril.default", "aten.triu.default", "aten.full.default")
               for n in opt.graph_module.graph.nodes)
    _assert_matches_eager(model, opt)


def test_data_dependent_mask_on_sdpa_is_left_fused() -> None:
    model = MaskedSdpa(key_padding).eval()
    opt = attnfx.optimize(model, (_x(B, T),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("ALREADY_FUSED", None)], opt.report
    call, = _sdpa_calls(opt)
    assert isinstance(call_arguments(call)["attn_mask"], torch.fx.Node)
    _assert_matches_eager(model, opt)


def test_transformer_layer_mask_given_as_input_is_left_fused() -> None:
    """nn.TransformerEncoderLayer's src_mask is an input: its values are data, never proven."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(C, H, 2 * C, dropout=0.0, batch_first=True).eval()
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    opt = attnfx.optimize(layer, (_x(B, T),), {"src_mask": mask})
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("ALREADY_FUSED", None)], opt.report
    with torch.no_grad():
        torch.testing.assert_close(opt(_x(B, T), src_mask=mask), layer(_x(B, T), src_mask=mask))
