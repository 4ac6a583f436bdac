"""Validate attnfx's cost model on this CPU: predicted against measured latency over a shape grid.

For every grid point (B, H, Hkv, M, N, E; causal or not; a mask tensor or not; decode) it runs each
variant this CPU can run -- the eager graph a model writes (matmul, scale, mask, softmax, matmul,
with repeat_kv for GQA), every registered attnfx variant whose `refusal(spec, "cpu")` is None (SDPA,
the chunked custom op once registered), and a pure-torch chunked loop while no chunked variant is
registered -- interleaving the variants round by round (a cheap variant re-warms its caches before each
timed call) and taking medians. It then asks `cost_model.select` for its
ranking and prints Spearman's rank correlation of predicted vs measured latency over all
(point, variant) pairs, how often the chosen variant is within 10% of the measured best (and the
regret when not), and saves a predicted-vs-measured PNG when matplotlib is installed.

    python benchmarks/validate_cost_model.py [--threads 1] [--quick] [--png out/x.png] [--json raw.json]

With one thread the clock is the thread's CPU time (a shared machine's other jobs then do not count);
with more it is wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnfx.cost_model import AttentionSpec, Causal, MaskInput
from attnfx.cost_model.targets import host_profile
from attnfx.cost_model.select import Option, select
from attnfx.cost_model.tiles import chunk_sizes
from attnfx.kernels import VARIANTS, Operands

Runner = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Point:
    spec: AttentionSpec

    @property
    def label(self) -> str:
        s = self.spec
        tags = ["causal" if s.causal is not Causal.NONE else "", s.mask.value if s.mask is not MaskInput.NONE else ""]
        head = f"B{s.batch} H{s.heads}/{s.kv_heads} M{s.q_len} N{s.kv_len} E{s.head_dim}"
        return " ".join([head] + [t for t in tags if t])


def _spec(b: int, h: int, g: int, m: int, n: int, e: int, causal: bool = False, mask: str = "none") -> AttentionSpec:
    shape = {"none": None, "additive": (b, 1, m, n), "bool": (b, 1, 1, n)}[mask]
    return AttentionSpec(b, h, h // g, m, n, e, e, scale=e ** -0.5,
                         causal=Causal.TOP_LEFT if causal else Causal.NONE, mask=MaskInput(mask), mask_shape=shape)


def grid(quick: bool = False) -> list[Point]:
    """A validation sweep cut to what a 2-core CPU runs in minutes: eager's score tensor
    stays <= 64 MiB and decode's K/V <= 512 MiB."""
    points = []
    for b, h in ((1, 8), (8, 8), (1, 32), (8, 32)):
        for n in (128, 256, 512, 1024, 2048):
            if b * h * n * n > 2**24:
                continue
            for g, e, causal in ((1, 64, False), (1, 128, True), (4, 64, True), (4, 128, False)):
                points.append(_spec(b, h, g, n, n, e, causal))
            for mask in ("additive", "bool"):
                points.append(_spec(b, h, 1, n, n, 64, mask=mask))
    for b, h, m, n in ((1, 8, 64, 2048), (1, 8, 256, 4096), (8, 8, 128, 1024), (1, 32, 16, 2048)):
        points.append(_spec(b, h, 1, m, n, 64))
    for b in (1, 8):
        for g in (1, 4, 8):
            for n in (1024, 4096, 16384):
                if 2 * b * (32 // g) * n * 128 * 4 <= 2**29:
                    points.append(_spec(b, 32, g, 1, n, 128))
    if quick:
        points = points[::4]
    return [Point(p) for p in points]


def operands(spec: AttentionSpec, seed: int = 0) -> Operands:
    gen = torch.Generator().manual_seed(seed)
    b, h, hk, m, n, e, f = (spec.batch, spec.heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim,
                            spec.value_dim)
    q = torch.randn(b, h, m, e, generator=gen)
    k = torch.randn(b, hk, n, e, generator=gen)
    v = torch.randn(b, hk, n, f, generator=gen)
    mask = None
    if spec.mask is MaskInput.ADDITIVE:
        mask = torch.randn(spec.mask_shape, generator=gen)
    elif spec.mask is MaskInput.BOOL:
        mask = torch.rand(spec.mask_shape, generator=gen) > 0.1
        mask[..., 0] = True  # no fully masked rows
    return Operands(q, k, v, mask)


def eager(spec: AttentionSpec, ops: Operands, causal_bias: torch.Tensor | None) -> torch.Tensor:
    """The unfused graph as Hugging Face models write it."""
    k, v = ops.k, ops.v
    g = spec.groups
    if g > 1:  # repeat_kv
        b, hk, n, e = k.shape
        k = k[:, :, None].expand(b, hk, g, n, e).reshape(b, hk * g, n, e)
        v = v[:, :, None].expand(b, hk, g, n, v.shape[-1]).reshape(b, hk * g, n, v.shape[-1])
    s = ops.q @ k.transpose(-1, -2)  # (b, h, m, n)
    s = s * spec.scale
    if ops.mask is not None:
        s = s + ops.mask if ops.mask.dtype != torch.bool else torch.where(ops.mask, s, -math.inf)
    if causal_bias is not None:
        s = s + causal_bias
    p = torch.softmax(s, dim=-1)
    return p @ v  # (b, h, m, f)


def chunked(spec: AttentionSpec, ops: Operands) -> torch.Tensor:
    """Stand-in for the chunked variant until it is registered: queries in blocks, keys in chunks,
    an online softmax per row, G query heads stacked per K/V head, every op after a chunk's matmul
    in place (so the chunk is the only score-sized allocation)."""
    b, hk, g, n = spec.batch, spec.kv_heads, spec.groups, spec.kv_len
    mc, nc = chunk_sizes(spec)
    out = ops.q.new_empty(b, spec.heads, spec.q_len, spec.value_dim)
    for m0 in range(0, spec.q_len, mc):
        m1 = min(m0 + mc, spec.q_len)
        rows = ops.q[:, :, m0:m1].reshape(b, hk, g * (m1 - m0), spec.head_dim)  # (b, hk, g*mc, e)
        shape = (b, hk, g, m1 - m0)
        run_max = torch.full((*shape, 1), -math.inf)
        run_sum = torch.zeros((*shape, 1))
        acc = torch.zeros((*shape, spec.value_dim))  # (b, hk, g, mc, f)
        hi = min(n, m1) if spec.causal is Causal.TOP_LEFT else n
        for n0 in range(0, hi, nc):
            n1 = min(n0 + nc, hi)
            s = (rows @ ops.k[:, :, n0:n1].transpose(-1, -2)).view(*shape, n1 - n0)  # (b, hk, g, mc, nc)
            s.mul_(spec.scale)
            keep = None
            if ops.mask is not None:
                rows_ = slice(m0, m1) if ops.mask.shape[2] > 1 else slice(None)
                chunk = ops.mask[:, :, rows_, n0:n1].unsqueeze(2)  # (b, 1, 1, mc|1, nc)
                if chunk.dtype == torch.bool:
                    keep = chunk
                else:
                    s.add_(chunk)
            if spec.causal is Causal.TOP_LEFT:
                band = torch.arange(n0, n1).view(1, -1) <= torch.arange(m0, m1).view(-1, 1)
                keep = band if keep is None else keep & band
            if keep is not None:
                s.masked_fill_(~keep, -math.inf)
            new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))
            safe = new_max.masked_fill(new_max == -math.inf, 0.0)
            p = s.sub_(safe).exp_()
            alpha = torch.exp(run_max - safe)
            run_sum = run_sum * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + (p.view(b, hk, -1, n1 - n0) @ ops.v[:, :, n0:n1]).view_as(acc)
            run_max = new_max
        out[:, :, m0:m1] = (acc / run_sum).view(b, spec.heads, m1 - m0, -1)
    return out


def runners(spec: AttentionSpec, ops: Operands) -> tuple[dict[str, tuple[str, Runner]], list[Option]]:
    """Variant name -> (algorithm, callable) for everything runnable here, and the select() options."""
    causal_bias = None
    if spec.causal is Causal.TOP_LEFT:  # built once per forward in HF models, outside attention
        causal_bias = torch.full((spec.q_len, spec.kv_len), -math.inf).triu(1).view(1, 1, spec.q_len, spec.kv_len)
    run: dict[str, tuple[str, Runner]] = {"eager": ("eager", lambda: eager(spec, ops, causal_bias))}
    options = [Option("eager", "eager", spec, "canonical")]
    for variant in VARIANTS:
        refusal = variant.refusal(spec, "cpu")
        options.append(Option(variant.name, variant.algorithm, spec, "canonical", refusal))
        if refusal is None:
            call = variant.call(spec, ops)
            run[variant.name] = (variant.algorithm, call.run)
    if not any(alg == "chunked" for alg, _ in run.values()):
        run["chunked (bench)"] = ("chunked", lambda: chunked(spec, ops))
        options.append(Option("chunked (bench)", "chunked", spec, "canonical"))
    return run, options


def measure(run: dict[str, tuple[str, Runner]], clock: Callable[[], float], budget_s: float) -> dict[str, float]:
    """Median seconds per variant, the variants interleaved round by round. A variant that takes
    under 20 ms runs once untimed right before each timed call, so that it does not pay for the
    caches and heap the previous variant left behind (the model prices inputs hot when they fit)."""
    for _, fn in run.values():
        fn()
    t0 = clock()
    for _, fn in run.values():
        fn()
    one_round = max(clock() - t0, 1e-6)
    rounds = max(3, min(15, int(budget_s / one_round)))
    samples: dict[str, list[float]] = {name: [] for name in run}
    first: dict[str, float] = {}
    for _ in range(rounds):
        for name, (_, fn) in run.items():
            if first.get(name, 0.0) < 0.02:
                fn()
            t = clock()
            fn()
            samples[name].append(clock() - t)
            first.setdefault(name, samples[name][0])
    return {name: statistics.median(ts) for name, ts in samples.items()}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties get their mean rank)."""
    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):
            tied = a == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def check(spec: AttentionSpec, ops: Operands, run: dict[str, tuple[str, Runner]]) -> None:
    """Every variant computes the same attention (the benchmark compares like with like)."""
    ref = eager(spec, ops, None if spec.causal is Causal.NONE else torch.full(
        (spec.q_len, spec.kv_len), -math.inf).triu(1))
    for name, (_, fn) in run.items():
        err = (fn() - ref).abs().max().item()
        if err > 1e-3:
            raise AssertionError(f"{name} differs from eager by {err:.2e} at {spec.describe()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu = thread CPU time (default with 1 thread), wall = perf_counter")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds of measurement per point")
    parser.add_argument("--quick", action="store_true", help="every 4th point only")
    parser.add_argument("--png", default="out/cost_model_validation.png", help="plot path (if matplotlib)")
    parser.add_argument("--json", default=None, help="write the raw measurements and predictions here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    t0 = time.perf_counter()
    profile = host_profile()
    print(f"profile: {profile.describe()}  [{time.perf_counter() - t0:.1f} s]")
    print(f"threads {torch.get_num_threads()}, clock {clock_name}\n")
    rows = []
    for i, point in enumerate(grid(args.quick)):
        spec = point.spec
        ops = operands(spec, seed=i)
        run, options = runners(spec, ops)
        if i == 0 or spec.q_len * spec.kv_len <= 512 * 512:
            check(spec, ops, run)
        measured = measure(run, clock, args.budget)
        selection = select(options, target=profile)
        predicted = {c.option.variant: c.predicted_s for c in selection.ranked}
        chosen = selection.winner.option.variant
        best = min(measured, key=measured.get)
        regret = measured[chosen] / measured[best] - 1
        rows.append({"label": point.label, "measured": measured, "predicted": predicted,
                     "chosen": chosen, "best": best, "regret": regret})
        cells = "  ".join(f"{n} {measured[n] * 1e3:8.2f}/{predicted[n] * 1e3:8.2f}" for n in measured)
        flag = "" if regret <= 0.10 else f"  <-- regret {regret:.0%}"
        print(f"{i:3d} {point.label:<40} {cells}  chose {chosen}{flag}", flush=True)

    pairs = [(r["predicted"][n], r["measured"][n]) for r in rows for n in r["measured"]]
    rho = spearman([p for p, _ in pairs], [m for _, m in pairs])
    within = [r["regret"] <= 0.10 for r in rows]
    regrets = sorted(r["regret"] for r in rows if r["regret"] > 0.10)
    log_err = statistics.median(abs(math.log(p / m)) for p, m in pairs)
    print(f"\n{len(rows)} points, {len(pairs)} (point, variant) pairs, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"Spearman rho (predicted vs measured latency): {rho:.3f}")
    print(f"chosen variant within 10% of the measured best: {sum(within)}/{len(rows)} = {sum(within) / len(rows):.1%}")
    print(f"regret when not: {', '.join(f'{r:.0%}' for r in regrets) or '-'}; "
          f"mean regret over all points {statistics.mean(r['regret'] for r in rows):.1%}")
    print(f"median |log(pred/meas)|: {log_err:.2f} (x{math.exp(log_err):.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"profile": profile.to_json(), "threads": args.threads, "clock": clock_name, "rows": rows}, fh,
                      indent=1)
    _plot(rows, rho, args.png)
    return 0


def _plot(rows: list[dict], rho: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 6))
    names = sorted({n for r in rows for n in r["measured"]})
    for name in names:
        xs = [r["predicted"][name] * 1e3 for r in rows if name in r["measured"]]
        ys = [r["measured"][name] * 1e3 for r in rows if name in r["measured"]]
        ax.scatter(xs, ys, s=14, label=name, alpha=0.8)
    lo = min(min(r["predicted"].values()) for r in rows) * 1e3 / 2
    hi = max(max(r["measured"].values()) for r in rows) * 1e3 * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="predicted (ms)", ylabel="measured (ms)",
           title=f"attnfx cost model on this CPU (Spearman {rho:.3f})")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
