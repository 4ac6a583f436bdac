"""The score side of a site: from the QK contraction to the softmax input, as algebra.

Walking back from the softmax finds the contraction that made the scores and the elementwise ops on
the way. Replaying those ops forward in a tiny algebra turns them into the spec's canonical order
(scale, softcap, additive bias, exclusion masks), wherever the model put the scale, whichever side
of an `add` the mask was on, and however the mask was spelled. Anything that does not fit is a
refusal with its reason, never a guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch.fx import Node

from . import ops
from .layout import Contraction, Roles, _permute_source, batch_reshape, is_batch_role, read_contraction
from .site import BiasTerm, MaskTerm, Reason, Refusal, ScaleTerm

MAX_PATH = 24
_PASS_THROUGH = ("cast", "identity")


@dataclass
class ScoreAlgebra:
    """scores = softcap(scale * QK * prod(scale_tensors)) + sum(bias) + shift, excluded where masks say."""

    scale: float = 1.0
    shift: float = 0.0  # a constant on every score (it cancels in a softmax, not in a sigmoid)
    scale_tensors: list[ScaleTerm] = field(default_factory=list)
    softcap: float | None = None
    bias: list[BiasTerm] = field(default_factory=list)
    masks: list[MaskTerm] = field(default_factory=list)
    sink: BiasTerm | None = None  # a logit column concatenated after the keys (attention sinks)

    def modifiers(self) -> dict[str, float]:
        """The score modifiers found, as the AttentionSpec fields they set (spec.SCORE_TERMS)."""
        return {} if self.softcap is None else {"softcap": self.softcap}


@dataclass(frozen=True)
class ScorePath:
    contraction: Contraction
    roles: Roles  # score roles at the contraction's output
    path: tuple[Node, ...]  # contraction -> softmax input order, without the contraction
    roles_after: tuple[Roles, ...]  # score roles after each path node
    structures: dict[Roles, tuple]  # batch roles of each layout seen -> its sizes (ints or SymInts)

    @property
    def final_roles(self) -> Roles:
        return self.roles_after[-1] if self.roles_after else self.roles


def _batch(roles: Roles) -> Roles:
    return tuple(r for r in roles if is_batch_role(r))


def constant_scalar(x: object) -> float | None:
    """A number an argument is for every input: a Python scalar or a scalar-filled `full`."""
    value = ops.scalar_value(x)
    if value is not None or not isinstance(x, Node):
        return value
    if x.op == "get_attr":  # a lifted 0-d constant (e.g. torch.tensor(finfo.min) made in forward)
        tensor = _attribute(x)
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1 or _is_state(x):
            return None  # buffers and parameters can change after optimisation: not constants
        return float(tensor.item())
    name = ops.target_name(x)
    if name in ("full", "scalar_tensor") and x.args and not isinstance(x.args[-1], Node):
        return ops.scalar_value(x.args[1] if name == "full" else x.args[0])
    if name in ("lift_fresh_copy", "lift_fresh_copy_", "clone", "detach", "detach_", "to", "_to_copy") and x.args:
        return constant_scalar(x.args[0])
    return None


def _is_state(node: Node) -> bool:
    """A parameter or buffer of the model (capture records which), or an attribute nobody vouched for."""
    state = node.graph.owning_module.meta.get("attnfx_state")
    return state is None or str(node.target) in state


def _attribute(node: Node) -> object:
    value = node.graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


def _score_operands(node: Node) -> list[Node]:
    """The operands of `node` that may carry the scores, in the order to try them."""
    k = ops.kind(node)
    if k in ("add", "sub", "mul"):
        return [a for a in node.args[:2] if isinstance(a, Node)]
    if k == "where":
        return [a for a in node.args[1:3] if isinstance(a, Node)]
    if k in ("div", "masked_fill", "neg", "tanh", "cast", "identity", "transpose", "permute", "reshape", "clamp_min"):
        first = ops.arg(node, "self", 0)
        return [first] if isinstance(first, Node) else []
    if ops.target_name(node) == "cat":  # extra logits appended to the scores (attention sinks)
        return [a for a in node.args[0] if ops.is_tensor(a) and ops.rank(a) == ops.rank(node)]
    # An op the algebra does not know: walk through it so the refusal can name it.
    return [a for a in node.all_input_nodes if ops.is_tensor(a) and ops.shape(a) == ops.shape(node)]


def find_contraction(start: Node, roles_of: Callable[[Contraction], Roles | Refusal],
                     accepts: Callable[[Node], bool] | None = None) -> ScorePath | Refusal:
    """Walk back from the softmax input to the QK contraction (trying each operand that may hold
    the scores, depth-first), then derive the score roles along the way. `accepts` says which ops
    may stand on the path (default: those the score algebra replays); a caller that classifies the
    path itself accepts more."""
    refusals: list[Refusal] = []

    def walk(node: Node, depth: int) -> list[Node] | None:
        contraction = read_contraction(node)
        if contraction is not None:
            roles = roles_of(contraction)
            if isinstance(roles, Refusal):
                refusals.append(roles)
                return None
            return [node]
        if depth >= MAX_PATH or not ops.is_tensor(node):
            return None
        reorders = ops.kind(node) in ("transpose", "permute") or ops.target_name(node) == "cat"
        for operand in _score_operands(node):
            if ops.is_tensor(operand) and (reorders or ops.shape(operand)[-2:] == ops.shape(node)[-2:]):
                found = walk(operand, depth + 1)
                if found is not None:
                    return found + [node]
        return None

    chain = walk(start, 0)
    if chain is None:
        if refusals:
            return refusals[0]
        return Refusal(Reason.NO_QK_CONTRACTION, "no contraction of two tensors produces the softmax input "
                       "through score operations", "QK")
    contraction = read_contraction(chain[0])
    roles = roles_of(contraction)
    accepts = accepts or (lambda node: ops.kind(node) in _ALGEBRA_KINDS or _is_cat(node))
    unknown = next((n for n in chain[1:] if not accepts(n)), None)
    if unknown is not None:
        return _unsupported(unknown)
    for node in chain[:-1]:
        outside = [u for u in ops.users(node) if u not in chain]
        if any(ops.depends_on(start, {u}) for u in outside):
            return Refusal(Reason.SCORE_DEPENDENT_MASK, f"a mask on the scores at {node.name} is computed from "
                           "the scores themselves (e.g. top-k), so it cannot be precomputed", "mask")
        if outside:
            return Refusal(Reason.SCORES_ESCAPE, f"the scores at {node.name} are also used by {outside[0].name}", "S")
    contraction_roles = roles
    structures = {_batch(roles): tuple(size for size, r in zip(ops.shape(chain[0]), roles) if is_batch_role(r))}
    roles_after: list[Roles] = []
    for index, node in enumerate(chain[1:]):
        permuted = _permute_source(node)
        if permuted is not None:
            roles = tuple(roles[i] for i in permuted[1])
        elif ops.kind(node) == "reshape" and not ops.same_shape(node, ops.arg(node, "self", 0)):
            rebatched = batch_reshape(node, roles, prefix=f"s{index}_")
            if rebatched is None:
                return Refusal(Reason.VIEW_ON_SCORES, f"{node.name} reshapes the query or key axis of the scores "
                               "between QK and softmax", "S")
            roles, sizes = rebatched
            structures[_batch(roles)] = sizes
        roles_after.append(roles)
    return ScorePath(contraction, contraction_roles, tuple(chain[1:]), tuple(roles_after), structures)


def replay(score_path: ScorePath, score_dtype: torch.dtype, constants_cancel: bool = True) -> ScoreAlgebra | Refusal:
    """Turn the ops on the score path into canonical-order algebra. `constants_cancel`: the scores
    feed a softmax, where a constant added to every score changes nothing (a sigmoid keeps it)."""
    algebra = ScoreAlgebra()
    c = score_path.contraction
    if c.alpha != 1.0:
        algebra.scale *= c.alpha
    if c.addend is not None and c.beta != 0.0:
        refusal = _add_term(algebra, c.node, c.addend, c.beta, score_path.roles, constants_cancel)
        if refusal is not None:
            return refusal
    nodes = list(score_path.path)
    previous = c.node
    i = 0
    while i < len(nodes):
        node = nodes[i]
        roles = score_path.roles_after[i]
        softcap = _softcap_at(nodes, i, previous)
        if softcap is not None:
            refusal = _apply_softcap(algebra, softcap, node)
            if refusal is not None:
                return refusal
            previous, i = nodes[i + 2], i + 3
            continue
        if _is_cat(node) or (algebra.sink is not None and ops.kind(node) not in _PASS_THROUGH):
            refusal = _apply_sink(algebra, node, previous, roles, constants_cancel)
        else:
            refusal = _apply(algebra, node, previous, roles, score_dtype, constants_cancel)
        if refusal is not None:
            return refusal
        previous, i = node, i + 1
    return algebra


def _is_cat(node: Node) -> bool:
    return ops.target_name(node) == "cat"


def _apply_sink(algebra: ScoreAlgebra, node: Node, score: Node, roles: Roles, constants_cancel: bool
                ) -> Refusal | None:
    """`cat([scores, sink], keys)` right before the softmax: one extra logit per row that only joins
    the normaliser (its weight is sliced off after the softmax), i.e. an attention sink."""
    operands = node.args[0] if _is_cat(node) else ()
    dim = ops.normalize_dim(int(ops.arg(node, "dim", 1, 0)), len(roles)) if _is_cat(node) else None
    sink = operands[1] if len(operands) == 2 and operands[0] is score else None
    if (algebra.sink is not None or sink is None or not constants_cancel or dim is None or roles[dim] != "n"
            or ops.rank(sink) != len(roles) or ops.static_int(ops.shape(sink)[dim]) != 1):
        return _unsupported(node)
    algebra.sink = BiasTerm(sink, roles)
    return None


def _softcap_at(nodes: list[Node], i: int, previous: Node) -> tuple[float, float] | None:
    """(a, c) when nodes[i:i+3] is `mul/div by scalar -> tanh -> mul by c`, i.e. c*tanh(a*s)."""
    if i + 2 >= len(nodes) or ops.kind(nodes[i + 1]) != "tanh":
        return None
    first, last = nodes[i], nodes[i + 2]
    a = _scalar_factor(first, previous)
    c = _scalar_factor(last, nodes[i + 1]) if ops.kind(last) == "mul" else None
    if a is None or c is None or c <= 0:
        return None
    return a, c


def _apply_softcap(algebra: ScoreAlgebra, ac: tuple[float, float], node: Node) -> Refusal | None:
    a, c = ac
    if algebra.softcap is not None or algebra.bias or algebra.masks or algebra.shift:
        return Refusal(Reason.SCORE_ORDER, f"softcap at {node.name} comes after a bias, mask or another "
                       "softcap (tanh would move excluded scores back into the softmax)", "softcap")
    # c * tanh(a * z) == softcap_c(a * c * z): fold a * c into the scale.
    algebra.scale *= a * c
    algebra.softcap = c
    return None


def _scalar_factor(node: Node, score: Node) -> float | None:
    """The number `node` multiplies `score` by (mul/div by a constant), else None."""
    k = ops.kind(node)
    others = [a for a in node.args[:2] if a is not score]
    if k not in ("mul", "div") or len(others) != 1 or node.args[0] is not score and k == "div":
        return None
    value = constant_scalar(others[0])
    if value is None or value == 0:
        return None
    return value if k == "mul" else 1.0 / value


def _apply(algebra: ScoreAlgebra, node: Node, score: Node, roles: Roles, score_dtype: torch.dtype,
           constants_cancel: bool) -> Refusal | None:
    k = ops.kind(node)
    if k in _PASS_THROUGH or k in ("transpose", "permute", "reshape"):
        return None
    if k in ("mul", "div", "neg"):
        return _apply_factor(algebra, node, score, k, roles, constants_cancel)
    if k in ("add", "sub"):
        return _apply_add(algebra, node, score, roles, constants_cancel)
    if k in ("masked_fill", "where"):
        return _apply_mask(algebra, node, score, roles, score_dtype, k)
    if k == "clamp_min" and _is_exclusion_floor(node, score, score_dtype):
        return None  # max(s, finfo.min): excluded scores stay excluded, kept ones are untouched
    return _unsupported(node)


_ALGEBRA_KINDS = (*_PASS_THROUGH, "transpose", "permute", "reshape", "mul", "div", "neg", "add", "sub",
                  "masked_fill", "where", "clamp_min", "tanh")


def _unsupported(node: Node) -> Refusal:
    if _is_cat(node):
        return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"{node.name} concatenates logits to the scores other than "
                       "one sink column after the keys right before a softmax", "S")
    return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"{node.name} applies {ops.target_name(node)} to the scores, "
                   "which no attention variant computes", "S")


def _is_exclusion_floor(node: Node, score: Node, dtype: torch.dtype) -> bool:
    """`max(s, c)` / `clamp(s, min=c)` with c so negative that it only touches excluded scores."""
    if ops.target_name(node) == "clamp":
        floor, ceiling = ops.arg(node, "min", 1), ops.arg(node, "max", 2)
        if ceiling is not None:
            return False
    else:
        others = [a for a in node.args[:2] if a is not score]
        floor = others[0] if len(others) == 1 else None
    value = constant_scalar(floor)
    return value is not None and ops.is_exclusion_fill(value, dtype) and value <= torch.finfo(dtype).min / 2


def _apply_factor(algebra: ScoreAlgebra, node: Node, score: Node, k: str, roles: Roles,
                  constants_cancel: bool) -> Refusal | None:
    if k == "neg":
        factor: float | None = -1.0
        other = None
    else:
        other = node.args[1] if node.args[0] is score else node.args[0]
        if k == "div" and node.args[0] is not score:
            return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"{node.name} divides by the scores", "S")
        if k == "div" and ops.arg(node, "rounding_mode", 2) is not None:
            return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"{node.name} divides with rounding", "S")
        factor = constant_scalar(other)
        if factor is not None and k == "div":
            factor = 1.0 / factor if factor != 0 else None
    if factor is None:
        return _apply_scale_tensor(algebra, node, score, other, k == "div", roles, constants_cancel)
    if algebra.softcap is not None and factor <= 0:
        return Refusal(Reason.SCORE_ORDER, f"{node.name} scales softcapped scores by {factor:g}; only a "
                       "positive factor is a wider softcap", "S")
    if algebra.softcap is not None:  # k * c * tanh(z / c) == softcap_{c k}(k * z) for k > 0 (biases, fills: * k)
        algebra.softcap *= factor
    if algebra.masks and factor <= 0:
        return Refusal(Reason.SCORE_ORDER, f"{node.name} multiplies masked scores by {factor:g}, which "
                       "would bring excluded keys back", "S")
    _rescale(algebra, factor)
    return None


def _apply_scale_tensor(algebra: ScoreAlgebra, node: Node, score: Node, other: object, divides: bool,
                        roles: Roles, constants_cancel: bool) -> Refusal | None:
    """A tensor factor constant along the key axis (per head, per query, or one run-time value)
    multiplies each query's row of scores: exactly q scaled by it. After a mask, excluded scores
    become fill * factor (whatever the factor's sign or value), which the mask then reproduces."""
    if not _folds_into_q(other, node, score, roles):
        shape = tuple(ops.hint_int(d) for d in ops.shape(other)) if ops.is_tensor(other) else other
        return Refusal(Reason.SCALE_NOT_SCALAR, f"{node.name} scales the scores by a tensor of shape {shape} "
                       "that varies along the keys; only a factor per head or per query is a softmax "
                       "temperature", "S")
    if algebra.softcap is not None or algebra.bias or (algebra.shift and not constants_cancel):
        return Refusal(Reason.SCORE_ORDER, f"{node.name} scales the scores by a tensor after a bias, "
                       "shift or softcap", "S")
    term = ScaleTerm(other, roles[len(roles) - ops.rank(other):], divides)
    algebra.scale_tensors.append(term)
    algebra.masks = [replace(m, scaled_by=(*m.scaled_by, term)) for m in algebra.masks]
    return None


def _folds_into_q(factor: object, node: Node, score: Node, roles: Roles) -> bool:
    """A tensor that broadcasts onto the scores without growing them and is size 1 on the key axis."""
    if not ops.is_tensor(factor) or ops.rank(factor) > len(roles) or not ops.same_shape(node, score):
        return False
    aligned = dict(zip(roles[len(roles) - ops.rank(factor):], ops.shape(factor)))
    return "n" not in aligned or ops.static_int(aligned["n"]) == 1


def _apply_add(algebra: ScoreAlgebra, node: Node, score: Node, roles: Roles, constants_cancel: bool
               ) -> Refusal | None:
    """`a + alpha * b` or `a - alpha * b` with the scores on either side."""
    alpha = ops.scalar_value(node.kwargs.get("alpha", 1.0))
    alpha = 1.0 if alpha is None else alpha
    factor = -alpha if ops.kind(node) == "sub" else alpha  # what multiplies b
    if node.args[0] is score:
        return _add_term(algebra, node, node.args[1], factor, roles, constants_cancel)
    if factor != 1.0:  # other + factor * scores: the scores are rescaled first
        if algebra.softcap is not None or (algebra.masks and factor <= 0):
            return Refusal(Reason.SCORE_ORDER, f"{node.name} rescales the scores by {factor:g} after a mask or "
                           "softcap", "S")
        _rescale(algebra, factor)
    return _add_term(algebra, node, node.args[0], 1.0, roles, constants_cancel)


def _add_term(algebra: ScoreAlgebra, node: Node, term: object, coeff: float, roles: Roles,
              constants_cancel: bool) -> Refusal | None:
    """Add `coeff * term` to the scores: a bias tensor, or a constant shift."""
    value = constant_scalar(term)
    if value is not None:
        algebra.shift += coeff * value
        return None
    if ops.numel_is_one(term):
        if constants_cancel:
            return None  # one value added to every score cancels in the softmax
        return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"{node.name} adds a run-time scalar to the scores before a "
                       "sigmoid; the sigmoid variants take a constant shift", "S")
    if not ops.is_tensor(term):
        return Refusal(Reason.SCORE_OP_UNSUPPORTED, f"{node.name} adds a non-tensor to the scores", "S")
    algebra.bias.append(BiasTerm(term, roles[len(roles) - ops.rank(term):], coeff))
    return None


def _rescale(algebra: ScoreAlgebra, factor: float) -> None:
    """Multiply everything added to the scores so far by `factor` (masks' fills included)."""
    algebra.scale *= factor
    algebra.shift *= factor
    algebra.bias = [BiasTerm(b.node, b.roles, b.coeff * factor) for b in algebra.bias]
    algebra.masks = [replace(m, fill=m.fill * factor) for m in algebra.masks]


def _apply_mask(algebra: ScoreAlgebra, node: Node, score: Node, roles: Roles, dtype: torch.dtype, k: str) -> Refusal | None:
    if k == "masked_fill":
        mask, fill_arg, keep_when = ops.arg(node, "mask", 1), ops.arg(node, "value", 2), False
    else:
        cond, a, b = node.args[:3]
        mask = cond
        if a is score:
            fill_arg, keep_when = b, True
        else:
            fill_arg, keep_when = a, False
    fill = constant_scalar(fill_arg)
    if fill is None:
        return Refusal(Reason.UNPROVEN_MASK, f"{node.name} fills scores with a tensor, not a constant", "mask")
    if not ops.is_exclusion_fill(fill, dtype):
        return Refusal(Reason.UNPROVEN_MASK, f"{node.name} sets scores to {fill:g}, which keeps them in the "
                       "softmax: it is not an exclusion mask", "mask")
    if not ops.is_tensor(mask) or ops.dtype(mask) != torch.bool:
        return Refusal(Reason.UNPROVEN_MASK, f"{node.name} selects with a non-boolean condition", "mask")
    algebra.masks.append(MaskTerm(mask, roles[len(roles) - ops.rank(mask):], keep_when, fill, len(algebra.bias)))
    return None
