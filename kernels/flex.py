"""`attnfx::flex_attention`: PyTorch's FlexAttention, compiled by Inductor, as a rewrite target.

FlexAttention skips the key blocks a block mask proves empty and runs the blocks it proves full
without evaluating the mask, so a sliding window costs O(N * window) instead of SDPA's dense
O(N^2) with a mask tensor. attnfx builds the block mask from the proven structure alone (causal
top-left / bottom-right, window), analytically in O(B * blocks): no
(M, N) mask is ever evaluated. Score modifiers (softcap, additive bias, ALiBi) become `score_mod`.

    attnfx::flex_attention(q, k, v, bias?, alibi_slopes?, scale, causal, window, softcap)
        -> out (B, H, M, F)

Arguments and semantics are attnfx::attention's (AttentionSpec's), except that `bias` must be
additive: a bool mask tensor has no block structure to skip. Inductor compiles FlexAttention on
x86 CPUs for inference only (no log-sum-exp, no backward), so the op's backward recomputes the
log-sum-exp with attnfx::attention and uses its backward: a rewritten graph still trains, exactly,
at the chunked kernel's speed. Each new (shape, dtype, modifiers) compiles once per process
(~10-40 s here; Inductor's on-disk cache shortens later processes); the cost model amortises it.
"""
from __future__ import annotations

import functools
import platform
import shutil
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from attnfx.cost_model.compiled import compile_key, note_compiled
from attnfx.cost_model.spec import SCORE_OP_SCHEMA, AttentionSpec, Causal, Kind, MaskInput, dtype_name

from . import attention_ops  # noqa: F401  (registers attnfx::attention, whose backward flex reuses)
from .attention_args import bias_4d, check_args, decode_op_args
from .fused import attention_call
from .variant import Call, Operands, OpVariant, kind_refusal, score_op_reader

FLEX_OP = "attnfx::flex_attention"

BLOCK = 128  # block-mask granularity (FlexAttention's default sparse block)
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RECOMPILE_LIMIT = 64  # distinct (shape, modifiers) one process may compile before Dynamo gives up


def block_tables(q_len: int, kv_len: int, offset: int | None, window: int,
                 block: int = BLOCK) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) of the band:
    a key block is *full* when every (m, n) pair in it is kept, *partial* when some are; blocks with
    none are skipped. Shapes (1, 1, M/block) and (1, 1, M/block, N/block), int32."""
    mb, nb = -(-q_len // block), -(-kv_len // block)
    q_lo = torch.arange(mb).view(1, -1, 1) * block
    q_hi = torch.clamp(q_lo + block, max=q_len) - 1
    k_lo = torch.arange(nb).view(1, 1, -1) * block
    k_hi = torch.clamp(k_lo + block, max=kv_len) - 1
    some = torch.ones(1, mb, nb, dtype=torch.bool)
    every = torch.ones(1, mb, nb, dtype=torch.bool)
    if offset is not None:
        some, every = some & (k_lo <= q_hi + offset), every & (k_hi <= q_lo + offset)
        if window != -1:
            some, every = some & (k_hi > q_lo + offset - window), every & (k_lo > q_hi + offset - window)
    partial = some & ~every
    return (*_pack(partial), *_pack(every))


def _pack(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Per query block: how many key blocks are set, and their indices first (stable order)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.unsqueeze(1).contiguous(), idx.unsqueeze(1).contiguous()


def _program(q: Tensor, k: Tensor, v: Tensor, tables: tuple[Tensor, ...],
             bias: Tensor | None, slopes: Tensor | None, scale: float, offset: int | None, window: int,
             softcap: float) -> Tensor:
    """What Inductor compiles: the block mask and score_mod closures over this call's tensors."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def mask_mod(b, h, m, n):
        keep = n >= 0
        if offset is not None:
            keep = keep & (n <= m + offset)
            if window != -1:
                keep = keep & (n > m + offset - window)
        return keep

    def score_mod(s, b, h, m, n):
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + bias[b, h, m, n]
        if slopes is not None:
            s = s + slopes[h] * (n - m)
        return s

    block_mask = BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                          seq_lengths=(q.shape[2], k.shape[2]))
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled():
    return torch.compile(_program, dynamic=False, fullgraph=True)


def flex_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
                 *score_args: float | int | str) -> Tensor:
    """attnfx::flex_attention's CPU implementation (compiles on the first call of each shape)."""
    extras, mods = decode_op_args(FLEX_OP, bias, alibi_slopes, *score_args)
    d = check_args(q, k, v, extras, FLEX_OP)
    reason = runtime_refusal(q.dtype, q.device.type, bias)
    if reason is not None:
        raise ValueError(f"attnfx::flex_attention: {reason}")
    offset = None if mods.causal is Causal.NONE else d.causal_offset(mods.causal)
    window = -1 if mods.window is None else mods.window
    tables = block_tables(d.q_len, d.kv_len, offset, window)
    full_bias = None
    if bias is not None:
        full_bias = bias_4d(bias).to(torch.float32).expand(d.batch, d.heads, d.q_len, d.kv_len)
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32)
    # Inductor compiles FlexAttention on CPU for inference only (the op's backward is attnfx::attention's),
    # and the op is opaque: dispatch modes around it (a caller's, opcheck's) do not trace into Dynamo
    with torch.no_grad(), _disable_current_modes(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        out = _compiled()(q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(), tables,
                          None if full_bias is None else full_bias.detach(), slopes, float(mods.scale), offset,
                          window, float(mods.softcap or 0.0))
    note_compiled(compile_key("flex_compile", (d.batch, d.heads, d.kv_heads, d.q_len, d.kv_len, d.head_dim,
                                               d.value_dim), dtype_name(q.dtype),
                              mods,
                              None if bias is None else tuple(bias_4d(bias).shape), alibi_slopes is not None))
    return out.to(q.dtype)


@functools.cache
def inductor_cpu_refusal() -> str | None:
    """Why Inductor cannot compile FlexAttention on this host (None: it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"Inductor's CPU FlexAttention template is x86-only; this host is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "Inductor's CPU FlexAttention template needs AVX2 or AVX512"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "Inductor compiles C++ and no C++ compiler is on PATH"
    return None


def runtime_refusal(dtype: torch.dtype, device: str, bias: Tensor | None = None) -> str | None:
    """Why the op cannot run on these inputs (None: it can); one sentence, shared with the variant."""
    if device != "cpu":
        return (f"attnfx offers FlexAttention on CPU only; on {device} attnfx::attention runs "
                "its own Triton kernels")
    if dtype not in FLEX_DTYPES:
        return f"Inductor's CPU FlexAttention takes float32/bfloat16/float16, not {str(dtype).removeprefix('torch.')}"
    if bias is not None and bias.dtype == torch.bool:
        return "a bool mask tensor gives FlexAttention no block structure to skip (SDPA and attnfx_chunked take it)"
    return inductor_cpu_refusal()


@torch.library.custom_op(
    "attnfx::flex_attention",
    mutates_args=(),
    schema=f"({SCORE_OP_SCHEMA}) -> Tensor",
)
def flex_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
                   *score_args: float | int | str) -> Tensor:
    """Attention with AttentionSpec's semantics through compiled FlexAttention (out only)."""
    return flex_forward(q, k, v, bias, alibi_slopes, *score_args)


@flex_attention.register_fake
def _flex_fake(q, k, v, bias, alibi_slopes, *score_args):
    d = check_args(q, k, v, decode_op_args(FLEX_OP, bias, alibi_slopes, *score_args)[0], FLEX_OP)
    return q.new_empty(d.batch, d.heads, d.q_len, d.value_dim)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, alibi_slopes, *params = inputs
    ctx.save_for_backward(q, k, v, bias, alibi_slopes)
    ctx.params = tuple(params)


def _backward(ctx, grad_out: Tensor):
    """Exact gradients: attnfx::attention recomputes (out, lse), then its backward runs."""
    q, k, v, bias, alibi_slopes = ctx.saved_tensors
    out, lse = torch.ops.attnfx.attention(q, k, v, bias, alibi_slopes, *ctx.params)
    bias_grad = bias is not None and bias.dtype.is_floating_point and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.attnfx.attention_backward(
        grad_out, None, q, k, v, bias, alibi_slopes, out, lse, *ctx.params, bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, *(None,) * len(ctx.params)


flex_attention.register_autograd(_backward, setup_context=_setup_context)


def _flex_refusal(spec: AttentionSpec, device: str) -> str | None:
    if spec.mask is MaskInput.BOOL:
        return "a bool mask tensor gives FlexAttention no block structure to skip (SDPA and attnfx_chunked take it)"
    reason = kind_refusal("flex", Kind.SOFTMAX, spec) or runtime_refusal(spec.torch_dtype, device)
    if reason is None and {"q_len", "kv_len"} & spec.dynamic:
        return "flex compiles one kernel per sequence length (seconds each) and this site's length is dynamic"
    if reason is None and device == "cpu" and spec.kv_len % BLOCK:
        return (f"Inductor's CPU FlexAttention gave wrong outputs at key lengths that are not a multiple of its "
                f"{BLOCK}-key block (e.g. 200 queries x 200 keys, 4 x 8, with torch 2.13); this site has "
                f"{spec.kv_len} keys")
    return reason


def _flex_call(spec: AttentionSpec, operands: Operands) -> Call:
    """attnfx::attention's arguments, to the op that returns the output alone."""
    return replace(attention_call(spec, operands), target=torch.ops.attnfx.flex_attention.default, output_index=None)


FLEX = OpVariant(
    "flex", "flex", FLEX_OP, "attnfx::flex_attention: FlexAttention compiled by Inductor, block mask from the proof",
    _flex_refusal, _flex_call, score_op_reader(FLEX_OP), takes=("softcap", "alibi"))
