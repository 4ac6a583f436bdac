"""How many passes over K/V a cascade needs, and how often it re-reads each input (FuseMax, Nayak et al.
2024, §III).

FuseMax's definition: a pass is one traversal of a fiber of the key rank; a chain of read-after-
read dependencies of length L forces L + 1 passes under every mapping. We walk the dependency graph
in topological order, carrying for each tensor `(k, complete)`: available while streaming pass k
(complete = 0) or only after pass k has finished (complete = 1). A *heavy* Einsum (it iterates the
key rank, or its inner tile n0) that reads a complete value has to start a new pass; *light* ones
(only n1, or no key rank: statistics between passes, epilogues) are free.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .einsums import Einsum, EinsumCascade


@dataclass(frozen=True)
class PassAnalysis:
    """Passes and re-reads of one cascade."""

    cascade: str
    passes: int
    level: dict[str, int]  # heavy Einsum -> the pass it runs in
    reads: dict[str, int]  # source with a key rank -> passes that (re)read it, with recompute

    def __str__(self) -> str:
        by_pass: dict[int, list[str]] = {}
        for name, lvl in self.level.items():
            by_pass.setdefault(lvl, []).append(name)
        rows = [f"pass {p}: {', '.join(names)}" for p, names in sorted(by_pass.items())]
        reads = ", ".join(f"{t}x{n}" for t, n in sorted(self.reads.items()))
        return f"{self.cascade}: {self.passes} pass(es) [{'; '.join(rows)}] re-reads: {reads or '-'}"


def _key_ranks(cascade: EinsumCascade) -> frozenset[str]:
    return frozenset({"n1", "n0"}) if cascade.tiled else frozenset({"n"})


def _heavy(e: Einsum) -> bool:
    return bool({"n", "n0"} & e.ranks)


def _keeps(e: Einsum) -> bool:
    return bool({"n", "n1"} & e.output.ranks)


def analyze(cascade: EinsumCascade) -> PassAnalysis:
    """Pass count, per-Einsum pass level and re-read counts of every key-ranked source."""
    g = cascade.graph
    key = _key_ranks(cascade)
    sources = cascade.sources
    avail: dict[str, tuple[int, int]] = {}
    level: dict[str, int] = {}
    for name in nx.topological_sort(g):
        e: Einsum = g.nodes[name]["einsum"]
        c = [(0, 1)]  # values that depend on no key-ranked input (Q, constants)
        c += [(1, 0) for a in e.reads if a.tensor in sources and sources[a.tensor] & key]
        for p in g.predecessors(name):
            k, ph = avail[p]
            c.append((k, 1 if g.edges[p, name]["final"] else ph))
        if _heavy(e):
            lvl = max(1, max(k + ph for k, ph in c))
            level[name] = lvl
            avail[name] = (lvl, 0 if _keeps(e) else 1)
        else:
            k, ph = max(c)
            avail[name] = (k, 1 if ("n1" in e.ranks and not _keeps(e)) else ph)
    reads = {t: len(_levels_reading(cascade, level, t)) for t, r in sources.items() if r & key}
    return PassAnalysis(cascade.name, max(level.values(), default=0), level, reads)


def _levels_reading(cascade: EinsumCascade, level: dict[str, int], tensor: str) -> set[int]:
    """Passes whose heavy Einsums read `tensor`, directly or through streamed heavy values
    (which a fused kernel recomputes instead of storing)."""
    g = cascade.graph
    memo: dict[str, bool] = {}

    def reaches(name: str) -> bool:
        if name not in memo:
            e: Einsum = g.nodes[name]["einsum"]
            memo[name] = any(a.tensor == tensor for a in e.reads) or any(
                _heavy(g.nodes[p]["einsum"]) and _keeps(g.nodes[p]["einsum"]) and reaches(p)
                for p in g.predecessors(name))
        return memo[name]

    return {lvl for name, lvl in level.items() if reaches(name)}
