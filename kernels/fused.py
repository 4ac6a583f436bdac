"""attnfx's own kernels as rewrite targets: every one emits `attnfx::attention(...)[0]`.

The op picks its implementation by device (and, on CUDA, by shape), so the three variants differ
only in where they may be chosen and which cascade the cost model prices them with:
  * attnfx_chunked: the pure-torch chunked 1-pass kernel, on CPU;
  * triton_flash:   the Triton flash kernel (FuseMax cascade 5), on CUDA, for M > 16 or N < 4M;
  * triton_decode:  the Triton split-KV decode kernel, on CUDA, for M <= 16 and N >= 4M.
All three take every feature AttentionSpec can state (scale, softcap, additive or bool mask of any
broadcast shape, ALiBi, causal top-left or bottom-right, window, key padding, GQA/MQA).
"""
from __future__ import annotations

import torch
from torch.fx import Node

from attnfx.cost_model.spec import DECODE_MAX_Q, DECODE_MIN_RATIO, AttentionSpec, MaskInput, ScoreMods

from . import ops  # noqa: F401  (registers torch.ops.attnfx.*)
from .attention_args import triton_refusal
from .registry import Call, CallSite, Operands, call_arguments


def attention_call(spec: AttentionSpec, operands: Operands) -> Call:
    """`attnfx::attention(...)[0]` for `spec` on canonical operands."""
    args = (
        operands.q, operands.k, operands.v,
        operands.mask if spec.mask is not MaskInput.NONE else None,
        operands.slopes if spec.alibi else None,
        operands.kv_lengths if spec.key_padding else None,
        *spec.mods.op_args(),
    )
    return Call(torch.ops.attnfx.attention.default, args, {}, output_index=0)


def read_attention_call(node: Node) -> CallSite | None:
    """The call site of an `attnfx::attention` call (output 0 is the attention output), else None;
    ValueError when its score arguments are not well-formed."""
    if node.op != "call_function" or node.target is not torch.ops.attnfx.attention.default:
        return None
    a = call_arguments(node)
    operands = Operands(a["q"], a["k"], a["v"], a["bias"], a["alibi_slopes"], a["kv_lengths"])
    return CallSite(operands, ScoreMods.from_op_args(a["scale"], a["causal"], a["window"], a["softcap"]),
                    output_index=0)


def _shape_name(spec: AttentionSpec) -> str:
    return f"M={spec.q_len} N={spec.kv_len}"


def _triton_refusal(spec: AttentionSpec, device: str) -> str | None:
    if device != "cuda":
        return f"Triton kernels run on cuda only; on {device} interpreted Triton is never chosen for speed"
    return triton_refusal(spec.torch_dtype, spec.head_dim, spec.value_dim)


class ChunkedVariant:
    op = "attnfx::attention"
    read = staticmethod(read_attention_call)
    name = "attnfx_chunked"
    algorithm = "chunked"
    exact = True
    description = "attnfx::attention's pure-torch chunked 1-pass kernel (memory-bounded, fp32 accumulation)"

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        if device != "cpu":
            return f"attnfx_chunked is attnfx's CPU kernel; on {device} attnfx::attention runs its Triton kernels"
        return None

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return attention_call(spec, operands)


class TritonFlashVariant:
    op = "attnfx::attention"
    read = staticmethod(read_attention_call)
    name = "triton_flash"
    algorithm = "flash"
    exact = True
    description = "attnfx::attention's Triton flash kernel (1-pass online softmax, causal block skipping)"

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        reason = _triton_refusal(spec, device)
        if reason is None and spec.is_decode:
            return (f"{_shape_name(spec)} is decode-shaped (M <= {DECODE_MAX_Q}, N >= {DECODE_MIN_RATIO}M): "
                    "attnfx::attention runs its split-KV kernel there (triton_decode)")
        return reason

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return attention_call(spec, operands)


class TritonDecodeVariant:
    op = "attnfx::attention"
    read = staticmethod(read_attention_call)
    name = "triton_decode"
    algorithm = "decode_split_kv"
    exact = True
    description = "attnfx::attention's Triton split-KV decode kernel (Flash-Decoding merge)"

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        reason = _triton_refusal(spec, device)
        if reason is None and not spec.is_decode:
            return (f"{_shape_name(spec)} is not decode-shaped (needs M <= {DECODE_MAX_Q} and "
                    f"N >= {DECODE_MIN_RATIO}M): attnfx::attention runs its flash kernel there (triton_flash)")
        return reason

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return attention_call(spec, operands)
