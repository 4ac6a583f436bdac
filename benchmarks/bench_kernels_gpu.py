"""GPU benchmark of attnfx's Triton attention kernels against PyTorch's SDPA (flash backend) and eager.

    python benchmarks/bench_kernels_gpu.py            # full sweep: N 512..16k, D 64/128, causal, GQA
    python benchmarks/bench_kernels_gpu.py --quick    # N 1k and 4k only

Prints forward and backward TFLOP/s per shape with attnfx/SDPA and attnfx/eager ratios, then decode
(M = 1, split-KV) latency against SDPA. Needs a CUDA device and triton; exits with a message otherwise.
FLOPs count live (m, n) pairs only (a causal square does about half the work): forward
4*B*H*P*D, backward 2.5x that (five matmuls instead of two), as FlashAttention's benchmarks do.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

TOKENS = 16_384  # B * N is held constant, so every row of the sweep does comparable work


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool

    def live_pairs(self) -> int:
        if not self.causal:
            return self.q_len * self.kv_len
        offset = self.kv_len - self.q_len  # bottom-right, as SDPA's is_causal is for M == N
        return sum(max(0, min(self.kv_len, m + offset + 1)) for m in range(self.q_len))

    def forward_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.live_pairs() * self.head_dim

    def __str__(self) -> str:
        gqa = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"B={self.batch:<3} H={self.heads}{gqa:<3} N={self.kv_len:<6} D={self.head_dim:<4}"
                f"{'causal' if self.causal else '      '}")


def tensors(s: Shape, dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, ...]:
    def make(h: int, n: int) -> torch.Tensor:
        return torch.randn(s.batch, h, n, s.head_dim, device="cuda", dtype=dtype, requires_grad=grad)

    return make(s.heads, s.q_len), make(s.kv_heads, s.kv_len), make(s.kv_heads, s.kv_len)


def attnfx_attention(s: Shape) -> Callable:
    causal = "bottom_right" if s.causal else "none"
    scale = 1 / math.sqrt(s.head_dim)
    return lambda q, k, v: torch.ops.attnfx.attention(q, k, v, None, None, scale, causal, -1, 0.0)[0]


def sdpa_flash(s: Shape) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        if s.kv_heads != s.heads:  # the flash backend takes no enable_gqa: it pays for the K/V copy
            k, v = (x.repeat_interleave(s.heads // s.kv_heads, dim=1) for x in (k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)

    return run


def eager(s: Shape) -> Callable:
    def run(q, k, v):
        k, v = (x.repeat_interleave(s.heads // s.kv_heads, dim=1) for x in (k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(s.head_dim)  # (b, h, m, n): read MN, write MN
        if s.causal:
            keep = torch.ones(s.q_len, s.kv_len, dtype=torch.bool, device=q.device).tril(s.kv_len - s.q_len)
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores.float().softmax(dim=-1).to(q.dtype) @ v

    return run


IMPLS = {"attnfx": attnfx_attention, "sdpa_flash": sdpa_flash, "eager": eager}


def time_ms(fn: Callable[[], object], grads: tuple[torch.Tensor, ...] = ()) -> float:
    """Median milliseconds (triton's do_bench); inf when the implementation fails or runs out of memory."""
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=list(grads) or None,
                                       return_mode="median")
    except (torch.OutOfMemoryError, RuntimeError) as err:
        print(f"    ({str(err).splitlines()[0][:100]})", file=sys.stderr)
        torch.cuda.empty_cache()
        return math.inf


def bench_shape(s: Shape, dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """{impl: (forward TFLOP/s, backward TFLOP/s)} for one shape, after checking attnfx against SDPA."""
    q, k, v = tensors(s, dtype, grad=True)
    reference = sdpa_flash(s)(q, k, v)
    error = (attnfx_attention(s)(q, k, v) - reference).abs().max().item()
    if error > 2e-2:
        print(f"    attnfx differs from SDPA by {error:.3g} at {s}", file=sys.stderr)
    results = {}
    flops = s.forward_flops()
    for name, make in IMPLS.items():
        fn = make(s)
        fwd = time_ms(lambda: fn(q, k, v))
        bwd = math.inf
        if math.isfinite(fwd):
            try:
                out = fn(q, k, v)
                grad = torch.randn_like(out)
                bwd = time_ms(lambda: out.backward(grad, retain_graph=True), grads=(q, k, v))
                del out
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        results[name] = (flops / fwd * 1e-9, 2.5 * flops / bwd * 1e-9)
    return results


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and math.isfinite(a) else "-"


def print_training_table(shapes: list[Shape], dtype: torch.dtype) -> None:
    """One row per shape: TFLOP/s of each implementation, forward then backward, with attnfx's ratios."""
    heads = [f"{d} {n}" for d in ("fwd", "bwd") for n in ("attnfx", "sdpa", "eager", "/sdpa", "/eager")]
    print(f"\n{'TFLOP/s':<40}" + "".join(f"{h:>12}" for h in heads))
    for s in shapes:
        r = bench_shape(s, dtype)
        cells = []
        for i in (0, 1):
            a, f, e = (r[n][i] for n in IMPLS)
            cells += [f"{a:.1f}", f"{f:.1f}", f"{e:.1f}", ratio(a, f), ratio(a, e)]
        print(f"{str(s):<40}" + "".join(f"{c:>12}" for c in cells), flush=True)


def print_decode_table(dtype: torch.dtype) -> None:
    print(f"\n{'decode latency (M=1)':<40}" + "".join(f"{h:>12}" for h in ("attnfx us", "sdpa us", "speed-up")))
    for batch in (1, 8):
        for kv_len in (4096, 16_384, 65_536):
            s = Shape(batch, 32, 8, 1, kv_len, 128, causal=False)
            q, k, v = tensors(s, dtype, grad=False)
            a = time_ms(lambda: attnfx_attention(s)(q, k, v)) * 1e3
            f = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) * 1e3
            print(f"{str(s):<40}" + "".join(f"{c:>12}" for c in (f"{a:.1f}", f"{f:.1f}", ratio(f, a))), flush=True)


def sweep(seqs: list[int]) -> list[Shape]:
    shapes = []
    for head_dim, heads in ((64, 32), (128, 16)):
        for kv_heads in (heads, heads // 4):
            for causal in (False, True):
                shapes += [Shape(max(1, TOKENS // n), heads, kv_heads, n, n, head_dim, causal) for n in seqs]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only N = 1k and 4k")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels_gpu: no CUDA device here; run it on a machine with an NVIDIA GPU.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_kernels_gpu: triton is not importable; `pip install triton` next to a CUDA torch.")
    import attnfx.kernels  # noqa: F401  (registers torch.ops.attnfx)

    dtype = getattr(torch, opts.dtype)
    seqs = [1024, 4096] if opts.quick else [512, 1024, 2048, 4096, 8192, 16_384]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {opts.dtype}")
    print_training_table(sweep(seqs), dtype)
    print_decode_table(dtype)


if __name__ == "__main__":
    main()
