"""Measure this CPU's rates for the time model in a few seconds.

GEMMs at attention shapes, one-row products (decode streams K and V through GEMM micro-kernels),
copies sized for each cache level and for DRAM, a fused softmax and torch.exp (finite and -inf
inputs), masked_fill with a broadcast bool mask (~10x slower than a multiply here), a tiny op
(dispatch overhead), a large fresh allocation (first-touch page-fault cost), and SDPA at a tiny and a
medium shape (its fixed cost and its efficiency). Each rate is the best of a few repetitions: the
least disturbed estimate on a shared machine.

    python -m attnfx.cost_model.calibrate          # measure, cache and print the host profile
    python -m attnfx.cost_model.calibrate --flex   # ... and compile and measure FlexAttention too
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .hardware import CALL_S, COMPILE_S, FLEX_SDPA_RATIO, SANDBOX_CPU, HardwareProfile
from .profiles import cache_path, machine_id, save_profile
from .spec import SCORE_ARGS, SCORE_OP_SCHEMA, AttentionSpec, ScoreMods

_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc maps allocations above this fresh on every call


def _clock() -> Callable[[], float]:
    """CPU time of this thread when torch runs single-threaded (immune to being descheduled on a
    shared machine), wall time otherwise."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _best(fn: Callable[[], object], reps: int, inner: int = 1) -> float:
    """Least seconds per call of `fn` over `reps` timed batches of `inner` calls, after a warm-up."""
    clock = _clock()
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - t0) / inner)
    return best


def _cache_sizes() -> tuple[int, int]:
    """(L2 per core, last-level cache) in bytes from sysfs; 1 MiB / 16 MiB when unreadable."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            kind = (index / "type").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes[level] = int(text.rstrip("KMG")) * scale
    l2 = sizes.get(2, 2**20)
    return l2, max(sizes.get(3, 0), 16 * 2**20)


def _gemm_rate(dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of batched GEMMs shaped like attention's QK^T and PV products."""
    seconds = flops = 0.0
    for (m, k, n) in ((512, 64, 512), (512, 512, 64)):
        a, b = torch.randn(8, m, k, dtype=dtype), torch.randn(8, k, n, dtype=dtype)
        out = torch.empty(8, m, n, dtype=dtype)
        seconds += _best(lambda: torch.bmm(a, b, out=out), reps)
        flops += 2 * 8 * m * k * n
    return flops / seconds


def _half_rows(gemm_rate: float, reps: int) -> float:
    """Rows at which a GEMM reaches half the GEMM rate, from single-row products (decode's QK^T and
    PV) on cache-resident operands."""
    q, k = torch.randn(16, 1, 128), torch.randn(16, 128, 256)
    p, v = torch.randn(16, 1, 256), torch.randn(16, 256, 128)
    out_s, out_o = torch.empty(16, 1, 256), torch.empty(16, 1, 128)
    t = _best(lambda: torch.bmm(q, k, out=out_s), reps, inner=20)
    t += _best(lambda: torch.bmm(p, v, out=out_o), reps, inner=20)
    return max(gemm_rate * t / (2 * 2 * 16 * 128 * 256) - 1.0, 0.0)


def _gemv_efficiency(copy_bw: float, footprint: int, reps: int) -> float:
    """Bandwidth one-row products (decode's q K^T and p V) reach on K and V of `footprint` bytes, as
    a fraction of a copy's at that size: how fast GEMM micro-kernels stream an operand."""
    heads, e = 16, 128
    n = max(footprint // (2 * heads * e * 4), 256)
    q, k = torch.randn(1, heads, 1, e), torch.randn(1, heads, n, e)
    p, v = torch.randn(1, heads, 1, n), torch.randn(1, heads, n, e)
    kt = k.transpose(-1, -2)
    t = _best(lambda: q @ kt, reps) + _best(lambda: p @ v, reps)
    return min(2 * k.numel() * 4 / t / copy_bw, 1.0)


def _copy_bw(footprint: int, reps: int) -> float:
    """Bytes/s of an elementwise op that reads and writes `footprint` bytes in all."""
    n = max(footprint // 8, 1024)
    x, y = torch.randn(n), torch.empty(n)
    inner = max(1, int(2e6 // n))
    return 8 * n / _best(lambda: torch.add(x, 1.0, out=y), reps, inner=inner)


def _fault_bw(launch_s: float, reps: int) -> float:
    """Bytes/s of touching a fresh allocation above glibc's mmap threshold (page faults)."""
    n = 3 * _GLIBC_MMAP_THRESHOLD_MAX // 4  # elements: 96 MiB
    warm = torch.empty(n)
    t_warm = _best(lambda: warm.fill_(1.0), reps)
    t_fresh = _best(lambda: torch.empty(n).fill_(1.0), reps)
    return 4 * n / max(t_fresh - t_warm - launch_s, 1e-6)


def _sdpa_time(b: int, h: int, n: int, e: int, reps: int) -> float:
    q, k, v = (torch.randn(b, h, n, e) for _ in range(3))
    return _best(lambda: F.scaled_dot_product_attention(q, k, v), reps)




@functools.cache
def _noop_op():
    """A custom op with attnfx::attention's arguments and autograd registration that only copies q."""
    @torch.library.custom_op("attnfx_calibrate::noop", mutates_args=(), schema=f"({SCORE_OP_SCHEMA}) -> Tensor")
    def noop(q, k, v, bias, alibi_slopes, *score_args):
        return q.clone()

    noop.register_autograd(lambda ctx, grad: (grad,) + (None,) * (4 + len(SCORE_ARGS)))
    return torch.ops.attnfx_calibrate.noop.default


def _op_call_s(reps: int) -> float:
    """Seconds a torch.library custom op's Python dispatch adds to a call (attnfx's ops pay it)."""
    x = torch.randn(1, 1, 16, 16)
    op = _noop_op()
    with torch.no_grad():
        t_op = _best(lambda: op(x, x, x, None, None, *ScoreMods().op_args()), reps, inner=50)
        return max(t_op - _best(lambda: x.clone(), reps, inner=50), 0.0)


def calibrate_flex(profile: HardwareProfile, reps: int = 3) -> HardwareProfile:
    """`profile` with FlexAttention measured: its compile (tens of seconds, so only on request),
    its fixed cost per call and its efficiency against SDPA at a dense B1 H8 N1024 d64 shape."""
    from torch.nn.attention.flex_attention import flex_attention

    from .timing import predict

    compiled = torch.compile(flex_attention, dynamic=False)
    q = torch.randn(1, 8, 1024, 64)
    tiny = torch.randn(1, 1, 128, 64)
    with torch.no_grad():
        started = time.perf_counter()
        compiled(q, q, q)
        compile_s = time.perf_counter() - started
        compiled(tiny, tiny, tiny)
        t_tiny = _best(lambda: compiled(tiny, tiny, tiny), reps, inner=10)
        ratio = _best(lambda: F.scaled_dot_product_attention(q, q, q), reps) / _best(lambda: compiled(q, q, q), reps)
    work = predict("sdpa", AttentionSpec(1, 1, 1, 128, 128, 64, 64), profile).total_s
    return replace(profile, call_s={**profile.call_s, "flex_call": max(t_tiny - work, 0.0)},
                   compile_s={**profile.compile_s, "flex_compile": compile_s},
                   efficiency={**profile.efficiency, "flex": ratio * profile.efficiency.get("sdpa", 1.0)})


def _rate(elements: int, seconds: float, launch: float) -> float:
    return elements / max(seconds - launch, 1e-9)


def _one_thread(quick: bool) -> HardwareProfile:
    """Every rate on one thread, timed by its CPU clock (other jobs on the machine do not count)."""
    from .timing import predict

    reps = 1 if quick else 7
    l2, llc = _cache_sizes()
    dram_footprint = 2 * llc if quick else 8 * llc
    x1 = torch.randn(1)
    launch = _best(lambda: x1 * 0.5, reps, inner=200)
    rows = torch.randn(256, 1024)
    small = torch.randn(16384)
    out = torch.empty_like(small)
    minus_inf = torch.full_like(small, -float("inf"))
    gemm = _gemm_rate(torch.float32, reps)
    dram = _copy_bw(dram_footprint, reps)
    llc_bw = _copy_bw(llc // 2, reps)
    chunk = torch.randn(8, 256, 512)
    masked = torch.arange(512).view(1, -1) > torch.arange(256).view(-1, 1)  # a causal band's complement
    profile = HardwareProfile(
        name=f"cpu ({platform.processor() or platform.machine()}, 1 thread)", device="cpu",
        mm_flops={"fp32": gemm, "half": _gemm_rate(torch.bfloat16, reps)},
        ew_flops=_rate(small.numel(), _best(lambda: torch.mul(small, 1.5, out=out), reps, 50), launch),
        exp_rate=rows.numel() / _best(lambda: torch.softmax(rows, -1), reps, inner=5),
        exp_op_rate=_rate(small.numel(), _best(lambda: torch.exp(small, out=out), reps, 50), launch),
        exp_inf_rate=_rate(small.numel(), _best(lambda: torch.exp(minus_inf, out=out), reps, 50), launch),
        select_rate=chunk.numel() / _best(lambda: chunk.masked_fill_(masked, 0.0), reps),
        half_rows=_half_rows(gemm, reps), gemv_efficiency=_gemv_efficiency(dram, dram_footprint, reps),
        gemv_cache_efficiency=_gemv_efficiency(llc_bw, llc // 4, reps),
        levels=((l2, _copy_bw(l2 // 2, reps)), (llc, llc_bw)),
        dram_bw=dram, launch_s=launch, efficiency={"gemm": 1.0, "sdpa": 1.0},
        call_s={"sdpa": 0.0, **CALL_S, "op_call": _op_call_s(reps)}, compile_s=dict(COMPILE_S),
        parallel=1, overlap=0.0, fault_bw=_fault_bw(launch, reps),
        fault_threshold=_GLIBC_MMAP_THRESHOLD_MAX if platform.libc_ver()[0] == "glibc" else None,
        source="calibrated" + (" (quick)" if quick else ""), machine_id=machine_id(), threads=1,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    # SDPA: its fixed cost from a tiny call, then its efficiency against the model at a medium one
    tiny = AttentionSpec(1, 1, 1, 16, 16, 64, 64)
    call = max(_sdpa_time(1, 1, 16, 64, reps) - predict("sdpa", tiny, profile).total_s, 0.0)
    profile = replace(profile, call_s={**profile.call_s, "sdpa": call})
    n = 512 if quick else 1024
    model = predict("sdpa", AttentionSpec(1, 8, 8, n, n, 64, 64), profile)
    mm_s = model.flops_mm / profile.mm_rate("float32", "sdpa")
    measured = _sdpa_time(1, 8, n, 64, reps)
    efficiency = mm_s / max(measured - (model.total_s - mm_s), 0.25 * mm_s)
    # FlexAttention's efficiency tracks SDPA's until `calibrate_flex` measures it (its compile is slow)
    sdpa = min(efficiency, 1.5)
    return replace(profile, efficiency={"gemm": 1.0, "sdpa": sdpa, "flex": FLEX_SDPA_RATIO * sdpa})


# What `threads` threads gain over one when the machine is too busy to measure it: compute and the
# private caches scale, a 2-vCPU slice's DRAM bandwidth barely does.
_ASSUMED_SPEEDUP = {"compute": 0.9, "cache": 0.9, "dram": 0.0}


def _speedups(one: HardwareProfile, threads: int, quick: bool) -> tuple[dict[str, float], str]:
    """Measured t-thread / 1-thread rates (wall clock), or assumed ones when the machine is busy
    (a parallel GEMM that is not 1.4x faster means other jobs hold the cores)."""
    reps = 1 if quick else 5
    dram_footprint = 2 * one.levels[-1][0] if quick else 8 * one.levels[-1][0]
    rows = torch.randn(256, 1024)
    measured = {
        "compute": _gemm_rate(torch.float32, reps) / one.mm_flops["fp32"],
        "exp": rows.numel() / _best(lambda: torch.softmax(rows, -1), reps, inner=5) / one.exp_rate,
        "cache": _copy_bw(one.levels[-1][0] // 2, reps) / one.levels[-1][1],
        "dram": _copy_bw(dram_footprint, reps) / one.dram_bw,
    }
    if measured["compute"] < 1 + 0.4 * (threads - 1):
        assumed = {k: 1 + v * (threads - 1) for k, v in _ASSUMED_SPEEDUP.items()}
        assumed["exp"] = assumed["compute"]
        return assumed, (f"machine busy while calibrating ({threads}-thread GEMM only {measured['compute']:.2f}x "
                         "one thread): multi-thread rates assumed from one-thread measurements")
    return {k: min(max(v, 1.0), float(threads)) for k, v in measured.items()}, ""


def calibrate(threads: int | None = None, quick: bool = False) -> HardwareProfile:
    """Measure the host at `threads` (default: torch's current setting): ~3-8 s, or about a second
    with `quick` (one repetition, smaller buffers: a rough profile for smoke tests).

    Rates are measured on one thread by its CPU clock, then scaled by the speed-up `threads`
    threads measure over one, so that a busy machine yields its unloaded speed, not its load."""
    previous = torch.get_num_threads()
    threads = threads or previous
    try:
        torch.set_num_threads(1)
        one = _one_thread(quick)
        if threads == 1:
            return one
        torch.set_num_threads(threads)
        up, note = _speedups(one, threads, quick)
        (l2, l2_bw), (llc, llc_bw) = one.levels
        return replace(
            one, name=one.name.replace("1 thread", f"{threads} threads"), threads=threads, parallel=threads,
            mm_flops={k: v * up["compute"] for k, v in one.mm_flops.items()},
            ew_flops=one.ew_flops * up["compute"], exp_rate=one.exp_rate * up["exp"],
            exp_op_rate=one.exp_op_rate * up["exp"], exp_inf_rate=one.exp_inf_rate * up["exp"],
            select_rate=one.select_rate * up["compute"],
            levels=((l2 * threads, l2_bw * up["cache"]), (llc, llc_bw * up["cache"])),
            dram_bw=one.dram_bw * up["dram"], fault_bw=(one.fault_bw or 0) * up["dram"] or None,
            notes=note or "speed-ups over one thread: " + ", ".join(f"{k} {v:.2f}x" for k, v in up.items()))
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure this CPU for attnfx's cost model and cache it.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-save", action="store_true", help="print only, do not write the cache")
    parser.add_argument("--flex", action="store_true", help="also compile and measure FlexAttention (~20-60 s)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    profile = calibrate(args.threads)
    if args.flex:
        profile = calibrate_flex(profile)
    print(profile.describe())
    print(f"levels: {[(f'{c / 2**20:.1f} MiB', f'{bw / 1e9:.1f} GB/s') for c, bw in profile.levels]}; "
          f"fault {profile.fault_bw / 1e9:.2f} GB/s; sdpa call {profile.call_s['sdpa'] * 1e6:.1f} us "
          f"(the sandbox profile: {SANDBOX_CPU.mm_flops['fp32'] / 1e9:.0f} GFLOP/s GEMM on 2 threads)")
    if profile.notes:
        print(profile.notes)
    if not args.no_save:
        print(f"saved {save_profile(profile, cache_path(profile.threads))}")
    print(f"took {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
