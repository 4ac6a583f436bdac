"""`optimize()`: capture -> lift every attention -> select a variant per site -> emit -> verify -> wire.

Nothing is wired into the graph before it is verified, and a model whose end-to-end outputs do not
match the original's is returned unrewritten with the reason in its report: a rewrite never changes
what the model computes silently.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from attnfx.cost_model.cascade import canonical_cascade
from attnfx.cost_model.hardware import HardwareProfile
from attnfx.cost_model.select import Option, Selection, select
from attnfx.cost_model.spec import AttentionSpec
from attnfx.kernels import VARIANTS, Variant
from attnfx.passes import ops
from attnfx.passes.attention import RULE, lift
from attnfx.passes.emit import Emitted, emit
from attnfx.passes.mask_proof import MaskEvaluator
from attnfx.passes.site import Lowering, Reason, Refusal, Site

from .capture import capture
from .errors import AttnfxError
from .module import OptimizedModule
from .report import CandidateRow, Report, SiteEntry
from .verify import compare, external_inputs, record, run_emitted

LONG_LENGTH = 2048  # where dynamic-length sites are also priced before eager may win


@dataclass(frozen=True)
class _Pricing:
    target: str | HardwareProfile
    memory_budget: float | None

    def select(self, options: list[Option]) -> Selection:
        return select(options, target=self.target, memory_budget=self.memory_budget)


@dataclass
class _Plan:
    entry: SiteEntry
    site: Site
    emitted: Emitted


def optimize(
    model: nn.Module,
    example_args: Any = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    verify: bool = True,
    target: str | HardwareProfile | None = None,
    memory_budget: float | None = None,
    variants: Sequence[str] | None = None,
) -> OptimizedModule:
    """Rewrite every attention in `model` to the variant predicted fastest; see the README.

    `example_args`/`example_kwargs` are what the model is called with (batch and sequence dims are
    captured dynamic unless `dynamic_shapes` says otherwise). `verify=False` skips the numerical
    check of each site. `target` prices the variants for "cpu" (this host, calibrated once and
    cached), "cuda" or a `HardwareProfile`; by default, the device of the example inputs.
    `memory_budget` (bytes) excludes variants whose intermediates would exceed it. `variants`
    restricts the implementations considered, by name.
    """
    started = time.perf_counter()
    args, kwargs = _normalise_inputs(model, example_args, example_kwargs)
    captured = capture(model, args, kwargs, dynamic_shapes)
    original = captured.graph_module
    work = GraphModule(original, _copy_graph(original.graph))
    work.meta.update(original.meta)
    _remove_dead_nodes(work.graph)
    device = _device_of(args, kwargs, model)
    candidates = _variants(variants)
    report = Report(model=type(model).__name__, capture=captured.method, notes=list(captured.notes))

    pricing = _Pricing(target if target is not None else device, memory_budget)
    plans = _match_and_emit(work, report, candidates, device, pricing)
    for entry in report.entries:
        entry.module_path = entry.module_path.removeprefix(captured.module_prefix)
    graph_kwargs = {k: v for k, v in kwargs.items() if k not in captured.constants}
    accepted, expected = _verify(work, plans, args, graph_kwargs) if verify and plans else (plans, None)
    _wire(work, plans, accepted)
    result = _check_end_to_end(work, original, report, args, graph_kwargs, expected) if accepted and verify else work
    report.optimize_seconds = time.perf_counter() - started
    respecialize = partial(optimize, model, verify=verify, target=target, memory_budget=memory_budget,
                           variants=variants)
    return OptimizedModule(result, report, args, kwargs, captured.dynamic_shapes, captured.constants,
                           respecialize if dynamic_shapes is None else None)


def _wire(work: GraphModule, plans: list[_Plan], accepted: list[_Plan]) -> None:
    """Swap each verified replacement in and drop what it replaced; drop the unverified ones."""
    for plan in plans:
        if plan in accepted:
            plan.site.av.node.replace_all_uses_with(plan.emitted.output)
            plan.entry.status = "REWRITTEN"
            _erase_unused(work.graph, plan.site.nodes)
        else:
            _erase_unused(work.graph, plan.emitted.nodes)
    _remove_dead_nodes(work.graph)
    work.graph.lint()
    work.recompile()


def _normalise_inputs(model: nn.Module, args: Any, kwargs: dict | None) -> tuple[tuple, dict]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnfx.optimize() takes an nn.Module, got {type(model).__name__}")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    return args, dict(kwargs or {})


def _device_of(args: tuple, kwargs: dict, model: nn.Module) -> str:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return leaf.device.type
    param = next(iter(model.parameters()), None)
    return param.device.type if param is not None else "cpu"


def _variants(names: Sequence[str] | None) -> tuple[Variant, ...]:
    if names is None:
        return VARIANTS
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in known and n != "eager"]
    if unknown:
        raise AttnfxError(f"unknown variant(s) {unknown}; attnfx knows {sorted(known)} (and 'eager')")
    return tuple(known[n] for n in names if n in known)


def _remove_dead_nodes(graph: torch.fx.Graph) -> None:
    """Drop pure nodes nothing uses (weights the caller discarded, what replaced sites read)."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users and not node.is_impure():
            graph.erase_node(node)


def _erase_unused(graph: torch.fx.Graph, nodes: Sequence[Node]) -> None:
    """Erase a replaced subgraph (eval-mode dropout included, which plain DCE keeps as impure)."""
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


def _entry(index: int, node: Node, status: str) -> SiteEntry:
    return SiteEntry(index=index, node=node.name, module_path=ops.module_path(node),
                     source=ops.source_line(node), rule=RULE, status=status)


def _match_and_emit(work: GraphModule, report: Report, candidates: tuple[Variant, ...], device: str,
                    pricing: _Pricing) -> list[_Plan]:
    evaluator = MaskEvaluator(work)
    plans = []
    for node in list(work.graph.nodes):
        k = ops.kind(node)
        if k == "sdpa":
            entry = _entry(len(report.entries), node, "ALREADY_FUSED")
            entry.reason = "the model already calls scaled_dot_product_attention here"
            report.entries.append(entry)
            continue
        if k not in ("softmax", "log_softmax"):
            continue
        entry = _entry(len(report.entries), node, "REFUSED")
        report.entries.append(entry)
        site = lift(node, evaluator)
        if isinstance(site, Refusal):
            _refuse(entry, site)
            continue
        entry.mask = site.facts.text
        chosen = _choose(entry, site, candidates, device, pricing)
        if chosen is None:
            continue
        lowering, variant = chosen
        plans.append(_Plan(entry, site, emit(work.graph, site, lowering, variant, entry.index)))
    return plans


def _refuse(entry: SiteEntry, refusal: Refusal, status: str = "REFUSED") -> None:
    entry.status, entry.reason_code = status, refusal.code.value
    entry.reason, entry.failed_stage = refusal.message, refusal.stage


def _choose(entry: SiteEntry, site: Site, candidates: tuple[Variant, ...], device: str,
            pricing: _Pricing) -> tuple[Lowering, Variant] | None:
    eager_spec = site.lowerings[-1].spec
    entry.spec = eager_spec
    entry.cascade = str(canonical_cascade(eager_spec, tuple(n.name for n in site.nodes)))
    options, by_key = _options(site, candidates, device)
    selection = pricing.select(options)
    selection, why = _prefer_for_long_inputs(selection, options, eager_spec, pricing)
    entry.candidates = [CandidateRow(c.option.variant, c.option.lowering, c.option.algorithm,
                                     c.predicted_s * 1e3, c.hbm_bytes / 2**20, c.peak_bytes / 2**20)
                        for c in selection.ranked]
    entry.unavailable = [(o.variant, o.lowering, o.refusal or "") for o in selection.refused]
    entry.why = why or selection.why
    winner = selection.winner
    if winner is not None and winner.option.variant == "eager" and len(selection.ranked) == 1:
        winner = None  # eager is the only thing that can run it: say why nothing else can
    if winner is None:
        if selection.ranked and not any(c.fits for c in selection.ranked):
            message = f"no variant fits the memory budget ({pricing.memory_budget:g} bytes of intermediates)"
        else:
            message = "no variant can take this site: " + "; ".join(
                f"{o.variant} [{o.lowering}]: {o.refusal}" for o in selection.refused)
        _refuse(entry, Refusal(Reason.NO_VARIANT, message, "select"))
        return None
    if winner.option.variant == "eager":
        _refuse(entry, Refusal(Reason.EAGER_FASTEST, "the model's own computation is predicted fastest "
                               "at these shapes", "select"), status="KEPT")
        return None
    entry.variant, entry.lowering = winner.option.variant, winner.option.lowering
    entry.spec = winner.option.spec
    entry.cascade = str(canonical_cascade(winner.option.spec, tuple(n.name for n in site.nodes)))
    return by_key[(winner.option.variant, winner.option.lowering)]


def _options(site: Site, candidates: tuple[Variant, ...], device: str) -> tuple[list[Option], dict]:
    options, by_key = [], {}
    for lowering in site.lowerings:
        for variant in candidates:
            options.append(Option(variant.name, variant.algorithm, lowering.spec, lowering.name,
                                  variant.refusal(lowering.spec, device)))
            by_key[(variant.name, lowering.name)] = (lowering, variant)
    options.append(Option("eager", "eager", site.lowerings[-1].spec, "as written"))
    return options, by_key


def _prefer_for_long_inputs(selection: Selection, options: list[Option], spec: AttentionSpec,
                            pricing: _Pricing) -> tuple[Selection, str]:
    """Eager only wins a dynamic-length site if it is also predicted fastest at LONG_LENGTH."""
    winner = selection.winner
    lengths = {"q_len", "kv_len"} & spec.dynamic
    if winner is None or winner.option.variant != "eager" or not lengths:
        return selection, ""
    long_options = [replace(o, spec=_at_length(o.spec, lengths)) for o in options]
    long_selection = pricing.select(long_options)
    long_winner = long_selection.winner
    if long_winner is None or long_winner.option.variant == "eager":
        return selection, ""
    ranked = [c for c in selection.ranked if (c.option.variant, c.option.lowering) ==
              (long_winner.option.variant, long_winner.option.lowering)]
    chosen = replace(selection, winner=ranked[0])
    why = (f"eager is predicted faster at the example length, but the length is dynamic and "
           f"{long_winner.option.variant} is predicted fastest at {LONG_LENGTH}")
    return chosen, why


def _at_length(spec: AttentionSpec, lengths: set[str]) -> AttentionSpec:
    sizes = {name: max(getattr(spec, name), LONG_LENGTH) for name in lengths}
    old = {"q_len": spec.q_len, "kv_len": spec.kv_len}
    shape = spec.mask_shape
    if shape is not None:
        dims = list(shape)
        for position, name in ((2, "q_len"), (3, "kv_len")):
            if name in sizes and dims[position] == old[name]:
                dims[position] = sizes[name]
        shape = tuple(dims)
    return replace(spec, mask_shape=shape, **sizes)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A node-for-node copy that shares the (immutable) pytree calling convention."""
    copy_ = torch.fx.Graph()
    copy_._codegen = graph._codegen
    value_map: dict[Node, Node] = {}
    out = copy_.graph_copy(graph, value_map)
    copy_.output(out)
    return copy_


def _verify(work: GraphModule, plans: list[_Plan], args: tuple, kwargs: dict) -> tuple[list[_Plan], Any]:
    """The plans whose replacement reproduces its site, and the original graph's flat outputs."""
    wanted = set().union(*(external_inputs(p.emitted.nodes) for p in plans)) | {p.site.av.node for p in plans}
    values, expected = record(work, args, kwargs, wanted)
    accepted = []
    for plan in plans:
        try:
            actual = run_emitted(work, plan.emitted.nodes, plan.emitted.output, values)
            check = compare(actual, values[plan.site.av.node])
        except Exception as exc:  # noqa: BLE001 - a replacement that cannot run is restored
            check = None
            detail = f"the replacement raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if check is not None:
            plan.entry.error = check.max_abs
            detail = check.detail
        if check is not None and check.ok:
            plan.entry.replacement = plan.emitted.output.name
            accepted.append(plan)
        else:
            _refuse(plan.entry, Refusal(Reason.VERIFICATION_FAILED, f"{plan.entry.variant} did not reproduce "
                                        f"the site on the example inputs: {detail}; the original was restored",
                                        "verify"), status="RESTORED")
    return accepted, expected


def _check_end_to_end(work: GraphModule, original: GraphModule, report: Report, args: tuple, kwargs: dict,
                      expected: Any) -> GraphModule:
    with torch.no_grad():
        actual = record(work, args, kwargs, skip_emitted=False)[1]
    check = compare(actual, expected)
    report.end_to_end_error = check.max_abs
    if check.ok:
        return work
    for entry in report.entries:
        if entry.status == "REWRITTEN":
            _refuse(entry, Refusal(Reason.VERIFICATION_FAILED, "every site passed alone but the model's outputs "
                                   f"drifted ({check.detail}); all sites were restored", "verify"), status="RESTORED")
    report.notes.append(f"end-to-end check failed ({check.detail}); the model is returned unrewritten")
    return original
