"""attnfx's invariant, checked on one generated program.

`optimize()` raises nothing but `CaptureError`; every softmax-like site of every block is in the
report; a near-miss is never REWRITTEN at the example (in a length-1 specialisation it may be exact
attention); the optimised module equals eager at the example, another batch and length, and an
edge shape (length 1: a re-specialisation); every status and reason code is
one the README documents; and the report agrees with the graph (one fused call per REWRITTEN entry,
an explicit softmax left in the graph for every explicit site that was not rewritten) — in the
returned module and in every specialisation it made.
"""
from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
from torch.utils import _pytree as pytree

import attnfx
from attnfx import kernels
from attnfx.report import STATUSES

from .grammar import Program
from .mutations import MUTATIONS
from .render import Case, build

README = Path(__file__).resolve().parents[2] / "README.md"
FAILURES = ("CRASH", "WRONG", "NEAR_MISS_REWRITTEN", "UNREPORTED", "EXTRA_ENTRIES", "COUNT_MISMATCH",
            "UNDOCUMENTED", "GENERATOR_ERROR", "ORACLE_ERROR")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of FAILURES, or a notice: CAPTURE_ERROR (documented), UNEXPECTED_CODE (kept, another
    # code), EAGER_NAN (the model's own outputs hold nan, e.g. a row with every key excluded by -inf)
    detail: str
    where: str = ""


@dataclass(frozen=True)
class BlockOutcome:
    """What the report says about one block: REWRITTEN, a status with its code, or UNREPORTED."""

    index: int
    near_miss: bool
    status: str
    code: str | None = None


@dataclass
class Outcome:
    case: Case
    blocks: list[BlockOutcome] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in FAILURES]

    def portable(self) -> Outcome:
        """This outcome without the program's executed namespace (its model and functions), so it pickles
        back from a worker process."""
        return replace(self, case=replace(self.case, namespace={}))

    def explain(self) -> str:
        """The failures and the program's source, ready to paste into a regression test."""
        lines = [f"{f.kind} [{f.where}]: {f.detail}" for f in self.findings]
        return "\n".join(lines + ["", "# --- program ---", self.case.source])


@lru_cache(maxsize=1)
def documented_codes() -> frozenset[str]:
    """The reason codes in the README's reason-code table (the first column of its rows)."""
    text = README.read_text()
    table = text[text.index("| code | meaning |"):]
    table = table[:table.index("\n\n")]
    return frozenset(code for row in table.splitlines()[2:] for code in re.findall(r"`([A-Z_]+)`", row.split("|")[1]))


def check(program: Program) -> Outcome:
    started = time.perf_counter()
    case = build(program)
    outcome = Outcome(case)
    try:
        with without_fake_tensor_cache():
            _check(case, outcome)
    except Exception as exc:  # noqa: BLE001 - the oracle's own bug: recorded, so a long run goes on
        outcome.findings.append(Finding("ORACLE_ERROR", _short(exc, with_frame=True), "oracle"))
    finally:
        outcome.seconds = time.perf_counter() - started
    return outcome


def without_fake_tensor_cache() -> Any:
    """Captures with fake-tensor dispatch caching off: a fuzz program's ops rarely repeat with the same
    symbolic shapes, so building and validating cache entries costs more than the hits save (export
    then takes about half the time). The cache is an optimisation only: what is captured is the same."""
    return dynamo_config.patch(fake_tensor_cache_enabled=False)


def _check(case: Case, outcome: Outcome) -> None:
    ns = case.namespace
    model = ns["make_model"]()
    inputs = [ns["example_inputs"](*shape) for shape in ns["SHAPES"]]
    try:
        expected = [_run(model, args, kwargs) for args, kwargs in inputs]
    except Exception as exc:  # noqa: BLE001 - the generator wrote a program that does not run
        outcome.findings.append(Finding("GENERATOR_ERROR", _short(exc), "eager"))
        return
    if any(bool(t.isnan().any()) for t in pytree.tree_leaves(expected[0]) if isinstance(t, torch.Tensor)):
        outcome.findings.append(Finding("EAGER_NAN", "the model's outputs at the example inputs hold nan", "eager"))
    try:
        opt = attnfx.optimize(model, *inputs[0])
    except attnfx.CaptureError as exc:
        outcome.findings.append(Finding("CAPTURE_ERROR", _short(exc), "optimize"))
        return
    except Exception as exc:  # noqa: BLE001 - anything else escaping attnfx is a crash
        outcome.findings.append(Finding("CRASH", _short(exc, with_frame=True), "optimize"))
        return
    outcome.blocks = _block_outcomes(case.program, opt.report)
    _check_report(case.program, opt, outcome, "optimize")
    for shape, (args, kwargs), want in zip(ns["SHAPES"], inputs, expected):
        where = f"shape {tuple(shape)}"
        try:
            got = _run(opt, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            outcome.findings.append(Finding("CRASH", _short(exc, with_frame=True), where))
            continue
        mismatch = _compare(got, want, case.tolerance)
        if mismatch:
            outcome.findings.append(Finding("WRONG", mismatch, where))
    for i, specialization in enumerate(opt.specializations):
        _check_report(case.program, specialization, outcome, f"specialization {i}")


def _run(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return module(*args, **kwargs)


def _compare(got: Any, want: Any, tolerance: dict[str, float]) -> str:
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return f"{len(got_leaves)} outputs, eager returns {len(want_leaves)}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        try:
            torch.testing.assert_close(g, w, equal_nan=True, **tolerance)
        except AssertionError as exc:
            if _ill_conditioned_match(g, w):
                continue
            nan = " (nan where eager is finite, or the reverse)" if bool((g.isnan() != w.isnan()).any()) else ""
            return f"output {i}{nan}: " + " ".join(str(exc).split())[:300]
    return ""


HUGE = 1e6  # outputs this large come from exclusion values (-1e9) reaching the output: rounding noise
# of one ulp there swamps small entries that cancel, so those outputs are compared norm-wise


def _ill_conditioned_match(got: torch.Tensor, want: torch.Tensor) -> bool:
    """An output holding huge values (e.g. log-probabilities of masked keys times V) matches when its
    error is within float rounding of its largest entry."""
    if not (got.is_floating_point() and want.is_floating_point()) or got.shape != want.shape:
        return False
    finite = want.isfinite() & got.isfinite()
    if not bool((got.isfinite() == want.isfinite()).all()) or not bool(finite.any()):
        return False
    largest = float(want[finite].abs().max())
    error = float((got[finite].double() - want[finite].double()).abs().max())
    return largest > HUGE and error <= 1e-6 * largest


def _entries_of(report: attnfx.Report, block: int) -> list[attnfx.SiteEntry]:
    name = f"attn{block}"
    return [e for e in report.entries if e.module_path == name or e.module_path.startswith(name + ".")]


def _block_outcomes(program: Program, report: attnfx.Report) -> list[BlockOutcome]:
    outcomes = []
    for i, block in enumerate(program.blocks):
        entries = _entries_of(report, i)
        if not entries:
            status = "NO_SITE" if 0 in block.expected_sites else "UNREPORTED"
            outcomes.append(BlockOutcome(i, bool(block.mutation), status))
            continue
        entry = next((e for e in entries if e.status == "REWRITTEN"), entries[0])
        outcomes.append(BlockOutcome(i, bool(block.mutation), entry.status, entry.reason_code))
    return outcomes


def _check_report(program: Program, opt: attnfx.OptimizedModule, outcome: Outcome, where: str) -> None:
    report, findings = opt.report, outcome.findings
    codes = documented_codes()
    for entry in report.entries:
        if entry.status not in STATUSES:
            findings.append(Finding("UNDOCUMENTED", f"status {entry.status!r} of {entry.node}", where))
        elif entry.status not in ("REWRITTEN", "ALREADY_FUSED") and entry.reason_code not in codes:
            findings.append(Finding("UNDOCUMENTED", f"{entry.status} {entry.node} with reason code "
                                    f"{entry.reason_code!r}, which the README's table does not list", where))
    attributed = 0
    for i, block in enumerate(program.blocks):
        entries = _entries_of(report, i)
        attributed += len(entries)
        allowed = block.expected_sites
        if len(entries) < min(allowed):
            findings.append(Finding("UNREPORTED", f"attn{i} has {min(allowed)} softmax-like site(s) "
                                    f"({block.softmax}), the report lists {len(entries)}", where))
        elif len(entries) > max(allowed):
            findings.append(Finding("EXTRA_ENTRIES", f"attn{i} has {max(allowed)} softmax-like site(s), "
                                    f"the report lists {len(entries)}", where))
        if block.mutation and where == "optimize":  # at an edge shape's specialization (length 1) a near-miss
            # can be exact attention (a 1x1 `tril` multiplies by 1): there the outputs alone are checked
            _check_near_miss(block.mutation, i, entries, findings, where)
    if attributed != len(report.entries):
        findings.append(Finding("EXTRA_ENTRIES", f"{len(report.entries) - attributed} report entries name no "
                                "attention block: " + ", ".join(f"{e.node}@{e.module_path!r}" for e in report.entries), where))
    _check_graph(program, opt, findings, where)


def _check_near_miss(mutation: str, index: int, entries: list, findings: list[Finding], where: str) -> None:
    expected = MUTATIONS[mutation].codes
    for entry in entries:
        if entry.status == "REWRITTEN":
            findings.append(Finding("NEAR_MISS_REWRITTEN", f"attn{index} ({mutation}) was rewritten "
                                    f"to {entry.variant} [{entry.lowering}]", where))
        elif expected and entry.reason_code not in expected:
            findings.append(Finding("UNEXPECTED_CODE", f"attn{index} ({mutation}) kept as {entry.reason_code}, "
                                    f"expected one of {sorted(expected)}: {entry.reason}", where))


def _check_graph(program: Program, opt: attnfx.OptimizedModule, findings: list[Finding], where: str) -> None:
    report, graph = opt.report, opt.graph_module.graph
    fused = sum(1 for n in graph.nodes if _is_fused(n))
    if fused != report.rewritten:
        findings.append(Finding("COUNT_MISMATCH", f"the report says {report.rewritten} REWRITTEN, the graph "
                                f"holds {fused} fused attention call(s)", where))
    softmaxes = sum(1 for n in graph.nodes if n.op == "call_function" and "softmax" in str(n.target))
    left = 0
    for i, block in enumerate(program.blocks):
        explicit = not block.handwritten and not (block.mutation and MUTATIONS[block.mutation].normalise)
        rewritten = any(e.status == "REWRITTEN" for e in _entries_of(report, i))
        left += explicit and not rewritten
    if softmaxes != left:
        findings.append(Finding("COUNT_MISMATCH", f"{left} explicit softmax site(s) were not rewritten, the graph "
                                f"holds {softmaxes} softmax node(s)", where))


def _is_fused(node: torch.fx.Node) -> bool:
    """An attention call some variant reads back: SDPA or any attnfx op. A reader that raises has
    recognised its op in a call it cannot restate as a spec (long6: padded_attention with fill -1e9)."""
    for variant in kernels.VARIANTS:
        try:
            if variant.read(node) is not None:
                return True
        except ValueError:
            return True
    return False


def _short(exc: BaseException, with_frame: bool = False) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    if with_frame:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/site-packages/torch/" not in f.filename]
        if frames:
            text += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})"
    return text
