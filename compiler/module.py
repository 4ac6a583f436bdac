"""The module `optimize()` returns: called like the model, backed by the rewritten graph."""
from __future__ import annotations

import copy
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
    rewrite, kept in `specializations` for later calls, like a recompilation. Its `state_dict()`
    has the model's keys, and `load_state_dict()` takes the model's.
    """

    def __init__(self, graph_module: GraphModule, report: Report, example_args: tuple,
                 example_kwargs: dict, dynamic_shapes: Any, constants: dict[str, Any] | None = None,
                 respecialize: Callable[[tuple, dict], nn.Module] | None = None,
                 model_forward: Callable[..., Any] | None = None, module_prefix: str = "") -> None:
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
        self._state_prefix = "graph_module." + module_prefix  # where the model's state sits in ours
        self.register_state_dict_post_hook(_model_keys)
        self.register_load_state_dict_pre_hook(_own_keys)

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
        args, kwargs = call.in_form_of(self._captured_call)
        return self.graph_module(*args, **{k: v for k, v in kwargs.items() if k not in self.constants})

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

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.report.capture == "torch.export":
            raise TypeError("an attnfx OptimizedModule cannot be pickled (torch.save): its graph is a torch.export "
                            "module. Save `torch.export.export(opt, example_inputs)` with torch.export.save, or "
                            "save the model's state_dict and call attnfx.optimize() again after loading it")
        return super().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> OptimizedModule:
        """A copy whose graph, model and specializations use the same copied parameters."""
        copy_ = type(self).__new__(type(self))
        memo[id(self)] = copy_
        copy_.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copy_

    def __repr__(self) -> str:
        return f"OptimizedModule({self.report.model}: {self.report.rewritten} of {len(self.report.entries)} site(s) rewritten)"


def _model_keys(module: OptimizedModule, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    inner = prefix + module._state_prefix
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _own_keys(module: OptimizedModule, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    inner = prefix + module._state_prefix
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def _call(module: nn.Module, call: BoundCall) -> Any:
    if isinstance(module, OptimizedModule):
        return module._run(call)
    return module(*call.args, **call.kwargs)


def _is_guard_failure(exc: AssertionError) -> bool:
    return str(exc).startswith("Guard failed")
