"""attnfx's sigmoid attention as torch.library custom ops (traceable, exportable, differentiable).

    attnfx::sigmoid_attention(q, k, v, bias?, alibi_slopes?, scale, causal, window, softcap,
                              logit_bias) -> out (B,H,M,F) in q's dtype
    attnfx::sigmoid_attention_backward(grad_out, q, k, v, bias?, alibi_slopes?, scale, causal,
                                       window, softcap, logit_bias, bias_grad) -> (dq, dk, dv, dbias)

Arguments as attnfx::attention's (canonical layout, GQA read in place, masks broadcast, causal
top-left / bottom-right, window, softcap, ALiBi); the weights are
sigmoid(s + logit_bias) with no row normalisation, and an excluded key (-inf score) weighs 0, so
a row that sees no key is 0. ALiBi slopes get no gradient; no double backward.
CUDA runs the Triton flash kernel with sigmoid weights; every other device the chunked pure-torch
implementation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnfx.cost_model.spec import SCORE_OP_SCHEMA, SCORE_SCHEMA

from .attention_args import check_args, decode_op_args
from .chunked_sigmoid import SIGMOID_ATTENTION, sigmoid_backward, sigmoid_forward
from .attention_ops import triton_module


@torch.library.custom_op(
    SIGMOID_ATTENTION,
    mutates_args=(),
    schema=f"({SCORE_OP_SCHEMA}, float logit_bias) -> Tensor",
)
def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
                      *rest: float | int | str) -> Tensor:
    """Sigmoid attention with AttentionSpec's semantics (kind SIGMOID); `rest` is spec.SCORE_ARGS,
    then logit_bias."""
    *score_args, logit_bias = rest
    extras, mods = decode_op_args(SIGMOID_ATTENTION, bias, alibi_slopes, *score_args)
    return sigmoid_forward(q, k, v, extras, mods, logit_bias)


@sigmoid_attention.register_kernel("cuda")
def _sigmoid_attention_cuda(q, k, v, *score_args):
    *score_args, logit_bias = score_args
    extras, mods = decode_op_args(SIGMOID_ATTENTION, *score_args)
    return triton_module("triton_flash_fwd", SIGMOID_ATTENTION).sigmoid_flash_forward(q, k, v, extras, mods, logit_bias)


@sigmoid_attention.register_fake
def _sigmoid_attention_fake(q, k, v, *score_args):
    d = check_args(q, k, v, decode_op_args(SIGMOID_ATTENTION, *score_args[:-1])[0], SIGMOID_ATTENTION)
    return q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)


@torch.library.custom_op(
    "attnfx::sigmoid_attention_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, {SCORE_SCHEMA}, "
    "float logit_bias, bool bias_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
)
def sigmoid_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                               alibi_slopes: Tensor | None,
                               *rest: float | int | str | bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of attnfx::sigmoid_attention, the weights recomputed: (dq, dk, dv, dbias); `rest`
    is spec.SCORE_ARGS, then logit_bias and bias_grad."""
    *score_args, logit_bias, bias_grad = rest
    extras, mods = decode_op_args(SIGMOID_ATTENTION, bias, alibi_slopes, *score_args)
    return sigmoid_backward(grad_out, q, k, v, extras, mods, logit_bias, bias_grad)


@sigmoid_attention_backward.register_kernel("cuda")
def _sigmoid_attention_backward_cuda(grad_out, q, k, v, *rest):
    *score_args, logit_bias, bias_grad = rest
    extras, mods = decode_op_args(SIGMOID_ATTENTION, *score_args)
    launch = triton_module("triton_flash_bwd", SIGMOID_ATTENTION).sigmoid_flash_backward
    return launch(grad_out, q, k, v, extras, mods, logit_bias, bias_grad)


@sigmoid_attention_backward.register_fake
def _sigmoid_attention_backward_fake(grad_out, q, k, v, bias, *rest):
    *score_args, _, bias_grad = rest
    check_args(q, k, v, decode_op_args(SIGMOID_ATTENTION, bias, *score_args)[0], SIGMOID_ATTENTION)
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, alibi_slopes, *ctx.params = inputs
    ctx.save_for_backward(q, k, v, bias, alibi_slopes)


def _backward(ctx, grad_out: Tensor):
    q, k, v, bias, alibi_slopes = ctx.saved_tensors
    bias_grad = bias is not None and bias.dtype.is_floating_point and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.attnfx.sigmoid_attention_backward(
        grad_out, q, k, v, bias, alibi_slopes, *ctx.params, bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, *(None,) * len(ctx.params)


sigmoid_attention.register_autograd(_backward, setup_context=_setup_context)
