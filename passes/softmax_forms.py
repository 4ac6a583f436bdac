"""Canonicalise softmaxes written out by hand into one softmax node, so the attention rule sees them.

Matches, over one dim d of scores x (every intermediate used only inside the pattern):
    exp(x - rowmax(x)) / sum_d(exp(...))       rowmax: amax(x, d, keepdim) or max(x, d)[0], possibly
    exp(x - rowmax(x)) * reciprocal(sum_d)     unsqueezed back and/or detached
    exp(x) / sum_d(exp(x))                     (no max subtraction: the softmax is the stabler form)
    exp(x - logsumexp(x, d, keepdim))
    softmax(x - rowmax(x), d)                  (an explicit softmax stabilised by hand)
Rewrites to: `aten._softmax(x, d, False)` in place of the hand-written nodes; `Canonical.restore()`
writes them back for every softmax that was not rewritten: a site attnfx keeps keeps its spelling.
Refuses: a form whose intermediates are used elsewhere is left as written and listed in `escaped`, so
the report still names it; anything else that does not fit is not a softmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from . import ops

aten = torch.ops.aten


@dataclass(frozen=True)
class _Saved:
    """An erased node as it was (erasing clears a node's arguments)."""

    node: Node
    args: tuple
    kwargs: dict


@dataclass
class Canonical:
    """The softmax nodes that stand in for hand-written ones, with the nodes they replaced."""

    replaced: dict[Node, list[_Saved]] = field(default_factory=dict)  # softmax -> its form, in order
    escaped: dict[Node, str] = field(default_factory=dict)  # probabilities of a form left as written -> why

    def restore(self, softmax: Node) -> None:
        """Write the hand-written form back in place of `softmax` (one that was not rewritten)."""
        form = self.replaced.pop(softmax)
        graph, copies = softmax.graph, {}
        with graph.inserting_before(softmax):
            for saved in form:
                old = saved.node
                args, kwargs = map_arg((saved.args, saved.kwargs), lambda a: copies.get(a, a))
                new = graph.create_node(old.op, old.target, args, kwargs, name=old.name)
                new.meta = dict(old.meta)
                copies[old] = new
        softmax.replace_all_uses_with(copies[form[-1].node])
        graph.erase_node(softmax)


def canonicalize_softmaxes(graph: Graph) -> Canonical:
    canonical = Canonical()
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        if ops.kind(node) == "softmax":
            _drop_row_max(node, canonical, order)
            continue
        if ops.kind(node) != "exp":
            continue
        found = _handwritten(node)
        if found is None:
            continue
        x, dim, probs, nodes = found
        escape = next((f"{n.name} is also used by {u.name}" for n in sorted(nodes, key=order.__getitem__)
                       for u in ops.users(n) if u not in nodes and u is not probs), None)
        if escape is not None:
            canonical.escaped[probs] = f"a softmax written out by hand, whose intermediate {escape}"
            continue
        with graph.inserting_before(probs):
            softmax = graph.create_node("call_function", aten._softmax.default, (x, dim, False),
                                        name="handwritten_softmax")
        for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
            if key in probs.meta:
                softmax.meta[key] = probs.meta[key]
        probs.replace_all_uses_with(softmax)
        form = [_Saved(n, n.args, dict(n.kwargs)) for n in sorted(nodes | {probs}, key=order.__getitem__)]
        for saved in reversed(form):
            graph.erase_node(saved.node)
        canonical.replaced[softmax] = form
    return canonical


def _handwritten(exp: Node) -> tuple[Node, int, Node, set[Node]] | None:
    """(scores, dim, probabilities, the other nodes of the form) when `exp` starts a hand-written
    softmax."""
    shifted = ops.arg(exp, "self", 0)
    if not ops.is_tensor(shifted):
        return None
    x, shift = shifted, None
    if ops.kind(shifted) == "sub" and ops.scalar_value(shifted.kwargs.get("alpha", 1)) == 1.0:
        x, row = shifted.args[:2]
        shift = _row_statistic(row, x) if isinstance(row, Node) else None
        if shift is None:
            return None
    rank = ops.rank(exp)
    internal = {shifted, *([] if shift is None else shift[2])} - {x}
    if shift is not None and shift[0] == "logsumexp":
        return x, shift[1], exp, internal
    for total in ops.users(exp):
        dim = _row_sum_dim(total, exp, rank)
        if dim is None or (shift is not None and shift[1] != dim):
            continue
        divided = _divided(exp, total)
        if divided is not None:
            probs, chain = divided
            return x, dim, probs, internal | chain | {exp, total}
    return None


def _drop_row_max(softmax: Node, canonical: Canonical, order: dict[Node, int]) -> None:
    """softmax(x - rowmax(x)) over the max's dim is softmax(x) (gpt-oss stabilises by hand before
    an explicit softmax): the same softmax node, reading x."""
    shifted, dim, _ = ops.softmax_args(softmax)
    if not softmax.args or softmax.args[0] is not shifted or ops.kind(shifted) != "sub" \
            or ops.scalar_value(shifted.kwargs.get("alpha", 1)) != 1.0:
        return
    x, row = shifted.args[:2]
    shift = _row_statistic(row, x) if isinstance(row, Node) and isinstance(x, Node) else None
    if shift is None or shift[0] != "reduce_max" or shift[1] != ops.normalize_dim(int(dim), ops.rank(x)):
        return
    nodes = {shifted, *shift[2]}
    if any(u not in nodes and u is not softmax for n in nodes for u in ops.users(n)):
        return  # the shifted scores are used elsewhere: the rule refuses it as written
    graph = softmax.graph
    with graph.inserting_before(softmax):
        args = (x, *softmax.args[1:])
        plain = graph.create_node("call_function", softmax.target, args, dict(softmax.kwargs), name="unshifted_softmax")
    plain.meta.update({k: softmax.meta[k] for k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")
                       if k in softmax.meta})
    softmax.replace_all_uses_with(plain)
    form = [_Saved(n, n.args, dict(n.kwargs)) for n in sorted(nodes | {softmax}, key=order.__getitem__)]
    for saved in reversed(form):
        graph.erase_node(saved.node)
    canonical.replaced[plain] = form


def _row_statistic(row: Node, x: Node) -> tuple[str, int, set[Node]] | None:
    """("reduce_max" | "logsumexp", dim, nodes) when `row` is x's max or logsumexp over one dim, kept as a
    size-1 dim (keepdim, or unsqueezed back), possibly detached."""
    nodes, keepdim_added = set(), None
    node = row
    while ops.kind(node) in ("identity", "unsqueeze"):  # detach / unsqueeze back
        nodes.add(node)
        if ops.kind(node) == "unsqueeze":
            keepdim_added = ops.normalize_dim(int(ops.arg(node, "dim", 1)), ops.rank(node))
        node = node.args[0]
    if node.op == "call_function" and (ops.target_name(node), node.args[1]) in (("getitem", 0), ("getattr", "values")):
        nodes.add(node)
        node = node.args[0]  # max(x, dim) returns (values, indices)
    kind = ops.kind(node)
    if kind not in ("reduce_max", "logsumexp") or ops.arg(node, "self", 0) is not x:
        return None
    dims = ops.arg(node, "dim", 1)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keepdim = bool(ops.arg(node, "keepdim", 2, False))
    if len(dims) != 1 or keepdim == (keepdim_added is not None):
        return None
    dim = ops.normalize_dim(int(dims[0]), ops.rank(x))
    if keepdim_added is not None and keepdim_added != dim:
        return None
    nodes.add(node)
    return kind, dim, nodes


def _row_sum_dim(total: Node, exp: Node, rank: int) -> int | None:
    """The dim `total` sums `exp` over, keeping it, or None."""
    if ops.kind(total) != "sum" or ops.arg(total, "self", 0) is not exp:
        return None
    dims = ops.arg(total, "dim", 1)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if len(dims) != 1 or not ops.arg(total, "keepdim", 2, False) or ops.arg(total, "dtype", 3) is not None:
        return None
    return ops.normalize_dim(int(dims[0]), rank)


def _divided(exp: Node, total: Node) -> tuple[Node, set[Node]] | None:
    """(the node computing exp / total, the nodes of 1 / total on the way) for a division or a
    product with the reciprocal."""
    for user in ops.users(exp):
        k = ops.kind(user)
        if k == "div" and tuple(user.args[:2]) == (exp, total) and ops.arg(user, "rounding_mode", 2) is None:
            return user, set()
        if k == "mul" and exp in user.args[:2]:
            other = user.args[1] if user.args[0] is exp else user.args[0]
            chain = _reciprocal_chain(other, total)
            if chain:
                return user, chain
    return None


def _reciprocal_chain(node: object, total: Node) -> set[Node]:
    """The nodes of 1 / total, reciprocal(total), or either times 1 (empty: not one of those)."""
    if not isinstance(node, Node):
        return set()
    chain = set()
    if ops.kind(node) == "mul" and 1.0 in [ops.scalar_value(a) for a in node.args[:2]]:
        chain.add(node)
        node = next((a for a in node.args[:2] if isinstance(a, Node)), None)
        if node is None:
            return set()
    if ops.kind(node) == "reciprocal" and node.args[0] is total:
        return chain | {node}
    if ops.kind(node) == "div" and ops.scalar_value(node.args[0]) == 1.0 and node.args[1] is total:
        return chain | {node}
    return set()


__all__ = ["Canonical", "canonicalize_softmaxes"]
