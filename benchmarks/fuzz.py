"""The attention fuzzer's long mode: many generated programs, each checked against attnfx's invariant.

    python benchmarks/fuzz.py --n 5000 [--seed S] [--json out.json] [--show 3] [--minutes 15]
    python benchmarks/fuzz.py --n 5000 --jobs 4 --counts counts.txt  # 4 processes; counts rewritten as it goes
    python benchmarks/fuzz.py --replay S:I          # print program I of seed S, its report and findings
    python benchmarks/fuzz.py --n 200 --force softmax=hw_amax --force softmax=hw_nomax --exclude layout=bmm
    python benchmarks/fuzz.py --n 500 --shrink    # also shrink one program per failure class

Prints: programs, rewritten, not-rewritten blocks by status and reason, misses (positives not
rewritten) by reason with the features they share, WRONG outputs and CRASHES (both must be 0), and
every failure class with the source of its shortest program. Program I of seed S is drawn from
`random.Random(f"{S}:{I}")`, so any key printed here reproduces with --replay (and the same
--force/--exclude flags); with --jobs the programs are the same, only the order they finish in
changes. `--counts FILE` is rewritten with the summary after every program, so a run that is cut
off still leaves its counts. Tests pin the cost model to the fixed sandbox profile; so does this
script, so its decisions match CI's.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")

from fuzz.choices import Unsatisfiable, random_chooser  # noqa: E402
from fuzz.grammar import draw_program  # noqa: E402
from fuzz.oracle import FAILURES, Outcome, check  # noqa: E402
from fuzz.shrink import shrink  # noqa: E402
from fuzz.tally import Tally, failure_class  # noqa: E402


def _pin_cost_model() -> None:
    from attnfx.cost_model.hardware import SANDBOX_CPU
    from attnfx.cost_model.profiles import CACHE_ENV, cache_path, save_profile

    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="attnfx-fuzz-")
    save_profile(SANDBOX_CPU, cache_path())


def _narrowing(pairs: list[str]) -> dict[str, list]:
    """`name=value` pairs (values read as Python literals where they parse) grouped by name."""
    grouped: dict[str, list] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        grouped.setdefault(name, []).append(value)
    return grouped


def draw(key: str, exclude: dict[str, list], force: dict[str, list]):
    """The program a key draws, or None when the narrowing leaves it nothing to choose."""
    try:
        return draw_program(random_chooser(key, exclude=exclude, only=force))
    except Unsatisfiable:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--minutes", type=float, help="stop drawing programs after this long")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--show", type=int, default=1,
                        help="sources printed per failure class (every WRONG and CRASH is printed)")
    parser.add_argument("--replay", help="SEED:INDEX of one program to print and check")
    parser.add_argument("--shrink", action="store_true", help="print a shrunk program per failure class")
    parser.add_argument("--force", action="append", default=[], metavar="NAME=VALUE",
                        help="draw NAME only from these values (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--jobs", type=int, default=1, help="check programs in this many processes")
    parser.add_argument("--counts", type=Path, help="rewrite this file with the counts after every program")
    args = parser.parse_args(argv)
    _pin_cost_model()
    exclude, force = _narrowing(args.exclude), _narrowing(args.force)
    if args.replay:
        return _replay(args.replay, exclude, force, args.shrink)
    tally = Tally()
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else float("inf")
    started = time.monotonic()
    for i, (key, outcome) in enumerate(_outcomes(args, exclude, force, deadline)):
        if outcome is None:
            tally.unsatisfiable += 1
            continue
        tally.add(key, outcome)
        if outcome.failures:
            print(f"[{key}] " + "; ".join(f"{f.kind} [{f.where}]" for f in outcome.failures), flush=True)
        if (i + 1) % 50 == 0:
            print(f"... {i + 1} programs, {tally.rewritten}/{tally.positives} positives rewritten, "
                  f"{sum(tally.failures.values())} failures", flush=True)
        if args.counts:
            _write_counts(args, tally, time.monotonic() - started)
    if time.monotonic() > deadline:
        print(f"stopped after {args.minutes:g} minutes")
    print(tally.summary())
    narrowing = "".join(f" --force {f}" for f in args.force) + "".join(f" --exclude {e}" for e in args.exclude)
    for name, members in sorted(tally.classes.items(), key=lambda item: -len(item[1])):
        shown = len(members) if name.startswith(("WRONG", "CRASH")) else args.show
        for key, outcome in sorted(members, key=lambda m: len(m[1].case.source))[:shown]:
            print(f"\n===== {name}\n===== {key} (replay: python benchmarks/fuzz.py --replay {key}{narrowing})\n"
                  f"{outcome.explain()}")
        if args.shrink:
            _print_shrunk(name, min(members, key=lambda m: len(m[1].case.source))[1])
    if args.json:
        args.json.write_text(json.dumps(tally.to_json(), indent=1))
    return 1 if tally.failures["WRONG"] or tally.failures["CRASH"] else 0


def checked(key: str, exclude: dict[str, list], force: dict[str, list]) -> Outcome | None:
    """The outcome of the program a key draws (None when it draws none), picklable for --jobs."""
    program = draw(key, exclude, force)
    return None if program is None else check(program).portable()


def _outcomes(args: argparse.Namespace, exclude: dict, force: dict, deadline: float) -> Iterator[tuple[str, Outcome | None]]:
    """(key, outcome) for programs 0.. of the seed, in this process or --jobs workers, until --n or the deadline."""
    keys = (f"{args.seed}:{i}" for i in range(args.n))
    if args.jobs <= 1:
        for key in keys:
            if time.monotonic() > deadline:
                return
            yield key, checked(key, exclude, force)
        return
    context = get_context("spawn")  # a fresh interpreter per worker: no torch state forked mid-use
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill PID: workers stop with the run
    pool = ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init)
    running: dict[Future, str] = {}
    try:
        while True:
            while len(running) < 2 * args.jobs and time.monotonic() <= deadline:
                key = next(keys, None)
                if key is None:
                    break
                running[pool.submit(checked, key, exclude, force)] = key
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _worker_init() -> None:
    """One thread per worker (the workers share the cores); the pinned cost-model profile comes with the
    environment the workers inherit."""
    import torch

    torch.set_num_threads(1)


def _write_counts(args: argparse.Namespace, tally: Tally, elapsed: float) -> None:
    header = (f"benchmarks/fuzz.py --seed {args.seed} --n {args.n} --jobs {args.jobs}: {tally.programs} programs "
              f"checked in {elapsed / 60:.1f} min wall ({elapsed / max(tally.programs, 1):.2f} s wall each), "
              f"updated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
    partial = args.counts.with_name(args.counts.name + ".partial")
    partial.write_text(header + tally.summary() + "\n")
    partial.replace(args.counts)


def _classes(outcome: Outcome) -> set[str]:
    return {failure_class(f.kind, f.detail, f.where) for f in outcome.findings if f.kind in FAILURES}


def _print_shrunk(name: str, outcome: Outcome) -> None:
    _, shrunk = shrink(outcome.case.program, name, check, _classes)
    if shrunk is None:
        print(f"\n===== {name}: no simpler program fails the same way")
        return
    print(f"\n===== {name}: shrunk\n{shrunk.explain()}")


def _replay(key: str, exclude: dict[str, list], force: dict[str, list], shrinking: bool) -> int:
    import attnfx

    program = draw(key, exclude, force)
    if program is None:
        print(f"{key} draws nothing under this narrowing")
        return 2
    outcome = check(program)
    print(outcome.explain())
    if outcome.blocks:
        model = outcome.case.namespace["make_model"]()
        args, kwargs = outcome.case.namespace["example_inputs"](*program.shapes[0])
        print(attnfx.optimize(model, args, kwargs).report)
    for name in sorted(_classes(outcome)) if shrinking else ():
        _print_shrunk(name, outcome)
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
