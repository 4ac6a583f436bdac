"""Cascades as data: each Einsum is one line of EDGE-style text, parsed into ranks and edges.

Writing a cascade as EDGE-style strings (`SN[m,n] = exp(QK[m,n] - GM[m])`) keeps the
table readable and makes adding an algorithm a matter of data. The notation:

- `T[i,j]` names a tensor and its ranks; `T[]` is a scalar.
- The output of a recurrence carries `r+1` (`RM[m,n1+1] = max(RM[m,n1], LM[m,n1])`): reading it at
  `r` is the loop-carried value (no dependency edge), at `r+1` the current one.
- Reading a tensor at an upper-case rank (`RNV[m,f,C]`) reads its *final* value after the
  recurrence stops: the consumer has to wait for the whole traversal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import networkx as nx

_ACCESS = re.compile(r"([A-Za-z_]\w*)\[([^\]]*)\]")


@dataclass(frozen=True)
class Access:
    """One tensor reference inside an Einsum line."""

    tensor: str
    indices: tuple[str, ...]

    @property
    def ranks(self) -> frozenset[str]:
        return frozenset(i.removesuffix("+1") for i in self.indices if i[:1].islower())

    @property
    def steps(self) -> bool:
        """Written at `r+1`: the output of a recurrence, or a read of its current value."""
        return any(i.endswith("+1") for i in self.indices)

    @property
    def final(self) -> bool:
        return any(i[:1].isupper() for i in self.indices)


@dataclass(frozen=True)
class Einsum:
    """One Einsum of a cascade, parsed from `OUT[...] = expression over IN[...]`."""

    text: str

    @cached_property
    def _accesses(self) -> tuple[Access, ...]:
        found = tuple(Access(name, tuple(i.strip() for i in idx.split(",") if i.strip()))
                      for name, idx in _ACCESS.findall(self.text))
        if not found or "=" not in self.text or not self.text.split("=", 1)[0].strip().startswith(found[0].tensor):
            raise ValueError(f"not an Einsum line: {self.text!r}")
        return found

    @property
    def output(self) -> Access:
        return self._accesses[0]

    @property
    def reads(self) -> tuple[Access, ...]:
        return self._accesses[1:]

    @property
    def name(self) -> str:
        return self.output.tensor

    @property
    def ranks(self) -> frozenset[str]:
        """The iteration space: every rank the Einsum visits (finals excluded)."""
        out = set(self.output.ranks)
        for a in self.reads:
            out |= a.ranks
        return frozenset(out)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class EinsumCascade:
    """A named list of Einsums; sources are the tensors no Einsum produces (Q, K, V, masks)."""

    name: str
    einsums: tuple[Einsum, ...]
    note: str = ""

    @staticmethod
    def of(name: str, *lines: str, note: str = "") -> "EinsumCascade":
        cascade = EinsumCascade(name, tuple(Einsum(t) for t in lines), note)
        cascade.graph  # validate now: duplicate outputs or cycles are errors in the table
        return cascade

    @cached_property
    def producers(self) -> dict[str, Einsum]:
        out: dict[str, Einsum] = {}
        for e in self.einsums:
            if e.name in out:
                raise ValueError(f"{self.name}: {e.name} is produced twice")
            out[e.name] = e
        return out

    @property
    def sources(self) -> dict[str, frozenset[str]]:
        """Input tensors and their ranks."""
        found: dict[str, frozenset[str]] = {}
        for e in self.einsums:
            for a in e.reads:
                if a.tensor not in self.producers:
                    found[a.tensor] = found.get(a.tensor, frozenset()) | a.ranks
        return found

    @property
    def tiled(self) -> bool:
        return any({"n0", "n1"} & e.ranks for e in self.einsums)

    @cached_property
    def graph(self) -> nx.DiGraph:
        """Producer -> consumer edges; `final` marks reads of a recurrence's last value.

        A read of an iterative tensor at the previous coordinate is loop-carried and adds no
        edge (FuseMax: recurrences get no self-edge), so the graph stays acyclic.
        """
        g = nx.DiGraph()
        for e in self.einsums:
            g.add_node(e.name, einsum=e)
        for e in self.einsums:
            for a in e.reads:
                producer = self.producers.get(a.tensor)
                if producer is None:
                    continue
                carried = producer.output.steps and not a.steps and not a.final
                if carried:
                    continue
                final = a.final or g.get_edge_data(a.tensor, e.name, {}).get("final", False)
                g.add_edge(a.tensor, e.name, final=final)
        if not nx.is_directed_acyclic_graph(g):
            raise ValueError(f"{self.name}: the dependency graph has a cycle: {nx.find_cycle(g)}")
        return g

    def __str__(self) -> str:
        head = f"{self.name}" + (f"  ({self.note})" if self.note else "")
        return "\n".join([head] + [f"  {e}" for e in self.einsums])
