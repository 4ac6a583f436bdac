"""One op vocabulary: every spelling of an op has one kind, for the matcher and the mask proof alike."""
from __future__ import annotations

import operator

import pytest
import torch
from torch.fx import Graph

from attnfx.passes import ops


def call(target, *args):
    graph = Graph()
    x = graph.placeholder("x")
    return graph.call_function(target, (x, *args))


def method(name, *args):
    graph = Graph()
    x = graph.placeholder("x")
    return graph.call_method(name, (x, *args))


@pytest.mark.parametrize("node,kind", [
    (call(torch.ops.aten._softmax.default, -1, False), "softmax"),
    (call(torch.softmax, -1), "softmax"),
    (method("softmax", -1), "softmax"),
    (call(operator.matmul, 1), "matmul"),
    (call(torch.ops.aten.bmm.default, 1), "matmul"),
    (call(torch.subtract, 1), "sub"),
    (call(torch.ops.aten.sub.Tensor, 1), "sub"),
    (call(operator.le, 1), "le"),
    (call(torch.ops.aten.le.Tensor, 1), "le"),
    (call(operator.and_, 1), "and"),
    (call(torch.logical_and, 1), "and"),
    (method("masked_fill_", 1, 0.0), "masked_fill"),
    (call(torch.ones_like), "fill"),
    (call(torch.ops.aten.full.default, 0.0), "fill"),
    (call(torch.ops.aten.scalar_tensor.default), "fill"),
    (call(torch.exp), "exp"),
    (call(torch.ops.aten.amax.default, [-1], True), "reduce_max"),
    (method("max", -1), "reduce_max"),
    (call(torch.sin), None),
])
def test_kind_of_each_spelling(node, kind) -> None:
    assert ops.kind(node) == kind


def test_in_place_ops_are_recognised_as_writes() -> None:
    assert ops.is_inplace(method("masked_fill_", 1, 0.0))
    assert not ops.is_inplace(method("masked_fill", 1, 0.0))
    assert not ops.is_inplace(call(torch.ops.aten._softmax.default, -1, False))
    assert not ops.is_inplace(call(operator.and_, 1))
