"""The module `optimize()` returns: called like the model, backed by the rewritten graph."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.fx import GraphModule

from .call_signature import BoundCall, bind_call
from .report import Report


class OptimizedModule(nn.Module):
    """An `nn.Module` with the model's call signature and output structure.

    `graph_module` is the rewritten fx graph (it shares the model's parameters), `report` says what
    was rewritten and why, and the example inputs are kept for export and re-verification. Calls
    are read against the model's signature (`call_signature`): a call the graph was not captured
    for (another structure, or shapes outside the captured ranges) gets its own capture and
    rewrite, kept in `specializations` for later calls, like a recompilation.
    """

    def __init__(self, graph_module: GraphModule, report: Report, example_args: tuple,
                 example_kwargs: dict, dynamic_shapes: Any, constants: dict[str, Any] | None = None,
                 respecialize: Callable[[tuple, dict], nn.Module] | None = None,
                 model_forward: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.dynamic_shapes = dynamic_shapes
        self.constants = dict(constants or {})
        self.specializations: list[nn.Module] = []
        self._respecialize = respecialize
        self._model_forward = model_forward
        self._calls: list[BoundCall] = []  # the call each specialization was captured for
        self._captured_call = bind_call(model_forward, example_args, example_kwargs) if model_forward else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._model_forward is None:
            return self.graph_module(*args, **kwargs)
        call = bind_call(self._model_forward, args, kwargs)
        if call.same_structure(self._captured_call):
            try:
                return self._run(call)
            except AssertionError as exc:
                if not _is_guard_failure(exc):
                    raise
                return self._specialized(call, f"inputs outside the captured ranges ({exc})")
        return self._specialized(call, "a call with other arguments than the captured one")

    def _run(self, call: BoundCall) -> Any:
        named = {name: call.value(name) for name in self.example_kwargs if name not in self.constants}
        return self.graph_module(*call.args, **named)

    def _specialized(self, call: BoundCall, why: str) -> Any:
        for captured, module in zip(self._calls, self.specializations):
            if not captured.same_structure(call):
                continue
            try:
                return _call(module, call)
            except AssertionError as exc:
                if not _is_guard_failure(exc):
                    raise
        if self._respecialize is None:
            raise TypeError(f"this module was optimised for one call structure and was called with {why}")
        module = self._respecialize(call.args, call.kwargs)
        self.specializations.append(module)
        self._calls.append(call)
        outcome = (f"{module.report.rewritten} site(s) rewritten" if isinstance(module, OptimizedModule)
                   else "compiled with the attnfx backend (its reports: attnfx.reports(module))")
        self.report.notes.append(f"re-optimised for {why}: {outcome}")
        return _call(module, call)

    def __repr__(self) -> str:
        return f"OptimizedModule({self.report.model}: {self.report.rewritten} of {len(self.report.entries)} site(s) rewritten)"


def _call(module: nn.Module, call: BoundCall) -> Any:
    if isinstance(module, OptimizedModule):
        return module._run(call)
    return module(*call.args, **call.kwargs)


def _is_guard_failure(exc: AssertionError) -> bool:
    return str(exc).startswith("Guard failed")
