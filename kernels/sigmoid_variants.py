"""Sigmoid-attention sites as rewrite targets: both emit `attnfx::sigmoid_attention(...)`.

The op picks its implementation by device, so the two variants differ in where they may be chosen
and which algorithm prices them:
  * attnfx_sigmoid_chunked: the pure-torch chunked loop, on CPU (algorithm sigmoid_chunked);
  * triton_sigmoid: the Triton flash kernel with sigmoid weights, on CUDA (algorithm sigmoid_flash).
Both take every feature a sigmoid site can state (scale, softcap, additive or bool mask, ALiBi,
causal top-left or bottom-right, window, key padding, GQA/MQA, logit_bias).
"""
from __future__ import annotations

import torch

from attnfx.cost_model.spec import AttentionSpec, Kind

from . import sigmoid_ops  # noqa: F401  (registers torch.ops.attnfx.sigmoid_attention)
from .fused import score_operands, triton_refusal_on
from .registry import Call, Operands, kind_refusal


def sigmoid_call(spec: AttentionSpec, operands: Operands) -> Call:
    """`attnfx::sigmoid_attention(...)` for `spec` on canonical operands."""
    return Call(torch.ops.attnfx.sigmoid_attention.default, (*score_operands(spec, operands), spec.logit_bias), {})


class SigmoidChunkedVariant:
    name = "attnfx_sigmoid_chunked"
    algorithm = "sigmoid_chunked"
    exact = True
    description = "attnfx::sigmoid_attention's pure-torch chunked kernel (memory-bounded, fp32 accumulation)"

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        if device != "cpu":
            return (f"attnfx_sigmoid_chunked is attnfx's CPU kernel; on {device} attnfx::sigmoid_attention "
                    "runs its Triton kernel")
        return kind_refusal(self.name, Kind.SIGMOID, spec)

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return sigmoid_call(spec, operands)


class TritonSigmoidVariant:
    name = "triton_sigmoid"
    algorithm = "sigmoid_flash"
    exact = True
    description = "attnfx::sigmoid_attention's Triton flash kernel (sigmoid weights, no row statistics)"

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        return triton_refusal_on(spec, device) or kind_refusal(self.name, Kind.SIGMOID, spec)

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return sigmoid_call(spec, operands)
