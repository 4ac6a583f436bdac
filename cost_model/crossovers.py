"""Where one way of computing attention starts to beat another.

Two are solved symbolically with sympy: the key length above which materialising the scores no longer
fits a memory budget (so a memory-bounded variant wins by default), and the compute-bound N* above
which linear attention is cheaper than softmax attention. Time crossovers between the exact
variants on a profile involve cache levels and page faults, so they are found numerically by
scanning N through the full time model and refining by bisection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp

from . import symbols as sym
from .algorithms import EAGER
from .hardware import HardwareProfile
from .spec import AttentionSpec
from .timing import predict


@dataclass(frozen=True)
class Crossover:
    """`formula` (a sympy equation or expression) and its value at the site, with a one-line gloss."""

    name: str
    formula: sp.Expr | None
    value: float | None
    note: str

    def __str__(self) -> str:
        head = f"{self.name}: " + (f"{sp.sstr(self.formula)}" if self.formula is not None else "")
        value = "none in range" if self.value is None else f"{self.value:,.0f}"
        return f"{head}{' = ' if self.formula is not None else ''}{value}  ({self.note})"


def resize(spec: AttentionSpec, kv_len: int) -> AttentionSpec:
    """The site at another key length; self-attention (M = N) grows its queries too."""
    return spec.resized(q_len=kv_len if spec.q_len == spec.kv_len else None, kv_len=kv_len)


def memory_crossover(spec: AttentionSpec, budget: float) -> Crossover:
    """Smallest N at which the eager graph's live intermediates exceed `budget` bytes."""
    peak = sp.sympify(EAGER.peak)
    if spec.q_len == spec.kv_len:
        peak = peak.subs(sym.M, sym.N)
    limit = sp.Symbol("budget", positive=True)
    values = {k: v for k, v in sym.bind(spec).items() if k not in (sym.N, sym.M)} | {limit: budget}
    for root in sp.solve(sp.Eq(peak, limit), sym.N):
        value = complex(root.subs(values).subs(sym.M, spec.q_len).evalf())
        if abs(value.imag) < 1e-9 and value.real > 0:
            note = (f"solved for N: above it eager's live scores exceed the {budget / 2**20:,.0f} MiB "
                    "budget and only memory-bounded variants can run")
            return Crossover("N above which materialising the scores breaks the budget",
                             sp.Eq(peak, limit), value.real, note)
    return Crossover("N above which materialising the scores breaks the budget", None, None, "no positive root")


def linear_crossover(profile: HardwareProfile, dtype: str = "float32") -> Crossover:
    """The note's compute-bound N* (M = N, E = F = E' = d) where linear attention's time equals
    softmax attention's, closed form and value at d = 64 and 128 on `profile`."""
    n, d = sym.N, sp.Symbol("d", positive=True)
    p_mm, p_ew, p_sfu = sp.symbols("P_mm P_ew P_sfu", positive=True)
    soft = 2 * n * n * (2 * d) / p_mm + 4 * n * n / p_ew + n * n / p_sfu
    lin = (2 * d * d * (2 * n) + 2 * n * d) / p_mm + 2 * n * d / p_sfu + 2 * 2 * n * d / p_ew
    closed = sp.simplify(sp.solve(sp.Eq(soft, lin), n)[-1])
    rates = {p_mm: profile.mm_rate(dtype, "gemm"), p_ew: profile.ew_flops, p_sfu: profile.exp_rate}
    at = {dim: float(closed.subs(rates | {d: dim})) for dim in (64, 128)}
    note = f"compute-bound; on {profile.name}: d=64 -> {at[64]:,.0f}, d=128 -> {at[128]:,.0f}"
    return Crossover("N* above which linear attention beats softmax", sp.Eq(sp.Symbol("N*"), closed), at[128], note)


def time_crossover(fast: str, slow: str, spec: AttentionSpec, profile: HardwareProfile,
                   lo: int = 16, hi: int = 1 << 17) -> Crossover:
    """Smallest N in [lo, hi] from which `fast` is predicted faster than `slow` at this site's other
    sizes (numeric: the time model is piecewise)."""
    def gap(n: int) -> float:
        s = resize(spec, n)
        return predict(fast, s, profile).total_s - predict(slow, s, profile).total_s

    grid = sorted({int(round(lo * (hi / lo) ** (i / 48))) for i in range(49)})
    signs = [(n, gap(n) < 0) for n in grid]
    value = None
    if signs[0][1]:
        note = f"{fast} is predicted faster than {slow} over all N >= {lo}"
        value = float(lo)
    else:
        for (n0, a), (n1, b) in zip(signs, signs[1:]):
            if not a and b:
                while n1 - n0 > 1:
                    mid = (n0 + n1) // 2
                    n0, n1 = (n0, mid) if gap(mid) < 0 else (mid, n1)
                value = float(n1)
                break
        note = (f"{fast} beats {slow} from N = {value:,.0f}" if value is not None
                else f"{fast} stays slower than {slow} for N <= {hi:,}")
    shape = "M = N" if spec.q_len == spec.kv_len else f"M = {spec.q_len}"
    return Crossover(f"time: {fast} vs {slow} ({shape})", None, value, note)


def crossovers(spec: AttentionSpec, profile: HardwareProfile, algorithms: list[str],
               memory_budget: float | None = None) -> list[Crossover]:
    """The crossovers explain() shows for a site: every exact algorithm against eager, the memory
    budget's N, and linear attention's N*."""
    out = [time_crossover(a, "eager", spec, profile) for a in algorithms if a != "eager"]
    if memory_budget is not None:
        out.append(memory_crossover(spec, memory_budget))
    out.append(linear_crossover(profile, spec.dtype))
    return [c for c in out if c.value is None or math.isfinite(c.value)]
