"""Rank the variants that can take a site by predicted time, under an optional memory budget.

Each runnable option is priced by its algorithm's cascade on the target profile (`timing.predict`);
options that would exceed `memory_budget` (bytes of intermediates) stay in the ranking, flagged, but
cannot win. `why` says in one line why the winner won, against the runner-up and against eager.
`choose()` adds attnfx's policy for sites whose lengths are only known at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .algorithms import ALGORITHMS
from .hardware import HardwareProfile
from .targets import resolve_target
from .spec import AttentionSpec
from .timing import Prediction, predict


@dataclass(frozen=True)
class Option:
    """One way to rewrite a site: a variant applied to one lowering (spec) of the site."""

    variant: str
    algorithm: str
    spec: AttentionSpec
    lowering: str
    refusal: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A runnable option with its predicted cost."""

    option: Option
    predicted_s: float
    hbm_bytes: float
    peak_bytes: float
    flops: float = 0.0  # matmul FLOPs
    exps: float = 0.0
    passes: int = 0
    kv_reads: int = 0
    launches: int = 0
    fits: bool = True  # peak_bytes within the memory budget
    prediction: Prediction | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        o = self.option
        budget = "" if self.fits else "  OVER BUDGET"
        return (f"{o.variant:<16} [{o.algorithm}, {o.lowering}] {_ms(self.predicted_s)}  "
                f"traffic {_mib(self.hbm_bytes)}  peak {_mib(self.peak_bytes)}  {self.passes}-pass  "
                f"{self.launches} launches{budget}")


@dataclass(frozen=True)
class Selection:
    ranked: tuple[Candidate, ...]  # the options that can run, fastest first
    refused: tuple[Option, ...]
    winner: Candidate | None
    why: str
    target: str = ""

    def describe(self) -> str:
        lines = [f"on {self.target}:" if self.target else "candidates:"]
        lines += [f"  {i}. {c.describe()}" for i, c in enumerate(self.ranked, 1)]
        lines += [f"  -  {o.variant:<16} refused: {o.refusal}" for o in self.refused]
        lines.append(f"  winner: {self.winner.option.variant if self.winner else 'none'} ({self.why})")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def price(option: Option, profile: HardwareProfile, memory_budget: float | None = None) -> Candidate:
    """The candidate for one runnable option on `profile`."""
    p = predict(option.algorithm, option.spec, profile)
    fits = memory_budget is None or p.peak_bytes <= memory_budget
    return Candidate(option, p.total_s, p.bytes, p.peak_bytes, p.flops_mm, p.exps, p.passes, p.kv_reads,
                     p.launches, fits, p)


def _why(winner: Candidate, ranked: list[Candidate], budget: float | None) -> str:
    """The winner against the runner-up, the next one and eager: speed ratio, extra passes,
    traffic and launches (variants offered under several lowerings are named with theirs)."""
    names = [c.option.variant for c in ranked]

    def label(c: Candidate) -> str:
        o = c.option
        return f"{o.variant} [{o.lowering}]" if names.count(o.variant) > 1 else o.variant

    others = [c for c in ranked if c is not winner]
    shown = others[:2] + [c for c in others[2:] if c.option.algorithm == "eager"][:1]
    parts = []
    for c in shown:
        ratio = c.predicted_s / winner.predicted_s
        reason = f"{ratio:.1f}x faster than {label(c)}"
        if ratio < 1:
            reason = (f"{label(c)} would be {1 / ratio:.1f}x faster but needs {_mib(c.peak_bytes)}"
                      f" > budget {_mib(budget or 0)}")
        extra = []
        if c.passes > winner.passes:
            extra.append(f"{c.passes - winner.passes} pass(es) more")
        if c.hbm_bytes > 1.5 * winner.hbm_bytes:
            extra.append(f"{c.hbm_bytes / winner.hbm_bytes:.1f}x the traffic")
        if c.launches > 4 * max(winner.launches, 1):
            extra.append(f"{c.launches} launches")
        parts.append(reason + (f" ({', '.join(extra)})" if extra else ""))
    head = f"{label(winner)} predicted {_ms(winner.predicted_s)}"
    return "; ".join([head] + parts) if parts else f"{head}; the only runnable option"


def select(options: list[Option], target: str | HardwareProfile = "cpu",
           memory_budget: float | None = None) -> Selection:
    """Pick the fastest option that can run and fits `memory_budget` (bytes of intermediates).

    `target` is "cpu" (this host's calibrated profile), "cuda" (the current GPU's spec sheet, H100
    without one) or a `HardwareProfile`. Options whose algorithm has no cost model are refused.
    """
    profile = resolve_target(target)
    refused = [o for o in options if o.refusal is not None]
    runnable = []
    for o in options:
        if o.refusal is not None:
            continue
        if o.algorithm not in ALGORITHMS:
            refused.append(Option(o.variant, o.algorithm, o.spec, o.lowering,
                                  f"no cost model for algorithm {o.algorithm!r}"))
        elif profile.device not in ALGORITHMS[o.algorithm].devices:
            refused.append(Option(o.variant, o.algorithm, o.spec, o.lowering,
                                  f"{o.algorithm} does not run on {profile.device}"))
        else:
            runnable.append(o)
    ranked = sorted((price(o, profile, memory_budget) for o in runnable), key=lambda c: c.predicted_s)
    fitting = [c for c in ranked if c.fits]
    if not fitting:
        why = "no option fits the memory budget" if ranked else "no option can run"
        return Selection(tuple(ranked), tuple(refused), None, why, profile.name)
    winner = fitting[0]
    return Selection(tuple(ranked), tuple(refused), winner, _why(winner, ranked, memory_budget), profile.name)


LONG_LENGTH = 2048  # where dynamic-length sites are also priced before eager may win


def choose(options: list[Option], target: str | HardwareProfile = "cpu",
           memory_budget: float | None = None) -> Selection:
    """`select()`, except that eager wins a site whose lengths are dynamic only if it is also
    predicted fastest at LONG_LENGTH: example inputs are usually shorter than real ones."""
    selection = select(options, target, memory_budget)
    winner = selection.winner
    lengths = {"q_len", "kv_len"} & (winner.option.spec.dynamic if winner is not None else frozenset())
    if winner is None or winner.option.variant != "eager" or not lengths:
        return selection
    long_options = [replace(o, spec=_at_long_length(o.spec, lengths)) for o in options]
    long_winner = select(long_options, target, memory_budget).winner
    if long_winner is None or long_winner.option.variant == "eager":
        return selection
    key = (long_winner.option.variant, long_winner.option.lowering)
    chosen = next(c for c in selection.ranked if (c.option.variant, c.option.lowering) == key)
    why = (f"eager is predicted faster at the example length, but the length is dynamic and "
           f"{long_winner.option.variant} is predicted fastest at {LONG_LENGTH}")
    return replace(selection, winner=chosen, why=why)


def _at_long_length(spec: AttentionSpec, lengths: set[str]) -> AttentionSpec:
    return spec.resized(**{name: max(getattr(spec, name), LONG_LENGTH) for name in lengths})
