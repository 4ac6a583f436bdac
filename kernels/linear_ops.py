"""attnfx's linear attention as torch.library custom ops (traceable, exportable, differentiable).

    attnfx::linear_attention(q, k, v, decay?, scale, causal, normalize, norm_eps, algorithm, chunk)
        -> (out (B,H,M,F) in q's dtype, den (B,H,M): the row normaliser, 1 when normalize is off;
            float32, float64 for float64 inputs)
    attnfx::linear_attention_backward(grad_out, grad_den?, q, k, v, decay?, out, den, scale, causal,
                                      normalize, norm_eps, algorithm, chunk) -> (dq, dk, dv)

q (B,H,M,E) and k (B,Hkv,N,E) arrive feature-mapped, v is (B,Hkv,N,F), decay (H,) in (0, 1];
causal in {"none", "top_left", "bottom_right"}; algorithm "right_to_left" (causal "none", no decay)
or "chunked" (a causal band; `chunk` query rows per step). Semantics are AttentionSpec's kind
LINEAR. The implementation is pure torch and runs on every device; decay gets no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .attention_args import accumulation_dtype
from .linear import LINEAR_ATTENTION, LinearArgs, check_linear_args, linear_backward, linear_forward


@torch.library.custom_op(
    LINEAR_ATTENTION,
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? decay, float scale, str causal, bool normalize, "
    "float norm_eps, str algorithm, int chunk) -> (Tensor out, Tensor den)",
)
def linear_attention(q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, scale: float, causal: str,
                     normalize: bool, norm_eps: float, algorithm: str, chunk: int) -> tuple[Tensor, Tensor]:
    """Linear attention with AttentionSpec's semantics (kind LINEAR): (out, den)."""
    return linear_forward(q, k, v, decay, LinearArgs.from_op_args(scale, causal, normalize, norm_eps, algorithm,
                                                                  chunk))


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, decay, *scalars):
    d = check_linear_args(q, k, v, decay, LinearArgs.from_op_args(*scalars))
    return (q.new_empty(d.batch, d.heads, d.q_len, d.value_dim),
            q.new_empty(d.batch, d.heads, d.q_len, dtype=accumulation_dtype(q.dtype)))


@torch.library.custom_op(
    "attnfx::linear_attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor? grad_den, Tensor q, Tensor k, Tensor v, Tensor? decay, Tensor out, "
    "Tensor den, float scale, str causal, bool normalize, float norm_eps, str algorithm, int chunk) "
    "-> (Tensor dq, Tensor dk, Tensor dv)",
)
def linear_attention_backward(grad_out: Tensor, grad_den: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                              decay: Tensor | None, out: Tensor, den: Tensor, scale: float, causal: str,
                              normalize: bool, norm_eps: float, algorithm: str,
                              chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attnfx::linear_attention: (dq, dk, dv)."""
    args = LinearArgs.from_op_args(scale, causal, normalize, norm_eps, algorithm, chunk)
    return linear_backward(grad_out, grad_den, q, k, v, decay, out, den, args)


@linear_attention_backward.register_fake
def _linear_attention_backward_fake(grad_out, grad_den, q, k, v, decay, out, den, *scalars):
    check_linear_args(q, k, v, decay, LinearArgs.from_op_args(*scalars))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, decay, *ctx.params = inputs
    ctx.save_for_backward(q, k, v, decay, *output)


def _backward(ctx, grad_out: Tensor, grad_den: Tensor):
    q, k, v, decay, out, den = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnfx.linear_attention_backward(grad_out, grad_den, q, k, v, decay, out, den,
                                                            *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None


linear_attention.register_autograd(_backward, setup_context=_setup_context)
