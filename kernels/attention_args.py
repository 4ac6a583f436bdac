"""The arguments of attnfx's attention ops, decoded and checked once for every implementation.

Inside attnfx a call is `(q, k, v, extras, mods)`: the optional tensors bundled as `ScoreTensors`,
the scalar modifiers as the spec's `ScoreMods`; only the custom-op schemas keep the flat list
(the spec's SCORE_OP_SCHEMA).

A call whose shapes do not line up is a caller's bug (ValueError). A well-formed call that one
kernel cannot take (dtype, head dim, no triton) is `KernelUnavailable`, which the selection reads to
skip that kernel; `triton_refusal()` states the Triton kernels' limits in one place, so a variant's
refusal and a launcher's error can never disagree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attnfx.cost_model.spec import Causal, ScoreMods

ATTENTION = "attnfx::attention"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class ScoreTensors:
    """The optional tensors a call's scores read: an additive or bool mask broadcastable to
    (B,H,M,N), and ALiBi slopes (H,)."""

    bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None


@dataclass(frozen=True)
class Dims:
    """Sizes of one call in canonical layout: q (B,H,M,E), k (B,Hkv,N,E), v (B,Hkv,N,F)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def causal_offset(self, causal: Causal) -> int:
        """Diagonal offset: key n is visible from query m when n <= m + offset."""
        return causal.offset(self.q_len, self.kv_len)


def decode_op_args(op: str, bias: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                   *score_args: float | int | str) -> tuple[ScoreTensors, ScoreMods]:
    """A custom op's flat score arguments (bias, alibi_slopes, then spec.SCORE_ARGS) as the bundles
    the implementations take; ValueError naming the op and the argument that is not well-formed."""
    try:
        mods = ScoreMods.from_op_args(*score_args)
    except ValueError as err:
        raise ValueError(f"{op}: {err}") from None
    return ScoreTensors(bias, alibi_slopes), mods


def check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors,
               op: str = ATTENTION) -> Dims:
    """Sizes of a call whose tensors line up; ValueError naming the op and the first that does not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op} wants 4-D q, k, v; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    b, h, m, e = q.shape
    bk, hk, n, ek = k.shape
    if (bk, hk, n) != tuple(v.shape[:3]) or bk != b or ek != e:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not line up as (B,H,M,E), (B,Hkv,N,E), (B,Hkv,N,F)")
    if h % hk:
        raise ValueError(f"{op}: query heads ({h}) must be a multiple of kv heads ({hk})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{op}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    dims = Dims(b, h, hk, m, n, e, v.shape[3])
    if extras.bias is not None:
        _check_bias(extras.bias, dims, op)
    slopes = extras.alibi_slopes
    if slopes is not None and tuple(slopes.shape) != (h,):
        raise ValueError(f"{op}: alibi_slopes must have shape ({h},), got {tuple(slopes.shape)}")
    return dims


def _check_bias(bias: torch.Tensor, dims: Dims, op: str) -> None:
    full = (dims.batch, dims.heads, dims.q_len, dims.kv_len)
    shape = tuple(bias.shape)
    fits = bias.dim() <= 4 and all(s in (1, f) for s, f in zip(shape[::-1], full[::-1]))
    if not fits:
        raise ValueError(f"{op}: bias of shape {shape} does not broadcast to (B,H,M,N)={full}")
    if not (bias.dtype.is_floating_point or bias.dtype == torch.bool):
        raise ValueError(f"{op}: bias must be floating (additive) or bool (True attends), "
                         f"got {bias.dtype}")


def bias_4d(bias: torch.Tensor) -> torch.Tensor:
    """`bias` viewed with leading size-1 dims up to 4-D (a view, never a copy)."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every storage dtype but fp64, which keeps its own precision (and its lse)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_refusal(dtype: torch.dtype, head_dim: int, value_dim: int) -> str | None:
    """Why attnfx's Triton kernels cannot take a call of this dtype and head dims (None: they can)."""
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float32/float16/bfloat16, not {str(dtype).removeprefix('torch.')}"
    if head_dim > MAX_HEAD_DIM or value_dim > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got E={head_dim} F={value_dim}"
    if not triton_importable():
        return "triton is not importable"
    return None
