"""The rewrite report: one entry per softmax (and per SDPA already in the graph), saying where it
is, what matched, what replaced it and why, the predicted costs, and the measured error.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from attnfx.cost_model.spec import AttentionSpec
from attnfx.passes import ops
from attnfx.passes.attention import RULES
from attnfx.passes.site import Alibi, Refusal, Site

from .decide import Decision

SCHEMA = "attnfx.report/1"
STATUSES = ("REWRITTEN", "REFUSED", "KEPT", "ALREADY_FUSED", "RESTORED")


@dataclass(frozen=True)
class CandidateRow:
    variant: str
    lowering: str
    algorithm: str
    predicted_ms: float
    hbm_mb: float
    peak_mb: float


@dataclass(frozen=True)
class SiteEntry:
    """What attnfx decided for one softmax, and why (built once, by `entry()`)."""

    index: int
    node: str
    module_path: str
    source: str
    rule: str
    status: str
    reason_code: str | None = None
    reason: str = ""
    failed_stage: str | None = None
    variant: str | None = None
    lowering: str | None = None
    spec: AttentionSpec | None = None
    cascade: str | None = None
    mask: str = ""
    alibi: str = ""  # the bias term proven ALiBi, or why no bias term is (its reason code first)
    candidates: list[CandidateRow] = field(default_factory=list)
    unavailable: list[tuple[str, str, str]] = field(default_factory=list)  # (variant, lowering, why)
    why: str = ""
    error: float | None = None
    replacement: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = _spec_dict(self.spec)
        data["unavailable"] = [{"variant": v, "lowering": lo, "reason": r} for v, lo, r in self.unavailable]
        return data


def _spec_dict(spec: AttentionSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    data = asdict(spec)
    data["causal"] = spec.causal.value
    data["mask"] = spec.mask.value
    data["dynamic"] = sorted(spec.dynamic)
    data["mask_shape"] = list(spec.mask_shape) if spec.mask_shape else None
    return data


@dataclass(frozen=True)
class Outcome:
    """What became of a site after its decision: its final status, and for an emitted one the
    verification's error, the refusal that restored it, or the node that replaced it."""

    status: str
    error: float | None = None
    refusal: Refusal | None = None
    replacement: str | None = None


_DECIDED_STATUS = {"REFUSED": "REFUSED", "KEPT": "KEPT", "ALREADY_FUSED": "ALREADY_FUSED"}


def entry(decision: Decision, outcome: Outcome | None = None, module_prefix: str = "") -> SiteEntry:
    """The report entry of one decision (and, for a chosen site, of its outcome)."""
    node, selection = decision.node, decision.selection
    refusal = outcome.refusal if outcome is not None and outcome.refusal is not None else decision.refusal
    status = outcome.status if outcome is not None else _DECIDED_STATUS[decision.status]
    reason = ""
    if decision.status == "ALREADY_FUSED":
        reason = "the model already calls scaled_dot_product_attention here"
    chosen = decision.variant is not None
    return SiteEntry(
        index=decision.index, node=node.name, module_path=ops.module_path(node).removeprefix(module_prefix),
        source=ops.source_line(node), rule=RULES.get(ops.kind(node), "attention.softmax"), status=status,
        reason_code=refusal.code.value if refusal is not None else None,
        reason=refusal.message if refusal is not None else reason,
        failed_stage=refusal.stage if refusal is not None else None,
        variant=decision.variant.name if chosen else None,
        lowering=decision.lowering.name if chosen else None,
        spec=decision.spec, cascade=decision.cascade,
        mask=decision.site.facts.text if decision.site is not None else "",
        alibi=_alibi_text(decision.site),
        candidates=[CandidateRow(c.option.variant, c.option.lowering, c.option.algorithm, c.predicted_s * 1e3,
                                 c.hbm_bytes / 2**20, c.peak_bytes / 2**20) for c in selection.ranked]
        if selection else [],
        unavailable=[(o.variant, o.lowering, o.refusal or "") for o in selection.refused] if selection else [],
        why=selection.why if selection else "",
        error=outcome.error if outcome is not None else None,
        replacement=outcome.replacement if outcome is not None else None,
    )


def _alibi_text(site: Site | None) -> str:
    proof = site.alibi if site is not None else None
    if proof is None:
        return ""
    return proof.text if isinstance(proof, Alibi) else f"{proof.code.value}: {proof.message}"


@dataclass
class Report:
    """Every decision attnfx made for one model; `print()` it or `to_json()` it."""

    model: str
    capture: str
    entries: list[SiteEntry] = field(default_factory=list)
    end_to_end_error: float | None = None
    optimize_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for e in self.entries if e.status == status)

    @property
    def rewritten(self) -> int:
        return self.count("REWRITTEN")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({
            "schema": SCHEMA,
            "model": self.model,
            "capture": self.capture,
            "summary": {s: self.count(s) for s in STATUSES},
            "end_to_end_error": self.end_to_end_error,
            "optimize_seconds": round(self.optimize_seconds, 3),
            "notes": self.notes,
            "entries": [e.to_dict() for e in self.entries],
        }, indent=indent)

    def __str__(self) -> str:
        return format_report(self)


def format_report(report: Report, details: bool = True) -> str:
    summary = ", ".join(f"{report.count(s)} {s.lower()}" for s in STATUSES if report.count(s))
    lines = [f"attnfx report for {report.model} (captured with {report.capture}): "
             f"{len(report.entries)} site(s): {summary or 'none'}"]
    if report.end_to_end_error is not None:
        lines.append(f"end-to-end max abs error vs the original on the example inputs: {report.end_to_end_error:.3g}")
    lines += [f"note: {n}" for n in report.notes]
    header = f"{'#':>3}  {'status':<13} {'where':<34} {'what':<44} {'error':>9}"
    lines += ["", header, "-" * len(header)]
    for e in report.entries:
        where = (e.module_path or "<root>") + (f" ({e.source})" if e.source else "")
        what = f"{e.variant} [{e.lowering}]" if e.status == "REWRITTEN" else (e.reason_code or e.status)
        error = f"{e.error:.2e}" if e.error is not None else "-"
        lines.append(f"{e.index:>3}  {e.status:<13} {where[:34]:<34} {what[:44]:<44} {error:>9}")
    if details:
        for e in report.entries:
            lines += [""] + _entry_details(e)
    return "\n".join(lines)


def _entry_details(e: SiteEntry) -> list[str]:
    lines = [f"[{e.index}] {e.status} {e.node} in {e.module_path or '<root>'}" + (f" at {e.source}" if e.source else "")]
    if e.reason:
        stage = f" (stage {e.failed_stage})" if e.failed_stage else ""
        lines.append(f"    reason: {e.reason_code}{stage}: {e.reason}")
    if e.spec is not None:
        lines.append(f"    site: {e.spec.describe()}")
    if e.mask:
        lines.append(f"    mask proof: {e.mask}")
    if e.alibi:
        lines.append(f"    bias: {e.alibi}")
    if e.cascade:
        lines += ["    " + line for line in e.cascade.splitlines()]
    if e.candidates:
        lines.append("    candidates (predicted):")
        for c in e.candidates:
            mark = "*" if (c.variant, c.lowering) == (e.variant, e.lowering) else " "
            lines.append(f"     {mark} {c.variant:<16} {c.lowering:<10} {c.algorithm:<16} {c.predicted_ms:>9.3f} ms "
                         f"{c.hbm_mb:>9.2f} MB moved {c.peak_mb:>9.2f} MB live")
    shown = set()
    for variant, lowering, why in e.unavailable:
        if (variant, why) not in shown:  # one line per variant and reason, not per lowering
            shown.add((variant, why))
            lines.append(f"       {variant:<16} {lowering:<10} unavailable: {why}")
    if e.why:
        lines.append(f"    why: {e.why}")
    return lines
