"""Swin's shifted-window attention written by hand: the feature map rolled by half a window,
partitioned into windows, a relative-position bias gathered from a learned table, and the shift
mask added as a constant (nW, N, N) buffer. Bias and shift mask are an additive term on the scores,
so the site is exact attention with them as SDPA's `attn_mask`. (HF's `SwinModel` in
examples/zoo_hf.py is the same structure; benchmarks/coverage.py checks it.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfx
from attnfx.cost_model.spec import MaskInput

HEADS, DIM, WINDOW, SIDE = 4, 32, 4, 8  # heads, channels, window side, feature-map side
N = WINDOW * WINDOW  # tokens per window


def _relative_index() -> torch.Tensor:
    """(N, N) index into the (2W-1)^2 bias table: the relative offset of every pair of tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (WINDOW - 1)
    return rel[..., 0] * (2 * WINDOW - 1) + rel[..., 1]


def _windows(x: torch.Tensor) -> torch.Tensor:
    """(b, S, S, C) -> (b * nW, N, C)."""
    b = x.shape[0]
    x = x.view(b, SIDE // WINDOW, WINDOW, SIDE // WINDOW, WINDOW, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, N, x.shape[-1])


def _shift_mask(shift: int) -> torch.Tensor:
    """(nW, N, N): -100 between tokens that the roll brought from different regions, else 0."""
    regions = torch.zeros(1, SIDE, SIDE, 1)
    cuts = (slice(0, -WINDOW), slice(-WINDOW, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        regions[:, rows, cols, :] = label
    labels = _windows(regions).squeeze(-1)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class ShiftedWindowAttention(nn.Module):
    def __init__(self, shift: int = WINDOW // 2, variant: str = "exact") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shift, self.variant = shift, variant
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.bias_table = nn.Parameter(torch.randn((2 * WINDOW - 1) ** 2, HEADS) * 0.5)
        self.register_buffer("relative_index", _relative_index(), persistent=False)
        self.register_buffer("shift_mask", _shift_mask(shift) if shift else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = _windows(x)
        q, k, v = self.qkv(windows).view(-1, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        s = (q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1)
        bias = self.bias_table[self.relative_index.view(-1)].view(N, N, HEADS).permute(2, 0, 1)
        s = s + bias.unsqueeze(0)
        nw = self.shift_mask.shape[0] if self.shift else 1
        if self.shift and self.variant == "exact":
            s = (s.view(b, nw, HEADS, N, N) + self.shift_mask[None, :, None]).view(-1, HEADS, N, N)
        p = s.softmax(dim=-1)
        if self.shift and self.variant == "mask_after_softmax":
            p = (p.view(b, nw, HEADS, N, N) + self.shift_mask[None, :, None]).view(-1, HEADS, N, N)
        o = (p @ v).transpose(1, 2).reshape(-1, N, DIM)
        o = self.proj(o).view(b, SIDE // WINDOW, SIDE // WINDOW, WINDOW, WINDOW, DIM)
        o = o.permute(0, 1, 3, 2, 4, 5).reshape(b, SIDE, SIDE, DIM)
        if self.shift:
            o = torch.roll(o, shifts=(self.shift, self.shift), dims=(1, 2))
        return o


def _x(b: int) -> torch.Tensor:
    return torch.randn(b, SIDE, SIDE, DIM, generator=torch.Generator().manual_seed(b))


def _calls(opt, name: str) -> int:
    return sum(1 for n in opt.graph_module.graph.nodes if n.op == "call_function" and name in str(n.target))


def _assert_matches_eager(model: nn.Module, opt: nn.Module) -> None:
    for b in (2, 3, 1):
        with torch.no_grad():
            torch.testing.assert_close(opt(_x(b)), model(_x(b)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, WINDOW // 2], ids=["plain_windows", "shifted_windows"])
def test_window_attention_with_table_bias_and_shift_mask_is_rewritten(shift: int) -> None:
    model = ShiftedWindowAttention(shift).eval()
    opt = attnfx.optimize(model, (_x(2),))
    entry, = opt.report.entries
    assert entry.status == "REWRITTEN", opt.report
    assert entry.spec.mask is MaskInput.ADDITIVE, opt.report  # the bias (and shift mask) as one attn_mask
    assert _calls(opt, "softmax") == 0
    _assert_matches_eager(model, opt)


def test_shift_mask_added_after_the_softmax_is_kept() -> None:
    model = ShiftedWindowAttention(variant="mask_after_softmax").eval()
    opt = attnfx.optimize(model, (_x(2),))
    assert [(e.status, e.reason_code) for e in opt.report.entries] == [("REFUSED", "PROBS_MODIFIED")], opt.report
    assert _calls(opt, "softmax") == 1
    _assert_matches_eager(model, opt)
