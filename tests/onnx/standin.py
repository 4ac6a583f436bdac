"""A stand-in for attnfx.optimize's result, built from models that call SDPA (or attnfx::attention)
themselves: captured like optimize() captures, with every attention call tagged as a rewritten site."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim

from attnfx.onnx_sites import ATTNFX_OP, SDPA_OP, op_name


@dataclass
class Entry:
    status: str
    variant: str
    replacement: str
    spec: Any = None


@dataclass
class Report:
    entries: list[Entry] = field(default_factory=list)


@dataclass
class StandIn:
    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any
    report: Report


def seq_dynamic(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    """Dim.AUTO on the batch and sequence axes, as capture marks them: (B, S, ...) inputs and
    (B, H, M, N) masks."""
    axes = {1: (0,), 2: (0, 1), 3: (0, 1), 4: (0, 2, 3)}
    return {name: {axis: Dim.AUTO for axis in axes[t.dim()]} for name, t in inputs.items()}


def stand_in(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *, refused: int = 0) -> StandIn:
    """Capture `model(**inputs)`; every attention call becomes a REWRITTEN report entry, plus
    `refused` REFUSED entries (sites optimize() would have left alone)."""
    dynamic = seq_dynamic(inputs)
    gm = torch.export.export(model.eval(), (), inputs, dynamic_shapes=dynamic, strict=False).module()
    report = Report()
    for node in gm.graph.nodes:
        if op_name(node) in (SDPA_OP, ATTNFX_OP):
            node.meta["attnfx_site"] = len(report.entries)
            variant = "sdpa" if op_name(node) == SDPA_OP else "attnfx"
            report.entries.append(Entry("REWRITTEN", variant, node.name))
    report.entries += [Entry("REFUSED", "", "") for _ in range(refused)]
    return StandIn(gm, (), dict(inputs), dynamic, report)
