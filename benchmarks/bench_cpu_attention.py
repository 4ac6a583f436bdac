"""CPU attention throughput as a share of this CPU's GEMM throughput, for every variant.

Useful FLOPs are 2 * B * H * live pairs * (E + F) (masked pairs excluded), divided by the measured
time; the GEMM rate is torch.bmm at the products a blocked attention runs -- (B*H, 256, E) x (E, 512)
and (B*H, 256, 512) x (512, F), outputs preallocated -- at the same thread count, re-measured every
round (its best). Every contender runs interleaved in one process, round by round; a contender's
time is its least disturbed round (min), and ratios are quoted against SDPA's best form.

    python benchmarks/bench_cpu_attention.py [--threads 1] [--lengths 1024 2048 4096 8192]
        [--cases causal window softcap alibi] [--no-flex] [--padded] [--tiny] [--repeats 3]

With one thread the clock is the thread's CPU time (other jobs on a shared machine do not count);
with more it is wall time. FlexAttention compiles once per (shape, modifiers) before timing; the
compile time is printed beside it.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

import attnfx.kernels  # noqa: F401  (registers attnfx::attention and attnfx's other ops)
from attnfx.cost_model import AttentionSpec, Causal, alibi_slopes
from attnfx.cost_model.timing import gemm_fraction

Runner = Callable[[], torch.Tensor]
WINDOW, SOFTCAP = 256, 50.0


def _clock() -> Callable[[], float]:
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def gemm_rate(bh: int, e: int, f: int, reps: int = 5, inner: int = 10) -> float:
    """FLOP/s of the two products of one 256-query x 512-key attention tile, outputs preallocated
    (best of `reps` batches of `inner` calls)."""
    clock = _clock()
    q, kt, p, v = torch.randn(bh, 256, e), torch.randn(bh, e, 512), torch.randn(bh, 256, 512), torch.randn(bh, 512, f)
    s_out, o_out = torch.empty(bh, 256, 512), torch.empty(bh, 256, f)
    best = math.inf
    for _ in range(reps):
        t0 = clock()
        for _ in range(inner):
            torch.bmm(q, kt, out=s_out)
            torch.bmm(p, v, out=o_out)
        best = min(best, (clock() - t0) / inner)
    return 2 * bh * 256 * 512 * (e + f) / best


def interleaved(contenders: dict[str, Runner], repeats: int, bh: int, e: int, f: int) -> tuple[dict[str, float], float]:
    """Least seconds per call of each contender over `repeats` round-robin rounds, and the best GEMM rate."""
    clock = _clock()
    with torch.no_grad():
        for fn in contenders.values():
            fn()
        best = dict.fromkeys(contenders, math.inf)
        gemm = 0.0
        for _ in range(repeats):
            gemm = max(gemm, gemm_rate(bh, e, f))
            for name, fn in contenders.items():
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
    return best, gemm


def _band(n: int, window: int | None) -> torch.Tensor:
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    return keep if window is None else keep & ~torch.ones(n, n, dtype=torch.bool).tril(-window)


def _eager(q, k, v, scale, keep, softcap=None, bias=None) -> torch.Tensor:
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~keep, -math.inf)
    return torch.softmax(s, -1) @ v


def contenders(case: str, n: int, b: int, h: int, e: int, flex: bool, max_eager: int) -> tuple[dict[str, Runner], AttentionSpec]:
    q, k, v = (torch.randn(b, h, n, e) for _ in range(3))
    scale = e ** -0.5
    window = WINDOW if case == "window" else None
    softcap = SOFTCAP if case == "softcap" else None
    slopes = alibi_slopes(h) if case == "alibi" else None
    keep = _band(n, window)
    spec = AttentionSpec(b, h, h, n, n, e, e, scale=scale, causal=Causal.TOP_LEFT, window=window, softcap=softcap,
                         alibi=slopes is not None)
    bias = None if slopes is None else slopes.view(1, h, 1, 1) * (torch.arange(n).view(1, -1) - torch.arange(n).view(-1, 1))
    op_args = (None, slopes, scale, "top_left", window or -1, softcap or 0.0)
    run: dict[str, Runner] = {}
    if n <= max_eager:
        run["eager"] = lambda: _eager(q, k, v, scale, keep, softcap, bias)
    if case == "causal":
        run["sdpa is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        key_keep = torch.ones(b, n, dtype=torch.bool)
        run["attnfx padded"] = lambda: torch.ops.attnfx.padded_attention(
            q, k, v, key_keep, None, None, scale, "top_left", -1, 0.0, -math.inf)
    if softcap is None:
        mask = keep if bias is None else bias.masked_fill(~keep, -math.inf)
        run["sdpa dense mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    run["attnfx chunked"] = lambda: torch.ops.attnfx.attention(q, k, v, *op_args)[0]
    run["attnfx bounded"] = lambda: torch.ops.attnfx.bounded_attention(q, k, v, *op_args)[0]
    if flex:
        run["attnfx flex"] = lambda: torch.ops.attnfx.flex_attention(q, k, v, *op_args)
    return run, spec


def _compile_flex(run: dict[str, Runner]) -> str:
    if "attnfx flex" not in run:
        return ""
    t0 = time.perf_counter()
    with torch.no_grad():
        run["attnfx flex"]()
    return f"  (flex compile {time.perf_counter() - t0:.1f} s)"


def attention_table(ns: argparse.Namespace) -> None:
    print(f"\nB={ns.batch} H={ns.heads} E=F={ns.head_dim} fp32, {torch.get_num_threads()} thread(s); least of "
          f"{ns.repeats} interleaved rounds. GEMM = torch.bmm at one 256x512 attention tile's products.")
    print(f"{'case':<8} {'N':>5} {'variant':<16} {'ms':>9} {'vs best SDPA':>12} {'GFLOP/s':>8} {'of GEMM':>8}")
    for case in ns.cases:
        for n in ns.lengths:
            run, spec = contenders(case, n, ns.batch, ns.heads, ns.head_dim, ns.flex, ns.max_eager)
            note = _compile_flex(run)
            times, gemm = interleaved(run, ns.repeats, ns.batch * ns.heads, ns.head_dim, ns.head_dim)
            sdpa = min((t for name, t in times.items() if name.startswith("sdpa")), default=None)
            for name, t in times.items():
                vs = f"{sdpa / t:.2f}x" if sdpa else "-"
                gf = gemm_fraction(t, spec, 1e9)
                print(f"{case:<8} {n:>5} {name:<16} {t * 1e3:>9.2f} {vs:>12} {gf:>8.1f} "
                      f"{gemm_fraction(t, spec, gemm):>8.0%}")
            print(f"{'':<8} {n:>5} {'GEMM':<16} {'':>9} {'':>12} {gemm / 1e9:>8.1f} {'100%':>8}{note}", flush=True)


def padded_table(ns: argparse.Namespace) -> None:
    """A padded batch (8 x 1024, kept lengths 256..1024) the way HF's sdpa path runs it (dense bool
    mask) against attnfx::padded_attention, causal (right and left padding) and not (an encoder)."""
    b, h, n, e = 8, ns.heads, 1024, ns.head_dim
    q, k, v = (torch.randn(b, h, n, e) for _ in range(3))
    lengths = torch.linspace(256, n, b).round().long()
    position = torch.arange(n)
    print(f"\npadded batch B={b} H={h} N={n} E={e}, kept lengths {lengths.tolist()} "
          f"({lengths.sum().item() / (b * n):.0%} of keys); least of {ns.repeats} interleaved rounds")
    for label, keep, causal in (("right, causal", position < lengths.view(-1, 1), True),
                                ("left, causal", position >= n - lengths.view(-1, 1), True),
                                ("right, encoder", position < lengths.view(-1, 1), False),
                                ("none, causal", torch.ones(b, n, dtype=torch.bool), True)):
        dense = keep.view(b, 1, 1, n) & (_band(n, None) if causal else True)
        mode = "top_left" if causal else "none"
        run = {
            "sdpa dense mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
            "attnfx padded": lambda: torch.ops.attnfx.padded_attention(q, k, v, keep, None, None, e ** -0.5, mode,
                                                                       -1, 0.0, -math.inf),
        }
        if label.startswith("none"):
            run["sdpa is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        times, _ = interleaved(run, ns.repeats, b * h, e, e)
        base = times["sdpa dense mask"]
        print(f"  {label:<15} " + "  ".join(f"{name} {t * 1e3:.1f} ms ({base / t:.2f}x)" for name, t in times.items()))


def tiny_table(ns: argparse.Namespace) -> None:
    """B=4 H=8 N=64 d=16 causal: every variant's time over eager's (per-call overhead dominates)."""
    b, h, n, e = 4, 8, 64, 16
    q, k, v = (torch.randn(b, h, n, e) for _ in range(3))
    scale, keep = e ** -0.5, _band(n, None)
    key_keep = torch.ones(b, n, dtype=torch.bool)
    args = (None, None, scale, "top_left", -1, 0.0)
    run = {
        "eager": lambda: _eager(q, k, v, scale, keep),
        "sdpa is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa dense mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "attnfx chunked": lambda: torch.ops.attnfx.attention(q, k, v, *args)[0],
        "attnfx bounded": lambda: torch.ops.attnfx.bounded_attention(q, k, v, *args)[0],
        "attnfx padded": lambda: torch.ops.attnfx.padded_attention(q, k, v, key_keep, None, None, scale, "top_left",
                                                                   -1, 0.0, -math.inf),
    }
    if ns.flex:
        run["attnfx flex"] = lambda: torch.ops.attnfx.flex_attention(q, k, v, *args)
        _compile_flex(run)
    rounds = [interleaved(run, 20, b * h, e, e)[0] for _ in range(ns.repeats)]
    times = {name: min(r[name] for r in rounds) for name in run}
    print(f"\ntiny B={b} H={h} N={n} d={e} causal: time / eager's")
    print("  " + "  ".join(f"{name} {t * 1e6:.0f} us ({t / times['eager']:.2f})" for name, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--cases", nargs="+", default=["causal", "window", "softcap", "alibi"],
                        choices=["causal", "window", "softcap", "alibi"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-eager", type=int, default=4096, help="longest N the eager graph runs at")
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--no-table", dest="table", action="store_false", help="skip the per-case table")
    parser.add_argument("--padded", action="store_true", help="also the padded-batch table")
    parser.add_argument("--tiny", action="store_true", help="also the tiny-shape table")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.table:
        attention_table(ns)
    if ns.padded:
        padded_table(ns)
    if ns.tiny:
        tiny_table(ns)


if __name__ == "__main__":
    main()
