"""Predicted time of an algorithm at a site on a hardware profile.

Per kernel: T = (max(Tc, Tm) + (1 - overlap) * min(Tc, Tm)) / utilisation + faults + launches
(utilisation: whole waves of blocks over the workers, and no less than the largest block's time),
with Tc = matmul FLOPs / (efficiency * GEMM rate) + ew / ew rate + exps / exp rate and Tm = traffic
at the bandwidth of the kernel's working set (re-reads at the bandwidth of their reuse set).
An eager graph is the sum of its kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import sympy as sp

from . import symbols as sym
from .algorithms import ALGORITHMS, Algorithm, Kernel
from .compiled import is_compiled
from .hardware import HardwareProfile
from .spec import AttentionSpec, MaskInput

_FIELDS = ("launches", "flops_mm", "exps", "masked_exps", "ew", "divides", "inputs", "read", "write", "reread",
           "reuse", "rows", "fresh", "ctas", "largest", "footprint")
_FUSED_EXP_UNITS = ("softmax", "sdpa", "flash", "flex")  # exps inside a fused kernel, not a torch.exp op
_GEMM_UNITS = ("gemm", "sdpa", "flash", "flex")  # kernels whose loads go through GEMM micro-kernels
_ARGS = (sym.B, sym.H, sym.Hkv, sym.M, sym.N, sym.E, sym.F, sym.s, sym.s_a, sym.s_m, sym.P, sym.P_t, sym.T,
         sym.K_t, sym.K_max, sym.Br, sym.Bc, sym.R, sym.C, sym.S, sym.Mk, sym.W, sym.V_k)


@dataclass(frozen=True)
class KernelTime:
    name: str
    launches: int
    compute_s: float
    memory_s: float
    fault_s: float
    overhead_s: float
    total_s: float


@dataclass(frozen=True)
class Prediction:
    """What one algorithm costs at one site on one profile."""

    algorithm: str
    total_s: float
    kernels: tuple[KernelTime, ...]
    flops_mm: float
    exps: float
    ew: float
    divides: float
    bytes: float  # memory traffic, re-reads included
    peak_bytes: float
    passes: int
    kv_reads: int  # passes that read K (with recompute), from the cascade's pass analysis
    launches: int
    splits: int = 1  # key splits the prediction assumes (split-KV decode)


@lru_cache(maxsize=None)
def _compiled(expr: sp.Expr) -> Callable[..., float]:
    return sp.lambdify(_ARGS, sp.sympify(expr), "math")


def _value(expr: sp.Expr | int | None, args: tuple[float, ...]) -> float:
    if expr is None:
        return 0.0
    if isinstance(expr, (int, float)):
        return float(expr)
    return float(_compiled(expr)(*args))


def _utilisation(ctas: float, parallel: int) -> float:
    """Wave quantisation: the share of `parallel` workers busy over ceil(ctas/parallel) waves."""
    if ctas <= 0 or parallel <= 1:
        return 1.0
    return ctas / (math.ceil(ctas / parallel) * parallel)


def _busy(work: float, ctas: float, largest: float, p: HardwareProfile) -> float:
    """Device time of `work` split into `ctas` blocks, the largest holding `largest` of it.

    GPUs run blocks in waves over their SMs, each wave as long as its longest block: whole waves of
    the largest block (monotone in the problem size: a new ragged block never makes it faster).
    CPU threads share blocks dynamically: whole waves of an average block, and never less than the
    largest block on one thread (calibrated against measurements on this CPU)."""
    if p.device == "cuda" and ctas > 0 and largest > 0:
        return max(work, math.ceil(ctas / p.parallel) * p.parallel * largest * work)
    return max(work / _utilisation(ctas, p.parallel), work * p.parallel * largest)


def _kernel_time(k: Kernel, v: dict[str, float], spec: AttentionSpec, p: HardwareProfile,
                 site_inputs: float) -> KernelTime:
    launches = v["launches"]
    t_c = 0.0
    if v["flops_mm"]:
        skinny = 1.0 + (p.half_rows / v["rows"] if v["rows"] else 0.0)
        t_c = v["flops_mm"] * skinny / p.mm_rate(spec.dtype, k.unit)
    exp_rate = p.exp_rate if k.unit in _FUSED_EXP_UNITS else p.exp_op_rate
    ew_rate = p.select_rate if k.unit == "select" and p.select_rate else p.ew_flops
    t_c += (v["ew"] + v["divides"]) / ew_rate + (v["exps"] - v["masked_exps"]) / exp_rate
    t_c += v["masked_exps"] / (p.exp_inf_rate or exp_rate)
    gemm = k.unit in _GEMM_UNITS

    def read_time(nbytes: float, footprint: float) -> float:
        bw = p.bandwidth(footprint)
        return nbytes / (bw * (p.stream_efficiency(footprint) if gemm else 1.0))

    hot = v["read"] + v["write"]
    t_m = 0.0
    if hot:
        footprint = v["footprint"] if k.footprint is not None else hot / max(launches, 1.0)
        t_m += read_time(v["read"], footprint) + v["write"] / p.bandwidth(footprint)
    if v["inputs"]:
        t_m += read_time(v["inputs"], site_inputs)
    if v["reread"]:
        t_m += read_time(v["reread"], v["reuse"])
    work = max(t_c, t_m) + (1.0 - p.overlap) * min(t_c, t_m)  # on the whole device, perfectly shared
    busy = _busy(work, v["ctas"], v["largest"], p)
    fault = v["faults"] * v["fresh"] / p.fault_bw if p.fault_bw else 0.0
    overhead = launches * (p.launch_s + p.call_s.get(k.unit, 0.0))
    if not is_compiled(k.unit, spec):
        overhead += p.amortized_compile_s(k.unit)
    return KernelTime(k.name, int(launches), t_c, t_m, fault, overhead, busy + fault + overhead)


def _faults(k: Kernel, v: dict[str, float], args: tuple[float, ...], p: HardwareProfile) -> float:
    """Allocations of `fresh` bytes that are page-faulted anew on every call."""
    if not v["fresh"] or p.fault_threshold is None or v["fresh"] < p.fault_min:
        return 0.0
    allocs = v["launches"] if k.allocs is None else _value(k.allocs, args)
    if v["fresh"] >= p.fault_threshold:
        return allocs
    return allocs if k.refaults is None else min(allocs, _value(k.refaults, args))


def site_input_bytes(spec: AttentionSpec) -> float:
    """Bytes of Q, K, V and the mask tensor as passed: what must come from memory at least once."""
    mask = 0
    if spec.mask_shape is not None:
        mask = math.prod(spec.mask_shape) * (1 if spec.mask is MaskInput.BOOL else spec.element_size)
    return spec.element_size * (spec.batch * spec.heads * spec.q_len * spec.head_dim
                                + spec.batch * spec.kv_heads * spec.kv_len * (spec.head_dim + spec.value_dim)) + mask


def resolve(algorithm: str | Algorithm) -> Algorithm:
    if isinstance(algorithm, Algorithm):
        return algorithm
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise KeyError(f"no cost model for algorithm {algorithm!r}; known: {sorted(ALGORITHMS)}") from None


def predict(algorithm: str | Algorithm, spec: AttentionSpec, profile: HardwareProfile) -> Prediction:
    """Time, counts, traffic and memory of `algorithm` at `spec` on `profile` (with the fastest of
    the algorithm's split counts)."""
    alg = resolve(algorithm)
    return min((_predict(alg, spec, profile, s) for s in alg.splits(spec, profile.parallel)),
               key=lambda p: p.total_s)


def _predict(alg: Algorithm, spec: AttentionSpec, profile: HardwareProfile, splits: int) -> Prediction:
    values = sym.bind(spec, alg.tiles(spec, profile.device), splits)
    args = tuple(float(values[a]) for a in _ARGS)
    totals = dict.fromkeys(("flops_mm", "exps", "ew", "divides", "bytes", "launches"), 0.0)
    times = []
    site_inputs = site_input_bytes(spec)
    for k in alg.kernels_for(spec):
        v = {f: _value(getattr(k, f), args) for f in _FIELDS}
        v["faults"] = _faults(k, v, args, profile)
        times.append(_kernel_time(k, v, spec, profile, site_inputs))
        for f in ("flops_mm", "exps", "ew", "divides", "launches"):
            totals[f] += v[f]
        totals["bytes"] += v["inputs"] + v["read"] + v["write"] + v["reread"]
    analysis = alg.passes(spec)
    peak = _value(alg.peak, args)
    return Prediction(
        alg.name, sum(t.total_s for t in times), tuple(times), totals["flops_mm"], totals["exps"],
        totals["ew"], totals["divides"], totals["bytes"], peak, analysis.passes,
        analysis.reads.get("K", 0), int(totals["launches"]), splits)


def useful_flops(spec: AttentionSpec) -> float:
    """The matmul FLOPs attention needs at a site: 2 * B * H * live pairs * (E + F), every masked or
    skipped pair excluded (what any variant's throughput is measured in)."""
    return 2.0 * spec.batch * spec.heads * sym.live_pairs(spec) * (spec.head_dim + spec.value_dim)


def gemm_fraction(seconds: float, spec: AttentionSpec, gemm_flops: float) -> float:
    """Attention throughput (useful FLOPs / `seconds`) as a share of a GEMM rate in FLOP/s."""
    return useful_flops(spec) / seconds / gemm_flops


def symbolic(algorithm: str | Algorithm, spec: AttentionSpec) -> dict[str, sp.Expr]:
    """The algorithm's totals at `spec`'s features as expressions in the symbols (for explain)."""
    alg = resolve(algorithm)
    out: dict[str, sp.Expr] = {}
    ks = alg.kernels_for(spec)
    for name, fields in (("matmul FLOPs", ("flops_mm",)), ("exp", ("exps",)), ("other ew", ("ew",)),
                         ("divides", ("divides",)), ("bytes", ("inputs", "read", "write", "reread")),
                         ("launches", ("launches",))):
        out[name] = sp.simplify(sum((sp.sympify(getattr(k, f)) for k in ks for f in fields), sp.Integer(0)))
    out["peak bytes"] = sp.sympify(alg.peak)
    return out
