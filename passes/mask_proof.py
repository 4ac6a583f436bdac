"""Prove what a mask *is*: split a keep-predicate over (b, h, m, n) into conjuncts, each recognised as
a causal diagonal, a sliding-window edge, a key-padding read, or left unproven.

The predicates come from `mask_eval.MaskEvaluator`, which evaluates the graph that builds the mask.
"""
from __future__ import annotations

import re
from functools import reduce
from typing import Any, Callable

import sympy

from attnfx.cost_model.spec import Causal

from .mask_eval import Sym, in_roles, role_symbol, to_bool
from .site import MaskFacts

def _linear_in_mn(rel: Any, one_query: bool) -> tuple[str, Any] | None:
    """('upper', K) for n <= m + K, ('lower', L) for n >= m + L, or None. With one query row m is
    always 0, so a bound on n alone (how a decode step's mask reads once m's size-1 axis is gone)
    is the diagonal through it: n <= K is n <= m + K."""
    m, n = role_symbol("m"), role_symbol("n")
    if isinstance(rel, (sympy.Le, sympy.Lt)):
        d, strict = rel.lhs - rel.rhs, isinstance(rel, sympy.Lt)
    elif isinstance(rel, (sympy.Ge, sympy.Gt)):
        d, strict = rel.rhs - rel.lhs, isinstance(rel, sympy.Gt)
    else:
        return None
    d = sympy.expand(d + (1 if strict else 0))  # integers: d < 0  <=>  d + 1 <= 0
    a_n, a_m = d.coeff(n), d.coeff(m)
    rest = sympy.expand(d - a_n * n - a_m * m)
    if rest.has(m) or rest.has(n):
        return None
    if one_query and a_m == 0:
        a_m = -a_n
    if a_n == 1 and a_m == -1:
        return "upper", -rest
    if a_n == -1 and a_m == 1:
        return "lower", rest
    return None


def classify(keep: Any, q_len: Any, kv_len: Any) -> MaskFacts:
    """Split `keep` (over role symbols b0.., m, n) into causal, window, key-padding and the rest."""
    keep = sympy.simplify_logic(keep) if keep.has(sympy.Or) else keep
    conjuncts = keep.args if isinstance(keep, sympy.And) else (keep,)
    upper, lower, padding, unproven = [], [], [], []
    data_roles = {role_symbol("b0"), role_symbol("n")}
    one_query = q_len == 1
    for conj in conjuncts:
        if conj == sympy.true:
            continue
        reads = conj.atoms(sympy.core.function.AppliedUndef)
        linear = _linear_in_mn(conj, one_query) if not reads else None
        if linear is not None:
            (upper if linear[0] == "upper" else lower).append(linear[1])
        elif reads and conj.free_symbols <= data_roles and role_symbol("n") in conj.free_symbols:
            padding += sorted(_describe(str(r)) for r in reads)
        else:
            unproven.append(_describe(str(conj)))
    upper, lower = _distinct(upper), _distinct(lower)
    causal, window = Causal.NONE, None
    if len(upper) == 1:
        offset = sympy.simplify(upper[0])
        if offset == 0:
            causal = Causal.TOP_LEFT
        elif sympy.simplify(offset - (kv_len - q_len)) == 0:
            causal = Causal.BOTTOM_RIGHT
        else:
            unproven.append(f"n <= m + {offset}")
    elif upper:
        unproven += [f"n <= m + {u}" for u in upper]
    if len(lower) == 1 and causal is not Causal.NONE:
        width = sympy.simplify(causal_offset(causal, q_len, kv_len) - lower[0] + 1)
        if width.is_Integer and int(width) >= 1:
            window = int(width)
        else:
            unproven.append(f"n >= m + {lower[0]}")
    elif lower:
        unproven += [f"n >= m + {lo}" for lo in lower]
    parts = []
    if causal is not Causal.NONE:
        rule = "n <= m" if causal is Causal.TOP_LEFT else "n <= m + N - M"
        parts.append(f"causal {causal.value.replace('_', '-')} ({rule})")
    if window is not None:
        parts.append(f"sliding window of {window} keys")
    if padding:
        parts.append("key padding read from " + ", ".join(padding))
    if unproven:
        parts.append("unproven: " + "; ".join(unproven))
    return MaskFacts(causal, window, bool(padding), tuple(unproven), ", ".join(parts) or "no exclusions")


def _distinct(bounds: list[Any]) -> list[Any]:
    """The same bound proven twice (a model's own mask and the framework's) is one bound."""
    kept: list[Any] = []
    for bound in bounds:
        if not any(sympy.simplify(bound - other) == 0 for other in kept):
            kept.append(bound)
    return kept


def causal_offset(causal: Causal, q_len: Any, kv_len: Any) -> Any:
    return kv_len - q_len if causal is Causal.BOTTOM_RIGHT else sympy.Integer(0)


def _describe(keep: Any) -> str:
    text = re.sub(r"data_(\w+?)__\w+\(", r"\1(", str(keep))
    return re.sub(r"\bb0\b", "b", text)


def keep_predicate(sym: Sym, roles: tuple[str, ...], fill_is_keep: bool = False) -> Any:
    """The predicate of a bool mask (or its negation) with its dims renamed to site roles."""
    expr = in_roles(sym, roles)
    pred = to_bool(expr)
    return sympy.Not(pred) if fill_is_keep else pred


def additive_keep(sym: Sym, roles: tuple[str, ...], is_exclusion: Callable[[float], bool]) -> Any | None:
    """For an additive mask of 0 / exclusion values: where it is 0. None if it is a real bias."""
    expr = in_roles(sym, roles)
    if expr == 0:
        return sympy.true
    if not isinstance(expr, sympy.Piecewise):
        return None
    keep, remaining = sympy.false, sympy.true
    for value, cond in expr.args:
        if value == 0:
            keep = sympy.Or(keep, sympy.And(remaining, cond))
        elif not (value.is_number and is_exclusion(float(value))):
            return None
        remaining = sympy.And(remaining, sympy.Not(cond))
    return keep


def exclusion_values(sym: Sym, roles: tuple[str, ...]) -> set[float]:
    """The values an additive 0/exclusion mask (one `additive_keep` accepts) gives excluded scores."""
    expr = in_roles(sym, roles)
    if not isinstance(expr, sympy.Piecewise):
        return set()
    return {float(value) for value, _ in expr.args if value != 0}


def conjunction(predicates: list[Any]) -> Any:
    return reduce(sympy.And, predicates, sympy.true)


__all__ = ["additive_keep", "classify", "conjunction", "exclusion_values", "keep_predicate"]
