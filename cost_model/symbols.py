"""The sympy symbols every cost formula is written in, and their values at a concrete site.

Per-head pair counts are computed exactly (causal and window structure, whole tiles for tiled
kernels) and bound to `P` / `P_t`; their closed forms are in `pairs_expr` for display and
crossovers.
"""
from __future__ import annotations

import math

import sympy as sp

from .spec import AttentionSpec, Causal, MaskInput

B, H, Hkv, M, N, E, F = sp.symbols("B H H_kv M N E F", positive=True)
s, s_a, s_m = sp.symbols("s s_a s_m", positive=True)  # bytes: q/k/v/o element, score, mask
P = sp.Symbol("P", positive=True)  # live (m, n) pairs per head
P_t = sp.Symbol("P_t", positive=True)  # pairs per head a tiled kernel computes (whole tiles)
T = sp.Symbol("T", positive=True)  # (q tile, kv tile) pairs per head a tiled kernel visits
Br, Bc = sp.symbols("B_r B_c", positive=True)  # query / key tile sizes
R, C = sp.symbols("R C", positive=True)  # query tiles ceil(M/Br), key tiles ceil(N/Bc)
S = sp.Symbol("S", positive=True)  # key splits (split-KV decode)
Mk = sp.Symbol("M_k", positive=True)  # elements of the mask tensor as passed (before broadcast)
W = sp.Symbol("W", positive=True)  # sliding-window width

G = H / Hkv  # query heads per K/V head

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def pairs_expr(spec: AttentionSpec) -> sp.Expr:
    """Closed form of the live pairs per head (design note §2), for display and solving."""
    if spec.causal is Causal.NONE:
        return M * N
    if spec.window is not None:
        return M * W - W * (W - 1) / 2
    if spec.causal is Causal.TOP_LEFT:
        return M * (M + 1) / 2  # M <= N
    return M * N - M * (M - 1) / 2


def tile_counts(spec: AttentionSpec, br: int, bc: int, clip: bool = False) -> tuple[int, int]:
    """(pairs, tiles) per head a kernel with `br` x `bc` tiles computes: every tile that holds a
    live pair is computed whole (`clip`: cut at the last live key of its rows), the others are
    skipped."""
    m_len, n_len = spec.q_len, spec.kv_len
    br, bc = max(1, min(br, m_len)), max(1, min(bc, n_len))
    offset = spec.causal.offset(m_len, n_len)
    pairs = tiles = 0
    for m0 in range(0, m_len, br):
        rows = min(br, m_len - m0)
        if spec.causal is Causal.NONE:
            lo, hi = 0, n_len - 1
        else:
            hi = min(n_len - 1, m0 + rows - 1 + offset)
            lo = 0 if spec.window is None else max(0, m0 + offset - spec.window + 1)
        if hi < lo:
            continue
        first, last = lo // bc, hi // bc
        for j in range(first, last + 1):
            pairs += rows * min(bc, (hi + 1 if clip else n_len) - j * bc)
            tiles += 1
    return pairs, tiles


def bind(spec: AttentionSpec, tiles: dict[str, int] | None = None, splits: int = 1) -> dict[sp.Symbol, float]:
    """Values of every symbol at `spec` (tile sizes from `tiles`: {"Br": .., "Bc": ..})."""
    tiles = tiles or {}
    br = max(1, min(int(tiles.get("Br", spec.q_len)), spec.q_len))
    bc = max(1, min(int(tiles.get("Bc", spec.kv_len)), spec.kv_len))
    pt, nt = tile_counts(spec, br, bc, clip=bool(tiles.get("clip", 0)))
    size = spec.element_size
    mask_elems = math.prod(spec.mask_shape) if spec.mask_shape is not None else 0
    mask_bytes = 1 if spec.mask is MaskInput.BOOL else size
    return {
        B: spec.batch, H: spec.heads, Hkv: spec.kv_heads, M: spec.q_len, N: spec.kv_len,
        E: spec.head_dim, F: spec.value_dim, s: size, s_a: size, s_m: mask_bytes,
        P: spec.live_pairs(), P_t: pt, T: nt, Br: br, Bc: bc,
        R: math.ceil(spec.q_len / br), C: math.ceil(spec.kv_len / bc), S: splits,
        Mk: mask_elems, W: spec.window or spec.kv_len,
    }
