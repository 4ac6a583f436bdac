"""The sympy symbols every cost formula is written in, and their values at a concrete site.

Per-head pair counts are computed exactly (causal and window structure, whole tiles for tiled
kernels) and bound to `P` / `P_t`; their closed forms are in `pairs_expr` for display and
crossovers.
"""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from .spec import AttentionSpec, Causal, MaskInput

B, H, Hkv, M, N, E, F = sp.symbols("B H H_kv M N E F", positive=True)
s, s_a, s_m = sp.symbols("s s_a s_m", positive=True)  # bytes: q/k/v/o element, score, mask
P = sp.Symbol("P", positive=True)  # live (m, n) pairs per head
P_t = sp.Symbol("P_t", positive=True)  # pairs per head a tiled kernel computes (whole tiles)
T = sp.Symbol("T", positive=True)  # (q tile, kv tile) pairs per head a tiled kernel visits
K_t = sp.Symbol("K_t", positive=True)  # key positions per head a tiled kernel loads, all q tiles summed
K_max = sp.Symbol("K_max", positive=True)  # key positions the busiest query tile loads
Br, Bc = sp.symbols("B_r B_c", positive=True)  # query / key tile sizes
R, C = sp.symbols("R C", positive=True)  # query tiles ceil(M/Br), key tiles ceil(N/Bc)
S = sp.Symbol("S", positive=True)  # key splits (split-KV decode)
Mk = sp.Symbol("M_k", positive=True)  # elements of the mask tensor as passed (before broadcast)
W = sp.Symbol("W", positive=True)  # sliding-window width
V_k = sp.Symbol("V_k", positive=True)  # share of the pairs a padding-free path computes (1: no padding)

G = H / Hkv  # query heads per K/V head

def pairs_expr(spec: AttentionSpec) -> sp.Expr:
    """Closed form of the live pairs per head , for display and solving."""
    if spec.causal is Causal.NONE:
        return M * N
    if spec.window is not None:
        return M * W - W * (W - 1) / 2
    if spec.causal is Causal.TOP_LEFT:
        return M * (M + 1) / 2  # M <= N
    return M * N - M * (M - 1) / 2


def _key_ranges(spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per query row m, the first and last visible key (last < first: none)."""
    m = np.arange(spec.q_len, dtype=np.int64)
    if spec.causal is Causal.NONE:
        return np.zeros_like(m), np.full_like(m, spec.kv_len - 1)
    offset = spec.causal.offset(spec.q_len, spec.kv_len)
    hi = np.minimum(spec.kv_len - 1, m + offset)
    lo = np.zeros_like(m) if spec.window is None else np.maximum(0, m + offset - spec.window + 1)
    return lo, hi


def live_pairs(spec: AttentionSpec) -> int:
    """Same as `spec.live_pairs()`, vectorised (sites with 100k-token keys are priced often)."""
    lo, hi = _key_ranges(spec)
    return int(np.maximum(hi - lo + 1, 0).sum())


def tile_counts(spec: AttentionSpec, br: int, bc: int, clip: bool = False) -> tuple[int, int, int, int]:
    """(pairs, tiles, keys, most keys) per head for a kernel with `br` x `bc` tiles: every tile that
    holds a live pair is computed whole (`clip`: cut at the last live key of its rows), the others
    are skipped; `keys` counts the key positions loaded, summed over the query tiles, and `most
    keys` is the largest count one query tile loads."""
    m_len, n_len = spec.q_len, spec.kv_len
    br, bc = max(1, min(br, m_len)), max(1, min(bc, n_len))
    lo, hi = _key_ranges(spec)
    starts = np.arange(0, m_len, br)
    rows = np.minimum(br, m_len - starts)
    tile_lo = lo[starts]  # the first row of a tile sees the fewest keys on the left ...
    tile_hi = hi[np.minimum(starts + br, m_len) - 1]  # ... its last row the most on the right
    live = tile_hi >= tile_lo
    first, last = tile_lo // bc, tile_hi // bc
    tiles = np.where(live, last - first + 1, 0)
    right = (tile_hi + 1) if clip else np.minimum((last + 1) * bc, n_len)
    width = np.where(live, right - first * bc, 0)
    return int((rows * width).sum()), int(tiles.sum()), int(width.sum()), int(width.max(initial=0))


def bind(spec: AttentionSpec, tiles: dict[str, int] | None = None, splits: int = 1) -> dict[sp.Symbol, float]:
    """Values of every symbol at `spec` (tile sizes from `tiles`: {"Br": .., "Bc": ..}; "kept": the
    share of pairs a padding-free path computes)."""
    tiles = tiles or {}
    br = max(1, min(int(tiles.get("Br", spec.q_len)), spec.q_len))
    bc = max(1, min(int(tiles.get("Bc", spec.kv_len)), spec.kv_len))
    pt, nt, kt, kmax = tile_counts(spec, br, bc, clip=bool(tiles.get("clip", 0)))
    size = spec.element_size
    mask_elems = math.prod(spec.mask_shape) if spec.mask_shape is not None else 0
    mask_bytes = 1 if spec.mask is MaskInput.BOOL else size
    return {
        B: spec.batch, H: spec.heads, Hkv: spec.kv_heads, M: spec.q_len, N: spec.kv_len,
        E: spec.head_dim, F: spec.value_dim, s: size, s_a: size, s_m: mask_bytes,
        P: live_pairs(spec), P_t: pt, T: nt, K_t: kt, K_max: max(kmax, 1), Br: br, Bc: bc,
        R: math.ceil(spec.q_len / br), C: math.ceil(spec.kv_len / bc), S: splits,
        Mk: mask_elems, W: spec.window or spec.kv_len, V_k: float(tiles.get("kept", 1.0)),
    }
