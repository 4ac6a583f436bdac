"""Tile sizes of attnfx's kernels: one rule per kernel, read both by the kernel that runs with it and
by the algorithm that prices it (cost_model may not import kernels, so the rules live here).
"""
from __future__ import annotations

from typing import Protocol

SCORE_BUDGET = 1 << 20  # elements of one (B, H, mc, nc) score chunk: 4 MiB in fp32, about L2-sized
KEY_CHUNK = 512

DECODE_BLOCK_N = 64
MIN_SPLIT_BLOCKS = 4  # a split shorter than this many key blocks costs more to merge than it saves

LINEAR_CHUNK = 64  # rows per Lightning chunk: the intra-chunk product costs about what the state does at E = F = 64


class Sizes(Protocol):
    """What the chunk rule reads: an AttentionSpec or the kernels' Dims."""

    batch: int
    heads: int
    q_len: int
    kv_len: int


def chunk_sizes(sizes: Sizes, budget: int = SCORE_BUDGET) -> tuple[int, int]:
    """(query block, key chunk) of the chunked CPU kernels, so that one score chunk holds at most
    max(budget, B*H) elements."""
    rows = sizes.batch * sizes.heads
    nc = max(1, min(sizes.kv_len, KEY_CHUNK, budget // rows))
    mc = max(1, min(sizes.q_len, budget // (rows * nc)))
    return mc, nc


def flash_blocks(head_dim: int) -> tuple[int, int, int]:
    """Triton flash forward (BLOCK_M, BLOCK_N, num_warps): smaller key blocks for wide heads to stay
    in registers."""
    if head_dim <= 64:
        return 64, 64, 4
    if head_dim <= 128:
        return 64, 64, 8
    return 64, 32, 8


def flash_backward_blocks(head_dim: int) -> tuple[int, int, int]:
    """Triton flash backward (BLOCK_M, BLOCK_N, num_warps): it holds two (BLOCK_N, D) fp32 accumulators."""
    if head_dim <= 64:
        return 64, 64, 4
    if head_dim <= 128:
        return 32, 64, 8
    return 32, 32, 8


def sdpa_cpu_tiles(q_len: int) -> tuple[int, int]:
    """ATen's CPU flash kernel (query block, key block): 32/64/256 rows (M < 192 / < 768 / more), 512 keys."""
    return (256 if q_len >= 768 else 64 if q_len >= 192 else 32), 512
