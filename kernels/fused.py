"""attnfx's own ops as rewrite targets: each variant emits one custom op, which picks its
implementation by device, so variants of one op differ only in where they may be chosen and which
algorithm the cost model prices them with.

  attnfx::attention(...)[0]            (softmax sites: every feature AttentionSpec can state)
    attnfx_chunked           the pure-torch chunked 1-pass kernel, on CPU
    triton_flash             the Triton flash kernel (FuseMax cascade 5), on CUDA, for M > 16 or N < 4M
    triton_decode            the Triton split-KV decode kernel, on CUDA, for M <= 16 and N >= 4M
  attnfx::sigmoid_attention(...)       (sigmoid sites: the same features, plus logit_bias)
    attnfx_sigmoid_chunked   the pure-torch chunked kernel, on CPU
    triton_sigmoid           the Triton flash kernel with sigmoid weights, on CUDA
  attnfx::linear_attention(...)[0]     (linear sites: q, k feature-mapped; GQA, normalize, decay)
    attnfx_linear            right to left, Q (K^T V): no causal band, no decay; any device
    attnfx_lightning         chunked (Lightning, LINEAR_CHUNK rows a chunk): a causal band; any device
Every variant refuses the sites of another kind, and training dropout (none of the ops has any).
Each op has one reader (`read`), which states what a call of it in a graph computes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Node

from attnfx.cost_model.spec import DECODE_MAX_Q, DECODE_MIN_RATIO, AttentionSpec, Causal, Kind, MaskInput, ScoreMods
from attnfx.cost_model.tiles import LINEAR_CHUNK

from . import attention_ops, linear_ops, sigmoid_ops  # noqa: F401  (register torch.ops.attnfx.*)
from .attention_args import triton_refusal
from .score_mods import APPLIED
from .variant import Call, CallSite, Operands, OpVariant, call_arguments, calls_op, kind_refusal, score_op_reader

Refusal = Callable[[AttentionSpec, str], "str | None"]


def score_operands(spec: AttentionSpec, operands: Operands) -> tuple:
    """(q, k, v, bias?, alibi_slopes?, *spec.SCORE_ARGS): the leading
    arguments of attnfx::attention and attnfx::sigmoid_attention, with only what the spec uses."""
    return (
        operands.q, operands.k, operands.v,
        operands.mask if spec.mask is not MaskInput.NONE else None,
        operands.slopes if spec.alibi else None,
        *spec.mods.op_args(),
    )


def attention_call(spec: AttentionSpec, operands: Operands) -> Call:
    """`attnfx::attention(...)[0]` for `spec` on canonical operands."""
    return Call(torch.ops.attnfx.attention.default, score_operands(spec, operands), {}, output_index=0)


def sigmoid_call(spec: AttentionSpec, operands: Operands) -> Call:
    """`attnfx::sigmoid_attention(...)` for `spec` on canonical operands."""
    return Call(torch.ops.attnfx.sigmoid_attention.default, (*score_operands(spec, operands), spec.logit_bias), {})


def linear_call(algorithm: str) -> Callable[[AttentionSpec, Operands], Call]:
    """`attnfx::linear_attention(...)[0]` for `spec` on canonical operands, contracted in `algorithm`'s order."""
    def call(spec: AttentionSpec, operands: Operands) -> Call:
        args = (operands.q, operands.k, operands.v, operands.decay if spec.decay else None, spec.scale,
                spec.causal.value, spec.normalize, spec.norm_eps, algorithm, LINEAR_CHUNK)
        return Call(torch.ops.attnfx.linear_attention.default, args, {}, output_index=0)
    return call


read_attention_call = score_op_reader("attnfx::attention", output_index=0)
read_sigmoid_call = score_op_reader("attnfx::sigmoid_attention", Kind.SIGMOID)


def read_linear_call(node: Node) -> CallSite | None:
    """The call site of an `attnfx::linear_attention` call (output 0 is the attention output)."""
    if not calls_op(node, "attnfx::linear_attention"):
        return None
    a = call_arguments(node)
    mods = ScoreMods(float(a["scale"]), Causal(a["causal"]))
    return CallSite(Operands(a["q"], a["k"], a["v"], decay=a["decay"]), mods, Kind.LINEAR, output_index=0)


def cpu_kernel(name: str, kind: Kind, elsewhere: str) -> Refusal:
    """Refusal of a chunked CPU kernel for `kind` sites; `elsewhere` says what other devices run."""
    def refusal(spec: AttentionSpec, device: str) -> str | None:
        if device != "cpu":
            return f"{name} is attnfx's CPU kernel; on {device} {elsewhere}"
        return kind_refusal(name, kind, spec)
    return refusal


def triton_kernel(name: str, kind: Kind, shapes: Refusal | None = None) -> Refusal:
    """Refusal of a Triton kernel for `kind` sites (and the shapes `shapes` refuses)."""
    def refusal(spec: AttentionSpec, device: str) -> str | None:
        if device != "cuda":
            return f"Triton kernels run on cuda only; on {device} interpreted Triton is never chosen for speed"
        reason = triton_refusal(spec.torch_dtype, spec.head_dim, spec.value_dim) or kind_refusal(name, kind, spec)
        return reason or (shapes(spec, device) if shapes else None)
    return refusal


def _flash_shapes(spec: AttentionSpec, device: str) -> str | None:
    if spec.is_decode:
        return (f"M={spec.q_len} N={spec.kv_len} is decode-shaped (M <= {DECODE_MAX_Q}, N >= {DECODE_MIN_RATIO}M): "
                "attnfx::attention runs its split-KV kernel there (triton_decode)")
    return None


def _decode_shapes(spec: AttentionSpec, device: str) -> str | None:
    if not spec.is_decode:
        return (f"M={spec.q_len} N={spec.kv_len} is not decode-shaped (needs M <= {DECODE_MAX_Q} and "
                f"N >= {DECODE_MIN_RATIO}M): attnfx::attention runs its flash kernel there (triton_flash)")
    return None


def _right_to_left(spec: AttentionSpec, device: str) -> str | None:
    reason = kind_refusal("attnfx_linear", Kind.LINEAR, spec)
    if reason is None and spec.causal is not Causal.NONE:
        return "a causal band needs the chunked order (attnfx_lightning): K^T V would sum keys a query cannot see"
    if reason is None and spec.decay:
        return "no attnfx linear algorithm takes a decay without a causal band"
    return reason


def _chunked_linear(spec: AttentionSpec, device: str) -> str | None:
    reason = kind_refusal("attnfx_lightning", Kind.LINEAR, spec)
    if reason is None and spec.causal is Causal.NONE:
        return "no causal band: the right-to-left order (attnfx_linear) computes this site in one state"
    return reason


CHUNKED = OpVariant(
    "attnfx_chunked", "chunked", "attnfx::attention",
    "attnfx::attention's pure-torch chunked 1-pass kernel (memory-bounded, fp32 accumulation)",
    cpu_kernel("attnfx_chunked", Kind.SOFTMAX, "attnfx::attention runs its Triton kernels"), attention_call,
    read_attention_call, takes=APPLIED)
TRITON_FLASH = OpVariant(
    "triton_flash", "flash", "attnfx::attention",
    "attnfx::attention's Triton flash kernel (1-pass online softmax, causal block skipping)",
    triton_kernel("triton_flash", Kind.SOFTMAX, _flash_shapes), attention_call, read_attention_call, takes=APPLIED)
TRITON_DECODE = OpVariant(
    "triton_decode", "decode_split_kv", "attnfx::attention",
    "attnfx::attention's Triton split-KV decode kernel (Flash-Decoding merge)",
    triton_kernel("triton_decode", Kind.SOFTMAX, _decode_shapes), attention_call, read_attention_call,
    takes=APPLIED)
SIGMOID_CHUNKED = OpVariant(
    "attnfx_sigmoid_chunked", "sigmoid_chunked", "attnfx::sigmoid_attention",
    "attnfx::sigmoid_attention's pure-torch chunked kernel (memory-bounded, fp32 accumulation)",
    cpu_kernel("attnfx_sigmoid_chunked", Kind.SIGMOID, "attnfx::sigmoid_attention runs its Triton kernel"),
    sigmoid_call, read_sigmoid_call, takes=APPLIED)
TRITON_SIGMOID = OpVariant(
    "triton_sigmoid", "sigmoid_flash", "attnfx::sigmoid_attention",
    "attnfx::sigmoid_attention's Triton flash kernel (sigmoid weights, no row statistics)",
    triton_kernel("triton_sigmoid", Kind.SIGMOID), sigmoid_call, read_sigmoid_call, takes=APPLIED)
LINEAR = OpVariant(
    "attnfx_linear", "linear_right_to_left", "attnfx::linear_attention",
    "attnfx::linear_attention right to left: Q (K^T V), O(N E F)",
    _right_to_left, linear_call("right_to_left"), read_linear_call)
LIGHTNING = OpVariant(
    "attnfx_lightning", "linear_chunked", "attnfx::linear_attention",
    f"attnfx::linear_attention chunked (Lightning, {LINEAR_CHUNK} rows a chunk): intra-chunk product + decayed "
    "running state", _chunked_linear, linear_call("chunked"), read_linear_call)
