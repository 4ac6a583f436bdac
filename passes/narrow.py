"""Take one index of a dim of a tensor the graph builds, computing only that slice.

A padding mask built as (B, 1, M, N) is one row (B, 1, 1, N) of information: the per-key keep mask
attnfx::padded_attention reads. Slicing the finished tensor still builds all B*M*N elements every
call; slicing through the elementwise ops and expands that built it computes B*N of them, and the
full-size tensor dies with the sites that read it.
"""
from __future__ import annotations

from torch.fx import Graph, Node

import torch

from . import ops

aten = torch.ops.aten

# ops whose output element depends only on the inputs' elements at the same (broadcast) index
_ELEMENTWISE = {"where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "add", "sub",
                "mul", "rsub", "neg", "cast", "identity"}
_MAX_DEPTH = 16


def pick(graph: Graph, node: Node, dim: int, index: int) -> Node:
    """`node` narrowed to `[index]` (0 or -1) along `dim`, keeping the dim (size 1)."""
    return _Picker(graph).pick(node, dim, index, 0)


class _Picker:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.done: dict[tuple[Node, int, int], Node] = {}

    def pick(self, node: Node, dim: int, index: int, depth: int) -> Node:
        key = (node, dim, index)
        if key not in self.done:
            self.done[key] = self._narrowed(node, dim, index, depth)
        return self.done[key]

    def _narrowed(self, node: Node, dim: int, index: int, depth: int) -> Node:
        if ops.static_int(ops.shape(node)[dim]) == 1:
            return node
        k = ops.kind(node)
        aten_op = isinstance(node.target, torch._ops.OpOverload)
        if depth < _MAX_DEPTH and aten_op and k in _ELEMENTWISE and ops.is_tensor(node):
            args = tuple(self._input(a, ops.rank(node), dim, index, depth) for a in node.args)
            return self.graph.call_function(node.target, args, dict(node.kwargs))
        if depth < _MAX_DEPTH and aten_op and k == "expand" and ops.is_tensor(node.args[0]):
            source = self._input(node.args[0], ops.rank(node), dim, index, depth)
            sizes = list(node.args[1])
            sizes[dim] = 1
            return self.graph.call_function(node.target, (source, sizes, *node.args[2:]), dict(node.kwargs))
        stop = None if index == -1 else index + 1
        return self.graph.call_function(aten.slice.Tensor, (node, dim, index, stop))

    def _input(self, arg, out_rank: int, dim: int, index: int, depth: int):
        """An argument of a broadcasting op, narrowed where it spans `dim` of the output."""
        if not isinstance(arg, Node) or not ops.is_tensor(arg):
            return arg
        own = dim - (out_rank - ops.rank(arg))
        if own < 0:
            return arg
        return self.pick(arg, own, index, depth + 1)


__all__ = ["pick"]
