"""The algorithms variants declare, each priced as data: its cascade and the kernels it launches.

An `Algorithm` names the einsum cascade it computes (for the pass analysis) and lists the kernels it
runs on the way, each with sympy expressions (symbols in `attnfx.cost_model.symbols`) for what the
kernel computes and moves. A kernel's `when` names a feature of the site it exists for (`gqa`,
`causal`, `bool_mask`, ...). Adding an algorithm (linear, sigmoid, window, ...) is adding an entry to
`ALGORITHMS`: the time model, the selection and `explain()` pick it up.

Conventions: counts are totals over the whole call. Traffic comes in three kinds:
`inputs` (the site's Q, K, V and mask: cold unless all of them fit in cache), `read`/`write` of
intermediates (hot when one launch's traffic fits in cache), and `reread` of inputs (K/V once per
query tile), which hits in a cache that holds `reuse` bytes. `fresh` is the size of each newly
allocated output: on a CPU, allocations above glibc's mmap threshold are page-faulted anew on every
call, and of those between the profile's `fault_min` and that threshold a heap that trims its top
maps `refaults` anew (measured with getrusage: all but one of an eager chain's score tensors; two
plus one per query block for the chunked loop).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Callable, Iterator

import sympy as sp

from .cascade import AS_WRITTEN, canonical_cascade
from .catalog import CATALOG
from .einsums import EinsumCascade
from .pass_count import PassAnalysis, analyze
from .spec import SCORE_TERMS, AttentionSpec, Causal, Kind, MaskInput, ScoreTerm
from .symbols import B, Bc, Br, C, E, F, G, H, Hkv, K_max, K_t, M, Mk, N, P, P_t, R, S, T, V_k, s, s_a, s_m
from .tiles import DECODE_BLOCK_N, LINEAR_CHUNK, chunk_sizes, flash_blocks, sdpa_cpu_tiles

Expr = sp.Expr | int


@dataclass(frozen=True)
class Kernel:
    """One kind of launch of an algorithm and what all its launches cost together."""

    name: str
    unit: str  # rate class in the hardware profile: gemm | ew | select | softmax | copy | sdpa | flash
    when: str | None = None  # a FEATURES key: the kernel only runs for sites that have it
    launches: Expr = 1
    flops_mm: Expr = 0
    exps: Expr = 0
    masked_exps: Expr = 0  # exps of -inf inputs (a standalone exp op takes a slow path for them)
    ew: Expr = 0
    divides: Expr = 0
    inputs: Expr = 0  # bytes of the site's inputs (Q, K, V, mask) read: cold unless they all fit in cache
    read: Expr = 0  # bytes of intermediates read: hot if one launch's traffic fits in cache
    write: Expr = 0
    footprint: Expr | None = None  # bytes one launch touches (default: its share of read + write)
    reread: Expr = 0  # bytes of inputs read again (K/V once per query tile) ...
    reuse: Expr = 0  # ... which hit in a cache that holds `reuse` bytes
    rows: Expr = 0  # rows of each GEMM (0: not a GEMM, or many)
    fresh: Expr = 0  # bytes of each output the kernel allocates ...
    allocs: Expr | None = None  # ... how many per call (default: one per launch) ...
    refaults: Expr | None = None  # ... and how many of those a trimming heap maps anew each call
    ctas: Expr = 0  # blocks of work one launch splits over the workers (0: any number) ...
    largest: Expr = 0  # ... and the largest block's share of the launch's work (0: all alike)


@dataclass(frozen=True)
class Algorithm:
    name: str
    cascade: str  # key into attnfx.cost_model.catalog.CATALOG, or AS_WRITTEN: the site's own cascade
    devices: frozenset[str]
    kernels: tuple[Kernel, ...]
    peak: Expr  # intermediate bytes alive at once, beyond inputs and output
    exact: bool = True
    kind: Kind = Kind.SOFTMAX  # the weights it computes: a site is priced with its own kind's algorithms
    tiles: Callable[[AttentionSpec, str], dict[str, int]] = field(default=lambda spec, device: {})
    # split counts worth trying (the fastest is used); candidates must not depend on N, so that
    # the best time stays monotone in N
    splits: Callable[[AttentionSpec, int], tuple[int, ...]] = field(default=lambda spec, workers: (1,))
    description: str = ""

    def einsums(self, spec: AttentionSpec) -> EinsumCascade:
        """Its cascade at `spec`: the site's own, lifted one when it runs the model's code as written."""
        return canonical_cascade(spec).einsums if self.cascade == AS_WRITTEN else CATALOG[self.cascade]

    def passes(self, spec: AttentionSpec) -> PassAnalysis:
        """Passes over K/V and re-reads of its cascade at `spec`."""
        return canonical_cascade(spec).passes if self.cascade == AS_WRITTEN else _catalog_passes(self.cascade)

    def kernels_for(self, spec: AttentionSpec) -> tuple[Kernel, ...]:
        """The kernels that run at `spec` (a `when` of "a+b" needs both features)."""
        return tuple(k for k in self.kernels
                     if k.when is None or all(FEATURES[w](spec) for w in k.when.split("+")))


@lru_cache(maxsize=None)
def _catalog_passes(name: str) -> PassAnalysis:
    return analyze(CATALOG[name])


# every score term is a feature by its name ("scale", "softcap", "bool_mask", "causal", ...)
FEATURES: dict[str, Callable[[AttentionSpec], bool]] = {
    **{term.name: term.present for term in SCORE_TERMS},
    "gqa": lambda spec: spec.kv_heads != spec.heads,
    "bias": lambda spec: spec.mask is MaskInput.ADDITIVE or spec.alibi,
    "mask": lambda spec: spec.mask is not MaskInput.NONE,
    "normalize": lambda spec: spec.normalize,
    "decay": lambda spec: spec.decay,
    # SDPA's flags express the site once its key mask is gone (what padded_attention's slices need)
    "sdpa_flags": lambda spec: _sdpa_flags(spec),
    "no_sdpa_flags": lambda spec: not _sdpa_flags(spec),
}


def _sdpa_flags(spec: AttentionSpec) -> bool:
    square = spec.q_len == spec.kv_len
    return (not spec.modifiers() and spec.window is None
            and (spec.causal is not Causal.BOTTOM_RIGHT or square or not spec.diagonal_hides_keys))

BHMN = B * H * M * N  # materialised score elements
SCORES = s_a * BHMN  # bytes of one materialised score tensor
Q_IN = s * B * H * M * E
O_OUT = s * B * H * M * F
KV = s * B * Hkv * N * (E + F)  # K and V as passed
MASK = s_m * Mk  # the mask tensor as passed (broadcast dims not materialised)


def _ew(name: str, when: str | None, inputs: Expr = 0, unit: str = "ew") -> Kernel:
    """An eager elementwise op over the scores: read them (and `inputs`), write a new tensor."""
    return Kernel(name, unit, when, ew=BHMN, inputs=inputs, read=SCORES, write=SCORES, fresh=SCORES)


def _eager_term(term: ScoreTerm) -> Kernel:
    """The eager kernels of a score term that declares its cost (spec.SCORE_TERMS), as one."""
    c = term.eager
    return Kernel(term.name, "ew", term.name, launches=c.launches, ew=c.ew * BHMN, exps=c.exps * BHMN,
                  read=c.passes * SCORES, write=c.passes * SCORES, fresh=SCORES)


# the scores as an eager graph computes them, up to the weights, and the product with V
_EAGER_SCORES = (
    Kernel("repeat_kv", "copy", "gqa", launches=2, inputs=KV, write=s * B * H * N * (E + F),
           fresh=s * B * H * N * E),
    # with GQA the products read the repeated copies (hot) instead of K and V
    Kernel("QK", "gemm", rows=M, flops_mm=2 * BHMN * E, inputs=Q_IN + s * B * Hkv * N * E,
           read=s * B * (H - Hkv) * N * E, write=SCORES, fresh=SCORES, refaults=0),
    *(_eager_term(term) for term in SCORE_TERMS if term.eager is not None),
    _ew("add bias", "bias", inputs=MASK),
    _ew("where mask", "bool_mask", inputs=MASK, unit="select"),
    _ew("causal mask", "causal", inputs=s_a * M * N),
)
_EAGER_AV = Kernel("AV", "gemm", rows=M, flops_mm=2 * BHMN * F, inputs=s * B * Hkv * N * F,
                   read=SCORES + s * B * (H - Hkv) * N * F, write=O_OUT)
# NOTE: the scores and the weights are alive together, and so are GQA's repeated K/V
_EAGER_PEAK = 2 * SCORES + s * B * (H - Hkv) * N * (E + F)

EAGER = Algorithm(
    "eager", AS_WRITTEN, frozenset({"cpu", "cuda"}),
    description="the model's own graph: matmul, one kernel per elementwise op, softmax, matmul",
    kernels=(
        *_EAGER_SCORES,
        Kernel("softmax", "softmax", exps=BHMN, ew=3 * BHMN, divides=BHMN, read=SCORES, write=SCORES,
               fresh=SCORES),
        _EAGER_AV,
    ),
    peak=_EAGER_PEAK,
)


def _cpu_sdpa_tiles(spec: AttentionSpec, device: str) -> dict[str, int]:
    if device == "cpu":
        return dict(zip(("Br", "Bc"), sdpa_cpu_tiles(spec.q_len)))
    return {"Br": 128, "Bc": 128}


# the busiest query tile's share of a tiled kernel's pairs
_QUERY_TILE = Br * K_max / (B * H * P_t)
# K/V every query tile loads beyond the first pass over K and V (GQA: once per query head)
_TILE_KV = s * B * (H * K_t - Hkv * N) * (E + F)

SDPA = Algorithm(
    "sdpa", "1-pass", frozenset({"cpu", "cuda"}), tiles=_cpu_sdpa_tiles,
    description="torch scaled_dot_product_attention: flash-style 1-pass (CPU kernel or CUDA flash)",
    kernels=(
        # SDPA turns a bool mask into an additive one before its kernel runs
        Kernel("bool mask -> float", "ew", "bool_mask", ew=Mk, inputs=MASK, write=s * Mk, fresh=s * Mk),
        Kernel("sdpa", "sdpa", flops_mm=2 * B * H * P_t * (E + F), exps=B * H * P_t, ew=3 * B * H * P_t,
               divides=B * H * M * F, inputs=Q_IN + KV, write=O_OUT, reread=_TILE_KV,
               reuse=s * N * (E + F), rows=Br, ctas=B * H * R, largest=_QUERY_TILE),
        Kernel("sdpa mask", "ew", "mask", launches=0, ew=B * H * P_t, inputs=MASK,
               reread=sp.Max(s_m * B * H * P_t - MASK, 0), reuse=MASK),
    ),
    peak=4 * B * H * M,
)


def _chunk_tiles(spec: AttentionSpec, device: str) -> dict[str, int]:
    """The chunked kernel's blocks; causal loops stop at the last visible key."""
    mc, nc = chunk_sizes(spec)
    return {"Br": mc, "Bc": nc, "clip": 1}


# A custom op's Python dispatch (schema boxing, the autograd wrapper): once per call, no work.
OP_CALL = Kernel("custom op call", "op_call")

_TILES = s_a * B * H * P_t  # bytes of every score chunk the loop materialises, summed
_CHUNK = s_a * B * H * Br * Bc  # bytes of one score chunk
_ROWS = B * H * T * Br  # running statistics updated per chunk
_CHUNK_MASKS = (
    Kernel("chunk bias", "ew", "bias", launches=2 * T, ew=B * H * P_t, inputs=MASK, read=_TILES, write=_TILES,
           footprint=2 * _CHUNK),
    Kernel("chunk keep-mask", "select", "bool_mask", launches=3 * T, ew=B * H * P_t, inputs=MASK, read=_TILES,
           write=_TILES, footprint=2 * _CHUNK),
    Kernel("chunk causal band", "select", "causal", launches=4 * T, ew=B * H * P_t, read=_TILES, write=_TILES,
           footprint=2 * _CHUNK),
)
_CHUNK_KV_REREAD = s * B * Hkv * (K_t - N) * (E + F)  # K/V read again by every query block after the first

CHUNKED = Algorithm(
    "chunked", "1-pass", frozenset({"cpu", "cuda"}), tiles=_chunk_tiles,
    description="attnfx's pure-torch loop over query blocks x key chunks with an online softmax",
    kernels=(
        # the chunk's matmul allocates it; every later score op works on it in place
        Kernel("chunk matmuls", "gemm", launches=2 * T, rows=G * Br, flops_mm=2 * B * H * P_t * (E + F),
               inputs=Q_IN + KV, read=_TILES, write=_TILES + 4 * _ROWS * F,
               reread=_CHUNK_KV_REREAD, reuse=KV, footprint=2 * _CHUNK, fresh=_CHUNK,
               allocs=T, refaults=0),
        # scale, amax, sub, exp in place, sum; the running max, sum and output on (B, H, mc, 1|F);
        # index ranges and views
        Kernel("chunk softmax", "ew", launches=22 * T, exps=B * H * P_t + _ROWS, masked_exps=B * H * (P_t - P),
               ew=4 * B * H * P_t + 4 * _ROWS * F, read=5 * _TILES + 8 * _ROWS * F, write=3 * _TILES + 4 * _ROWS * F,
               footprint=2 * _CHUNK),
        *_CHUNK_MASKS,
        # divide, tanh, multiply in place, and the softcap's derivative 1 - t^2 kept for the backward
        Kernel("chunk softcap", "ew", "softcap", launches=5 * T, ew=4 * B * H * P_t, exps=B * H * P_t,
               read=4 * _TILES, write=4 * _TILES, footprint=2 * _CHUNK, fresh=_CHUNK, allocs=2 * T, refaults=0),
        Kernel("query block", "ew", launches=17 * R, ew=2 * B * H * M * (E + F), read=Q_IN + 4 * B * H * M * F,
               write=s * B * H * M * E + O_OUT),
        OP_CALL,
    ),
    peak=_CHUNK + 4 * B * H * Br * (F + 2),
)


def _flash_tiles(spec: AttentionSpec, device: str) -> dict[str, int]:
    return dict(zip(("Br", "Bc"), flash_blocks(max(spec.head_dim, spec.value_dim))[:2]))


# the mask a fused kernel reads per score tile: once from memory, then from cache
_FLASH_MASK = Kernel("flash mask", "ew", "mask", launches=0, ew=B * H * P_t, inputs=MASK,
                     reread=sp.Max(s_m * B * H * P_t - MASK, 0), reuse=MASK)

FLASH = Algorithm(
    "flash", "1-pass", frozenset({"cuda"}), tiles=_flash_tiles,
    description="attnfx Triton 1-pass kernel (FA2 cascade, split-Q)",
    kernels=(
        Kernel("flash", "flash", flops_mm=2 * B * H * P_t * (E + F), exps=B * H * P_t + B * H * M * C,
               ew=3 * B * H * P_t + (2 * F + 4) * B * H * M * C, divides=B * H * M * F,
               inputs=Q_IN + KV, write=O_OUT, reread=_TILE_KV, reuse=KV, ctas=B * H * R, largest=_QUERY_TILE),
        _FLASH_MASK,
    ),
    peak=4 * B * H * M,
)


def _decode_splits(spec: AttentionSpec, workers: int) -> tuple[int, ...]:
    """1, 2, 4, ... splits per KV head, up to enough to give every worker a block."""
    per_head = max(1, -(-max(workers, 1) // (spec.batch * spec.kv_heads)))
    return tuple(sorted({min(2**i, per_head) for i in range(per_head.bit_length() + 1)}))


_SPLIT = sp.Min(S - 1, 1)  # 1 when the keys are split (a combine kernel runs), else 0
_PARTIALS = _SPLIT * 4 * B * H * M * S * (F + 2)  # fp32 (O_s, m_s, l_s) per split

DECODE_SPLIT_KV = Algorithm(
    "decode_split_kv", "split-KV", frozenset({"cuda"}), splits=_decode_splits,
    tiles=lambda spec, device: {"Br": spec.q_len, "Bc": DECODE_BLOCK_N},
    description="attnfx Triton split-KV decode (Flash-Decoding): grouped heads, one heavy pass + combine",
    kernels=(
        # the busiest split loads ceil(T/S) key blocks for the G query heads of its KV head
        Kernel("split", "flash", flops_mm=2 * B * H * P_t * (E + F), exps=B * H * P_t, ew=3 * B * H * P_t,
               inputs=KV, ctas=B * Hkv * S, largest=G * M * Bc * sp.ceiling(T / S) / (B * H * P_t)),
        Kernel("split prologue/epilogue", "flash", launches=0, exps=B * H * M * S, ew=(2 * F + 4) * B * H * M * S,
               inputs=Q_IN, reread=Q_IN * (S - 1), write=_PARTIALS + (1 - _SPLIT) * O_OUT, ctas=B * Hkv * S),
        Kernel("combine", "ew", launches=_SPLIT, ew=_SPLIT * B * H * M * S * (2 * F + 4),
               exps=_SPLIT * B * H * M * S, divides=B * H * M * F, read=_PARTIALS, write=_SPLIT * O_OUT),
    ),
    peak=_PARTIALS,
)

# Sigmoid attention: weights sigmoid(s + logit_bias), no row statistics (FlashSigmoid).
SIGMOID_EAGER = Algorithm(
    "sigmoid_eager", AS_WRITTEN, frozenset({"cpu", "cuda"}), kind=Kind.SIGMOID,
    description="the model's own sigmoid-attention graph: matmul, elementwise ops, sigmoid, matmul",
    kernels=(
        *_EAGER_SCORES,
        Kernel("sigmoid", "ew", launches=2, exps=BHMN, ew=2 * BHMN, read=2 * SCORES, write=2 * SCORES, fresh=SCORES),
        _EAGER_AV,
    ),
    peak=_EAGER_PEAK,
)

SIGMOID_CHUNKED = Algorithm(
    "sigmoid_chunked", "sigmoid", frozenset({"cpu", "cuda"}), kind=Kind.SIGMOID, tiles=_chunk_tiles,
    description="attnfx::sigmoid_attention's pure-torch loop over query blocks x key chunks",
    kernels=(
        Kernel("chunk matmuls", "gemm", launches=2 * T, rows=G * Br, flops_mm=2 * B * H * P_t * (E + F),
               inputs=Q_IN + KV, read=_TILES, write=_TILES + 4 * _ROWS * F, reread=_CHUNK_KV_REREAD, reuse=KV,
               footprint=2 * _CHUNK, fresh=_CHUNK, allocs=T, refaults=0),
        # scale, + logit_bias, sigmoid in place; the output rows += the chunk's product; index ranges
        Kernel("chunk sigmoid", "ew", launches=7 * T, exps=B * H * P_t, masked_exps=B * H * (P_t - P),
               ew=3 * B * H * P_t + _ROWS * F, read=3 * _TILES + 8 * _ROWS * F, write=3 * _TILES + 4 * _ROWS * F,
               footprint=2 * _CHUNK),
        *_CHUNK_MASKS,
        Kernel("query block", "ew", launches=6 * R, ew=B * H * M * (E + F), read=Q_IN + 4 * B * H * M * F,
               write=s * B * H * M * E + O_OUT),
    ),
    peak=_CHUNK + 4 * B * H * Br * F,
)

SIGMOID_FLASH = Algorithm(
    "sigmoid_flash", "sigmoid", frozenset({"cuda"}), kind=Kind.SIGMOID, tiles=_flash_tiles,
    description="attnfx Triton flash kernel with sigmoid weights: no running max, sum or division",
    kernels=(
        # an exp and a reciprocal per pair on the special-function units
        Kernel("flash sigmoid", "flash", flops_mm=2 * B * H * P_t * (E + F), exps=2 * B * H * P_t,
               ew=3 * B * H * P_t, inputs=Q_IN + KV, write=O_OUT, reread=_TILE_KV, reuse=KV, ctas=B * H * R,
               largest=_QUERY_TILE),
        _FLASH_MASK,
    ),
    peak=0,
)

# Linear attention: q, k feature-mapped; weights <q, k> x causal band x decay^(m - n), optionally
# normalised by their row sums. attnfx computes the normaliser as the numerator of a column of ones
# appended to V (FV = F + 1 columns; priced so whether or not the site normalises).
FV = F + 1
_NUM = 4 * B * H * M * FV  # the fp32 numerator, normaliser column included
_ONES = Kernel("ones column", "copy", "normalize", inputs=s * B * Hkv * N * F, write=4 * B * Hkv * N * FV,
               fresh=4 * B * Hkv * N * FV)
_NORMALISE = Kernel("normalise", "ew", "normalize", launches=3, ew=B * H * M, divides=B * H * M * F, read=_NUM,
                    write=O_OUT + 4 * B * H * M)

LINEAR_EAGER = Algorithm(
    "linear_eager", AS_WRITTEN, frozenset({"cpu", "cuda"}), kind=Kind.LINEAR,
    description="linear attention as written: (phi(Q) phi(K)^T * band * decay) V, O(M N (E + F))",
    kernels=(
        *_EAGER_SCORES,
        _ew("decay weights", "decay", inputs=s_a * H * M * N),
        Kernel("row sums", "ew", "normalize", ew=BHMN, read=SCORES, write=s_a * B * H * M),
        _EAGER_AV,
        Kernel("normalise", "ew", "normalize", divides=B * H * M * F, read=O_OUT, write=O_OUT, fresh=O_OUT),
    ),
    peak=_EAGER_PEAK,
)

LINEAR_RIGHT_TO_LEFT = Algorithm(
    "linear_right_to_left", "linear", frozenset({"cpu", "cuda"}), kind=Kind.LINEAR,
    description="attnfx::linear_attention right to left: the state K^T V per K/V head, then Q times it, O(N E F)",
    kernels=(
        _ONES,
        Kernel("state K^T V", "gemm", rows=E, flops_mm=2 * B * Hkv * N * E * FV, inputs=s * B * Hkv * N * (E + F),
               write=4 * B * Hkv * E * FV),
        Kernel("readout Q state", "gemm", launches=2, rows=G * M, flops_mm=2 * B * H * M * E * FV, ew=B * H * M * FV,
               inputs=Q_IN, read=4 * B * Hkv * E * FV + _NUM, write=2 * _NUM, fresh=_NUM),
        _NORMALISE,
    ),
    peak=4 * B * Hkv * E * FV + _NUM + 4 * B * Hkv * N * FV,
)


def _linear_chunk_tiles(spec: AttentionSpec, device: str) -> dict[str, int]:
    """Lightning's chunk: C query rows against the C keys the state does not hold yet."""
    return {"Br": LINEAR_CHUNK, "Bc": LINEAR_CHUNK}


_INTRA = 4 * B * H * R * Br * Bc  # fp32 intra-chunk weights, all chunks

LINEAR_CHUNKED = Algorithm(
    "linear_chunked", "lightning", frozenset({"cpu", "cuda"}), kind=Kind.LINEAR, tiles=_linear_chunk_tiles,
    description="attnfx::linear_attention chunked (Lightning): per chunk of C rows a masked C x C product "
                "and a read of the running E x F state, which then takes in the chunk's keys; O(N E F + N C E)",
    kernels=(
        _ONES,
        # Q_c K_c^T, times the band (and decay) weights, times V_c; the weights' index arithmetic
        Kernel("intra-chunk", "gemm", launches=9 * R, rows=Br, flops_mm=2 * B * H * R * Br * Bc * (E + FV),
               ew=2 * B * H * R * Br * Bc, inputs=Q_IN + s * B * Hkv * N * (E + F), read=2 * _INTRA,
               write=2 * _INTRA + _NUM, footprint=2 * 4 * B * H * Br * Bc),
        Kernel("state readout", "gemm", launches=3 * R, rows=Br, flops_mm=2 * B * H * M * E * FV,
               ew=B * H * M * FV, read=4 * B * H * R * E * FV + _NUM, write=2 * _NUM, footprint=4 * B * H * E * FV),
        Kernel("state update", "gemm", launches=4 * R, rows=E, flops_mm=2 * B * Hkv * N * E * FV,
               ew=B * Hkv * R * E * FV, read=8 * B * Hkv * R * E * FV, write=8 * B * Hkv * R * E * FV,
               footprint=4 * B * Hkv * E * FV),
        # with a decay the state is per query head, the keys and rows are weighted decay^age
        Kernel("decay", "gemm", "decay", launches=7 * R, rows=E, flops_mm=2 * B * (H - Hkv) * N * E * FV,
               exps=B * H * (2 * R + R * Br * Bc), ew=B * H * (M * E + N * E + R * E * FV + R * Br * Bc),
               read=4 * B * H * (M * E + N * E), write=4 * B * H * (M * E + N * E), footprint=4 * B * H * E * FV),
        _NORMALISE,
    ),
    peak=4 * B * H * E * FV + 4 * B * H * Br * Bc + _NUM + 4 * B * Hkv * N * FV,
)

def _bounded_tiles(spec: AttentionSpec, device: str) -> dict[str, int]:
    """kernels/bounded.py's rule: 128-row query blocks and up to 1024 keys, 2^20 scores per chunk."""
    rows = spec.batch * spec.heads
    nc = max(1, min(spec.kv_len, 1024, (1 << 20) // (rows * 128)))
    return {"Br": max(1, min(spec.q_len, 128, (1 << 20) // (rows * nc))), "Bc": nc, "clip": 1}


BOUNDED = Algorithm(
    "bounded", "1-pass", frozenset({"cpu"}), tiles=_bounded_tiles,
    description="attnfx's pure-torch loop with a fixed per-row offset (a score bound): matmul, subtract, exp2 "
                "in place, matmul with the row sums as a column of ones",
    kernels=(
        Kernel("row bounds", "ew", launches=12, ew=2 * B * H * M * E + 2 * B * Hkv * N * E, inputs=Q_IN + KV,
               write=4 * B * H * M),
        Kernel("chunk matmuls", "gemm", launches=2 * T, rows=G * Br, flops_mm=2 * B * H * P_t * (E + F + 1),
               inputs=Q_IN + KV, read=_TILES, write=_TILES + 4 * _ROWS * (F + 1),
               reread=s * B * Hkv * (K_t - N) * (E + F), reuse=KV, footprint=2 * _CHUNK, fresh=_CHUNK,
               allocs=T, refaults=0),
        Kernel("chunk offset, exp2", "ew", launches=4 * T, exps=B * H * P_t, masked_exps=B * H * (P_t - P),
               ew=B * H * P_t + _ROWS * (F + 1), read=2 * _TILES + 4 * _ROWS * (F + 1), write=2 * _TILES,
               footprint=2 * _CHUNK),
        Kernel("chunk softcap", "ew", "softcap", launches=2 * T, ew=B * H * P_t, exps=B * H * P_t, read=2 * _TILES,
               write=2 * _TILES, footprint=2 * _CHUNK),
        Kernel("chunk ALiBi", "ew", "bias", launches=5 * T, ew=2 * B * H * P_t, read=_TILES, write=_TILES,
               footprint=2 * _CHUNK),
        Kernel("diagonal band", "select", "causal", launches=5 * R, ew=B * H * M * Bc, read=s_a * B * H * M * Bc,
               write=s_a * B * H * M * Bc, footprint=2 * _CHUNK),
        Kernel("query block", "ew", launches=6 * R, ew=B * H * M * (E + F), read=Q_IN + 4 * B * H * M * F,
               write=s * B * H * M * E + O_OUT),
        OP_CALL,
    ),
    peak=_CHUNK + 4 * B * H * M * (F + 2),
)


FLEX = Algorithm(
    "flex", "1-pass", frozenset({"cpu"}), tiles=lambda spec, device: {"Br": 128, "Bc": 128},
    description="FlexAttention compiled by Inductor: block mask from the proof (skips empty 128x128 blocks), "
                "score_mod for softcap, bias and ALiBi",
    kernels=(
        # Dynamo's guards, the block tables and the custom op, once per call; the compile once per shape
        Kernel("flex call", "flex_call"),
        Kernel("flex compile", "flex_compile", launches=0),
        Kernel("flex", "flex", flops_mm=2 * B * H * P_t * (E + F), exps=B * H * P_t, ew=3 * B * H * P_t,
               divides=B * H * M * F, inputs=Q_IN + KV, write=O_OUT, reread=_TILE_KV, reuse=s * N * (E + F),
               rows=Br, ctas=B * H * R, largest=_QUERY_TILE),
        Kernel("flex softcap", "flex", "softcap", launches=0, ew=2 * B * H * P_t, exps=B * H * P_t),
        Kernel("flex score bias", "flex", "bias", launches=0, ew=B * H * P_t, inputs=MASK,
               reread=sp.Max(s_m * B * H * P_t - MASK, 0), reuse=MASK),
    ),
    peak=4 * B * H * M,
)


_KEPT_KEYS: contextvars.ContextVar[float] = contextvars.ContextVar("attnfx_kept_keys", default=1.0)


@contextlib.contextmanager
def assume_kept_keys(fraction: float) -> Iterator[None]:
    """Price padding-free paths as if `fraction` of each row's keys were kept. Only the data knows
    it: the default 1.0 (no padding) prices the flag path, never a gain from padding not seen;
    a caller that has the example attention_mask can state its kept share."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kept key fraction must be in (0, 1], got {fraction}")
    token = _KEPT_KEYS.set(fraction)
    try:
        yield
    finally:
        _KEPT_KEYS.reset(token)


def kept_pairs(spec: AttentionSpec, kept_keys: float) -> float:
    """Share of the pairs the padding-free path computes when `kept_keys` of the keys are kept: the
    kept keys for every query row, and under a causal diagonal the right-padded worst case, where the
    padded query rows still see every kept key: 1 - (1 - kept)^2 (left padding computes kept^2)."""
    return kept_keys if spec.causal is Causal.NONE else 1.0 - (1.0 - kept_keys) ** 2


def _padded_tiles(spec: AttentionSpec, device: str) -> dict[str, float]:
    tiles = _cpu_sdpa_tiles(spec, device) if _sdpa_flags(spec) else _chunk_tiles(spec, device)
    return {**tiles, "kept": kept_pairs(spec, _KEPT_KEYS.get())}


def _over_kept_pairs(kernel: Kernel, when: str) -> Kernel:
    """`kernel` as the padding-free slices run it: over the kept share V_k of the pairs and tiles."""
    share = {P_t: P_t * V_k, P: P * V_k, T: T * V_k, K_t: K_t * V_k, K_max: K_max * V_k}
    scaled = {f.name: sp.sympify(getattr(kernel, f.name)).subs(share) for f in fields(Kernel)
              if f.name not in ("name", "unit", "when") and getattr(kernel, f.name) is not None}
    return replace(kernel, **scaled, when=when if kernel.when is None else f"{when}+{kernel.when}")


PADDED = Algorithm(
    "padded", "1-pass", frozenset({"cpu"}), tiles=_padded_tiles,
    description="attnfx::padded_attention: checks the key mask (O(B*N)), then SDPA's flags or attnfx::attention "
                "over the kept keys only",
    kernels=(
        OP_CALL,
        Kernel("key check", "ew", launches=3, ew=B * N, inputs=B * N),
        _over_kept_pairs(SDPA.kernels[1], "sdpa_flags"),
        *(_over_kept_pairs(k, "no_sdpa_flags") for k in CHUNKED.kernels
          if k.when != "bool_mask" and k is not OP_CALL),
    ),
    # the output the slices are written into, and the running statistics
    peak=s * B * H * M * F + 4 * B * H * M,
)

# Approximate algorithms: no variant declares them yet; priced for explain() and crossovers.
LINEAR = Algorithm(
    "linear", "linear", frozenset({"cpu", "cuda"}), exact=False,
    description="linear attention, phi = elu + 1, non-causal (Katharopoulos et al.)",
    kernels=(
        Kernel("features", "ew", launches=4, exps=B * H * M * E + B * Hkv * N * E,
               ew=2 * (B * H * M * E + B * Hkv * N * E), inputs=Q_IN + s * B * Hkv * N * E,
               write=s * (B * H * M * E + B * Hkv * N * E)),
        Kernel("KV state", "gemm", flops_mm=2 * B * Hkv * N * E * F + B * Hkv * N * E,
               inputs=s * B * Hkv * N * F, read=s * B * Hkv * N * E, write=4 * B * Hkv * E * (F + 1)),
        Kernel("readout", "gemm", launches=3, flops_mm=2 * B * H * M * E * (F + 1), divides=B * H * M * F,
               read=s * B * H * M * E + 4 * B * Hkv * E * (F + 1), write=O_OUT),
    ),
    peak=4 * B * Hkv * E * (F + 1),
)

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    EAGER, SDPA, CHUNKED, BOUNDED, FLASH, DECODE_SPLIT_KV, FLEX, PADDED, SIGMOID_EAGER, SIGMOID_CHUNKED,
    SIGMOID_FLASH, LINEAR_EAGER, LINEAR_RIGHT_TO_LEFT, LINEAR_CHUNKED, LINEAR)}

# how a site of each kind is priced when it is left as the model wrote it
EAGER_BY_KIND: dict[Kind, str] = {Kind.SOFTMAX: EAGER.name, Kind.SIGMOID: SIGMOID_EAGER.name,
                                  Kind.LINEAR: LINEAR_EAGER.name}
