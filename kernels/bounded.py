"""`attnfx::bounded_attention`: a faster CPU forward for sites without mask tensors, by a fixed
per-row softmax offset instead of a running maximum.

The chunked kernel keeps a running (max, sum, out) per row and rescales them at every key chunk:
about ten passes over each score chunk. Any offset c[m] with max_n s[m, n] - c[m] in a safe range
gives the same softmax, so this kernel takes an upper bound of the row's scores known before any
score is computed -- Cauchy-Schwarz, |scale * q.k| <= |scale| |q| max|k|; through a softcap,
cap * tanh(bound / cap); plus ALiBi's largest visible term -- and sums exp2(s - c) (log2 units,
folded into q) straight into the output, with the row sum riding along as a column of ones
appended to V. Per chunk that is: one matmul, (tanh, ALiBi,) one subtraction, one exp2 in place,
one matmul. Rows whose bound overshoots by more than 2^100 (sum below 2^-100) or whose sum is not
finite are recomputed by attnfx::attention, so the result is always the softmax's, to fp32 rounding.

    attnfx::bounded_attention(q, k, v, bias?, alibi_slopes?, scale, causal, window, softcap)
        -> (out, lse)

Arguments, semantics and outputs are attnfx::attention's (so a graph consumer, ONNX lowering
included, treats both alike), except that bias must be None: those sites keep
attnfx_chunked. lse is natural-log, -inf for rows with no visible key; the backward is
attnfx::attention's.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from attnfx.cost_model.spec import SCORE_OP_SCHEMA, AttentionSpec, Causal, Kind, MaskInput, ScoreMods

from . import attention_ops  # noqa: F401  (registers attnfx::attention and its backward, which this op reuses)
from .attention_args import Dims, accumulation_dtype, check_args, decode_op_args
from .fused import attention_call
from .variant import Call, Operands, OpVariant, kind_refusal, score_op_reader

BOUNDED_OP = "attnfx::bounded_attention"

LOG2E = 1.0 / math.log(2.0)
SCORE_BUDGET = 1 << 20  # elements of one score chunk (4 MiB in fp32)
KEY_CHUNK = 1024
QUERY_BLOCK = 128
UNDERFLOW = 2.0 ** -100  # a row sum below this means the bound overshot: recompute the row


def _blocks(d: Dims, budget: int = SCORE_BUDGET) -> tuple[int, int]:
    """(query rows, keys) per chunk: at most `budget` scores over the batch and heads."""
    rows = d.batch * d.heads
    nc = max(1, min(d.kv_len, KEY_CHUNK, budget // max(rows * QUERY_BLOCK, 1)))
    mc = max(1, min(d.q_len, QUERY_BLOCK, budget // (rows * nc)))
    return mc, nc


def _row_bounds(q: Tensor, k: Tensor, slopes: Tensor | None, d: Dims, scale: float, softcap: float,
                offset: int | None, window: int) -> Tensor:
    """(B, Hkv, G, M, 1) upper bounds of each row's scores in log2 units."""
    q_norm = q.norm(dim=-1).view(d.batch, d.kv_heads, d.groups, d.q_len, 1)
    k_max = k.norm(dim=-1).amax(-1).view(d.batch, d.kv_heads, 1, 1, 1)
    bound = q_norm * k_max * abs(scale)
    if softcap:
        bound = torch.tanh(bound / softcap) * softcap
    if slopes is not None:
        m = torch.arange(d.q_len, device=q.device, dtype=bound.dtype).view(-1, 1)
        hi = m + offset if offset is not None else torch.full_like(m, d.kv_len - 1)
        hi = hi.clamp(max=d.kv_len - 1)
        lo = (m + offset - window + 1).clamp(min=0) if window != -1 else torch.zeros_like(m)
        s = slopes.view(1, d.kv_heads, d.groups, 1, 1).to(bound.dtype)
        bound = bound + torch.maximum(s * (lo - m), s * (hi - m))  # (n - m) is largest at an end
    return bound * LOG2E


def bounded_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
                    *score_args: float | int | str) -> tuple[Tensor, Tensor]:
    """(out (B,H,M,F), lse (B,H,M)) with a fixed per-row offset; rows it cannot bound are recomputed."""
    d, mods = _check(q, k, v, bias, alibi_slopes, score_args)
    scale, softcap, window = mods.scale, mods.softcap or 0.0, -1 if mods.window is None else mods.window
    acc = accumulation_dtype(q.dtype)
    offset = None if mods.causal is Causal.NONE else d.causal_offset(mods.causal)
    qa, ka = q.to(acc), k.to(acc)
    slopes = None if alibi_slopes is None else alibi_slopes.to(acc)
    bound = _row_bounds(qa, ka, slopes, d, scale, softcap, offset, window)  # (b, hk, g, m, 1)
    # q carries the scale and log2(e) (or 1/cap before a softcap); V a column of ones for the row sums
    qs = (qa * (scale / softcap if softcap else scale * LOG2E)).view(d.batch, d.kv_heads, d.groups, d.q_len, -1)
    kt = ka.transpose(-1, -2)
    vv = torch.cat([v.to(acc), v.new_ones(d.batch, d.kv_heads, d.kv_len, 1, dtype=acc)], -1)
    total = torch.empty(d.batch, d.kv_heads, d.groups, d.q_len, d.value_dim + 1, dtype=acc, device=q.device)
    mc, nc = _blocks(d)
    for m0 in range(0, d.q_len, mc):
        m1 = min(m0 + mc, d.q_len)
        lo, hi = _key_range(m0, m1, offset, window, d.kv_len)
        rows = qs[:, :, :, m0:m1].reshape(d.batch, d.kv_heads, d.groups * (m1 - m0), -1)
        block = total[:, :, :, m0:m1]
        block.zero_()
        for n0 in range(lo, hi, nc):
            n1 = min(n0 + nc, hi)
            s = torch.matmul(rows, kt[..., n0:n1]).view(d.batch, d.kv_heads, d.groups, m1 - m0, n1 - n0)
            _modify(s, slopes, bound[:, :, :, m0:m1], softcap, offset, window, m0, m1, n0, n1)
            p = s.exp2_().view(d.batch, d.kv_heads, -1, n1 - n0)
            block += torch.matmul(p, vv[:, :, n0:n1]).view_as(block)
    return _finish(total, bound, q, k, v, alibi_slopes, score_args, mods, d)


def _key_range(m0: int, m1: int, offset: int | None, window: int, kv_len: int) -> tuple[int, int]:
    if offset is None:
        return 0, kv_len
    lo = 0 if window == -1 else max(0, m0 + offset - window + 1)
    return min(lo, kv_len), max(0, min(kv_len, m1 + offset))


def _modify(s: Tensor, slopes: Tensor | None, bound: Tensor, softcap: float, offset: int | None, window: int,
            m0: int, m1: int, n0: int, n1: int) -> None:
    """In place: softcap, ALiBi and the offset, in log2 units; -inf outside the band."""
    if softcap:
        s.tanh_().mul_(softcap * LOG2E)
    rows = torch.arange(m0, m1, device=s.device).view(-1, 1)
    cols = torch.arange(n0, n1, device=s.device).view(1, -1)
    if slopes is not None:
        hk, g = s.shape[1], s.shape[2]
        s.add_((slopes * LOG2E).view(1, hk, g, 1, 1) * (cols - rows).to(s.dtype))
    s.sub_(bound)
    if offset is None:
        return
    full = n1 - 1 <= m0 + offset and (window == -1 or n0 > m1 - 1 + offset - window)
    if not full:
        keep = cols <= rows + offset
        if window != -1:
            keep = keep & (cols > rows + offset - window)
        s.masked_fill_(~keep, -math.inf)


def _finish(total: Tensor, bound: Tensor, q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None,
            score_args: tuple, mods: ScoreMods, d: Dims) -> tuple[Tensor, Tensor]:
    """Normalise; recompute with attnfx::attention the rows the bound could not serve."""
    sums = total[..., -1:]
    empty = sums == 0
    out = (total[..., :-1] / sums.masked_fill(empty, 1.0)).view(d.batch, d.heads, d.q_len, d.value_dim)
    lse = torch.where(empty, -math.inf, (bound + torch.log2(sums.masked_fill(empty, 1.0))) / LOG2E)
    lse = lse.view(d.batch, d.heads, d.q_len)
    # an empty row has no visible key (its band is empty); any other zero, tiny or non-finite sum is
    # a bound that overshot (or overflowed): recompute those rows
    visible = _visible(d, mods, q.device).view(1, 1, 1, d.q_len, 1)
    bad = (~torch.isfinite(sums) | (sums < UNDERFLOW)) & visible
    if bool(bad.any()):
        safe_out, safe_lse = torch.ops.attnfx.attention(q, k, v, None, alibi_slopes, *score_args)
        rows = bad.view(d.batch, d.heads, d.q_len)
        out = torch.where(rows.unsqueeze(-1), safe_out.to(out.dtype), out)
        lse = torch.where(rows, safe_lse.to(lse.dtype), lse)
    return out.to(q.dtype), lse


def _check(q, k, v, bias, alibi_slopes, score_args: tuple) -> tuple[Dims, ScoreMods]:
    extras, mods = decode_op_args(BOUNDED_OP, bias, alibi_slopes, *score_args)
    d = check_args(q, k, v, extras, BOUNDED_OP)
    if bias is not None:
        raise ValueError("attnfx::bounded_attention takes no bias (attnfx::attention does)")
    return d, mods


def _visible(d: Dims, mods: ScoreMods, device: torch.device) -> Tensor:
    """(M,) bool: query rows that see at least one key under the band."""
    m = torch.arange(d.q_len, device=device)
    if mods.causal is Causal.NONE:
        return torch.ones_like(m, dtype=torch.bool)
    offset = d.causal_offset(mods.causal)
    hi = (m + offset).clamp(max=d.kv_len - 1)
    lo = (m + offset - mods.window + 1).clamp(min=0) if mods.window is not None else torch.zeros_like(m)
    return hi >= lo


@torch.library.custom_op(
    "attnfx::bounded_attention",
    mutates_args=(),
    schema=f"({SCORE_OP_SCHEMA}) -> (Tensor out, Tensor lse)",
)
def bounded_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
                      *score_args: float | int | str) -> tuple[Tensor, Tensor]:
    """Attention with a fixed per-row softmax offset: (out, lse) as attnfx::attention gives them."""
    return bounded_forward(q, k, v, bias, alibi_slopes, *score_args)


@bounded_attention.register_fake
def _bounded_fake(q, k, v, bias, alibi_slopes, *score_args):
    d, _ = _check(q, k, v, bias, alibi_slopes, score_args)
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    return out, q.new_empty(d.batch, d.heads, d.q_len, dtype=accumulation_dtype(q.dtype))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _, alibi_slopes, *params = inputs
    ctx.save_for_backward(q, k, v, alibi_slopes, *output)
    ctx.params = tuple(params)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor):
    q, k, v, alibi_slopes, out, lse = ctx.saved_tensors
    dq, dk, dv, _ = torch.ops.attnfx.attention_backward(grad_out, grad_lse, q, k, v, None, alibi_slopes, out, lse,
                                                        *ctx.params, False)
    return dq, dk, dv, None, None, *(None,) * len(ctx.params)


bounded_attention.register_autograd(_backward, setup_context=_setup_context)


def _bounded_refusal(spec: AttentionSpec, device: str) -> str | None:
    if device != "cpu":
        return f"attnfx_bounded is a CPU kernel; on {device} attnfx::attention runs its Triton kernels"
    if spec.mask is not MaskInput.NONE:
        return "attnfx_bounded takes no mask tensor (attnfx_chunked does)"
    return kind_refusal("attnfx_bounded", Kind.SOFTMAX, spec)


def _bounded_call(spec: AttentionSpec, operands: Operands) -> Call:
    return replace(attention_call(spec, operands), target=torch.ops.attnfx.bounded_attention.default)


BOUNDED = OpVariant(
    "attnfx_bounded", "bounded", BOUNDED_OP,
    "attnfx::bounded_attention: fixed per-row softmax offset, exp2, row sums in the PV product",
    _bounded_refusal, _bounded_call, score_op_reader(BOUNDED_OP, output_index=0), takes=("softcap", "alibi"))
