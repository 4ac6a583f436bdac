"""Linear and sigmoid attention: the written O(N^2) form (eager) vs attnfx's ops (run by hand), and
whole models with hand-written linear attention vs the same models after `attnfx.optimize`.

    .venv/bin/python benchmarks/bench_linear_sigmoid.py [--lengths 1024 4096 16384] [--repeats 5]
                                                         [--backward] [--threads 2] [--only ops|models]

Sites (B=1, H=8, E=F=64, fp32, q/k feature-mapped with elu + 1):
  * causal linear, per-head decay, normalised: (Q K^T * tril(decay^age)) V / rowsum  vs
    attnfx::linear_attention chunked (Lightning);
  * non-causal linear, normalised: (Q K^T) V / rowsum  vs  attnfx::linear_attention right to left;
  * causal sigmoid, logit bias -log N: sigmoid(Q K^T / sqrt(E) - log N, -inf above the diagonal) V
    vs attnfx::sigmoid_attention (chunked CPU kernel).
Models (B=1, T tokens, 8 heads of 64, qkv and output projections, the attention written by hand and
rewritten by attnfx.optimize, which is run once on 1024-token inputs: the capture is dynamic in T):
  * causal linear with a per-head decay built in forward (lambda ** (i - j) * (i >= j)), normalised;
  * causal linear, elu + 1, masked_fill(~tril, 0), normalised;
  * non-causal linear, elu + 1, normalised.
Eager and attnfx are timed interleaved in one process (median of --repeats); the eager form is
skipped where its (N, N) tensors would not fit. Peak memory is the largest sum of live tensors the
call's aten ops allocate (inputs excluded), measured in a separate untimed run.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnfx.kernels  # noqa: F401  (registers torch.ops.attnfx)
from attnfx.cost_model.tiles import LINEAR_CHUNK

B, H, E = 1, 8, 64
EAGER_LIMIT = 6 * 2**30  # bytes of (N, N) tensors the eager forms may allocate


class PeakMemory(TorchDispatchMode):
    """Largest sum of live storages allocated by aten ops while active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                storage = x.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.seen:
                    self.seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


@dataclass
class Site:
    name: str
    eager: Callable[[], torch.Tensor]
    fused: Callable[[], torch.Tensor]
    eager_bytes: int  # of the (N, N) tensors the eager form keeps alive together
    leaves: tuple[torch.Tensor, ...]


def sites(n: int, backward: bool) -> list[Site]:
    g = torch.Generator().manual_seed(0)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    q = phi(torch.randn(B, H, n, E, generator=g)).requires_grad_(backward)
    k = phi(torch.randn(B, H, n, E, generator=g)).requires_grad_(backward)
    v = torch.randn(B, H, n, E, generator=g).requires_grad_(backward)
    decay = torch.linspace(0.9, 0.999, H)
    scale, eps = E ** -0.5, 1e-6
    pos = torch.arange(n)
    square = B * H * n * n * 4
    out: list[Site] = []
    causal = (pos.view(1, -1) <= pos.view(-1, 1))
    if 3 * square <= EAGER_LIMIT:  # the masks are buffers of the model, built once
        decay_mask = torch.where(causal, decay.view(-1, 1, 1) ** (pos.view(-1, 1) - pos.view(1, -1)).clamp_min(0), 0.0)
    else:
        decay_mask = None

    def causal_linear_eager():
        w = (q @ k.transpose(-1, -2)) * scale * decay_mask
        return (w @ v) / (w.sum(-1, keepdim=True) + eps)

    def linear_eager():
        w = (q @ k.transpose(-1, -2)) * scale
        return (w @ v) / (w.sum(-1, keepdim=True) + eps)

    def sigmoid_eager():
        s = (q @ k.transpose(-1, -2)) * scale - math.log(n)
        return torch.sigmoid(s.masked_fill(~causal, -math.inf)) @ v

    linear = torch.ops.attnfx.linear_attention
    out.append(Site("causal linear (decay, normalised)", causal_linear_eager,
                    lambda: linear(q, k, v, decay, scale, "top_left", True, eps, "chunked", LINEAR_CHUNK)[0],
                    3 * square, (q, k, v)))
    out.append(Site("non-causal linear (normalised)", linear_eager,
                    lambda: linear(q, k, v, None, scale, "none", True, eps, "right_to_left", LINEAR_CHUNK)[0],
                    2 * square, (q, k, v)))
    out.append(Site("causal sigmoid", sigmoid_eager,
                    lambda: torch.ops.attnfx.sigmoid_attention(q, k, v, None, None, scale, "top_left", -1, 0.0,
                                                               -math.log(n)),
                    3 * square, (q, k, v)))
    return out


def run(fn: Callable[[], torch.Tensor], backward: bool) -> torch.Tensor:
    out = fn()
    if backward:
        out.backward(torch.ones_like(out))
    return out


def clock(fn: Callable[[], torch.Tensor], site: Site, backward: bool) -> float:
    for x in site.leaves:
        x.grad = None
    start = time.perf_counter()
    run(fn, backward)
    return time.perf_counter() - start


def peak(fn: Callable[[], torch.Tensor], backward: bool) -> int:
    with PeakMemory() as memory:
        run(fn, backward)
    return memory.peak


class LinearAttentionModel(torch.nn.Module):
    """x (1, T, H*E) -> projections -> linear attention written by hand -> output projection."""

    def __init__(self, causal: bool, decay: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(H * E, 3 * H * E)
        self.out = torch.nn.Linear(H * E, H * E)
        self.causal, self.decay = causal, decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, H, E).transpose(1, 2) for z in self.qkv(x).split(H * E, dim=-1))
        w = (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-2, -1) * E ** -0.5
        i = torch.arange(t)
        age = i.view(-1, 1) - i.view(1, -1)
        if self.decay:
            w = w * (torch.linspace(0.9, 0.999, H).view(-1, 1, 1) ** age.clamp_min(0) * (age >= 0))
        elif self.causal:
            w = w.masked_fill(age < 0, 0.0)
        y = (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
        return self.out(y.transpose(1, 2).reshape(b, t, H * E))


MODELS = {"causal linear + decay (model)": (True, True), "causal linear (model)": (True, False),
          "non-causal linear (model)": (False, False)}


def bench_models(lengths: list[int], repeats: int) -> None:
    """Each model eager vs attnfx.optimize'd, interleaved; eager is skipped where its (H, N, N)
    tensors would not fit."""
    import attnfx

    print("\n| model | N | eager ms | attnfx ms | speed-up | attnfx peak MiB | max rel err | variant |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (causal, decay) in MODELS.items():
        model = LinearAttentionModel(causal, decay).eval()
        example = torch.randn(1, 1024, H * E, generator=torch.Generator().manual_seed(1))
        optimized = attnfx.optimize(model, (example,))
        variant = optimized.report.entries[0].variant or optimized.report.entries[0].status
        for n in lengths:
            x = torch.randn(1, n, H * E, generator=torch.Generator().manual_seed(n))
            with_eager = 3 * H * n * n * 4 <= EAGER_LIMIT
            with torch.no_grad():
                optimized(x)  # warm-up
                times: dict[str, list[float]] = {"eager": [], "fused": []}
                for _ in range(repeats):  # interleaved
                    for key, fn in (("eager", model), ("fused", optimized)):
                        if key == "eager" and not with_eager:
                            continue
                        start = time.perf_counter()
                        fn(x)
                        times[key].append(time.perf_counter() - start)
                fused_ms = 1e3 * statistics.median(times["fused"])
                fused_peak = peak(lambda: optimized(x), False) / 2**20
                if not with_eager:
                    print(f"| {name} | {n} | skipped ({3 * H * n * n * 4 / 2**30:.0f} GiB of (N, N) tensors) | "
                          f"{fused_ms:.1f} | - | {fused_peak:.0f} | - | {variant} |")
                    continue
                eager_ms = 1e3 * statistics.median(times["eager"])
                err = _relative(optimized(x), model(x))
            print(f"| {name} | {n} | {eager_ms:.1f} | {fused_ms:.1f} | {eager_ms / fused_ms:.1f}x | {fused_peak:.0f} | "
                  f"{err:.1e} | {variant} |")


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def bench_ops(lengths: list[int], repeats: int, backward: bool) -> None:
    print("| site | N | eager ms | attnfx ms | speed-up | eager peak MiB | attnfx peak MiB | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        for site in sites(n, backward):
            with_eager = site.eager_bytes <= EAGER_LIMIT
            run(site.fused, backward)  # warm-up
            times: dict[str, list[float]] = {"eager": [], "fused": []}
            for _ in range(repeats):  # interleaved
                if with_eager:
                    times["eager"].append(clock(site.eager, site, backward))
                times["fused"].append(clock(site.fused, site, backward))
            fused_ms = 1e3 * statistics.median(times["fused"])
            fused_peak = peak(site.fused, backward) / 2**20
            if not with_eager:
                print(f"| {site.name} | {n} | skipped ({site.eager_bytes / 2**30:.0f} GiB) | {fused_ms:.1f} | - | - | "
                      f"{fused_peak:.1f} | - |")
                continue
            eager_ms = 1e3 * statistics.median(times["eager"])
            with torch.no_grad():
                expected, actual = site.eager().double(), site.fused().double()
            err = ((actual - expected).abs().max() / expected.abs().max()).item()
            print(f"| {site.name} | {n} | {eager_ms:.1f} | {fused_ms:.1f} | {eager_ms / fused_ms:.1f}x | "
                  f"{peak(site.eager, backward) / 2**20:.0f} | {fused_peak:.1f} | {err:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training; ops only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=("ops", "models"), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"B={B} H={H} E=F={E} fp32, {mode}, {torch.get_num_threads()} threads, median of {args.repeats}")
    if args.only != "models":
        bench_ops(args.lengths, args.repeats, args.backward)
    if args.only != "ops":
        bench_models(args.lengths, args.repeats)


if __name__ == "__main__":
    main()
