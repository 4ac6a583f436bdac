"""The weights of a linear-attention site, as algebra: what multiplies phi(Q) phi(K)^T entry by entry.

A path from the QK contraction to the weights the values are contracted with may scale the product
(numbers, one-element tensors), zero entries (tril/triu, masked_fill or where with 0, a 0/1 band
multiplied in) and multiply in a decay mask. The masks are evaluated symbolically (mask_eval) and
proven: the kept entries must form a causal band, and the factor on them must be geometric in the
age m - n, lambda^(m - n) with one ratio lambda per head, which becomes the op's decay operand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any

import sympy
from torch.fx import Graph, Node

from attnfx.cost_model.spec import Causal

from . import ops
from .layout import Roles, is_batch_role
from .mask_eval import MaskEvaluator, in_roles, role_symbol, to_number
from .mask_proof import classify, conjunction, keep_predicate
from .scores import ScorePath, constant_scalar
from .site import Decay, MaskFacts, Reason, Refusal

_PASS_THROUGH = ("cast", "identity", "transpose", "permute", "reshape")
NORMALISERS = ("softmax", "log_softmax", "sigmoid")  # weights through one of these are another rule's


@dataclass
class LinearWeights:
    """weights = scale * prod(scale_tensors) * QK * prod(factors), zero where a keep predicate fails."""

    scale: float = 1.0
    scale_tensors: list[tuple[Node, bool]] = field(default_factory=list)  # (one-element tensor, divides)
    factors: list[Any] = field(default_factory=list)  # sympy values over the site's roles
    keeps: list[Any] = field(default_factory=list)  # sympy predicates over the site's roles


def read_weights(sp: ScorePath, evaluator: MaskEvaluator) -> LinearWeights | Refusal:
    """The algebra of the path from the QK contraction to the weights, or why it is not linear attention's."""
    c = sp.contraction
    weights = LinearWeights(scale=c.alpha)
    if c.addend is not None and c.beta != 0.0:
        return Refusal(Reason.FEATURE_MAP_AFTER_PRODUCT, f"{c.node.name} adds a tensor to the product", "S")
    chain = (c.node, *sp.path)
    for i, node in enumerate(sp.path):
        roles_in = sp.roles if i == 0 else sp.roles_after[i - 1]
        refusal = _read_step(weights, node, chain[i], roles_in, sp.roles_after[i], set(chain), evaluator)
        if refusal is not None:
            return refusal
    return weights


def _read_step(weights: LinearWeights, node: Node, previous: Node, roles_in: Roles, roles: Roles,
               chain: set[Node], evaluator: MaskEvaluator) -> Refusal | None:
    k = ops.kind(node)
    if k in _PASS_THROUGH:
        return None
    if k in ("mul", "div", "neg"):
        return _factor(weights, node, previous, k, roles, chain, evaluator)
    if k in ("masked_fill", "where"):
        from .attention import _zero_fill  # the softmax rule's reading of a zeroing mask

        zero = _zero_fill(node)
        if zero is None:
            return Refusal(Reason.UNPROVEN_MASK, f"{node.name} sets weights to a value other than 0", "mask")
        mask, keep_when = zero
        mask_roles = roles[len(roles) - ops.rank(mask):]
        weights.keeps.append(keep_predicate(evaluator.value(mask), mask_roles, fill_is_keep=not keep_when))
        return None
    if k in ("tril", "triu"):
        diagonal = ops.scalar_value(ops.arg(node, "diagonal", 1, 0))
        if diagonal is None:
            return Refusal(Reason.UNPROVEN_MASK, f"{node.name} keeps a band with a run-time diagonal", "mask")
        row, col = role_symbol(roles_in[-2]), role_symbol(roles_in[-1])
        keep = sympy.Le(col - row, int(diagonal)) if k == "tril" else sympy.Ge(col - row, int(diagonal))
        weights.keeps.append(keep)
        return None
    return Refusal(Reason.FEATURE_MAP_AFTER_PRODUCT, f"{node.name} applies {ops.target_name(node)} to the product "
                   "phi(Q) phi(K)^T: a map after the product does not factor into phi(Q) and phi(K), so no "
                   "other contraction order computes it", "S")


def _factor(weights: LinearWeights, node: Node, previous: Node, k: str, roles: Roles, chain: set[Node],
            evaluator: MaskEvaluator) -> Refusal | None:
    if k == "neg":
        weights.scale = -weights.scale
        return None
    if k == "div" and node.args[0] is not previous:
        return Refusal(Reason.FEATURE_MAP_AFTER_PRODUCT, f"{node.name} divides by the product", "S")
    other = node.args[1] if node.args[0] is previous else node.args[0]
    value = constant_scalar(other)
    if value is not None and value != 0:
        weights.scale *= value if k == "mul" else 1.0 / value
        return None
    if ops.numel_is_one(other):
        weights.scale_tensors.append((other, k == "div"))
        return None
    if not ops.is_tensor(other) or k == "div" or ops.rank(other) > len(roles):
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"{node.name} {'divides' if k == 'div' else 'multiplies'} the "
                       "weights by something that is not a mask", "mask")
    if ops.depends_on(other, chain):
        return Refusal(Reason.FEATURE_MAP_AFTER_PRODUCT, f"{node.name} multiplies the product by a function of "
                       "itself", "S")
    weights.factors.append(in_roles(evaluator.value(other), roles[len(roles) - ops.rank(other):]))
    return None


@dataclass(frozen=True)
class ProvenWeights:
    facts: MaskFacts
    factor: float  # a constant the weights are multiplied by (folded into the scale)
    decay: Decay | None


def prove(weights: LinearWeights, roles: Roles, q_len: Any, kv_len: Any, heads: int,
          graph: Graph) -> ProvenWeights | Refusal:
    """The causal band and the per-head decay the weights carry, proven for every length."""
    value, kept = _split(sympy.piecewise_fold(sympy.Mul(*[to_number(f) for f in weights.factors])))
    if value is None:
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, "the mask multiplied into the weights takes more than one "
                       "nonzero form", "mask")
    facts = classify(conjunction([*weights.keeps, kept]), ops.sym_expr(q_len), ops.sym_expr(kv_len))
    if facts.key_padding or facts.unproven or facts.window is not None:
        return Refusal(Reason.UNPROVEN_MASK, f"linear attention keeps a causal band or everything; these weights "
                       f"are kept where: {facts.text}", "mask")
    value = sympy.simplify(value)
    if value.is_number:
        if value == 0:
            return Refusal(Reason.UNPROVEN_MASK, "the mask zeroes every weight", "mask")
        return ProvenWeights(facts, float(value), None)
    decay = _geometric_ratio(value, facts)
    if isinstance(decay, Refusal):
        return decay
    batch = [r for r in roles if is_batch_role(r)]
    head = batch[-1] if batch and len(batch) <= 2 else None
    operand = _decay_operand(decay, head, batch, heads, graph)
    return operand if isinstance(operand, Refusal) else ProvenWeights(facts, 1.0, operand)


def _split(expr: Any) -> tuple[Any, Any]:
    """(the one nonzero value, where it holds) of a piecewise value; (None, _) if it has several."""
    if not isinstance(expr, sympy.Piecewise):
        return expr, sympy.true
    values, keep, remaining = set(), sympy.false, sympy.true
    for value, cond in expr.args:
        if value != 0:
            values.add(value)
            keep = sympy.Or(keep, sympy.And(remaining, cond))
        remaining = sympy.And(remaining, sympy.Not(cond))
    return (values.pop(), keep) if len(values) == 1 else (None, keep)


def _geometric_ratio(value: Any, facts: MaskFacts) -> Any:
    """lambda when `value` is lambda^(m - n) for every kept key (n <= m), else a refusal saying why."""
    if facts.causal is not Causal.TOP_LEFT:
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"the weights are multiplied by {value}, but a decay needs a "
                       "top-left causal band (lambda^(m - n) over keys n <= m)", "mask")
    m, n = role_symbol("m"), role_symbol("n")
    age = sympy.Symbol("age", integer=True, nonnegative=True)
    by_age = sympy.simplify(value.xreplace({m: n + age}))
    if by_age.has(n):
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"the decay {value} depends on the key position, not only on "
                       "the age m - n", "mask")
    if sympy.simplify(by_age.subs(age, 0) - 1) != 0:
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"the decay {value} is {by_age.subs(age, 0)} at age 0, not 1",
                       "mask")
    ratio = sympy.simplify(by_age.subs(age, age + 1) / by_age)
    if ratio.has(age):
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"the decay {value} is not geometric in the age m - n (the "
                       f"ratio of consecutive ages is {ratio})", "mask")
    return ratio


def _decay_operand(ratio: Any, head: str | None, batch: list[str], heads: int, graph: Graph) -> Decay | Refusal:
    """The op's decay (H,) from lambda: numbers per head, a tensor of the model, or exp of one."""
    others = {role_symbol(r) for r in batch if r != head}
    if ratio.free_symbols & others or (head is None and ratio.free_symbols):
        return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"the decay ratio {ratio} varies over the batch, not per head",
                       "mask")
    reads = list(ratio.atoms(sympy.core.function.AppliedUndef))
    h = role_symbol(head) if head is not None else None
    if not reads:
        return Decay(values=tuple(float(ratio.subs(h, i)) if h is not None else float(ratio) for i in range(heads)))
    source = _tensor_read(reads[0], h, heads, graph) if len(reads) == 1 else None
    if source is not None:
        read = reads[0]
        if ratio == read:
            return Decay(source=source)
        if ratio.func is sympy.exp and (ratio.args[0] / read).is_number:
            return Decay(source=source, exp_coeff=float(ratio.args[0] / read))
    return Refusal(Reason.DECAY_NOT_GEOMETRIC, f"the decay ratio {ratio} is not one tensor value per head", "mask")


def _tensor_read(read: Any, head: Any, heads: int, graph: Graph) -> Node | None:
    """The tensor of the model `read` reads, when it reads it at (head) with every other index 0 and
    it holds one value per head (mask_eval names opaque reads data_<input>__<node name>)."""
    if head is None or sum(1 for a in read.args if a == head) != 1 or any(a not in (head, 0) for a in read.args):
        return None
    name = read.func.__name__
    nodes = [n for n in graph.nodes if name.endswith(f"__{n.name}")]
    node = max(nodes, key=lambda n: len(n.name), default=None)
    if node is None or not ops.is_tensor(node):
        return None
    sizes = [ops.static_int(s) for s in ops.shape(node)]
    return node if None not in sizes and math.prod(sizes) == heads else None


__all__ = ["LinearWeights", "NORMALISERS", "ProvenWeights", "prove", "read_weights"]
