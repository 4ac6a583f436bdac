"""The module `optimize()` returns: called like the model, backed by the rewritten graph."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.fx import GraphModule

from .errors import AttnfxError
from .report import Report


class OptimizedModule(nn.Module):
    """An `nn.Module` with the model's call signature and output structure.

    `graph_module` is the rewritten fx graph (it shares the model's parameters), `report` says what
    was rewritten and why, and the example inputs are kept for export and re-verification.
    """

    def __init__(self, graph_module: GraphModule, report: Report, example_args: tuple,
                 example_kwargs: dict, dynamic_shapes: Any, constants: dict[str, Any] | None = None,
                 respecialize: Callable[[tuple, dict], "OptimizedModule"] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.dynamic_shapes = dynamic_shapes
        self.constants = dict(constants or {})
        self.specializations: list[OptimizedModule] = []
        self._respecialize = respecialize

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, value in self.constants.items():
            given = kwargs.pop(name, value)
            if given != value:
                raise AttnfxError(f"this module was optimised for {name}={value!r} and was called with "
                                  f"{name}={given!r}; call attnfx.optimize() again with that value")
        try:
            return self.graph_module(*args, **kwargs)
        except AssertionError as exc:
            if not str(exc).startswith("Guard failed"):
                raise
            return self._specialized(exc, args, kwargs)

    def _specialized(self, guard: AssertionError, args: tuple, kwargs: dict) -> Any:
        """Inputs outside the captured shape ranges (e.g. length 1 when capture saw 8) get their
        own capture and rewrite, kept for later calls, like a recompilation."""
        for specialization in self.specializations:
            try:
                return specialization.graph_module(*args, **kwargs)
            except AssertionError as exc:
                if not str(exc).startswith("Guard failed"):
                    raise
        if self._respecialize is None:
            raise guard
        specialization = self._respecialize(args, {**kwargs, **self.constants})
        self.specializations.append(specialization)
        self.report.notes.append(f"re-optimised for inputs outside the captured ranges ({guard}): "
                                 f"{specialization.report.rewritten} site(s) rewritten")
        return specialization.graph_module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"OptimizedModule({self.report.model}: {self.report.rewritten} of {len(self.report.entries)} site(s) rewritten)"
