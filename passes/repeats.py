"""Fold K/V head repeats (`repeat_kv`, `repeat_interleave`) into grouped-query attention.

`repeat_kv` (unsqueeze -> expand -> reshape) and `repeat_interleave(x, G, dim=heads)` give query head
h the K/V head h // G, which is exactly what grouped kernels (SDPA's `enable_gqa`) do without copying
K/V. `x.repeat(1, G, 1, 1)` tiles instead (h -> h % Hkv) and is deliberately not folded.
"""
from __future__ import annotations

from torch.fx import Node

from . import ops
from .layout import Arranged, Roles, look_through_permutes


def _skip_identity(node: Node) -> Node:
    """Step over full slices and clones that `x[:, :, None]`-style indexing leaves behind."""
    while True:
        k = ops.kind(node)
        if k == "identity":
            node = node.args[0]
        elif k == "slice" and _is_full_slice(node):
            node = node.args[0]
        else:
            return node


def _is_full_slice(node: Node) -> bool:
    src = node.args[0]
    dim = ops.normalize_dim(int(ops.arg(node, "dim", 1, 0)), ops.rank(src))
    start = ops.arg(node, "start", 2, None)
    end = ops.arg(node, "end", 3, None)
    step = ops.arg(node, "step", 4, 1)
    size = ops.sym_expr(ops.shape(src)[dim])
    if end is None or (isinstance(end, int) and end >= 2**62):
        full_end = True
    elif isinstance(end, Node):
        full_end = _same_size(ops.tensor_meta(end), size)
    else:
        full_end = size.is_number and end >= int(size)
    return start in (None, 0) and step == 1 and full_end


def _same_size(a: object, b: object) -> bool:
    return (ops.sym_expr(a) - ops.sym_expr(b)).expand() == 0


def repeated_along(node: Node) -> tuple[Node, int, int] | None:
    """(source, dim, groups) when `node` repeats each slice of `source` along `dim` `groups` times."""
    k = ops.kind(node)
    if k == "repeat_interleave":
        repeats, dim = ops.arg(node, "repeats", 1), ops.arg(node, "dim", 2)
        if isinstance(repeats, int) and dim is not None:
            src = node.args[0]
            return src, ops.normalize_dim(int(dim), ops.rank(src)), repeats
        return None
    if k not in ("reshape", "flatten"):
        return None
    expanded = _skip_identity(node.args[0])
    if ops.kind(expanded) != "expand":
        return None
    unsqueezed = _skip_identity(expanded.args[0])
    if ops.kind(unsqueezed) != "unsqueeze":
        return None
    src = _skip_identity(unsqueezed.args[0])
    new_dim = ops.normalize_dim(int(ops.arg(unsqueezed, "dim", 1)), ops.rank(unsqueezed))
    if new_dim == 0:
        return None
    src_shape, out_shape, exp_shape = ops.shape(src), ops.shape(node), ops.shape(expanded)
    groups = ops.static_int(exp_shape[new_dim])
    dim = new_dim - 1
    heads = ops.static_int(src_shape[dim])
    if groups is None or heads is None or len(out_shape) != len(src_shape):
        return None
    expected = (*src_shape[:dim], heads * groups, *src_shape[dim + 1:])
    if not all(_same_size(a, b) for a, b in zip(out_shape, expected)):
        return None
    return src, dim, groups


def fold_repeats(k: Arranged, v: Arranged, batch_roles: Roles) -> tuple[Arranged, Arranged]:
    """K and V without their head repeat (unchanged when they are not both repeated alike); the
    group size then follows from the head counts."""
    if not batch_roles:
        return k, v
    heads_role = batch_roles[-1]
    folded = []
    for arranged in (k, v):
        base = look_through_permutes(arranged)
        found = repeated_along(base.node)
        if found is None or base.roles[found[1]] != heads_role:
            return k, v
        folded.append((Arranged(found[0], base.roles), found[2]))
    (k_src, k_groups), (v_src, v_groups) = folded
    if k_groups != v_groups:
        return k, v
    return k_src, v_src
