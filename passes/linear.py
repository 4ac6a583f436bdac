"""The linear-attention rule (`attention.linear`): lift `(phi(Q) phi(K)^T * M) V`, written with no
softmax, into a site of kind LINEAR.

Matches: a contraction with values (the anchor, a matmul or einsum) whose weights trace back through
scalar scales, causal masks (tril/triu, masked_fill or where with 0, a 0/1 band multiplied in), a
per-head decay mask lambda^(m - n) and views to a contraction of queries with keys over one feature
axis; optionally divided by the row sum of the same weights (plus a constant eps), before or after
the contraction with values. q and k are the operands as written: any feature map phi (elu + 1,
relu, exp, a softmax over the features, ...) is part of them.
Rewrites to: attnfx::linear_attention (right to left without a causal band, chunked with one).
Refuses, listed with a `Reason`: a map applied after the product, a decay that is not geometric, a
normaliser over another axis, masks that are not a causal band, weights used elsewhere.
Not listed (stage "QK"): contractions whose keys or values are the model's own tensors (two
projections in a row), weights that pass a softmax or sigmoid (those rules' sites), anything not
shaped queries-keys-values.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.fx import Node

from attnfx.cost_model.spec import Causal, Kind

from . import ops
from .attention import _build_site, _ProbPath, _value_roles, qk_roles
from .layout import Arranged, Contraction, Roles, is_batch_role, read_contraction
from .linear_weights import NORMALISERS, prove, read_weights
from .mask_eval import MaskEvaluator
from .scores import ScoreAlgebra, ScorePath, constant_scalar, find_contraction
from .site import Lowering, Reason, Refusal, Site

ANCHORS = ("matmul", "einsum")  # the op kinds a linear site is anchored on (its AV contraction)
NOT_ATTENTION = "QK"  # the stage of refusals that mean "not linear attention": such anchors are not listed
_VIEWS = ("cast", "identity", "transpose", "permute", "reshape", "unsqueeze", "squeeze", "expand", "flatten",
          "repeat_interleave", "slice")


@dataclass(frozen=True)
class _Normaliser:
    """out / (sum over keys of the weights + eps): where it divides and what it is made of."""

    output: Node  # the divided output (after the AV contraction) or the divided weights (before it)
    eps: float
    nodes: tuple[Node, ...]  # the sum, eps and reshapes, and the division


def lift_linear(anchor: Node, evaluator: MaskEvaluator) -> Site | Refusal:
    """Lift the linear attention whose AV contraction is `anchor`, or say why not (stage "QK": it is
    not linear attention at all)."""
    av = read_contraction(anchor)
    found = _find_weights(av) if av is not None else None
    if found is None:
        return _not_attention(f"{anchor.name} does not contract query-key weights with values")
    sp, weights, before, values = found
    if any(ops.kind(n) in NORMALISERS for n in sp.path):
        name = next(ops.kind(n) for n in sp.path if ops.kind(n) in NORMALISERS)
        return Refusal(Reason.SOFTMAX_PRESENT, f"the weights pass a {name}: that is {name} attention (its own "
                       "rule's site), not linear attention", NOT_ATTENTION)
    c, values_node = sp.contraction, values[0].node
    state = next((n for n in (c.rhs, values_node) if _is_model_tensor(n)), None)
    if state is not None:
        return _not_attention(f"{state.name} is a tensor of the model: a product of projections, not attention")
    if not _per_sequence(c, sp.roles, values[0]):
        return _not_attention("the keys or the values have no batch or head axis: a product of projections "
                              "(an MLP), not attention")
    if len({_source(n) for n in (c.lhs, c.rhs, values_node)}) < 3:
        return _not_attention("queries, keys and values are not three tensors (a Gram product such as x x^T x, "
                              "or attention weights multiplied together)")
    after = _normaliser(anchor, weights, sp.final_roles, values[1]) if before is None else None
    normaliser = before or after
    if isinstance(normaliser, Refusal):
        return normaliser
    if normaliser is not None and any(ops.kind(n) == "exp" for n in sp.path):
        return Refusal(Reason.SOFTMAX_PRESENT, "exp of the product divided by its row sum is a softmax written "
                       "out by hand (the softmax rule's site)", NOT_ATTENTION)
    escape = _escape(weights, {anchor, *(normaliser.nodes if normaliser else ())})
    if escape is not None:
        return escape
    return _site(anchor, av, sp, weights, values, normaliser, after is not None, evaluator)


def feature_maps(site: Site) -> set[Node]:
    """The nodes a linear site's q and k are views of (its feature maps phi(q), phi(k)); empty for
    other kinds. A softmax among them normalises features, not attention weights."""
    if site.kind is not Kind.LINEAR:
        return set()
    return {_source(site.q.node), _source(site.k.node)}


def _not_attention(message: str) -> Refusal:
    return Refusal(Reason.NO_QK_CONTRACTION, message, NOT_ATTENTION)


def _find_weights(av: Contraction) -> tuple[ScorePath, Node, _Normaliser | None, tuple[Arranged, Roles]] | None:
    """(score path, weights, the normaliser dividing them before AV, values and output roles) for
    the operand of `av` that traces back to a query-key contraction and is contracted over its key axis."""
    for operand in (av.lhs, av.rhs):
        before = _divided_weights(operand)
        weights = before.output.args[0] if before is not None else operand
        sp = find_contraction(weights, qk_roles, accepts=lambda node: True)
        if isinstance(sp, Refusal) or sp.contraction.node is av.node:
            continue
        values = _value_roles(av, operand, sp.final_roles)
        if not isinstance(values, Refusal):
            return sp, weights, before, values
    return None


def _per_sequence(c: Contraction, score_roles: Roles, values: Arranged) -> bool:
    """Keys and values of attention belong to a sequence of the batch (a batch or head axis); a
    weight matrix shared by every row, as in `gelu(x @ W1) @ W2`, has none."""
    label_roles = dict(zip(c.out_labels, score_roles))
    keys_batched = any(is_batch_role(label_roles[label]) for label in c.rhs_labels if label in label_roles)
    return keys_batched and any(is_batch_role(role) for role in values.roles)


def _source(node: Node) -> Node:
    """The tensor `node` is a view of."""
    while ops.kind(node) in _VIEWS and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _is_model_tensor(node: Node) -> bool:
    """A parameter, buffer or constant of the model, seen through views (in Dynamo's graphs, an
    input Dynamo named after a module's parameter or buffer)."""
    source = _source(node)
    dynamo_state = source.op == "placeholder" and ("_parameters_" in source.name or "_buffers_" in source.name)
    return source.op == "get_attr" or dynamo_state


def _row_sum(den: Node, weights: Node) -> tuple[float, list[Node], Node] | None:
    """(eps, nodes, the sum) when `den` is sum(weights over one axis) [+ eps] through reshapes."""
    eps, nodes = 0.0, []
    while True:
        k = ops.kind(den)
        if k == "add" and len(den.args) == 2 and constant_scalar(den.args[1]) is not None:
            eps, nodes, den = eps + constant_scalar(den.args[1]), nodes + [den], den.args[0]
        elif k == "add" and len(den.args) == 2 and constant_scalar(den.args[0]) is not None:
            eps, nodes, den = eps + constant_scalar(den.args[0]), nodes + [den], den.args[1]
        elif k in ("unsqueeze", "reshape", "cast", "identity", "transpose", "permute") and isinstance(den.args[0], Node):
            nodes, den = nodes + [den], den.args[0]
        else:
            break
    if ops.kind(den) != "sum" or den.args[0] is not weights:
        return None
    return eps, nodes + [den], den


def _divided_weights(operand: Node) -> _Normaliser | None:
    """`w / (w.sum(-1, keepdim=True) + eps)` feeding the AV contraction."""
    if ops.kind(operand) != "div" or not all(isinstance(a, Node) for a in operand.args[:2]):
        return None
    found = _row_sum(operand.args[1], operand.args[0])
    return None if found is None else _Normaliser(operand, found[0], (*found[1], operand))


def _normaliser(anchor: Node, weights: Node, roles: Roles, out_roles: Roles) -> _Normaliser | Refusal | None:
    """`(w @ v) / (w.sum(-1, keepdim=True) + eps)`: the division after the AV contraction, if any;
    a refusal when the row sum is over another axis than the keys or lines up with other rows."""
    users = ops.users(anchor)
    if len(users) != 1 or ops.kind(users[0]) != "div" or users[0].args[0] is not anchor:
        return None
    division = users[0]
    found = _row_sum(division.args[1], weights) if isinstance(division.args[1], Node) else None
    if found is None:
        return None
    eps, nodes, total = found
    dims = ops.arg(total, "dim", 1)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    summed = [roles[ops.normalize_dim(int(d), len(roles))] for d in dims]
    if summed != ["n"]:
        names = {"m": "queries", "n": "keys"}
        return Refusal(Reason.NORMALIZER_AXIS, f"{total.name} sums the weights over "
                       f"[{', '.join(names.get(r, 'a batch/head dim') for r in summed)}]: a normaliser sums each "
                       "query's weights over the keys", "normalize")
    if not _rows_line_up(division.args[1], anchor, out_roles):
        return Refusal(Reason.NORMALIZER_AXIS, f"{division.name} divides each output row by another row's sum",
                       "normalize")
    return _Normaliser(division, eps, (*nodes, division))


def _rows_line_up(den: Node, out: Node, out_roles: Roles) -> bool:
    """The row sums (one per query, size 1 along the value features) broadcast onto the output rows."""
    shape, offset = ops.shape(den), len(out_roles) - ops.rank(den)
    if offset < 0 or "m" not in out_roles[offset:]:
        return False
    for role, size, out_size in zip(out_roles[offset:], shape, ops.shape(out)[offset:]):
        if (role == "f" and ops.static_int(size) != 1) or (role == "m" and not ops.same_size(size, out_size)):
            return False
    return True


def _trained_parameter(node: Node) -> str | None:
    """The name of a parameter (or input) that requires grad which `node` is computed from, if any."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        value = current.meta.get("val") if current.op == "placeholder" else None  # Dynamo's graphs
        if current.op == "get_attr":
            value = current.graph.owning_module
            for part in str(current.target).split("."):
                value = getattr(value, part, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return str(current.target)
        stack.extend(current.all_input_nodes)
    return None


def _escape(weights: Node, allowed: set[Node]) -> Refusal | None:
    other = next((u for u in ops.users(weights) if u not in allowed), None)
    if other is None:
        return None
    what = "returned by the model" if other.op == "output" else f"also used by {other.name}"
    return Refusal(Reason.PROBS_ESCAPE, f"the attention weights ({weights.name}) are {what}", "A")


def _site(anchor: Node, av: Contraction, sp: ScorePath, weights: Node, values: tuple[Arranged, Roles],
          normaliser: _Normaliser | None, after: bool, evaluator: MaskEvaluator) -> Site | Refusal:
    algebra = read_weights(sp, evaluator)
    if isinstance(algebra, Refusal):
        return algebra
    batch = [r for r in sp.final_roles if r not in ("m", "n")]
    structure = sp.structures.get(tuple(batch), ())
    heads = ops.hint_int(structure[-1]) if structure else 1
    c = sp.contraction
    q_len = ops.shape(c.node)[sp.roles.index("m")]
    kv_len = ops.shape(c.node)[sp.roles.index("n")]
    proven = prove(algebra, sp.final_roles, q_len, kv_len, heads, anchor.graph)
    if isinstance(proven, Refusal):
        return proven
    trained = _trained_parameter(proven.decay.source) if proven.decay and proven.decay.source else None
    if trained is not None:
        return Refusal(Reason.DECAY_TRAINED, f"the decay is computed from the trainable parameter {trained}, and "
                       "attnfx::linear_attention gives the decay no gradient (freeze it to rewrite the site)", "mask")
    extra = [anchor] if after else []
    path = [*extra, *(normaliser.nodes if normaliser else ())]
    output = normaliser.output if after else anchor
    scores = ScoreAlgebra(scale=algebra.scale * proven.factor, scale_tensors=list(algebra.scale_tensors))
    probs = _ProbPath(replace(av, node=output), weights, sp.final_roles, path, [], 0.0)
    v, out_roles = values
    site = _build_site(weights, Kind.LINEAR, sp, scores, probs, v, out_roles, evaluator)
    if isinstance(site, Refusal):
        return site
    if proven.decay is not None and len(site.batch_roles) > 2:
        return Refusal(Reason.RANK_UNSUPPORTED, "a decay per head with more than two batch dims", "mask")
    site.facts, site.decay = proven.facts, proven.decay
    base = site.lowerings[-1].spec
    spec = replace(base, causal=proven.facts.causal, decay=proven.decay is not None,
                   normalize=normaliser is not None, norm_eps=normaliser.eps if normaliser else 0.0)
    site.lowerings = [Lowering("flag" if spec.causal is not Causal.NONE else "none", spec)]
    return site


__all__ = ["ANCHORS", "NOT_ATTENTION", "feature_maps", "lift_linear"]
