"""Counts over many checked programs: rewritten, kept by reason, misses by reason, failures by class."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .grammar import Block, Program
from .oracle import FAILURES, Outcome


def features(program: Program, block: Block) -> list[str]:
    """`name=value` for every choice that shaped a block, to say what its misses have in common."""
    scale = block.scale
    found = [f"dtype={program.dtype}", f"projection={block.projection}", f"kv_heads={block.kv_heads}",
             f"gqa={block.gqa}", f"layout={block.layout}", f"softcap={block.softcap}",
             f"scale={scale.placement}/{scale.form}", f"softmax={block.softmax}", f"upcast={block.upcast}",
             f"dropout={block.dropout}", f"sink={block.sink}"]
    if block.einsum:
        found.append(f"einsum.scores={block.einsum.scores}")
    for term in block.terms:
        found += [f"term={term.family}", f"term={term.family}/{term.spelling}"]
        found += [f"mask.apply={term.apply}", f"mask.fill={term.fill}"] if not term.is_bias else []
    return found


def failure_class(kind: str, detail: str, where: str) -> str:
    """A failure's class: its kind, stage and message with names and numbers blanked."""
    text = re.sub(r"\b[a-z_]+_\d+\b", "<node>", detail)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    stage = "report" if where.startswith(("optimize", "specialization")) and kind != "CRASH" else re.sub(r"\d+", "N", where)
    return f"{kind} [{stage}] {text[:160]}"


@dataclass
class Tally:
    programs: int = 0
    unsatisfiable: int = 0
    seconds: float = 0.0
    positives: int = 0
    rewritten: int = 0
    near_misses: int = 0
    statuses: Counter = field(default_factory=Counter)  # every block not rewritten: "STATUS CODE"
    misses: Counter = field(default_factory=Counter)  # positive blocks not rewritten, by code
    miss_features: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    positive_features: Counter = field(default_factory=Counter)
    notices: Counter = field(default_factory=Counter)
    notice_classes: Counter = field(default_factory=Counter)  # notices by class, e.g. which code a near-miss got
    failures: Counter = field(default_factory=Counter)  # by kind
    classes: dict[str, list[tuple[str, Outcome]]] = field(default_factory=lambda: defaultdict(list))
    restored: list[str] = field(default_factory=list)  # keys of programs where verification caught a bad rewrite

    def add(self, key: str, outcome: Outcome) -> None:
        self.programs += 1
        self.seconds += outcome.seconds
        program = outcome.case.program
        for result, block in zip(outcome.blocks, program.blocks):
            label = result.status + (f" {result.code}" if result.code else "")
            if result.status == "RESTORED":
                self.restored.append(key)
            if result.status != "REWRITTEN":
                self.statuses[label] += 1
            if result.near_miss:
                self.near_misses += 1
                continue
            self.positives += 1
            self.positive_features.update(features(program, block))
            if result.status == "REWRITTEN":
                self.rewritten += 1
            else:
                self.misses[label] += 1
                self.miss_features[label].update(features(program, block))
        for finding in outcome.findings:
            if finding.kind in FAILURES:
                self.failures[finding.kind] += 1
                self.classes[failure_class(finding.kind, finding.detail, finding.where)].append((key, outcome))
            else:
                self.notices[finding.kind] += 1
                self.notice_classes[failure_class(finding.kind, finding.detail.split(": ")[0], finding.where)] += 1

    def common_features(self, label: str, top: int = 3) -> list[str]:
        """The features most over-represented among a miss code's blocks (held by at least half)."""
        count = self.misses[label]
        seen = self.miss_features[label]
        lifted = [(n / count / (self.positive_features[f] / self.positives), f) for f, n in seen.items()
                  if n >= count / 2]
        return [f"{f} ({seen[f]}/{count})" for _, f in sorted(lifted, reverse=True)[:top]]

    def summary(self) -> str:
        lines = [f"programs: {self.programs} ({self.seconds:.0f} s, {self.seconds / max(self.programs, 1):.1f} s each;"
                 f" {self.unsatisfiable} draws redrawn)",
                 f"positive blocks: {self.positives}, rewritten: {self.rewritten}; near-miss blocks: {self.near_misses}",
                 f"WRONG outputs: {self.failures['WRONG']}   CRASHES: {self.failures['CRASH']}",
                 "failures by kind: " + (", ".join(f"{k} {n}" for k, n in self.failures.most_common()) or "none"),
                 "notices: " + (", ".join(f"{k} {n}" for k, n in self.notices.most_common()) or "none"),
                 *[f"  {n:5d}  {name}" for name, n in self.notice_classes.most_common()],
                 "", "not rewritten, by status and reason (all blocks):"]
        lines += [f"  {n:5d}  {label}" for label, n in self.statuses.most_common()]
        lines += ["", "misses (positive blocks not rewritten), by reason, with what they share:"]
        lines += [f"  {n:5d}  {label}: {', '.join(self.common_features(label))}" for label, n in self.misses.most_common()]
        if self.restored:
            lines += ["", "RESTORED (a rewrite that verification rejected; replay to see why): " + " ".join(self.restored)]
        lines += ["", f"failure classes: {len(self.classes)}"]
        for name, members in sorted(self.classes.items(), key=lambda item: -len(item[1])):
            lines.append(f"  {len(members):4d}  {name}  (e.g. {members[0][0]})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"programs": self.programs, "seconds": round(self.seconds, 1), "positives": self.positives,
                "rewritten": self.rewritten, "near_misses": self.near_misses, "statuses": dict(self.statuses),
                "misses": dict(self.misses), "failures": dict(self.failures), "notices": dict(self.notices),
                "restored": self.restored,
                "classes": {name: [{"key": key, "findings": [f.__dict__ for f in o.findings], "source": o.case.source}
                                   for key, o in members] for name, members in self.classes.items()}}
