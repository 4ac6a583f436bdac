"""attnfx's attention as torch.library custom ops, so a rewritten graph stays traceable
(fake kernels), exportable (one op node), differentiable (registered autograd) and runnable anywhere.

    attnfx::attention(q, k, v, bias?, alibi_slopes?, scale, causal, window, softcap)   (spec.SCORE_ARGS)
        -> (out (B,H,M,F) in q's dtype, lse (B,H,M) float32; float64 for float64 inputs)
    attnfx::attention_backward(grad_out, grad_lse?, q, k, v, bias?, alibi_slopes?,
                               out, lse, scale, causal, window, softcap, bias_grad)
        -> (dq, dk, dv, dbias)   dbias has bias's shape when bias_grad, else it is empty (0,)

Semantics are AttentionSpec's: causal in {"none", "top_left", "bottom_right"}, window -1 = none,
softcap 0.0 = none; `bias` broadcasts to (B,H,M,N) and is either additive (floating) or a keep-mask
(bool, True attends); ALiBi slopes are (H,). Fully masked rows give 0 with lse = -inf. ALiBi
slopes get no gradient, the backward op has none (no double backward), and dropout is not
supported (sites with training dropout keep SDPA). NOTE: a row that a finite additive mask
(finfo.min) covers entirely averages V, as the spec says, but its fp32 lse rounds to the mask
value (log l is absorbed), so its own gradient is off by a factor l; it is exact when that row's
grad_out is 0, as for padding rows in training.

CUDA runs attnfx's Triton kernels (split-KV decode when M <= 16 and N >= 4M, flash otherwise) and
raises KernelUnavailable for what they cannot take; every other device runs the chunked pure-torch
implementation. Importing this module registers the ops; it never imports triton.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from attnfx.cost_model.errors import KernelUnavailable
from attnfx.cost_model.spec import SCORE_OP_SCHEMA, SCORE_SCHEMA, is_decode_shape

from .attention_args import ATTENTION, accumulation_dtype, check_args, decode_op_args, triton_importable
from .chunked import chunked_backward, chunked_forward


def triton_module(name: str, op: str = ATTENTION) -> ModuleType:
    """One of attnfx's Triton kernel modules, imported on first use (never at import time)."""
    if not triton_importable():
        raise KernelUnavailable(f"{op} on cuda: triton is not importable")
    return importlib.import_module(f"{__package__}.{name}")


@torch.library.custom_op(
    "attnfx::attention", mutates_args=(), schema=f"({SCORE_OP_SCHEMA}) -> (Tensor out, Tensor lse)",
)
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
              *score_args: float | int | str) -> tuple[Tensor, Tensor]:
    """Fused attention with AttentionSpec's semantics: (out, lse). `score_args` are spec.SCORE_ARGS."""
    return chunked_forward(q, k, v, *decode_op_args(ATTENTION, bias, alibi_slopes, *score_args))


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, *score_args):
    extras, mods = decode_op_args(ATTENTION, *score_args)
    if is_decode_shape(q.shape[2], k.shape[2]):
        return triton_module("triton_decode").decode_forward(q, k, v, extras, mods)
    return triton_module("triton_flash_fwd").flash_forward(q, k, v, extras, mods)


@attention.register_fake
def _attention_fake(q, k, v, *score_args):
    d = check_args(q, k, v, decode_op_args(ATTENTION, *score_args)[0])
    out = q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)
    lse = q.new_empty(d.batch, d.heads, d.q_len, dtype=accumulation_dtype(q.dtype))
    return out, lse


@torch.library.custom_op(
    "attnfx::attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, "
    f"Tensor out, Tensor lse, {SCORE_SCHEMA}, bool bias_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
)
def attention_backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                       bias: Tensor | None, alibi_slopes: Tensor | None, out: Tensor, lse: Tensor,
                       *rest: float | int | str | bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of attnfx::attention recomputed from its lse: (dq, dk, dv, dbias); `rest` is
    spec.SCORE_ARGS, then bias_grad."""
    *score_args, bias_grad = rest
    extras, mods = decode_op_args(ATTENTION, bias, alibi_slopes, *score_args)
    return chunked_backward(grad_out, grad_lse, q, k, v, extras, mods, out, lse, bias_grad)


@attention_backward.register_kernel("cuda")
def _attention_backward_cuda(grad_out, grad_lse, q, k, v, bias, alibi_slopes, out, lse, *rest):
    *score_args, bias_grad = rest
    extras, mods = decode_op_args(ATTENTION, bias, alibi_slopes, *score_args)
    launch = triton_module("triton_flash_bwd").flash_backward
    return launch(grad_out, grad_lse, q, k, v, extras, mods, out, lse, bias_grad)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, bias, alibi_slopes, out, lse, *rest):
    *score_args, bias_grad = rest
    check_args(q, k, v, decode_op_args(ATTENTION, bias, alibi_slopes, *score_args)[0])
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, alibi_slopes, *ctx.params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, alibi_slopes, out, lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor):
    q, k, v, bias, alibi_slopes, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and bias.dtype.is_floating_point and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.attnfx.attention_backward(
        grad_out, grad_lse, q, k, v, bias, alibi_slopes, out, lse, *ctx.params, bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, *(None,) * len(ctx.params)


attention.register_autograd(_backward, setup_context=_setup_context)
