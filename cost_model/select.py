"""Rank the variants that can take a site by predicted time, under an optional memory budget.

Placeholder roofline until the full cost model lands: time = max(FLOPs / peak, bytes / bandwidth)
+ launches * overhead, with eager charged for materialising the (B, H, M, N) scores.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import AttentionSpec, MaskInput


@dataclass(frozen=True)
class Option:
    """One way to rewrite a site: a variant applied to one lowering (spec) of the site."""

    variant: str
    algorithm: str
    spec: AttentionSpec
    lowering: str
    refusal: str | None = None


@dataclass(frozen=True)
class Candidate:
    option: Option
    predicted_s: float
    hbm_bytes: float
    peak_bytes: float


@dataclass(frozen=True)
class Selection:
    ranked: tuple[Candidate, ...]  # the options that can run, fastest first
    refused: tuple[Option, ...]
    winner: Candidate | None
    why: str


_CPU = {"flops": 150e9, "bandwidth": 30e9, "launch_s": 8e-6}


def _predict(option: Option) -> Candidate:
    s = option.spec
    heads = s.batch * s.heads
    pairs = s.live_pairs() if option.algorithm != "eager" else s.q_len * s.kv_len
    flops = 2.0 * heads * pairs * (s.head_dim + s.value_dim)
    io = s.element_size * heads * (s.q_len * (s.head_dim + s.value_dim) + s.kv_len * (s.head_dim + s.value_dim))
    if s.mask is not MaskInput.NONE and s.mask_shape is not None:
        mask_elems = 1
        for d in s.mask_shape:
            mask_elems *= d
        io += 4 * mask_elems
    scores = 4.0 * heads * s.q_len * s.kv_len
    if option.algorithm == "eager":
        io += 8 * scores  # each elementwise op reads and writes the scores
        peak, launches = 2 * scores, 8
    else:
        peak, launches = 4.0 * heads * s.q_len, 1
    t = max(flops / _CPU["flops"], io / _CPU["bandwidth"]) + launches * _CPU["launch_s"]
    return Candidate(option, t, io, peak)


def select(options: list[Option], memory_budget: float | None = None) -> Selection:
    """Pick the fastest option that can run and fits `memory_budget` (bytes of intermediates)."""
    runnable = [o for o in options if o.refusal is None]
    refused = tuple(o for o in options if o.refusal is not None)
    ranked = sorted((_predict(o) for o in runnable), key=lambda c: c.predicted_s)
    fitting = [c for c in ranked if memory_budget is None or c.peak_bytes <= memory_budget]
    if not fitting:
        return Selection(tuple(ranked), refused, None, "no option fits the memory budget")
    winner = fitting[0]
    why = f"lowest predicted time ({winner.predicted_s * 1e3:.3f} ms)"
    return Selection(tuple(ranked), refused, winner, why)
