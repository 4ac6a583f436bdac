"""The attention rules: lift `softmax(QK-scores) @ V` and `sigmoid(QK-scores) @ V`, however they
are spelled, into a `Site`.

Matches: a softmax over the key axis (rule `attention.softmax`), or an elementwise sigmoid with no
row normalisation (rule `attention.sigmoid`, FlashSigmoid's attention), of scores produced by a
two-operand contraction (matmul, bmm, baddbmm, einsum) of queries with keys, through scalar scales,
a tanh softcap, additive bias tensors, exclusion masks and (sigmoid only: there it does not cancel)
a constant shift, whose weights (through casts, dropout and transposes) are contracted with values
over that same key axis.
Rewrites to: any variant that can take one of the site's lowerings (see `Lowering`).
Refuses (with a `Reason`): everything else — weights used elsewhere, a softmax over another axis,
masks or scales after the normalisation, a sigmoid renormalised by its row sum, non-scalar scales,
score-dependent masks, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.fx import Node

from attnfx.cost_model.spec import Kind, dtype_name

from . import ops
from .layout import (Arranged, Contraction, Roles, _permute_source, batch_reshape, broadcast_prefix_sizes,
                     is_batch_role, look_through_permutes, read_contraction, unflatten_sizes)
from .alibi import first_alibi
from .mask_eval import MaskEvaluator
from .lowerings import alibi_lowerings, site_lowerings
from .mask_proof import additive_keep, classify, conjunction, keep_predicate
from .repeats import fold_repeats
from .scores import ScoreAlgebra, ScorePath, find_contraction, replay
from .site import Alibi, BiasTerm, MaskFacts, MaskTerm, Reason, Refusal, Site

RULES = {"softmax": "attention.softmax", "log_softmax": "attention.softmax", "sigmoid": "attention.sigmoid",
         "matmul": "attention.linear", "einsum": "attention.linear"}  # linear: anchored on AV (passes/linear.py)
_KINDS = {"softmax": Kind.SOFTMAX, "sigmoid": Kind.SIGMOID}


def qk_roles(c: Contraction) -> Roles | Refusal:
    """Roles of the score dims: batch labels b0.., the query label m and the key label n."""
    lhs, rhs, out = c.lhs_labels, c.rhs_labels, c.out_labels
    contracted = [x for x in lhs if x in rhs and x not in out]
    lhs_free = [x for x in lhs if x in out and x not in rhs]
    rhs_free = [x for x in rhs if x in out and x not in lhs]
    if len(contracted) != 1:
        return Refusal(Reason.NO_QK_CONTRACTION, f"{c.node.name} contracts over {len(contracted)} dims, "
                       "not one feature dim", "QK")
    if not lhs_free or not rhs_free or any(x not in out and x not in contracted for x in lhs + rhs):
        return Refusal(Reason.NO_QK_CONTRACTION, f"{c.node.name} has no query/key axis pair", "QK")
    m, n = lhs_free[-1], rhs_free[-1]
    roles, batch = [], 0
    for label in out:
        if label == m:
            roles.append("m")
        elif label == n:
            roles.append("n")
        else:
            roles.append(f"c{batch}")
            batch += 1
    return tuple(roles)


def lift(weights: Node, evaluator: MaskEvaluator) -> Site | Refusal:
    """Lift the attention around `weights` (a softmax or a sigmoid node), or say which stage refused
    and why."""
    if ops.kind(weights) == "log_softmax":
        return Refusal(Reason.LOG_SOFTMAX, "log_softmax yields log-probabilities (a loss or sampling "
                       "computation), not attention weights", "softmax")
    kind = _KINDS[ops.kind(weights)]
    x = ops.arg(weights, "self", 0)
    score_path = find_contraction(x, qk_roles)
    if isinstance(score_path, Refusal):
        return score_path
    if len(ops.users(x)) != 1:
        other = next(u for u in ops.users(x) if u is not weights)
        return Refusal(Reason.SCORES_ESCAPE, f"the scores are also used by {other.name}", "S")
    roles = score_path.final_roles
    if kind is Kind.SOFTMAX:
        dim = ops.normalize_dim(int(ops.softmax_args(weights)[1]), len(roles))
        if roles[dim] != "n":
            what = "the queries" if roles[dim] == "m" else "a batch/head dim"
            return Refusal(Reason.SOFTMAX_AXIS, f"softmax over dim {dim}, which indexes {what}, not the keys",
                           "softmax")
    algebra = replay(score_path, ops.dtype(x), constants_cancel=kind is Kind.SOFTMAX)
    if isinstance(algebra, Refusal):
        return algebra
    probs = _follow_probs(weights, roles, score_path.structures, algebra)
    if isinstance(probs, Refusal):
        return probs
    algebra.masks = [replace(t, fill=-math.inf) if t in probs.zeroed else t for t in algebra.masks]
    values = _value_roles(probs.av, probs.probs, probs.roles)
    if isinstance(values, Refusal):
        return values
    v, out_roles = values
    return _build_site(weights, kind, score_path, algebra, probs, v, out_roles, evaluator)


def _zero_fill(node: Node) -> tuple[Node, bool] | None:
    """(mask, keep_when) when `node` sets weights to 0 where a mask says so, else None."""
    if ops.kind(node) == "masked_fill":
        mask, value, keep_when = ops.arg(node, "mask", 1), ops.arg(node, "value", 2), False
    else:
        cond, a, b = node.args[:3]
        mask, value, keep_when = cond, (b if ops.scalar_value(a) is None else a), ops.scalar_value(a) is None
    if ops.scalar_value(value) != 0.0 or not ops.is_tensor(mask) or ops.dtype(mask) != torch.bool:
        return None
    return mask, keep_when


def _zeroed_masks(node: Node, algebra: ScoreAlgebra) -> list[MaskTerm]:
    """The score masks a probability mask zeroes exactly again (none: it is not such a mask). It
    changes only rows with no key left (uniform -> 0), so those masks get a -inf fill, whose empty
    rows are 0."""
    zero = _zero_fill(node)
    if zero is None:
        return []
    return [t for t in algebra.masks if t.node is zero[0] and t.keep_when == zero[1]]


def _sigmoid_weight_mask(node: Node, roles: Roles, algebra: ScoreAlgebra) -> MaskTerm | None:
    """A sigmoid's weights set to 0 by a boolean mask: each weight stands alone (no row sum), and
    sigmoid(-inf) = 0, so this is the same mask on the scores with a -inf fill."""
    zero = _zero_fill(node)
    if zero is None:
        return None
    mask, keep_when = zero
    return MaskTerm(mask, roles[len(roles) - ops.rank(mask):], keep_when, -math.inf, len(algebra.bias))


@dataclass(frozen=True)
class _ProbPath:
    """From the softmax to the AV contraction."""

    av: Contraction
    probs: Node  # what the contraction reads
    roles: Roles  # of `probs`
    path: list[Node]
    zeroed: list[MaskTerm]  # score masks the path zeroes again
    dropout_p: float  # training-mode dropout on the way


def _follow_probs(weights: Node, roles: Roles, structures: dict[Roles, tuple], algebra: ScoreAlgebra
                  ) -> _ProbPath | Refusal:
    node, path, zeroed, dropout_p = weights, [], [], 0.0
    name = ops.kind(weights)
    sliced = algebra.sink is None
    while True:
        users = ops.users(node)
        if len(users) != 1 or users[0].op == "output":
            other = next((u for u in users if u.op == "output"), users[1] if len(users) > 1 else None)
            what = "returned by the model" if other is not None and other.op == "output" else (
                f"also used by {other.name}" if other is not None else "unused")
            return Refusal(Reason.PROBS_ESCAPE, f"the attention weights ({node.name}) are {what}", "A")
        user = users[0]
        contraction = read_contraction(user)
        if contraction is not None and not sliced:
            return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"the sink logit's weight reaches {user.name}: only a "
                           "sink sliced off after the softmax is an attention sink", "A")
        if contraction is not None:
            return _ProbPath(contraction, node, roles, path, zeroed, dropout_p)
        k = ops.kind(user)
        if k == "dropout":
            p = ops.scalar_value(ops.arg(user, "p", 1, 0.5)) or 0.0
            train = ops.arg(user, "train", 2, ops.arg(user, "training", 2, True))
            if train and p > 0:
                if dropout_p:
                    return Refusal(Reason.DROPOUT_TRAINING, f"{user.name} drops attention weights a second "
                                   "time", "A")
                dropout_p = p
        elif algebra.sink is not None and not sliced and _drops_sink(user, roles):
            sliced = True  # the sink's own weight is dropped: what remains weighs the values
        elif k in ("masked_fill", "where") and name == "sigmoid" and (
                weight_mask := _sigmoid_weight_mask(user, roles, algebra)) is not None:
            algebra.masks.append(weight_mask)
        elif k in ("masked_fill", "where"):
            again = _zeroed_masks(user, algebra)
            zeroed += again
            if not again:
                return Refusal(Reason.MASK_AFTER_SOFTMAX, f"{user.name} masks the weights after the {name}, "
                               "which no attention variant computes", "A")
        elif k in ("mul", "div", "add", "sub", "neg"):
            return Refusal(Reason.PROBS_MODIFIED, f"{user.name} applies {ops.target_name(user)} to the "
                           f"weights after the {name}", "A")
        elif k in ("transpose", "permute"):
            perm = _permute_source(user)[1]
            roles = tuple(roles[i] for i in perm)
        elif k == "reshape" and not ops.same_shape(user, node):
            rebatched = batch_reshape(user, roles, prefix=f"p{len(path)}_")
            if rebatched is None:
                return Refusal(Reason.NO_AV_CONTRACTION, f"{user.name} reshapes the query or key axis of the "
                               "weights", "AV")
            roles, sizes = rebatched
            structures[tuple(r for r in roles if is_batch_role(r))] = sizes
        elif k not in ("cast", "identity", "reshape", "masked_fill", "where"):
            return Refusal(Reason.NO_AV_CONTRACTION, f"the weights flow into {user.name} "
                           f"({ops.target_name(user)}), not a contraction with values", "AV")
        path.append(user)
        node = user


def _drops_sink(node: Node, roles: Roles) -> bool:
    """`p[..., :-1]`: a slice of the key axis that keeps every column but the last (the sink's)."""
    if ops.target_name(node) != "slice" or len(node.args) < 4:
        return False
    dim = ops.normalize_dim(int(node.args[1]), len(roles))
    step = node.args[4] if len(node.args) > 4 else 1
    return roles[dim] == "n" and node.args[2] in (0, None) and node.args[3] == -1 and step == 1


def _value_roles(av: Contraction, probs: Node, prob_roles: Roles) -> tuple[Arranged, Roles] | Refusal:
    if av.lhs is probs and av.rhs is not probs:
        p_labels, v_node, v_labels = av.lhs_labels, av.rhs, av.rhs_labels
    elif av.rhs is probs and av.lhs is not probs:
        p_labels, v_node, v_labels = av.rhs_labels, av.lhs, av.lhs_labels
    else:
        return Refusal(Reason.NO_AV_CONTRACTION, f"{av.node.name} contracts the weights with themselves", "AV")
    label_roles = dict(zip(p_labels, prob_roles))
    contracted = av.contracted()
    if len(contracted) != 1 or label_roles.get(contracted[0]) != "n":
        names = {"m": "queries", "n": "keys"}
        summed = ", ".join(names.get(label_roles.get(c, ""), "a batch/head dim") for c in contracted)
        return Refusal(Reason.PROBS_WRONG_AXIS, f"{av.node.name} contracts the weights over [{summed}], "
                       "not over the keys alone", "AV")
    free = [x for x in v_labels if x not in label_roles]
    if len(free) != 1 or free[0] not in av.out_labels:
        return Refusal(Reason.NO_AV_CONTRACTION, f"{av.node.name} has no single value-feature axis", "AV")
    label_roles[free[0]] = "f"
    out_roles = tuple(label_roles[x] for x in av.out_labels)
    expected = {r for r in prob_roles if r != "n"} | {"f"}
    if set(out_roles) != expected:
        return Refusal(Reason.NO_AV_CONTRACTION, f"{av.node.name} also sums over batch or head dims", "AV")
    v = Arranged(v_node, tuple(label_roles[x] for x in v_labels))
    base = _before_views(look_through_permutes(v).node)
    if ops.kind(base) in ("mul", "div") and any(_is_number(a) for a in base.args[:2]):
        return Refusal(Reason.SCALE_ON_VALUES, f"{base.name} scales V before the AV contraction; a scale on "
                       "values is not the softmax scale, so the site is left as written", "AV")
    return v, out_roles


def _before_views(node: Node) -> Node:
    """The tensor behind the model's own views, reshapes, expands, head repeats, permutes and casts of it
    (a scale before GQA's `repeat_interleave` is as much a scale on V as one after it)."""
    while ops.kind(node) in ("reshape", "transpose", "permute", "cast", "identity", "repeat_interleave") \
            or ops.target_name(node) in ("expand", "unsqueeze", "flatten", "unflatten", "alias") or _whole_slice(node):
        node = node.args[0]
    return node


def _whole_slice(node: Node) -> bool:
    """`x[:, :]`: a slice that keeps every index (export writes `x[:, :, None]` with them)."""
    if ops.target_name(node) != "slice":
        return False
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2 ** 62)) and step == 1


def _is_number(x: object) -> bool:
    return ops.scalar_value(x) is not None


def _build_site(weights: Node, kind: Kind, sp: ScorePath, algebra: ScoreAlgebra, probs: _ProbPath,
                v: Arranged, out_roles: Roles, evaluator: MaskEvaluator) -> Site | Refusal:
    av, prob_path = probs.av, probs.path
    c = sp.contraction
    label_roles = dict(zip(c.out_labels, sp.roles))
    label_roles[c.contracted()[0]] = "e"
    # The finest batch layout (most dims; the softmax's on a tie) is canonical, renamed b0, b1, ...
    final = tuple(r for r in sp.final_roles if is_batch_role(r))
    finest = max(sp.structures, key=lambda layout: (len(layout), layout == final))
    rename = {r: f"b{i}" for i, r in enumerate(finest)}

    def canon(roles: Roles) -> Roles:
        return tuple(rename.get(r, r) for r in roles)

    q = Arranged(c.lhs, canon(tuple(label_roles[x] for x in c.lhs_labels)))
    k = Arranged(c.rhs, canon(tuple(label_roles[x] for x in c.rhs_labels)))
    v, out_roles = Arranged(v.node, canon(v.roles)), canon(out_roles)
    algebra.bias = [BiasTerm(t.node, canon(t.roles), t.coeff) for t in algebra.bias]
    algebra.scale_tensors = [replace(t, roles=canon(t.roles)) for t in algebra.scale_tensors]
    if algebra.sink is not None:
        algebra.sink = replace(algebra.sink, roles=canon(algebra.sink.roles))
    algebra.masks = [replace(t, roles=canon(t.roles), scaled_by=tuple(replace(f, roles=canon(f.roles))
                                                                      for f in t.scaled_by)) for t in algebra.masks]
    structures = {canon(batch): sizes for batch, sizes in sp.structures.items()}
    batch_roles = tuple(rename.values())
    batch_sizes = tuple(ops.hint_int(size) for size in sp.structures[finest])
    dtypes = {ops.dtype(n) for n in (q.node, k.node, v.node)}
    if len(dtypes) != 1 or dtype_name(next(iter(dtypes))) is None:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return Refusal(Reason.DTYPE_UNSUPPORTED, f"q/k/v dtypes ({names}) are not one floating dtype a "
                       "kernel takes", "QK")
    if len(batch_roles) > 2:  # dims after the first merge into "heads": they must match and unflatten back
        inner = [r for r in batch_roles[1:]]
        if any(not ops.same_size(a.size(r), t.size(r)) for r in inner for a in (q, k, v) for t in (q, k, v)) \
                or unflatten_sizes(tuple(q.size(r) for r in inner)) is None:
            return Refusal(Reason.RANK_UNSUPPORTED, "more than two batch dims, broadcast or with more than one "
                           "dynamic size after the first", "QK")
    refusal = _check_structures(structures, batch_roles, (q, k, v), algebra, out_roles)
    if refusal is not None:
        return refusal
    source = set(sp.path) | {c.node, weights, av.node, *prob_path}
    for term in (*algebra.bias, *algebra.masks, *algebra.scale_tensors, *([algebra.sink] if algebra.sink else [])):
        if ops.depends_on(term.node, source):
            return Refusal(Reason.SCORE_DEPENDENT_MASK, f"the mask/bias {term.node.name} is computed from the "
                           "scores themselves (e.g. top-k), so it cannot be precomputed", "mask")
    k, v = fold_repeats(k, v, batch_roles)
    # An additive term of only 0 and exclusion values is a mask (its keep-predicate); else a bias.
    bias_keeps = [additive_keep(evaluator.value(t.node), t.roles, _exclusion(ops.dtype(t.node))) for t in algebra.bias]
    facts = _prove(algebra, evaluator, bias_keeps, sizes=(q.size("m"), k.size("n")))
    site = Site(
        weights=weights, kind=kind, logit_bias=0.0 if kind is Kind.SOFTMAX else algebra.shift,
        qk=c, av=av, q=q, k=k, v=v, batch_roles=batch_roles, out_roles=out_roles,
        scale=algebra.scale, scale_tensors=tuple(algebra.scale_tensors), modifiers=algebra.modifiers(),
        bias=tuple(algebra.bias), masks=tuple(algebra.masks), facts=facts,
        structures=structures, batch_sizes=batch_sizes, dropout_p=probs.dropout_p, sink=algebra.sink,
        nodes=_with_checks((c.node, *sp.path, weights, *prob_path, av.node)),
    )
    real_bias = [t for t, keep in zip(site.bias, bias_keeps) if keep is None]
    site.alibi = first_alibi(real_bias, evaluator, kind, batch_roles, sink=site.sink is not None)
    site.lowerings = site_lowerings(site, real_bias, evaluator)
    if isinstance(site.alibi, Alibi):
        site.lowerings[0:0] = alibi_lowerings(site, site.alibi, real_bias, evaluator)
    return site


def _check_structures(structures: dict[Roles, tuple], batch_roles: Roles, operands: tuple,
                      algebra: ScoreAlgebra, out_roles: Roles) -> Refusal | None:
    """Tensors in another batch layout than the canonical one must convert by flatten + unflatten:
    whole (or broadcast over every batch dim), with at most one dynamic size to unflatten into."""
    foreign = [a for a in (*operands, *algebra.bias, *algebra.masks, *algebra.scale_tensors,
                           *([algebra.sink] if algebra.sink else []))
               if any(is_batch_role(r) and r not in batch_roles for r in a.roles)]
    out_layout = tuple(r for r in out_roles if is_batch_role(r))
    targets = ([batch_roles] if foreign else []) + ([out_layout] if out_layout != batch_roles else [])
    if any(unflatten_sizes(structures[t]) is None for t in targets):
        return Refusal(Reason.RANK_UNSUPPORTED, "the batch dims change layout and more than one is dynamic", "S")
    for tensor in foreign:
        layout = next((b for b in structures if {r for r in tensor.roles if is_batch_role(r)} <= set(b)), None)
        sizes = dict(zip(tensor.roles, ops.shape(tensor.node)))
        whole = layout is not None and all(r in sizes and ops.same_size(sizes[r], full)
                                           for r, full in zip(layout, structures[layout]))
        broadcast = layout is not None and broadcast_prefix_sizes(
            tuple(sizes.get(r, 1) for r in layout), structures[batch_roles]) is not None
        if not (whole or broadcast):
            return Refusal(Reason.RANK_UNSUPPORTED, f"{tensor.node.name} broadcasts over part of a batch layout "
                           "that the site reshapes", "S")
    return None


def _with_checks(nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    """The subgraph's nodes in graph order, with export's metadata checks on them."""
    result: list[Node] = []
    for node in nodes:
        result.append(node)
        result.extend(ops.metadata_checks(node))
    return tuple(sorted(set(result), key=_position(nodes[0].graph)))


def _position(graph) -> Callable[[Node], int]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


def _exclusion(dtype: torch.dtype):
    return lambda value: ops.is_exclusion_fill(value, dtype)


def _prove(algebra: ScoreAlgebra, evaluator: MaskEvaluator, bias_keeps: list, sizes: tuple) -> MaskFacts:
    predicates = [keep_predicate(evaluator.value(t.node), t.roles, fill_is_keep=not t.keep_when) for t in algebra.masks]
    predicates += [keep for keep in bias_keeps if keep is not None]
    if not predicates:
        return MaskFacts()
    return classify(conjunction(predicates), ops.sym_expr(sizes[0]), ops.sym_expr(sizes[1]))


__all__ = ["RULES", "lift", "qk_roles"]
