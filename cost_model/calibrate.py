"""Measure this CPU's rates for the time model in a few seconds (design note §6, step 1).

A GEMM at attention shapes, copies sized for each cache level and for DRAM, a fused softmax (the
exp-bound kernel), a tiny op (dispatch overhead), a large fresh allocation (first-touch page-fault
cost), and SDPA at a tiny and a medium shape (its fixed cost and its efficiency). Each rate is the
best of a few repetitions: the least disturbed estimate on a shared machine.

    python -m attnfx.cost_model.calibrate          # measure, cache and print the host profile
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .hardware import DESIGN_NOTE_CPU, HardwareProfile
from .spec import AttentionSpec

_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc maps allocations above this fresh on every call


def _clock() -> Callable[[], float]:
    """CPU time of this thread when torch runs single-threaded (immune to being descheduled on a
    shared machine), wall time otherwise."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _best(fn: Callable[[], object], reps: int = 5, inner: int = 1) -> float:
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


def _gemm_rate(dtype: torch.dtype) -> float:
    """FLOP/s of batched GEMMs shaped like attention's QK^T and PV products."""
    rates = []
    for (m, k, n) in ((512, 64, 512), (512, 512, 64)):
        a, b = torch.randn(8, m, k, dtype=dtype), torch.randn(8, k, n, dtype=dtype)
        out = torch.empty(8, m, n, dtype=dtype)
        rates.append(2 * 8 * m * k * n / _best(lambda: torch.bmm(a, b, out=out), reps=5))
    return len(rates) / sum(1 / r for r in rates)


def _half_rows(gemm_rate: float) -> float:
    """Rows at which a GEMM reaches half the GEMM rate, from single-row products (decode's QK^T and
    PV) on cache-resident operands: streaming the wide operand costs that many rows of compute."""
    q, k = torch.randn(16, 1, 128), torch.randn(16, 128, 256)
    p, v = torch.randn(16, 1, 256), torch.randn(16, 256, 128)
    out_s, out_o = torch.empty(16, 1, 256), torch.empty(16, 1, 128)
    t = _best(lambda: torch.bmm(q, k, out=out_s), reps=5, inner=20)
    t += _best(lambda: torch.bmm(p, v, out=out_o), reps=5, inner=20)
    flops = 2 * 2 * 16 * 128 * 256
    return max(gemm_rate * t / flops - 1.0, 0.0)


def _gemv_efficiency(dram_bw: float, llc: int) -> float:
    """Bandwidth a one-row product (decode's q K^T and p V) reaches on DRAM-resident K and V, as a
    fraction of a copy's."""
    heads, e = 16, 128
    n = max(2 * llc // (heads * e * 4), 256)
    q, k = torch.randn(1, heads, 1, e), torch.randn(1, heads, n, e)
    p, v = torch.randn(1, heads, 1, n), torch.randn(1, heads, n, e)
    kt = k.transpose(-1, -2)
    t = _best(lambda: q @ kt, reps=3) + _best(lambda: p @ v, reps=3)
    return min(2 * k.numel() * 4 / t / dram_bw, 1.0)


def _copy_bw(footprint: int) -> float:
    """Bytes/s of an elementwise op that reads and writes `footprint` bytes in all."""
    n = max(footprint // 8, 1024)
    x, y = torch.randn(n), torch.empty(n)
    inner = max(1, int(2e6 // n))
    return 8 * n / _best(lambda: torch.add(x, 1.0, out=y), reps=5, inner=inner)


def _fault_bw(launch_s: float) -> float:
    """Bytes/s of touching a fresh allocation above glibc's mmap threshold (page faults)."""
    n = 3 * _GLIBC_MMAP_THRESHOLD_MAX // 4
    warm = torch.empty(n)
    t_warm = _best(lambda: warm.fill_(1.0), reps=3)
    t_fresh = _best(lambda: torch.empty(n).fill_(1.0), reps=3)
    return 4 * n / max(t_fresh - t_warm - launch_s, 1e-6)


def _sdpa_time(b: int, h: int, n: int, e: int) -> float:
    q, k, v = (torch.randn(b, h, n, e) for _ in range(3))
    return _best(lambda: F.scaled_dot_product_attention(q, k, v), reps=5)


def calibrate(threads: int | None = None) -> HardwareProfile:
    """Measure the host at `threads` (default: torch's current setting). Takes ~2-5 s."""
    from .profiles import machine_id
    from .timing import predict

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        threads = torch.get_num_threads()
        l2, llc = _cache_sizes()
        l2_total = l2 * threads
        x1 = torch.randn(1)
        launch = _best(lambda: x1 * 0.5, reps=5, inner=200)
        rows = torch.randn(256, 1024)
        exp_rate = rows.numel() / _best(lambda: torch.softmax(rows, -1), reps=5, inner=5)
        small = torch.randn(16384)
        small_out = torch.empty_like(small)
        ew = small.numel() / max(_best(lambda: torch.mul(small, 1.5, out=small_out), reps=5, inner=50) - launch, 1e-9)
        exp_op = small.numel() / max(_best(lambda: torch.exp(small, out=small_out), reps=5, inner=50) - launch, 1e-9)
        minus_inf = torch.full_like(small, -float("inf"))
        exp_inf = small.numel() / max(_best(lambda: torch.exp(minus_inf, out=small_out), reps=5, inner=50) - launch, 1e-9)
        gemm = _gemm_rate(torch.float32)
        profile = HardwareProfile(
            name=f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' * (threads > 1)})",
            device="cpu",
            mm_flops={"fp32": gemm, "half": _gemm_rate(torch.bfloat16)},
            ew_flops=ew, exp_rate=exp_rate, exp_op_rate=exp_op, exp_inf_rate=exp_inf, half_rows=_half_rows(gemm),
            levels=((l2_total, _copy_bw(l2_total // 2)), (llc, _copy_bw(llc // 2))),
            dram_bw=_copy_bw(8 * llc), launch_s=launch,
            efficiency={"gemm": 1.0, "sdpa": 1.0}, call_s={"sdpa": 0.0},
            parallel=threads, overlap=0.0, fault_bw=_fault_bw(launch),
            fault_threshold=_GLIBC_MMAP_THRESHOLD_MAX if platform.libc_ver()[0] == "glibc" else None,
            source="calibrated", machine_id=machine_id(), threads=threads,
            date=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        profile = replace(profile, gemv_efficiency=_gemv_efficiency(profile.dram_bw, llc))
        # SDPA: its fixed cost from a tiny call, then its GEMM efficiency from a medium one.
        tiny = AttentionSpec(1, 1, 1, 16, 16, 64, 64)
        call = max(_sdpa_time(1, 1, 16, 64) - predict("sdpa", tiny, profile).total_s, 0.0)
        profile = replace(profile, call_s={"sdpa": call})
        medium = AttentionSpec(1, 8, 8, 1024, 1024, 64, 64)
        model = predict("sdpa", medium, profile)
        mm_s = model.flops_mm / profile.mm_rate("float32", "sdpa")
        measured = _sdpa_time(1, 8, 1024, 64)
        efficiency = mm_s / max(measured - (model.total_s - mm_s), 0.25 * mm_s)
        return replace(profile, efficiency={"gemm": 1.0, "sdpa": min(efficiency, 1.5)})
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    from .profiles import cache_path, save_profile

    parser = argparse.ArgumentParser(description="Measure this CPU for attnfx's cost model and cache it.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-save", action="store_true", help="print only, do not write the cache")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    profile = calibrate(args.threads)
    print(profile.describe())
    print(f"levels: {[(f'{c / 2**20:.1f} MiB', f'{bw / 1e9:.1f} GB/s') for c, bw in profile.levels]}; "
          f"fault {profile.fault_bw / 1e9:.2f} GB/s; sdpa call {profile.call_s['sdpa'] * 1e6:.1f} us "
          f"(design note: {DESIGN_NOTE_CPU.mm_flops['fp32'] / 1e9:.0f} GFLOP/s GEMM on 2 threads)")
    if not args.no_save:
        print(f"saved {save_profile(profile, cache_path(profile.threads))}")
    print(f"took {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
