"""The attention fuzzer's long mode: many generated programs, each checked against attnfx's invariant.

    python benchmarks/fuzz.py --n 5000 [--seed S] [--json out.json] [--show 3] [--minutes 15]
    python benchmarks/fuzz.py --replay S:I          # print program I of seed S, its report and findings
    python benchmarks/fuzz.py --n 200 --force softmax=hw_amax --force softmax=hw_nomax --exclude layout=bmm
    python benchmarks/fuzz.py --n 500 --shrink    # also shrink one program per failure class

Prints: programs, rewritten, not-rewritten blocks by status and reason, misses (positives not
rewritten) by reason with the features they share, WRONG outputs and CRASHES (both must be 0), and
every failure class with the source of its shortest program. Program I of seed S is drawn from
`random.Random(f"{S}:{I}")`, so any key printed here reproduces with --replay (and the same
--force/--exclude flags). Tests pin the cost
model to the fixed sandbox profile; so does this script, so its decisions match CI's.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    args = parser.parse_args(argv)
    _pin_cost_model()
    exclude, force = _narrowing(args.exclude), _narrowing(args.force)
    if args.replay:
        return _replay(args.replay, exclude, force, args.shrink)
    tally = Tally()
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else float("inf")
    for i in range(args.n):
        if time.monotonic() > deadline:
            print(f"stopped after {args.minutes:g} minutes")
            break
        key = f"{args.seed}:{i}"
        program = draw(key, exclude, force)
        if program is None:
            tally.unsatisfiable += 1
            continue
        outcome = check(program)
        tally.add(key, outcome)
        if outcome.failures:
            print(f"[{key}] " + "; ".join(f"{f.kind} [{f.where}]" for f in outcome.failures), flush=True)
        if (i + 1) % 50 == 0:
            print(f"... {i + 1} programs, {tally.rewritten}/{tally.positives} positives rewritten, "
                  f"{sum(tally.failures.values())} failures", flush=True)
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
