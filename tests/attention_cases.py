"""Small modules that write attention (and near-misses of it) in the many ways models do.

Each case is a function `attend(q, k, v)` on (B, H, T, D) tensors; `Projected(attend)` wraps it
in a module with real projections so capture and rewriting see what a model would give them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

B, T, H, D = 2, 12, 4, 16
C = H * D
SCALE = 1.0 / math.sqrt(D)


class Projected(nn.Module):
    """x (B, T, C) -> q, k, v heads -> attend -> merged heads -> output projection."""

    def __init__(self, attend: Callable, returns_extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)
        self.attend = attend
        self.returns_extra = returns_extra

    def forward(self, x: torch.Tensor):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (z.view(b, t, H, D).transpose(1, 2) for z in (q, k, v))  # (b, h, t, d)
        y = self.attend(q, k, v)
        extra = None
        if isinstance(y, tuple):
            y, extra = y
        y = self.out(y.transpose(1, 2).reshape(b, t, C))
        return (y, extra) if self.returns_extra else y


def inputs(t: int = T, b: int = B) -> tuple[torch.Tensor]:
    return (torch.randn(b, t, C, generator=torch.Generator().manual_seed(t * 31 + b)),)


def op_calls(opt, op: str) -> list:
    """The nodes of an optimised model's graph that call the custom op `op` ("attnfx::...")."""
    return [n for n in opt.graph_module.graph.nodes if getattr(n.target, "name", str)() == op]


def check_kept(attend: Callable, rule: str, code: str, text: str, op: str, **options) -> None:
    """`Projected(attend)` optimised lists one site, of `rule`, refused with `code` (its message
    saying `text`); no call of `op` is emitted and the outputs are the model's."""
    import attnfx

    model = Projected(attend).eval()
    opt = attnfx.optimize(model, inputs(), **options)
    (entry,) = opt.report.entries
    assert (entry.rule, entry.status, entry.reason_code) == (rule, "REFUSED", code)
    assert text in entry.reason
    assert not op_calls(opt, op)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x))


def check_gradients(model: nn.Module, opt: nn.Module, x: tuple, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """The optimised model's parameter gradients of a loss at `x` are the model's own."""
    model.zero_grad()
    opt(*x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(*x).square().sum().backward()
    for g, want in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, want, rtol=rtol, atol=atol)


def causal_keep(t: int, device=None) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


# -- positive spellings ----------------------------------------------------------------------
def matmul_div(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v


def matmul_mul(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * SCALE, -1) @ v


def prescaled_q(q, k, v):
    return ((q * SCALE) @ k.transpose(-2, -1)).softmax(-1) @ v


def prescaled_k(q, k, v):
    return (q @ (k * SCALE).transpose(-2, -1)).softmax(dim=-1) @ v


def unscaled(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def einsum_bhmd(q, k, v):
    p = torch.einsum("bhmd,bhnd->bhmn", q, k).mul(SCALE).softmax(-1)
    return torch.einsum("bhmn,bhnd->bhmd", p, v)


def einsum_bshd(q, k, v):
    qs, ks, vs = (z.transpose(1, 2) for z in (q, k, v))  # (b, s, h, d)
    p = torch.einsum("bmhd,bnhd->bhmn", qs, ks) * SCALE
    out = torch.einsum("bhmn,bnhd->bmhd", p.softmax(-1), vs)
    return out.transpose(1, 2)


def bmm_merged_heads(q, k, v):
    b, h, t, d = q.shape
    q3, k3, v3 = (z.reshape(b * h, t, d) for z in (q, k, v))
    p = torch.bmm(q3, k3.transpose(1, 2)).div(math.sqrt(d)).softmax(-1)
    return torch.bmm(p, v3).view(b, h, t, d)


def permuted_key(q, k, v):
    """K^T produced by one permute of (b, t, h, d): pytorch#195320's miscompile, done right."""
    kt = k.transpose(1, 2).permute(0, 2, 3, 1)  # (b, h, d, t)
    return F.softmax(q @ kt * SCALE, dim=-1) @ v


def transposed_av(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return (v.transpose(-1, -2) @ p.transpose(-1, -2)).transpose(-1, -2)


def upcast_softmax(q, k, v):
    s = (q @ k.transpose(-2, -1)) * SCALE
    return F.softmax(s.float(), dim=-1).type_as(q) @ v


def softmax_module(q, k, v):
    return nn.Softmax(dim=-1)(q @ k.transpose(-2, -1) * SCALE) @ v


def eval_dropout(q, k, v):
    return F.dropout(F.softmax(q @ k.transpose(-2, -1) * SCALE, -1), p=0.1, training=False) @ v


def causal_tril_bool(q, k, v):
    t = q.size(-2)
    s = (q @ k.transpose(-2, -1)) * SCALE
    s = s.masked_fill(~causal_keep(t, q.device), float("-inf"))
    return s.softmax(-1) @ v


def causal_triu_additive(q, k, v):
    t = q.size(-2)
    mask = torch.triu(torch.full((t, t), float("-inf"), device=q.device), diagonal=1)
    return F.softmax(q @ k.transpose(-2, -1) * SCALE + mask, dim=-1) @ v


def causal_arange_where(q, k, v):
    t = q.size(-2)
    idx = torch.arange(t, device=q.device)
    keep = idx[:, None] >= idx[None, :]
    s = torch.where(keep, q @ k.transpose(-2, -1) * SCALE, torch.finfo(q.dtype).min)
    return s.softmax(-1) @ v


def gqa_repeat_interleave(q, k, v):
    k2, v2 = k[:, :2], v[:, :2]  # 2 K/V heads shared by 4 query heads
    k2, v2 = (z.repeat_interleave(2, dim=1) for z in (k2, v2))
    return F.softmax(q @ k2.transpose(-2, -1) * SCALE, -1) @ v2


def gqa_expand_reshape(q, k, v):
    b, _, t, d = k.shape
    k2, v2 = k[:, :2], v[:, :2]
    k2, v2 = (z[:, :, None].expand(b, 2, 2, t, d).reshape(b, 4, t, d) for z in (k2, v2))
    return F.softmax(q @ k2.transpose(-2, -1) * SCALE, -1) @ v2


def mqa_broadcast(q, k, v):
    k1, v1 = k[:, :1], v[:, :1]  # one K/V head broadcast over all query heads
    return F.softmax(q @ k1.transpose(-2, -1) * SCALE, -1) @ v1


def kv_tiled_repeat(q, k, v):
    """`repeat` tiles heads (h -> h % Hkv): not GQA's grouping, so it must not be folded."""
    k2, v2 = (z[:, :2].repeat(1, 2, 1, 1) for z in (k, v))
    return F.softmax(q @ k2.transpose(-2, -1) * SCALE, -1) @ v2


class ScaleBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(SCALE))

    def forward(self, q, k, v):
        return F.softmax((q @ k.transpose(-2, -1)) * self.scale, -1) @ v


class TrilBuffer(nn.Module):
    """nanoGPT: a registered causal buffer sliced to the sequence length."""

    def __init__(self, block: int = 64) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, q, k, v):
        t = q.size(-2)
        s = (q @ k.transpose(-2, -1)) * SCALE
        s = s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(s, dim=-1) @ v


# -- near misses ------------------------------------------------------------------------------
def softmax_over_queries(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-2) @ v


def softmax_over_heads(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=1) @ v


def mask_after_softmax(q, k, v):
    t = q.size(-2)
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return p.masked_fill(~causal_keep(t, q.device), 0.0) @ v


def probs_times_tensor(q, k, v):
    t = q.size(-2)
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return (p * causal_keep(t, q.device).to(p.dtype)) @ v


def scale_on_values(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ (v * SCALE)


def probs_returned(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return p @ v, p


def probs_in_loss(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    entropy = -(p * p.clamp_min(1e-9).log()).sum()
    return p @ v, entropy


def scores_returned(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    return F.softmax(s, dim=-1) @ v, s


def log_softmax_attention(q, k, v):
    return F.log_softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v


def sigmoid_attention(q, k, v):
    return torch.sigmoid(q @ k.transpose(-2, -1) * SCALE) @ v


def topk_masked(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    kth = s.topk(4, dim=-1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    return F.softmax(s, dim=-1) @ v


def per_query_scale(q, k, v):
    temperature = q.norm(dim=-1, keepdim=True)  # (b, h, t, 1)
    return F.softmax((q @ k.transpose(-2, -1)) / temperature, dim=-1) @ v


def per_head_scale(q, k, v):
    temperature = torch.linspace(1.0, 2.0, q.size(1), device=q.device).view(-1, 1, 1)
    return F.softmax((q @ k.transpose(-2, -1)) * temperature, dim=-1) @ v


def fill_with_zero(q, k, v):
    t = q.size(-2)
    s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~causal_keep(t, q.device), 0.0)
    return F.softmax(s, dim=-1) @ v


def fill_with_tensor(q, k, v):
    t = q.size(-2)
    s = q @ k.transpose(-2, -1) * SCALE
    keep = causal_keep(t, q.device)
    s = torch.where(keep, s, keep.to(s.dtype) - 1.0)
    return F.softmax(s, dim=-1) @ v


def training_dropout(q, k, v):
    return F.dropout(F.softmax(q @ k.transpose(-2, -1) * SCALE, -1), p=0.5, training=True) @ v


def relu_scores(q, k, v):
    return F.softmax(torch.relu(q @ k.transpose(-2, -1) * SCALE), dim=-1) @ v


def gated_scores(q, k, v):
    gate = torch.sigmoid(q.sum(-1, keepdim=True) * k.sum(-1, keepdim=True).transpose(-2, -1))
    return F.softmax((q @ k.transpose(-2, -1)) * gate, dim=-1) @ v


def av_over_queries(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return p.transpose(-2, -1) @ v


def av_sums_heads(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    out = torch.einsum("bhmn,bhnd->bmd", p, v)
    return out[:, None].expand(-1, q.size(1), -1, -1)


def mask_before_softcap(q, k, v):
    t = q.size(-2)
    s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~causal_keep(t, q.device), float("-inf"))
    s = torch.tanh(s / 30.0) * 30.0
    return F.softmax(s, dim=-1) @ v


def softmax_of_values(q, k, v):
    """A softmax over a plain activation (a gating head), then a matmul: not attention."""
    return F.softmax(q, dim=-1) @ v.transpose(-2, -1) @ v


def rebatched_scores(q, k, v):
    """Bloom-style: scores made on merged (B*H) heads, masked as (B, H, M, N), viewed back."""
    b, h, t, d = q.shape
    q3, k3, v3 = (z.reshape(b * h, t, d) for z in (q, k, v))
    scores = torch.baddbmm(torch.zeros(b * h, 1, t, device=q.device), q3, k3.transpose(1, 2), beta=1.0, alpha=SCALE)
    scores = scores.view(b, h, t, t).masked_fill(~causal_keep(t, q.device), torch.finfo(q.dtype).min)
    probs = F.softmax(scores, dim=-1).view(b * h, t, t)
    return torch.bmm(probs, v3).view(b, h, t, d)


class DecodeStep(nn.Module):
    """KV-cache decode: M new queries attend over a cache of N past keys plus themselves."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x, past_k, past_v):
        b, m, _ = x.shape
        q, k, v = (z.view(b, m, H, D).transpose(1, 2) for z in self.qkv(x).split(C, dim=-1))
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        n = k.size(2)
        q_pos = torch.arange(m, device=x.device)[:, None] + (n - m)
        keep = torch.arange(n, device=x.device)[None, :] <= q_pos  # bottom-right aligned
        s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, m, C)


def multiplicative_mask(q, k, v):
    t = q.size(-2)
    return F.softmax((q @ k.transpose(-2, -1) * SCALE) * causal_keep(t, q.device).to(q.dtype), dim=-1) @ v


def renormalised_probs(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return (p / p.sum(-1, keepdim=True)) @ v


def softmax_over_batch(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=0) @ v


def scale_after_softcap(q, k, v):
    s = torch.tanh((q @ k.transpose(-2, -1)) / 30.0) * 30.0
    return F.softmax(s * 0.5, dim=-1) @ v


def probs_times_probs(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return (p @ p) @ v
