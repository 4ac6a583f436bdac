"""Latency of the bundled nanoGPT example: attnfx vs eager, vs SDPA by hand, vs torch.compile.

Run by hand: `python benchmarks/bench_example.py [--seq-lens 256 1024 2048] [--repeats 5]`.
Every contender runs interleaved in this one process on the same weights; ratios are printed
(> 1 means attnfx is faster). Batch 1, fp32, the machine's default thread count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import attnfx  # noqa: E402
import nanogpt  # noqa: E402
from attnfx.benchmark import time_interleaved  # noqa: E402


def bench(seq_len: int, repeats: int) -> dict[str, float]:
    model = nanogpt.build()
    by_hand = nanogpt.build(nanogpt.GPTConfig(attention="sdpa"))
    by_hand.load_state_dict(model.state_dict())
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    opt = attnfx.optimize(model, (idx,))
    optimize_s = time.perf_counter() - started
    assert opt.report.rewritten == model.config.n_layer, opt.report
    compiled = torch.compile(model)
    times = time_interleaved({
        "eager": lambda: model(idx),
        "attnfx": lambda: opt(idx),
        "sdpa_by_hand": lambda: by_hand(idx),
        "torch.compile": lambda: compiled(idx),
    }, repeats=repeats, warmup=2)
    with torch.no_grad():
        error = (opt(idx) - model(idx)).abs().max().item()
    return {**times, "optimize_s": optimize_s, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    print(f"nanoGPT example (4 layers, 8 heads, d=512), batch 1, fp32, {torch.get_num_threads()} threads; "
          f"median of {ns.repeats} interleaved calls. Ratios: contender time / attnfx time.")
    header = f"{'seq':>6} {'vs eager':>9} {'vs SDPA by hand':>16} {'vs torch.compile':>17} {'optimize() s':>13} {'max abs err':>12}"
    print(header)
    print("-" * len(header))
    for seq_len in ns.seq_lens:
        r = bench(seq_len, ns.repeats)
        print(f"{seq_len:>6} {r['eager'] / r['attnfx']:>8.2f}x {r['sdpa_by_hand'] / r['attnfx']:>15.2f}x "
              f"{r['torch.compile'] / r['attnfx']:>16.2f}x {r['optimize_s']:>13.1f} {r['error']:>12.2e}")


if __name__ == "__main__":
    main()
