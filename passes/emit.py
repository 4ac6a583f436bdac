"""Emit the replacement for one site: canonical operands, the mask, the variant's call, and the
output back in the model's layout. Nothing is wired in here: the caller verifies, then swaps uses.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from attnfx.cost_model.spec import MaskInput
from attnfx.kernels import Operands, Variant

from . import ops
from .layout import Arranged, arrange, broadcast_prefix_sizes, is_batch_role, unflatten_sizes
from .narrow import pick
from .site import Alibi, BiasTerm, Decay, Lowering, Site

aten = torch.ops.aten
SINK_OP = "attnfx::attention"  # the op whose second output (lse) the attention-sink lowering reads


@dataclass(frozen=True)
class Emitted:
    nodes: tuple[Node, ...]  # every node added, in order
    output: Node  # replaces the site's AV contraction
    call: Node  # the variant's call
    operands: Operands  # what the call reads, in canonical layout


def emit(graph: Graph, site: Site, lowering: Lowering, variant: Variant, site_index: int) -> Emitted:
    av = site.av.node
    before = av.prev
    with graph.inserting_before(av):
        builder = _Builder(graph, site)
        q = builder.scaled_q(site)
        k = builder.operand(site.k, ("n", "e"))
        v = builder.operand(site.v, ("n", "f"))
        k, v = builder.broadcast_batch(site, site.k, k), builder.broadcast_batch(site, site.v, v)
        mask = builder.mask(lowering, ops.dtype(site.q.node))
        decay = builder.decay(site.decay) if lowering.spec.decay else None
        slopes = builder.slopes(lowering.alibi, lowering.spec.heads) if lowering.alibi is not None else None
        operands = Operands(q=q, k=k, v=v, mask=mask, slopes=slopes, decay=decay, fill=lowering.fill)
        call = variant.call(lowering.spec, operands)
        out = call_node = graph.call_function(call.target, call.args, call.kwargs)
        if call.output_index is not None:
            out = graph.call_function(operator.getitem, (out, call.output_index))
        if site.sink is not None:
            out = builder.with_sink(call_node, out, site)
        out = builder.restore(out, site)
        if ops.dtype(av) != ops.dtype(site.q.node):
            out = graph.call_function(aten._to_copy.default, (out,), {"dtype": ops.dtype(av)})
    nodes = []
    node = before.next
    while node is not av:
        nodes.append(node)
        node = node.next
    for new in nodes:
        new.meta["nn_module_stack"] = av.meta.get("nn_module_stack", {})
        new.meta["stack_trace"] = av.meta.get("stack_trace", "")
        new.meta["attnfx_site"] = site_index
        _propagate_fake(new)
    return Emitted(tuple(nodes), out, call_node, operands)


class _Builder:
    """Arranges tensors into canonical 4-D (B, H, ·, ·) layout and back."""

    def __init__(self, graph: Graph, site: Site) -> None:
        self.graph = graph
        self.batch_roles = site.batch_roles
        self.structures = site.structures

    def call(self, target, *args, **kwargs) -> Node:
        return self.graph.call_function(target, args, kwargs)

    def to_4d(self, node: Node) -> Node:
        nb = len(self.batch_roles)
        for _ in range(2 - nb):
            node = self.call(aten.unsqueeze.default, node, 0)
        if nb > 2:
            node = self.call(aten.flatten.using_ints, node, 1, nb - 1)
        return node

    def operand(self, arranged: Arranged, inner: Roles) -> Node:
        return self.to_4d(self.canonical(arranged, inner))

    def scaled_q(self, site: Site) -> Node:
        """q with the site's tensor scales folded in (each is constant along the keys), in q's dtype."""
        q = self.operand(site.q, ("m", "e"))
        dtype = ops.dtype(site.q.node)
        promotes = False
        for term in site.scale_tensors:
            factor = term.node
            if ops.rank(factor) > 0:  # a 0-d factor does not promote q's dtype; others may
                promotes |= ops.dtype(factor) != dtype
                factor = self.to_4d(self.canonical(Arranged(factor, term.roles), ("m", "n")))
            q = self.call(aten.div.Tensor if term.divides else aten.mul.Tensor, q, factor)
        return self.call(aten._to_copy.default, q, dtype=dtype) if promotes else q

    def with_sink(self, call: Node, out: Node, site: Site) -> Node:
        """Softmax over keys + sink = attention * sum / (sum + e^sink) = attention * sigmoid(lse - sink);
        a fully masked row (out 0, lse -inf) stays 0, as in eager."""
        lse = self.call(operator.getitem, call, 1)
        sink = self.to_4d(self.canonical(Arranged(site.sink.node, site.sink.roles), ("m", "n")))
        gap = self.call(aten.sub.Tensor, self.call(aten.unsqueeze.default, lse, -1), sink)
        scaled = self.call(aten.mul.Tensor, out, self.call(aten.sigmoid.default, gap))
        return self.call(aten._to_copy.default, scaled, dtype=ops.dtype(site.q.node))

    def _layout_of(self, roles: Roles) -> Roles:
        batch = [r for r in roles if is_batch_role(r)]
        if all(r in self.batch_roles for r in batch):
            return self.batch_roles
        return next(layout for layout in self.structures if set(batch) <= set(layout))

    def canonical(self, arranged: Arranged, inner: Roles) -> Node:
        """`arranged` in (canonical batch..., *inner) order, converting another batch layout
        (e.g. merged (B*H) before a view to (B, H)) by flatten + unflatten."""
        layout = self._layout_of(arranged.roles)
        node = arrange(self.graph, arranged, (*layout, *inner))
        if layout == self.batch_roles:
            return node
        canonical = self.structures[self.batch_roles]
        sizes = broadcast_prefix_sizes(tuple(arranged.size(r) for r in layout), canonical)
        return self._rebatch(node, len(layout), sizes if sizes is not None else unflatten_sizes(canonical))

    def _rebatch(self, node: Node, batch_dims: int, sizes: list[int]) -> Node:
        if batch_dims == 0:
            node = self.call(aten.unsqueeze.default, node, 0)
        elif batch_dims > 1:
            node = self.call(aten.flatten.using_ints, node, 0, batch_dims - 1)
        return self.call(aten.unflatten.int, node, 0, sizes)

    def broadcast_batch(self, site: Site, source: Arranged, kv: Node) -> Node:
        """K/V shared across the batch (a size-1 batch dim) are expanded, as a view, to q's batch."""
        if len(self.batch_roles) < 2:
            return kv
        batch_role = self.batch_roles[0]
        q_batch = site.q.size(batch_role)
        if ops.static_int(source.size(batch_role)) != 1 or ops.static_int(q_batch) == 1:
            return kv
        size = ops.static_int(q_batch)
        if size is None:
            size = self.call(aten.sym_size.int, site.q.node, site.q.roles.index(batch_role))
        return self.call(aten.expand.default, kv, [size, -1, -1, -1])

    def mask(self, lowering: Lowering, dtype: torch.dtype) -> Node | None:
        if lowering.spec.mask is MaskInput.NONE:
            return None
        if lowering.per_key:
            return self.key_keep(lowering)
        terms = [self._bias_term(term) for term in lowering.bias]
        total = self._sum(terms)
        keeps = []
        for term in lowering.masks:
            node = self.canonical(Arranged(term.node, term.roles), ("m", "n"))
            keep = node if term.keep_when else self.call(aten.logical_not.default, node)
            later = self._sum(terms[term.later_bias:])  # what was added on top of the fill
            excluded = term.fill if later is None else self.call(aten.add.Tensor, later, term.fill)
            keeps.append((keep, self._scaled_fill(excluded, term.scaled_by, dtype)))
        if lowering.spec.mask is MaskInput.BOOL:
            return self.to_4d(keeps[0][0])
        for keep, excluded in keeps:
            if total is None and isinstance(excluded, Node):
                total = self.call(aten.where.ScalarSelf, keep, 0.0, excluded)
            elif total is None:
                total = self.call(aten.where.Scalar, keep, 0.0, excluded)
            elif isinstance(excluded, Node):
                total = self.call(aten.where.self, keep, total, excluded)
            else:
                total = self.call(aten.where.ScalarOther, keep, total, excluded)
        if _dtype_of(total) not in (None, dtype):
            total = self.call(aten._to_copy.default, total, dtype=dtype)
        return self.to_4d(total)

    def decay(self, decay: Decay) -> Node:
        """A linear site's decay lambda, one value per canonical head: (H,)."""
        if decay.values is not None:
            return self.call(torch.tensor, list(decay.values), dtype=torch.float32)
        node = self.call(aten.reshape.default, decay.source, [-1])
        if decay.exp_coeff is not None:
            node = self.call(aten.exp.default, self.call(aten.mul.Tensor, node, decay.exp_coeff))
        return node

    def slopes(self, alibi: Alibi, heads: int) -> Node:
        """(H,) float32 ALiBi slopes, read at run time from the tensor of the model that holds them."""
        if alibi.source is None:
            return self.call(aten.full.default, [heads], alibi.value, dtype=torch.float32)
        node = self.call(aten.reshape.default, alibi.source, [-1])
        if alibi.head_dim is None:
            node = self.call(aten.expand.default, node, [heads])
        if alibi.term.coeff != 1.0:
            node = self.call(aten.mul.Tensor, node, alibi.term.coeff)
        return self.call(aten._to_copy.default, node, dtype=torch.float32)

    def key_keep(self, lowering: Lowering) -> Node:
        """The per-key keep mask (B|1, 1, 1, N) of the site's 0/exclusion terms. The proof says the
        keep-predicate is band(m, n) & padding(b, n): the last query row sees every key the band
        lets any row see, so its keep row is the padding (any row sees nothing more under a window)."""
        keep = None
        for term in (*lowering.bias, *lowering.masks):
            node = term.node
            if lowering.spec.window is None and "m" in term.roles:
                node = pick(self.graph, node, term.roles.index("m"), -1)
            node = self.to_4d(self.canonical(Arranged(node, term.roles), ("m", "n")))
            node = self.call(aten.slice.Tensor, node, 1, 0, 1)
            if isinstance(term, BiasTerm):
                node = self.call(aten.eq.Scalar, node, 0)
            elif not term.keep_when:
                node = self.call(aten.logical_not.default, node)
            if lowering.spec.window is not None:
                node = self.call(aten.any.dim, node, 2, True)
            keep = node if keep is None else self.call(aten.logical_and.default, keep, node)
        return keep

    def _scaled_fill(self, excluded: Node | float, scales: tuple, dtype: torch.dtype) -> Node | float:
        """The excluded scores' value after the tensor scales that followed the mask, in `dtype`."""
        for scale in scales:
            factor = scale.node
            if ops.rank(factor):
                factor = self.canonical(Arranged(factor, scale.roles), ("m", "n"))
            if isinstance(excluded, Node):
                excluded = self.call(aten.div.Tensor if scale.divides else aten.mul.Tensor, excluded, factor)
            else:
                factor = self.call(aten.reciprocal.default, factor) if scale.divides else factor
                excluded = self.call(aten.mul.Scalar, factor, excluded)
        if scales:
            excluded = self.call(aten._to_copy.default, excluded, dtype=dtype)
        return excluded

    def _bias_term(self, term) -> Node:
        node = self.canonical(Arranged(term.node, term.roles), ("m", "n"))
        return node if term.coeff == 1.0 else self.call(aten.mul.Tensor, node, term.coeff)

    def _sum(self, nodes: list[Node]) -> Node | None:
        total = None
        for node in nodes:
            total = node if total is None else self.call(aten.add.Tensor, total, node)
        return total

    def restore(self, out: Node, site: Site) -> Node:
        """(B, H, M, F) back to the AV contraction's own layout."""
        nb = len(self.batch_roles)
        if nb < 2:
            for _ in range(2 - nb):
                out = self.call(aten.squeeze.dim, out, 0)
        elif nb > 2:
            out = self.call(aten.unflatten.int, out, 1, unflatten_sizes(tuple(self.structures[self.batch_roles][1:])))
        layout = self._layout_of(site.out_roles)
        if layout != self.batch_roles:
            out = self._rebatch(out, len(self.batch_roles), unflatten_sizes(self.structures[layout]))
        canonical = (*layout, "m", "f")
        perm = [canonical.index(r) for r in site.out_roles]
        if perm != list(range(len(perm))):
            out = self.call(aten.permute.default, out, perm)
        return out


def _dtype_of(node: Node) -> torch.dtype | None:
    meta = ops.tensor_meta(node)
    return getattr(meta, "dtype", None)


def _propagate_fake(node: Node) -> None:
    """Give emitted nodes the FakeTensor metadata capture gave the rest of the graph."""
    fake_mode = None
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            fake_mode = val.fake_mode
            break
    if fake_mode is None:
        return
    args = map_arg(node.args, lambda n: n.meta.get("val"))
    kwargs = map_arg(node.kwargs, lambda n: n.meta.get("val"))
    try:
        with fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - metadata is a convenience; the real run is verified
        node.meta.pop("val", None)


__all__ = ["Emitted", "emit"]
