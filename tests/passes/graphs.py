"""Trace a few-line function the way optimize() captures a model, for unit tests of single passes."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node

from attnfx.capture import capture
from attnfx.passes import ops


class _Fn(nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def traced(fn: Callable, *args: torch.Tensor) -> GraphModule:
    """The ATen-level graph of `fn(*args)`, every dim dynamic (as optimize() captures it)."""
    return capture(_Fn(fn), args, {}).graph_module


def only(gm: GraphModule, kind: str) -> Node:
    """The one node of `kind` in the graph."""
    (node,) = [n for n in gm.graph.nodes if ops.kind(n) == kind]
    return node


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
