"""What every attnfx Triton launcher checks and sizes before a launch (the score arguments it
passes come from score_mods.score_kwargs). Kept free of triton imports.
"""
from __future__ import annotations

import torch

from attnfx.cost_model.errors import KernelUnavailable

from .attention_args import Dims, ScoreTensors, check_args, triton_refusal


def checked_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: ScoreTensors, kernel: str) -> Dims:
    """Dims of a call a Triton kernel can take; KernelUnavailable naming the kernel and the reason otherwise."""
    dims = check_args(q, k, v, extras)
    reason = triton_refusal(q.dtype, dims.head_dim, dims.value_dim)
    if reason is not None:
        raise KernelUnavailable(f"attnfx {kernel} kernel: {reason}")
    return dims


def head_blocks(dims: Dims) -> tuple[int, int]:
    """Head dims padded to powers of two (>= 16 for tl.dot); the padding is masked on load."""
    return max(16, _next_pow2(dims.head_dim)), max(16, _next_pow2(dims.value_dim))


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()
