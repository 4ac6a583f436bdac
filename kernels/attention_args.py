"""The arguments of `attnfx::attention`, checked once for every implementation.

A call whose shapes do not line up is a caller's bug (ValueError). A well-formed call that one
kernel cannot take (dtype, head dim, no triton) is `KernelUnavailable`, which the selection reads to
skip that kernel; `triton_refusal()` states the Triton kernels' limits in one place, so a variant's
refusal and a launcher's error can never disagree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

CAUSAL_MODES = ("none", "top_left", "bottom_right")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


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

    def causal_offset(self, causal: str) -> int:
        """Diagonal offset: key n is visible from query m when n <= m + offset."""
        return self.kv_len - self.q_len if causal == "bottom_right" else 0


def check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    causal: str,
    window: int,
    softcap: float,
) -> Dims:
    """Sizes of a well-formed call; ValueError naming the first argument that is not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attnfx::attention wants 4-D q, k, v; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    b, h, m, e = q.shape
    bk, hk, n, ek = k.shape
    if (bk, hk, n) != tuple(v.shape[:3]) or bk != b or ek != e:
        raise ValueError(f"attnfx::attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not line up as (B,H,M,E), (B,Hkv,N,E), (B,Hkv,N,F)")
    if h % hk:
        raise ValueError(f"attnfx::attention: query heads ({h}) must be a multiple of kv heads ({hk})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError("attnfx::attention: q, k, v must share one floating dtype; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    dims = Dims(b, h, hk, m, n, e, v.shape[3])
    if bias is not None:
        _check_bias(bias, dims)
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (h,):
        raise ValueError(f"attnfx::attention: alibi_slopes must have shape ({h},), got {tuple(alibi_slopes.shape)}")
    if kv_lengths is not None and (tuple(kv_lengths.shape) != (b,) or kv_lengths.dtype.is_floating_point):
        raise ValueError(f"attnfx::attention: kv_lengths must be integer of shape ({b},), "
                         f"got {kv_lengths.dtype} {tuple(kv_lengths.shape)}")
    if causal not in CAUSAL_MODES:
        raise ValueError(f"attnfx::attention: causal must be one of {CAUSAL_MODES}, got {causal!r}")
    if window != -1 and (window < 1 or causal == "none"):
        raise ValueError(f"attnfx::attention: window must be -1 (none) or >= 1 with a causal diagonal; "
                         f"got window={window}, causal={causal!r}")
    if softcap < 0:
        raise ValueError(f"attnfx::attention: softcap must be 0 (none) or positive, got {softcap}")
    return dims


def _check_bias(bias: torch.Tensor, dims: Dims) -> None:
    full = (dims.batch, dims.heads, dims.q_len, dims.kv_len)
    shape = tuple(bias.shape)
    fits = bias.dim() <= 4 and all(s in (1, f) for s, f in zip(shape[::-1], full[::-1]))
    if not fits:
        raise ValueError(f"attnfx::attention: bias of shape {shape} does not broadcast to (B,H,M,N)={full}")
    if not (bias.dtype.is_floating_point or bias.dtype == torch.bool):
        raise ValueError("attnfx::attention: bias must be floating (additive) or bool (True attends), "
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
