"""Attention coverage over the model zoo: attnfx beside torch.compile's own attention fusion.

One row per zoo model: ground-truth attention sites; softmax nodes in the exported graph; sites
attnfx rewrote (plus SDPA calls it found already fused) and its max abs error vs eager at the example
inputs and at another sequence length (same weights); and, measured in the same run, how many sites
Inductor's ``fuse_attention`` pass replaced when ``torch.compile(model)`` (default backend, CPU) runs
one forward. Inductor increments ``counters["inductor"]["fuse_attention"]`` once per replaced
pattern (``pattern_matcher_count`` counts every pattern-matcher rewrite, attention or not).

    python benchmarks/coverage.py [--models bert,gpt2] [--seq-len 8] [--no-inductor] [--no-attnfx]

All models run by default: about 50 minutes on 2 CPU cores (5-60 s per model, funnel about 200 s),
mostly Inductor compile time; --no-inductor takes about 5 minutes.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import zoo  # noqa: E402

STATUS_CODES = {"REWRITTEN": "RW", "ALREADY_FUSED": "AF", "KEPT": "KP", "REFUSED": "RF", "RESTORED": "RS"}


@dataclass
class Row:
    name: str
    sites: int
    softmax: int | None = None
    rewritten: int | None = None
    fused: int | None = None
    statuses: str = ""
    err: float | None = None
    err2: float | None = None
    inductor: int | None = None
    inductor_err: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def attempt(row: Row, stage: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; a failure is recorded on the row rather than ending the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the benchmark reports every failure and goes on
        row.problems.append(f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None


def measure_attnfx(row: Row, entry: zoo.ZooModel, seq_len: int, second: tuple) -> None:
    """``attnfx.optimize`` on a fresh build; errors at the example inputs and at ``second``."""
    import attnfx

    model, args, kwargs = entry.build(seq_len)
    opt = attempt(row, "attnfx.optimize", lambda: attnfx.optimize(model, args, kwargs))
    if opt is None:
        return
    statuses = Counter(e.status for e in opt.report.entries)
    row.rewritten, row.fused = statuses["REWRITTEN"], statuses["ALREADY_FUSED"]
    row.statuses = " ".join(f"{n}{STATUS_CODES.get(s, s)}" for s, n in sorted(statuses.items()))
    for e in opt.report.entries:
        if e.status not in ("REWRITTEN", "ALREADY_FUSED"):
            row.problems.append(f"site {e.index} {e.status} {e.reason_code}: {e.reason[:160]}")
    row.err = attempt(row, "attnfx run", lambda: zoo.max_abs_diff(eager(opt, args, kwargs), eager(model, args, kwargs)))
    args2, kwargs2 = second
    row.err2 = attempt(row, "attnfx run (2nd shape)",
                       lambda: zoo.max_abs_diff(eager(opt, args2, kwargs2), eager(model, args2, kwargs2)))


def measure_inductor(row: Row, entry: zoo.ZooModel, seq_len: int) -> None:
    """One compiled forward from a clean Dynamo state; caches off so every pass really runs."""
    from torch._dynamo.utils import counters

    model, args, kwargs = entry.build(seq_len)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out = attempt(row, "torch.compile", lambda: eager(torch.compile(model), args, kwargs))
    if out is not None:
        row.inductor = counters["inductor"]["fuse_attention"]
        row.inductor_err = zoo.max_abs_diff(out, eager(model, args, kwargs))


def measure(entry: zoo.ZooModel, seq_len: int, with_attnfx: bool, with_inductor: bool) -> Row:
    row = Row(entry.name, entry.attention_sites)
    started = time.perf_counter()
    built = attempt(row, "build", lambda: (entry.build(seq_len), entry.build(seq_len + 4 if entry.seq_dynamic
                                                                              else seq_len, batch=3)))
    if built is None:
        return row
    (model, args, kwargs), (_, args2, kwargs2) = built
    program = attempt(row, "export", lambda: zoo.export(model, args, kwargs))
    if program is not None:
        row.softmax = len(zoo.softmax_nodes(program.graph))
    if with_attnfx:
        measure_attnfx(row, entry, seq_len, (args2, kwargs2))
    if with_inductor:
        measure_inductor(row, entry, seq_len)
    row.seconds = time.perf_counter() - started
    return row


def _num(x: float | int | None, fmt: str = "d") -> str:
    return "-" if x is None else format(x, fmt)


HEADER = (f"{'model':<26} {'family':<22} {'sites':>5} {'softmax':>7} {'attnfx':>6} {'+fused':>6} "
          f"{'statuses':<14} {'err':>8} {'err@2nd':>8} {'inductor':>8} {'ind.err':>8} {'sec':>5}")


def format_row(row: Row, family: str) -> str:
    return (f"{row.name:<26} {family[:22]:<22} {row.sites:>5} {_num(row.softmax):>7} {_num(row.rewritten):>6} "
            f"{_num(row.fused):>6} {row.statuses[:14]:<14} {_num(row.err, '.1e'):>8} {_num(row.err2, '.1e'):>8} "
            f"{_num(row.inductor):>8} {_num(row.inductor_err, '.1e'):>8} {row.seconds:>5.0f}")


def totals(rows: list[Row]) -> list[str]:
    sites = sum(r.sites for r in rows)
    lines = []
    if any(r.inductor is not None for r in rows):
        ind = sum(r.inductor or 0 for r in rows)
        lines.append(f"inductor (counters['inductor']['fuse_attention']) replaced {ind} of {sites} sites "
                     f"in {sum(r.inductor is not None for r in rows)} compiled models")
    if any(r.rewritten is not None for r in rows):
        rw, af = sum(r.rewritten or 0 for r in rows), sum(r.fused or 0 for r in rows)
        full = sum(1 for r in rows if r.rewritten is not None and r.rewritten + r.fused >= r.sites)
        lines.append(f"attnfx rewrote {rw} of {sites} sites (+{af} already SDPA); {full} of {len(rows)} models "
                     f"fully covered")
    mismatched = [r.name for r in rows if r.softmax is not None and r.softmax != zoo.REGISTRY[r.name].softmax_nodes]
    if mismatched:
        lines.append(f"softmax count differs from the zoo's ground truth: {', '.join(mismatched)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--seq-len", type=int, default=8, help="example sequence length (default 8)")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile (the slow part)")
    parser.add_argument("--no-attnfx", action="store_true", help="skip attnfx.optimize")
    opts = parser.parse_args(argv)
    names = [n for n in opts.models.split(",") if n] or list(zoo.REGISTRY)
    unknown = [n for n in names if n not in zoo.REGISTRY]
    if unknown:
        parser.error(f"unknown zoo models: {', '.join(unknown)} (known: {', '.join(zoo.REGISTRY)})")
    with_attnfx = not opts.no_attnfx
    if with_attnfx:
        import attnfx
        if not hasattr(attnfx, "optimize"):
            print("attnfx.optimize does not exist in this checkout (the matcher is not merged): "
                  "attnfx columns are skipped", file=sys.stderr)
            with_attnfx = False

    print(f"torch {torch.__version__}, seq_len {opts.seq_len}, 2nd shape: seq_len+4 (or same) at batch 3\n")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for name in names:
        row = measure(zoo.REGISTRY[name], opts.seq_len, with_attnfx, not opts.no_inductor)
        rows.append(row)
        print(format_row(row, zoo.REGISTRY[name].family), flush=True)
    print("-" * len(HEADER))
    print("\n".join(totals(rows)))
    problems = [(r.name, p) for r in rows for p in r.problems]
    if problems:
        print("\nproblems:")
        for name, problem in problems:
            print(f"  {name}: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
