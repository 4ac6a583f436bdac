"""ALiBi proven from a bias term's symbolic value: `slopes[h] * n` plus a constant per score row.

The kernels add `slopes[h] * (n - m)` to the scores. A model's bias `slopes[h] * (n + c(b, h, m))`
differs from that by `slopes[h] * (c + m)`, which is constant along the keys, and a softmax is
invariant to a constant added to a whole row: such a bias IS ALiBi for a softmax site (MPT builds
`slopes[h] * arange(1 - N, 1)` over keys, the same for every query, for exactly this reason). A
sigmoid has no row normalisation, so there the bias must be `slopes[h] * (n - m)` exactly.

The slopes must reach the kernel as a tensor read at run time: the proof finds the graph tensor that
holds them (a parameter, a buffer, or what the model computes from them), so a user who changes
the slopes after optimisation changes what runs. Only a slope that is a plain number in the graph
becomes a literal.
"""
from __future__ import annotations

from collections import deque
import sympy
from sympy.core.function import AppliedUndef
from torch.fx import Node

from attnfx.cost_model.spec import Kind

from . import ops
from .layout import Roles
from .mask_eval import _IDX, MaskEvaluator, in_roles, is_predicate, role_symbol
from .site import Alibi, BiasTerm, Reason, Refusal

MAX_SOURCE_SEARCH = 64  # ancestors of the bias looked at for the tensor holding the slopes
_STAGE = "alibi"


def prove_alibi(term: BiasTerm, evaluator: MaskEvaluator, kind: Kind, batch_roles: Roles, sink: bool = False
                ) -> Alibi | Refusal:
    """`term` as ALiBi over the site's canonical heads, or the refusal saying which part does not fit.
    With an attention sink the row's normaliser holds a logit the shift does not move, so, as for a
    sigmoid, only the exact form is ALiBi."""
    value = evaluator.value(term.node)
    if is_predicate(value.expr):
        return _refusal(Reason.ALIBI_NOT_LINEAR, term, "is a boolean tensor added to the scores")
    expr = sympy.expand(term.coeff * in_roles(value, term.roles))
    n, m = role_symbol("n"), role_symbol("m")
    data = _data_read_at(expr, n)
    if data is not None:
        return _refusal(Reason.ALIBI_READS_DATA, term, f"reads {data} at the key index (data, or an op the proof "
                        "does not evaluate), so it is not proven to be slopes[h] * n plus a per-row constant")
    slope = sympy.simplify(expr.xreplace({n: n + 1}) - expr)
    if n in slope.free_symbols:
        return _refusal(Reason.ALIBI_NOT_LINEAR, term, "is not linear in the key index")
    head = _head_role(batch_roles)
    others = {role_symbol(r) for r in term.roles if r != head} | {m}
    wrong = sorted(str(s) for s in slope.free_symbols & others)
    if wrong:
        axis = "query" if wrong == ["m"] else f"{', '.join(wrong)}"
        return _refusal(Reason.ALIBI_SLOPE_AXIS, term, f"changes by a slope that varies along the {axis} axis, "
                        "not per head")
    shift = sympy.simplify(expr - slope * n)
    if n in shift.free_symbols:
        return _refusal(Reason.ALIBI_NOT_LINEAR, term, "is not a slope times the key index plus a per-row constant")
    exact = sympy.simplify(shift + slope * m) == 0
    if kind is Kind.SIGMOID and not exact:
        return _refusal(Reason.ALIBI_SHIFT_KEPT, term, "is ALiBi up to a per-row constant, which a sigmoid does "
                        "not cancel (only a softmax does)")
    if sink and not exact:
        return _refusal(Reason.ALIBI_SHIFT_KEPT, term, "is ALiBi up to a per-row constant, which a softmax with an "
                        "attention sink does not cancel (the sink's logit is not shifted)")
    return _with_source(term, evaluator, slope, head, exact)


def first_alibi(real_bias: list[BiasTerm], evaluator: MaskEvaluator, kind: Kind, batch_roles: Roles,
                sink: bool = False) -> Alibi | Refusal | None:
    """The first bias term proven to be ALiBi, else why the first one is not (None: no bias)."""
    proofs = [prove_alibi(t, evaluator, kind, batch_roles, sink) for t in real_bias]
    return next((p for p in proofs if isinstance(p, Alibi)), proofs[0] if proofs else None)


def _data_read_at(expr, n) -> str | None:
    """The model input (or node) an opaque read in `expr` comes from, when it is read at key index n."""
    reads = sorted(str(f.func) for f in expr.atoms(AppliedUndef) if n in f.free_symbols)
    return reads[0].removeprefix("data_").split("__")[0] if reads else None


def _head_role(batch_roles: Roles) -> str | None:
    """The canonical role that indexes query heads (None: there is no single one)."""
    if len(batch_roles) == 1:
        return batch_roles[0]
    return batch_roles[1] if len(batch_roles) == 2 else None


def _with_source(term: BiasTerm, evaluator: MaskEvaluator, slope, head: str | None, exact: bool
                 ) -> Alibi | Refusal:
    per_head = head is not None and role_symbol(head) in slope.free_symbols
    if slope.is_number:
        return Alibi(term, None, None, float(slope), exact)
    heads = ops.sym_expr(ops.shape(term.node)[term.roles.index(head)]) if per_head else None
    for node in _ancestors(term.node):
        held, head_dim = _holds_slopes(evaluator, node, slope / term.coeff, head if per_head else None, heads)
        if held:
            return Alibi(term, node, head_dim, None, exact)
    return _refusal(Reason.ALIBI_SLOPES_NOT_FOUND, term, "is ALiBi, but no tensor of the graph holds its slopes "
                    "one per head")


def _ancestors(node: Node):
    """Tensor ancestors of `node`, nearest first, at most MAX_SOURCE_SEARCH of them."""
    seen, queue, count = {node}, deque(node.all_input_nodes), 0
    while queue and count < MAX_SOURCE_SEARCH:
        current = queue.popleft()
        if current in seen:
            continue
        seen.add(current)
        count += 1
        if ops.is_tensor(current) and ops.dtype(current).is_floating_point:
            yield current
        queue.extend(current.all_input_nodes)


def _holds_slopes(evaluator: MaskEvaluator, node: Node, slope, head: str | None, heads) -> tuple[bool, int | None]:
    """Whether `node` holds exactly these slopes, and its dim that indexes them (None: `node` is one
    value, the slope of every head)."""
    value = evaluator.value(node)
    if is_predicate(value.expr):
        return False, None
    varying = [d for d, size in enumerate(value.shape) if size != 1]
    if head is None:
        return not varying and sympy.simplify(value.expr - slope) == 0, None
    if len(varying) != 1 or sympy.simplify(value.shape[varying[0]] - heads) != 0:
        return False, None
    d = varying[0]
    return sympy.simplify(value.expr.xreplace({_IDX[d]: role_symbol(head)}) - slope) == 0, d


def _refusal(code: Reason, term: BiasTerm, what: str) -> Refusal:
    return Refusal(code, f"the bias {term.node.name} {what}; it stays a dense bias tensor", _STAGE)


__all__ = ["first_alibi", "prove_alibi"]
