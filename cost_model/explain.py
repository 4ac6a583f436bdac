"""`explain()`: the whole analysis of one attention shape as text, without a model.

Sections: the site, the target profile, each algorithm's einsum cascade with its pass analysis, the
cost formulas with their values at the shape, the ranked variants with why the winner won, and the
crossovers. The compiler exposes it as `attnfx.explain`; it passes the real variants' options, and
without them every exact algorithm of the site's kind that runs on the target is priced.
"""
from __future__ import annotations

from typing import Any, Mapping

import sympy as sp

from .algorithms import ALGORITHMS
from .crossovers import crossovers
from .hardware import HardwareProfile
from .targets import resolve_target
from .select import Option, select
from . import symbols as sym
from .spec import AttentionSpec, Causal, MaskInput
from .symbols import bind, pairs_expr
from .timing import gemm_fraction, predict, symbolic, useful_flops

_ALIASES = {"B": "batch", "H": "heads", "Hkv": "kv_heads", "M": "q_len", "N": "kv_len", "E": "head_dim",
            "F": "value_dim"}


def spec_from(shape: AttentionSpec | Mapping[str, Any]) -> AttentionSpec:
    """An AttentionSpec from itself or from keyword sizes (B/H/Hkv/M/N/E/F or the field names);
    M defaults to N, Hkv to H, F to E, scale to E**-0.5; `causal=True` means top-left."""
    if isinstance(shape, AttentionSpec):
        return shape
    kw = {_ALIASES.get(k, k): v for k, v in shape.items()}
    kw.setdefault("q_len", kw.get("kv_len"))
    kw.setdefault("kv_heads", kw.get("heads"))
    kw.setdefault("value_dim", kw.get("head_dim"))
    kw.setdefault("batch", 1)
    kw.setdefault("scale", float(kw["head_dim"]) ** -0.5)
    causal = kw.get("causal", Causal.NONE)
    kw["causal"] = Causal.TOP_LEFT if causal is True else Causal.NONE if causal is False else Causal(causal)
    if "mask" in kw:
        kw["mask"] = MaskInput(kw["mask"])
        if kw["mask"] is not MaskInput.NONE and "mask_shape" not in kw:
            kw["mask_shape"] = (kw["batch"], 1, kw["q_len"], kw["kv_len"])
    return AttentionSpec(**kw)


def _options(spec: AttentionSpec, profile: HardwareProfile) -> list[Option]:
    return [Option(name, name, spec, "canonical") for name, alg in ALGORITHMS.items()
            if alg.exact and alg.kind is spec.kind and profile.device in alg.devices]


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _cascades(names: list[str], spec: AttentionSpec) -> list[str]:
    lines, seen = [], set()
    for name in names:
        algorithm = ALGORITHMS[name]
        cascade, result = algorithm.einsums(spec), algorithm.passes(spec)
        reads = ", ".join(f"{t} x{n}" for t, n in sorted(result.reads.items()))
        lines.append(f"{name}: {algorithm.description}")
        lines.append(f"  cascade {cascade.name}: {result.passes} pass(es) over K/V; re-reads with recompute: {reads}")
        if cascade.name not in seen:
            seen.add(cascade.name)
            lines += [f"    {e}" for e in cascade.einsums]
    return lines


def _costs(names: list[str], spec: AttentionSpec, profile: HardwareProfile) -> list[str]:
    lines = []
    for name in names:
        alg = ALGORITHMS[name]
        tiles = alg.tiles(spec, profile.device)
        pred = predict(name, spec, profile)
        values = bind(spec, tiles, pred.splits)
        if pred.splits > 1:
            tiles = {**tiles, "splits": pred.splits}
        tile_txt = ", ".join(f"{k}={v}" for k, v in tiles.items() if k != "clip")
        gemm = profile.mm_rate(spec.dtype, "gemm")
        lines.append(f"{name}{f' (tiles {tile_txt})' if tile_txt else ''}: predicted {pred.total_s * 1e3:.3f} ms, "
                     f"{useful_flops(spec) / pred.total_s / 1e9:.3g} useful GFLOP/s = "
                     f"{gemm_fraction(pred.total_s, spec, gemm):.0%} of GEMM")
        for label, expr in symbolic(name, spec).items():
            value = float(sp.sympify(expr).subs(values)) if expr != 0 else 0.0
            lines.append(f"  {label:<13} {sp.sstr(expr)} = {_fmt(value)}")
        if spec.dynamic:
            lines += _dynamic(name, spec, values)
        slowest = sorted(pred.kernels, key=lambda k: -k.total_s)[:4]
        lines.append("  time by kernel: " + ", ".join(
            f"{k.name} {k.total_s * 1e3:.3f} ms (compute {k.compute_s * 1e3:.3f}, memory {k.memory_s * 1e3:.3f}"
            + (f", faults {k.fault_s * 1e3:.3f}" if k.fault_s else "") + ")" for k in slowest))
    return lines


_DIMS = {"batch": sym.B, "heads": sym.H, "kv_heads": sym.Hkv, "q_len": sym.M, "kv_len": sym.N,
         "head_dim": sym.E, "value_dim": sym.F}


def _dynamic(name: str, spec: AttentionSpec, values: dict) -> list[str]:
    """The costs as functions of the site's dynamic sizes, every other size fixed (tile-granular
    pair counts approximated by the live pairs' closed form)."""
    free = {_DIMS[d] for d in spec.dynamic if d in _DIMS}
    pairs = pairs_expr(spec)
    fixed = {k: v for k, v in values.items() if k not in free and k not in (sym.P, sym.P_t)}
    lines = [f"  in the dynamic sizes ({', '.join(sorted(spec.dynamic))}; tile counts as at this shape):"]
    for label, expr in symbolic(name, spec).items():
        if label in ("matmul FLOPs", "exp", "bytes", "peak bytes"):
            form = sp.sympify(expr).subs({sym.P: pairs, sym.P_t: pairs}).subs(fixed)
            lines.append(f"    {label:<13} ~ {sp.sstr(sp.simplify(form))}")
    return lines


def explain(shape: AttentionSpec | Mapping[str, Any], target: str | HardwareProfile = "cpu",
            memory_budget: float | None = None, options: list[Option] | None = None) -> str:
    """The cost model's analysis of one attention shape on `target`, as printable text."""
    spec = spec_from(shape)
    profile = resolve_target(target)
    options = options if options is not None else _options(spec, profile)
    selection = select(options, target=profile, memory_budget=memory_budget)
    names = list(dict.fromkeys(c.option.algorithm for c in selection.ranked))
    budget = "none" if memory_budget is None else f"{memory_budget / 2**20:,.0f} MiB"
    out = [f"attnfx.explain: {spec.describe()}", f"target: {profile.describe()}", f"memory budget: {budget}",
           f"live (m, n) pairs per head: {spec.live_pairs():,} of {spec.q_len * spec.kv_len:,}",
           f"useful FLOPs 2*B*H*pairs*(E+F) = {useful_flops(spec):.4g}; GEMM on this target "
           f"{profile.mm_rate(spec.dtype, 'gemm') / 1e9:.4g} GFLOP/s ({spec.dtype})", "",
           "== cascades and passes ==", *_cascades(names, spec), "",
           "== costs at this shape (formula = value) ==", *_costs(names, spec, profile), "",
           "== ranked variants ==", selection.describe(), "",
           "== crossovers ==", *[str(c) for c in crossovers(spec, profile, names, memory_budget)]]
    return "\n".join(out)
