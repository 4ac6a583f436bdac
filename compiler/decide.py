"""One decision per softmax in a graph: lift it, price its options, and choose — or say why not.

A `Decision` is frozen: the report entry is built from it once, after verification, so what the
report says is exactly what was decided. Any unexpected exception while lifting or choosing one
site becomes that site's `INTERNAL_ERROR` refusal; the rest of the model is still optimised.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, replace
from typing import Callable

from torch.fx import Graph, Node

from attnfx.cost_model.cascade import canonical_cascade
from attnfx.cost_model.hardware import HardwareProfile
from attnfx.cost_model.algorithms import EAGER_BY_KIND
from attnfx.cost_model.select import Option, Selection, choose
from attnfx.cost_model.spec import AttentionSpec
from attnfx.kernels import Variant
from attnfx.passes import ops
from attnfx.passes.attention import RULES, lift
from attnfx.passes.linear import ANCHORS as LINEAR_ANCHORS, NOT_ATTENTION, feature_maps, lift_linear
from attnfx.passes.mask_eval import MaskEvaluator
from attnfx.passes.sdpa_sites import lift_sdpa
from attnfx.passes.emit import SINK_OP
from attnfx.passes.site import Lowering, Reason, Refusal, Site


@dataclass(frozen=True)
class Planning:
    """What the selection prices against: the target, the device variants must run on there, the
    memory budget, the variants the user allows, and whether the model's own code may win."""

    target: str | HardwareProfile
    device: str
    memory_budget: float | None
    candidates: tuple[Variant, ...]
    exact_dropout: bool = False  # keep eager's random dropout stream: never fuse training dropout
    eager: bool = True  # whether the model's own code may win


@dataclass(frozen=True)
class Decision:
    """What attnfx decided for one softmax (or SDPA call) before anything was emitted."""

    index: int
    node: Node
    status: str  # "CHOSEN" | "REFUSED" | "KEPT" | "ALREADY_FUSED"
    refusal: Refusal | None = None
    site: Site | None = None
    selection: Selection | None = None
    lowering: Lowering | None = None
    variant: Variant | None = None
    runners_up: tuple[tuple[Lowering, Variant], ...] = ()  # the next fastest replacements, in order
    rejected: tuple[str, ...] = ()  # the replacements verification rejected before this one, and why

    def next_choice(self, why: str) -> Decision | None:
        """This decision with the next fastest replacement of another variant, after verification
        rejected this one for `why`; None when the model's own code comes next (or nothing does)."""
        failed = f"{self.variant.name} [{self.lowering.name}] ({why})"
        rest = [(lowering, variant) for lowering, variant in self.runners_up if variant.name != self.variant.name]
        if not rest:
            return None
        (lowering, variant), *rest = rest
        return replace(self, lowering=lowering, variant=variant, runners_up=tuple(rest),
                       rejected=(*self.rejected, failed))

    @property
    def spec(self) -> AttentionSpec | None:
        """The spec of what replaces the site, or of the site as written when nothing does."""
        if self.lowering is not None:
            return self.lowering.spec
        return self.site.lowerings[-1].spec if self.site is not None else None

    @property
    def cascade(self) -> str | None:
        spec = self.spec
        return None if spec is None else str(canonical_cascade(spec, tuple(n.name for n in self.site.nodes)))


def decide_all(graph: Graph, evaluator: MaskEvaluator, planning: Planning,
               escaped: dict[Node, str] | None = None) -> list[Decision]:
    """A decision for every softmax and every existing SDPA call, in graph order; `escaped` are
    hand-written softmaxes (their probabilities) that are listed and refused with the reason given."""
    decisions: list[Decision] = []
    escaped = escaped or {}
    for node in list(graph.nodes):
        k = ops.kind(node)
        if node in escaped:
            decisions.append(Decision(len(decisions), node, "REFUSED",
                                      Refusal(Reason.PROBS_ESCAPE, escaped[node], "softmax")))
        elif k == "sdpa":
            decisions.append(guarded(len(decisions), node, "match",
                                     lambda index, n: _reexamine_sdpa(index, n, evaluator, planning)))
        elif k in RULES:
            decision = guarded(len(decisions), node, "match", lambda index, n: _decide(index, n, evaluator, planning))
            if _listed(k, decision):
                decisions.append(decision)
    maps = {n for d in decisions if d.site is not None for n in feature_maps(d.site)}
    kept = [d for d in decisions if not (d.node in maps and d.site is None and d.refusal.stage == NOT_ATTENTION)]
    return [replace(d, index=i) for i, d in enumerate(kept)]


def _listed(kind: str, decision: Decision) -> bool:
    """Every softmax is listed (but a softmax over the features of a linear site's q or k, see
    decide_all); a sigmoid of anything but query-key scores, and a contraction that is
    not linear attention (a refusal at stage "QK"), are not attention and are not."""
    if kind not in ("sigmoid", *LINEAR_ANCHORS) or decision.site is not None:
        return True
    return decision.refusal.stage != NOT_ATTENTION


def guarded(index: int, node: Node, stage: str, step: Callable[[int, Node], Decision]) -> Decision:
    """`step(index, node)`, or an INTERNAL_ERROR refusal naming the exception it raised."""
    try:
        return step(index, node)
    except Exception as exc:  # noqa: BLE001 - one site's bug must not take the model down
        return Decision(index, node, "REFUSED", internal_error(exc, stage))


def internal_error(exc: Exception, stage: str) -> Refusal:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    text = str(exc).strip().splitlines()
    return Refusal(Reason.INTERNAL_ERROR, f"attnfx raised {type(exc).__name__}: {text[0] if text else ''}"
                   f"{where}; the site was left as written (please report this)", stage)


def _reexamine_sdpa(index: int, node: Node, evaluator: MaskEvaluator, planning: Planning) -> Decision:
    """An existing SDPA call whose dense mask is a proven causal band gets the flag lowering when a
    variant takes it; otherwise (and never against eager's price: SDPA is not eager) it stays."""
    site = lift_sdpa(node, evaluator)
    decision = None if site is None else _choose(index, node, site, replace(planning, eager=False))
    return decision if decision is not None and decision.status == "CHOSEN" else Decision(index, node, "ALREADY_FUSED")


def _decide(index: int, node: Node, evaluator: MaskEvaluator, planning: Planning) -> Decision:
    site = (lift_linear if ops.kind(node) in LINEAR_ANCHORS else lift)(node, evaluator)
    if isinstance(site, Refusal):
        return Decision(index, node, "REFUSED", site)
    if site.dropout_p and planning.exact_dropout:
        return Decision(index, node, "REFUSED", Refusal(
            Reason.DROPOUT_TRAINING, f"dropout (p={site.dropout_p:g}) on the attention probabilities in training "
            "mode, and exact_dropout=True keeps eager's random stream, which a fused variant does not draw", "A"))
    return _choose(index, node, site, planning)


def _choose(index: int, node: Node, site: Site, planning: Planning) -> Decision:
    options, by_key = _options(site, planning)
    selection = choose(options, planning.target, planning.memory_budget)
    winner = selection.winner
    if winner is not None and winner.option.variant == "eager" and len(selection.ranked) == 1:
        winner = None  # eager is the only thing that can run it: say why nothing else can
    if winner is None:
        if selection.ranked and not any(c.fits for c in selection.ranked):
            message = f"no variant fits the memory budget ({planning.memory_budget:g} bytes of intermediates)"
        else:
            message = "no variant can take this site: " + "; ".join(
                f"{o.variant} [{o.lowering}]: {o.refusal}" for o in selection.refused)
        return Decision(index, node, "REFUSED", Refusal(Reason.NO_VARIANT, message, "select"), site, selection)
    if winner.option.variant == "eager":
        refusal = Refusal(Reason.EAGER_FASTEST, "the model's own computation is predicted fastest at these "
                          "shapes", "select")
        return Decision(index, node, "KEPT", refusal, site, selection)
    lowering, variant = by_key[(winner.option.variant, winner.option.lowering)]
    return Decision(index, node, "CHOSEN", None, site, selection, lowering, variant,
                    _runners_up(selection, by_key))


def _runners_up(selection: Selection, by_key: dict) -> tuple[tuple[Lowering, Variant], ...]:
    """The replacements ranked after the winner, up to the model's own code: if verification rejects
    the winner, the next of them is tried, but never one predicted slower than leaving the site."""
    after = []
    for candidate in selection.ranked[selection.ranked.index(selection.winner) + 1:]:
        if candidate.option.variant == "eager":
            break
        if candidate.fits:
            after.append(by_key[(candidate.option.variant, candidate.option.lowering)])
    return tuple(after)


def _options(site: Site, planning: Planning) -> tuple[list[Option], dict]:
    options, by_key = [], {}
    for lowering in site.lowerings:
        for variant in planning.candidates:
            if lowering.only and variant.name not in lowering.only:
                continue
            refusal = variant.refusal(lowering.spec, planning.device)
            if site.sink is not None and refusal is None and variant.op != SINK_OP:
                refusal = f"the attention sink is applied through the log-sum-exp, which only {SINK_OP} returns"
            options.append(Option(variant.name, variant.algorithm, lowering.spec, lowering.name, refusal))
            by_key[(variant.name, lowering.name)] = (lowering, variant)
    if planning.eager:
        eager = site.lowerings[-1].spec
        options.append(Option("eager", EAGER_BY_KIND[eager.kind], eager, "as written"))
    return options, by_key


__all__ = ["Decision", "Planning", "decide_all", "guarded", "internal_error"]
