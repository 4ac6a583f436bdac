"""Index algebra: contractions as einsum labels, tensors as tuples of roles.

A contraction (matmul, bmm, baddbmm, einsum) is read as labelled operands, so `q @ k.transpose(-1, -2)`,
`torch.einsum("bqhd,bkhd->bhqk", q, k)` and `bmm(q, k.permute(0, 2, 1))` are the same thing. Every
tensor of a site is then described by its *roles*, one per dim: batch roles `b0, b1, ...`, query `m`,
key `n`, feature `e` (q/k) or `f` (v). The rewriter arranges any operand into canonical role order
with permutes and unsqueezes, composing through the model's own transposes so they cancel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.fx import Graph, Node

from . import ops

aten = torch.ops.aten

Roles = tuple[str, ...]


@dataclass(frozen=True)
class Contraction:
    """`out[out_labels] = sum lhs[lhs_labels] * rhs[rhs_labels]` (times alpha, plus beta * addend)."""

    node: Node
    lhs: Node
    rhs: Node
    lhs_labels: str
    rhs_labels: str
    out_labels: str
    alpha: float = 1.0
    addend: Node | None = None
    beta: float = 1.0

    def contracted(self) -> str:
        return "".join(c for c in self.lhs_labels if c in self.rhs_labels and c not in self.out_labels)


_BATCH_LETTERS = "ABCDEFGH"


def _matmul_labels(lhs_rank: int, rhs_rank: int) -> tuple[str, str, str] | None:
    if lhs_rank < 2 or rhs_rank < 2:
        return None
    out_rank = max(lhs_rank, rhs_rank)
    batch = _BATCH_LETTERS[: out_rank - 2]
    lhs_batch = batch[len(batch) - (lhs_rank - 2):]
    rhs_batch = batch[len(batch) - (rhs_rank - 2):]
    return lhs_batch + "ik", rhs_batch + "kj", batch + "ij"


def read_contraction(node: Node) -> Contraction | None:
    """The node as a two-operand contraction, or None (1-D matmuls, ellipsis einsums, ...)."""
    k = ops.kind(node)
    if k == "matmul":
        lhs, rhs = ops.arg(node, "self", 0), ops.arg(node, "other", 1)
        if not (ops.is_tensor(lhs) and ops.is_tensor(rhs)):
            return None
        labels = _matmul_labels(ops.rank(lhs), ops.rank(rhs))
        return Contraction(node, lhs, rhs, *labels) if labels else None
    if k == "baddbmm":
        addend, lhs, rhs = ops.arg(node, "self", 0), ops.arg(node, "batch1", 1), ops.arg(node, "batch2", 2)
        beta = ops.scalar_value(ops.arg(node, "beta", 3, 1.0))
        alpha = ops.scalar_value(ops.arg(node, "alpha", 4, 1.0))
        if beta is None or alpha is None or not (ops.is_tensor(lhs) and ops.is_tensor(rhs)):
            return None
        return Contraction(node, lhs, rhs, "Aik", "Akj", "Aij", alpha=alpha, addend=addend, beta=beta)
    if k == "einsum":
        return _read_einsum(node)
    return None


def _read_einsum(node: Node) -> Contraction | None:
    equation = ops.arg(node, "equation", 0)
    operands = node.args[1] if len(node.args) > 1 else node.kwargs.get("tensors", ())
    if isinstance(operands, Node) or not isinstance(equation, str):
        return None
    if len(node.args) > 2:
        operands = node.args[1:]
    if len(operands) != 2 or "->" not in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    parts = inputs.split(",")
    lhs, rhs = operands
    if len(parts) != 2 or not (ops.is_tensor(lhs) and ops.is_tensor(rhs)):
        return None
    if "..." in equation:
        parts, out = _expand_ellipsis(parts, out, [ops.rank(lhs), ops.rank(rhs)])
    if any(len(set(p)) != len(p) for p in (*parts, out)):
        return None
    return Contraction(node, lhs, rhs, parts[0], parts[1], out)


def _expand_ellipsis(parts: list[str], out: str, ranks: list[int]) -> tuple[list[str], str]:
    """Name the dims an einsum's `...` stands for (right-aligned broadcasting, like the op)."""
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in "".join(parts) + out]
    counts = [rank - (len(p) - 3) if "..." in p else 0 for p, rank in zip(parts, ranks)]
    dims = "".join(free[: max(counts)])
    parts = [p.replace("...", dims[len(dims) - c:]) for p, c in zip(parts, counts)]
    return parts, out.replace("...", dims)


@dataclass(frozen=True)
class Arranged:
    """A tensor node and the role of each of its dims."""

    node: Node
    roles: Roles

    def size(self, role: str):
        """Size of the dim playing `role` (1 when the tensor broadcasts over that role)."""
        return ops.shape(self.node)[self.roles.index(role)] if role in self.roles else 1


def is_batch_role(role: str) -> bool:
    return role not in ("m", "n", "e", "f")


def batch_reshape(node: Node, roles: Roles, prefix: str) -> tuple[Roles, tuple] | None:
    """New roles when a reshape only splits or merges the batch dims in front of the last two
    (e.g. scores (B*H, M, N) -> (B, H, M, N)), with the new batch sizes."""
    src = ops.arg(node, "self", 0)
    if len(roles) < 2 or any(is_batch_role(r) for r in roles[-2:]):
        return None
    src_shape, out_shape = ops.shape(src), ops.shape(node)
    if len(out_shape) < 2 or not all(ops.same_size(a, b) for a, b in zip(src_shape[-2:], out_shape[-2:])):
        return None
    batch = tuple(out_shape[:-2])
    return tuple(f"{prefix}{i}" for i in range(len(batch))) + tuple(roles[-2:]), batch


def unflatten_sizes(sizes: tuple) -> list[int] | None:
    """Sizes for `unflatten`: static values and at most one -1, else None."""
    values = [ops.unflatten_size(s) for s in sizes]
    return values if values.count(-1) <= 1 else None


def broadcast_prefix_sizes(sizes: tuple, canonical: tuple) -> list[int] | None:
    """Canonical batch sizes for a tensor in another (merged) batch layout that is size 1 on its leading
    dims and whole, with static sizes, on the rest: Swin's relative-position bias (1, H) added to scores
    in (B * windows, H) before they are viewed as (B, windows, H). Row-major flattening keeps the
    trailing dims in place, so they are a suffix of the canonical layout with the same product."""
    static = [ops.static_int(s) for s in sizes]
    lead = next((i for i, s in enumerate(static) if s != 1), len(static))
    if None in static[lead:]:
        return None
    trailing = math.prod(static[lead:])
    suffix, product = len(canonical), 1
    while product < trailing and suffix > 0:
        suffix -= 1
        value = ops.static_int(canonical[suffix])
        if value is None:
            return None
        product *= value
    return [1] * suffix + [ops.static_int(s) for s in canonical[suffix:]] if product == trailing else None


def _permute_source(node: Node) -> tuple[Node, list[int]] | None:
    """(input, perm) when `node` only reorders dims of its input: out dim i = input dim perm[i]."""
    k = ops.kind(node)
    if k == "permute":
        src = ops.arg(node, "self", 0)
        dims = ops.arg(node, "dims", 1)
        if not isinstance(dims, (list, tuple)):
            dims = node.args[1:]
        ndim = ops.rank(src)
        return src, [ops.normalize_dim(int(d), ndim) for d in dims]
    if k == "transpose":
        src = ops.arg(node, "self", 0)
        ndim = ops.rank(src)
        if ops.target_name(node) == "t":
            d0, d1 = 0, ndim - 1
        else:
            d0 = ops.normalize_dim(int(ops.arg(node, "dim0", 1)), ndim)
            d1 = ops.normalize_dim(int(ops.arg(node, "dim1", 2)), ndim)
        perm = list(range(ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return src, perm
    return None


def permute_chain(arranged: Arranged) -> list[Arranged]:
    """`arranged` and each tensor the model's own transposes/permutes made it from, in order."""
    chain = [arranged]
    node, roles = arranged.node, arranged.roles
    while (source := _permute_source(node)) is not None:
        src, perm = source
        src_roles = [""] * len(perm)
        for out_dim, in_dim in enumerate(perm):
            src_roles[in_dim] = roles[out_dim]
        node, roles = src, tuple(src_roles)
        chain.append(Arranged(node, roles))
    return chain


def look_through_permutes(arranged: Arranged) -> Arranged:
    """The tensor before any of the model's own transposes/permutes."""
    return permute_chain(arranged)[-1]


def arrange(graph: Graph, arranged: Arranged, target: Sequence[str]) -> Node:
    """Emit nodes giving `arranged` in role order `target`; roles it lacks become size-1 dims.

    Reuses the first tensor on the model's permute chain already in target order, so a model's
    `k.transpose(-1, -2)` followed by our transpose back costs nothing.
    """
    chain = permute_chain(arranged)
    in_order = [a for a in chain if [r for r in target if r in a.roles] == list(a.roles)]
    base = in_order[0] if in_order else chain[-1]
    node, roles = base.node, list(base.roles)
    present = [r for r in target if r in roles]
    extra = [r for r in roles if r not in target]
    if extra:
        raise ValueError(f"cannot arrange roles {roles} into {list(target)}: {extra} have no place")
    perm = [roles.index(r) for r in present]
    if perm != list(range(len(perm))):
        node = graph.call_function(aten.permute.default, (node, perm))
    for position, role in enumerate(target):
        if role not in roles:
            node = graph.call_function(aten.unsqueeze.default, (node, position))
    return node
