"""The module `optimize()` returns: called like the model, backed by the rewritten graph."""
from __future__ import annotations

from typing import Any

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
                 example_kwargs: dict, dynamic_shapes: Any, constants: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.dynamic_shapes = dynamic_shapes
        self.constants = dict(constants or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, value in self.constants.items():
            given = kwargs.pop(name, value)
            if given != value:
                raise AttnfxError(f"this module was optimised for {name}={value!r} and was called with "
                                  f"{name}={given!r}; call attnfx.optimize() again with that value")
        return self.graph_module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"OptimizedModule({self.report.model}: {self.report.rewritten} of {len(self.report.entries)} site(s) rewritten)"
