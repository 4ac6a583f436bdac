"""`optimize()`: capture -> decide per site (lift, price, choose) -> emit -> verify -> wire -> report.

Nothing is wired into the graph before it is verified, and a model whose end-to-end outputs do not
match the original's is returned unrewritten with the reason in its report: a rewrite never changes
what the model computes silently.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from attnfx.cost_model.hardware import HardwareProfile
from attnfx.cost_model.targets import resolve_target
from attnfx.kernels import VARIANTS, Variant
from attnfx.passes import ops
from attnfx.passes.emit import Emitted, emit
from attnfx.passes.mask_eval import MaskEvaluator
from attnfx.passes.site import Reason, Refusal
from attnfx.passes.softmax_forms import canonicalize_softmaxes

from .call_signature import bind_call
from .capture import capture
from .decide import Decision, Planning, decide_all, internal_error
from .errors import AttnfxError
from .generation import optimize_generative, uses_cache
from .module import OptimizedModule
from .report import Outcome, Report, entry
from .verify import compare, external_inputs, record, run_emitted


@dataclass(frozen=True)
class Options:
    """optimize()'s choices, shared by every front end (optimize, the torch.compile backend)."""

    verify: bool = True
    target: str | HardwareProfile | None = None
    memory_budget: float | None = None
    variants: tuple[str, ...] | None = None
    exact_dropout: bool = False

    def __post_init__(self) -> None:
        if self.variants is not None:
            object.__setattr__(self, "variants", tuple(self.variants))
            _variants(self.variants)  # unknown names fail here, before any work

    def planning(self, example_device: str) -> Planning:
        """Variants must run on the target's device (a CUDA plan made on a CPU machine is still
        verified here: attnfx::attention runs everywhere); by default, where the inputs are."""
        target = example_device if self.target is None else self.target
        device = example_device if self.target is None else resolve_target(self.target).device
        eager = self.variants is None or "eager" in self.variants  # variants=["sdpa"]: never eager
        return Planning(target, device, self.memory_budget, _variants(self.variants), self.exact_dropout, eager)


_KEPT = Outcome("KEPT")


@dataclass
class _Plan:
    decision: Decision
    emitted: Emitted


def optimize(
    model: nn.Module,
    example_inputs: Any = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    verify: bool = True,
    target: str | HardwareProfile | None = None,
    memory_budget: float | None = None,
    variants: Sequence[str] | None = None,
    exact_dropout: bool = False,
    example_args: Any = None,
) -> nn.Module:
    """Rewrite every attention in `model` to the variant predicted fastest; see the README.

    The example inputs are what the model is called with: `model(*example_inputs,
    **example_kwargs)` (batch and sequence dims are captured dynamic unless `dynamic_shapes` says
    otherwise). `verify=False` skips the numerical check of each site. `target` prices the
    variants for "cpu" (this host, calibrated once and cached), "cuda" or a `HardwareProfile`; by
    default, the device of the example inputs. `memory_budget` (bytes) excludes variants whose
    intermediates would exceed it. `variants` restricts the implementations considered, by name.
    Training-mode attention dropout goes to a fused variant (SDPA's dropout_p: its own random
    stream, verified with dropout off); `exact_dropout=True` leaves those sites as written instead.
    A Hugging Face model that returns its KV cache gets a shallow copy whose forward is compiled
    with the attnfx backend (see `attnfx.generation`), so that `.generate()` works.
    `example_args` is the former name of `example_inputs`.
    """
    started = time.perf_counter()
    if example_args is not None:
        warnings.warn("optimize(example_args=...) is now optimize(example_inputs=...)", DeprecationWarning,
                      stacklevel=2)
        example_inputs = example_args
    options = Options(verify, target, memory_budget, None if variants is None else tuple(variants), exact_dropout)
    model, args, kwargs = _normalise_inputs(model, example_inputs, example_kwargs)
    if uses_cache(model, kwargs):
        return optimize_generative(model, args, kwargs, options, dynamic_shapes)
    bind_call(model.forward, args, kwargs)  # a call the model would reject gets its own error
    captured = capture(model, args, kwargs, dynamic_shapes)
    graph_kwargs = {k: v for k, v in kwargs.items() if k not in captured.constants}
    report = Report(model=type(model).__name__, capture=captured.method, notes=list(captured.notes))
    result = rewrite(captured.graph_module, args, graph_kwargs, options, report,
                     _device_of(args, kwargs, model), captured.module_prefix)
    report.optimize_seconds = time.perf_counter() - started
    respecialize = partial(optimize, model, verify=verify, target=target, memory_budget=memory_budget,
                           variants=variants, exact_dropout=exact_dropout)
    return OptimizedModule(result, report, args, kwargs, captured.dynamic_shapes, captured.constants,
                           respecialize if dynamic_shapes is None else None, model.forward, captured.module_prefix)


def rewrite(original: GraphModule, args: tuple, kwargs: dict, options: Options, report: Report,
            device: str, module_prefix: str = "") -> GraphModule:
    """Rewrite every attention of a captured graph (ATen- or torch-level) called as
    `original(*args, **kwargs)`; fill `report` and return the rewritten graph, or `original` itself
    when the end-to-end check fails. `original` is never modified."""
    work = GraphModule(original, _copy_graph(original.graph))
    work.meta.update(original.meta)
    _remove_dead_nodes(work.graph)
    canonical = canonicalize_softmaxes(work.graph)
    decisions = decide_all(work.graph, MaskEvaluator(work), options.planning(device), canonical.escaped)
    plans, emit_failures = _emit(work, decisions)
    outcomes: dict[int, Outcome] = dict(emit_failures)
    if options.verify and plans:
        plans, verdicts, expected = _verify(work, plans, args, kwargs)
        outcomes.update(verdicts)
        if canonical.replaced:  # the end-to-end reference is the model as written
            expected = record(original, args, kwargs)[1]
    else:
        outcomes.update({p.decision.index: Outcome("REWRITTEN") for p in plans})
        expected = None
    for decision in decisions:  # a hand-written softmax that was not rewritten keeps its spelling
        if decision.node in canonical.replaced and outcomes.get(decision.index, _KEPT).status != "REWRITTEN":
            canonical.restore(decision.node)
    _wire(work, plans)
    result = work
    if plans and options.verify:
        result = _check_end_to_end(work, original, report, args, kwargs, expected, outcomes)
    if result is work and any(p.decision.lowering.spec.dropout_p for p in plans):
        _arm_dropout(work, plans)
    final = {p.decision.index: p.decision for p in plans}  # a runner-up where verification rejected the winner
    report.entries.extend(entry(final.get(d.index, d), outcomes.get(d.index), module_prefix) for d in decisions)
    return result


def _emit(work: GraphModule, decisions: list[Decision]) -> tuple[list[_Plan], dict[int, Outcome]]:
    """Emit every chosen site's replacement (not wired in); a site whose emission raises is kept."""
    plans, failures = [], {}
    for decision in decisions:
        if decision.status != "CHOSEN":
            continue
        emitted = _emit_one(work, decision)
        if isinstance(emitted, Outcome):
            failures[decision.index] = emitted
        else:
            plans.append(emitted)
    return plans, failures


def _emit_one(work: GraphModule, decision: Decision) -> _Plan | Outcome:
    """One chosen site's replacement, or the INTERNAL_ERROR outcome of an emitter that raised."""
    before = set(work.graph.nodes)
    # emitted without dropout: verification compares the deterministic part, then it is armed
    deterministic = replace(decision.lowering, spec=replace(decision.lowering.spec, dropout_p=0.0))
    try:
        return _Plan(decision, emit(work.graph, decision.site, deterministic, decision.variant, decision.index))
    except Exception as exc:  # noqa: BLE001 - an emitter bug leaves that one site as written
        _erase_unused(work.graph, [n for n in work.graph.nodes if n not in before])
        return Outcome("REFUSED", refusal=internal_error(exc, "emit"))


def _arm_dropout(work: GraphModule, plans: list[_Plan]) -> None:
    """Give each verified site with training dropout its variant's call with the dropout on."""
    for plan in plans:
        spec = plan.decision.lowering.spec
        if not spec.dropout_p:
            continue
        call = plan.decision.variant.call(spec, plan.emitted.operands)
        old = plan.emitted.call
        with work.graph.inserting_before(old):
            armed = work.graph.call_function(call.target, call.args, call.kwargs)
        armed.meta = dict(old.meta)
        old.replace_all_uses_with(armed)
        work.graph.erase_node(old)
    work.recompile()


def _wire(work: GraphModule, plans: list[_Plan]) -> None:
    """Swap each verified replacement in and drop what it replaced."""
    for plan in plans:
        plan.decision.site.av.node.replace_all_uses_with(plan.emitted.output)
        _erase_unused(work.graph, plan.decision.site.nodes)
    _remove_dead_nodes(work.graph)
    work.graph.lint()
    work.recompile()


def _normalise_inputs(model: nn.Module, args: Any, kwargs: dict | None) -> tuple[nn.Module, tuple, dict]:
    """The module to capture (what a torch.compile wrapper wraps) and its example inputs as a
    tuple and a dict; a module whose weights are not real values yet is refused, naming them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnfx.optimize() takes an nn.Module, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile(model): optimize the model itself
    _check_materialised(model)
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    return model, args, dict(kwargs or {})


def _check_materialised(model: nn.Module) -> None:
    """attnfx verifies every rewrite on real values: meta tensors and lazy modules have none."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            raise AttnfxError(f"{type(model).__name__}.{name} is not initialised yet (a lazy module): call the "
                              "model once on real inputs before attnfx.optimize()")
        if tensor.device.type == "meta":
            raise AttnfxError(f"{type(model).__name__}.{name} is on the meta device: load the weights (e.g. "
                              "model.to_empty(device='cpu') then load_state_dict) before attnfx.optimize(), which "
                              "verifies every rewrite on real values")


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
    """Drop pure nodes nothing uses (weights the caller discarded, what replaced sites read), and
    the metadata checks of tensors nothing else reads."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users and (not node.is_impure() or _lone_check(node)):
            graph.erase_node(node)


def _lone_check(node: Node) -> bool:
    """An export metadata check of a tensor nothing else reads (a mask the rewrite no longer uses)."""
    return ops.is_metadata_check(node) and all(len(arg.users) == 1 for arg in node.all_input_nodes)


def _erase_unused(graph: torch.fx.Graph, nodes: Sequence[Node]) -> None:
    """Erase a replaced subgraph (eval-mode dropout included, which plain DCE keeps as impure)."""
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A node-for-node copy that shares the (immutable) pytree calling convention."""
    copy_ = torch.fx.Graph()
    copy_._codegen = graph._codegen
    value_map: dict[Node, Node] = {}
    out = copy_.graph_copy(graph, value_map)
    copy_.output(out)
    return copy_


def _verify(work: GraphModule, plans: list[_Plan], args: tuple, kwargs: dict
            ) -> tuple[list[_Plan], dict[int, Outcome], Any]:
    """The plans whose replacement reproduces its site, each plan's outcome, and the original
    graph's flat outputs. A rejected replacement is erased and the site's next fastest one (of
    another variant) is tried, down to the model's own code, which is restored."""
    wanted = set().union(*(external_inputs(p.emitted.nodes) for p in plans)) | {p.decision.site.av.node for p in plans}
    values, expected = record(work, args, kwargs, wanted)
    accepted, outcomes = [], {}
    for plan in plans:
        verified, outcomes[plan.decision.index] = _first_verified(work, plan, values, args, kwargs)
        if verified is not None:
            accepted.append(verified)
    return accepted, outcomes, expected


def _first_verified(work: GraphModule, plan: _Plan, values: dict, args: tuple, kwargs: dict
                    ) -> tuple[_Plan | None, Outcome]:
    """The site's first replacement in the cost model's order that reproduces it, and its outcome;
    (None, why) when none before the model's own code does."""
    while True:
        outcome, detail = _check_site(work, plan, values)
        if outcome.status == "REWRITTEN":
            return plan, outcome
        _erase_unused(work.graph, plan.emitted.nodes)
        runner_up = plan.decision.next_choice(detail)
        if runner_up is None:
            return None, outcome
        emitted = _emit_one(work, runner_up)
        if isinstance(emitted, Outcome):
            return None, emitted
        plan = emitted
        missing = external_inputs(plan.emitted.nodes) - values.keys()
        if missing:
            values.update(record(work, args, kwargs, missing)[0])


def _check_site(work: GraphModule, plan: _Plan, values: dict) -> tuple[Outcome, str]:
    """REWRITTEN when the emitted replacement reproduces the site's output on the recorded inputs;
    else RESTORED, and what differed."""
    try:
        actual = run_emitted(work, plan.emitted.nodes, plan.emitted.output, values)
        check = compare(actual, values[plan.decision.site.av.node])
    except Exception as exc:  # noqa: BLE001 - a replacement that cannot run is restored
        error, detail = None, f"the replacement raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    else:
        if check.ok:
            return Outcome("REWRITTEN", check.max_abs, replacement=plan.emitted.output.name), ""
        error, detail = check.max_abs, check.detail
    earlier = "".join(f"{r}; then " for r in plan.decision.rejected)
    return Outcome("RESTORED", error, Refusal(
        Reason.VERIFICATION_FAILED, f"{earlier}{plan.decision.variant.name} did not reproduce the site on the "
        f"example inputs: {detail}; the original was restored", "verify")), detail


def _check_end_to_end(work: GraphModule, original: GraphModule, report: Report, args: tuple, kwargs: dict,
                      expected: Any, outcomes: dict[int, Outcome]) -> GraphModule:
    """`work` if its outputs match the original's; else `original`, with every rewrite restored."""
    with torch.no_grad():
        actual = record(work, args, kwargs, skip_emitted=False)[1]
    check = compare(actual, expected)
    report.end_to_end_error = check.max_abs
    if check.ok:
        return work
    restored = Refusal(Reason.VERIFICATION_FAILED, "every site passed alone but the model's outputs drifted "
                       f"({check.detail}); all sites were restored", "verify")
    for index, outcome in outcomes.items():
        if outcome.status == "REWRITTEN":
            outcomes[index] = Outcome("RESTORED", outcome.error, restored)
    report.notes.append(f"end-to-end check failed ({check.detail}); the model is returned unrewritten")
    return original
