"""Prove what a mask *is* from how the graph builds it, for every sequence length.

Each node of a mask's subgraph is evaluated symbolically: its value is a sympy expression in its own
index symbols i0, i1, ... and the ShapeEnv's size symbols. `arange` becomes an index, comparisons
become relations, `tril`/`triu` and registered band-shaped buffers become piecewise functions, and
anything data-dependent (a user's attention_mask, an unknown op) becomes an opaque function of the
indices it is read at. A keep-predicate over (b, h, m, n) is then split into conjuncts, each
recognised as a causal diagonal, a sliding-window edge, a key-padding read, or left unproven.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable

import sympy
import torch
from torch.fx import GraphModule, Node

from attnfx.cost_model.spec import Causal

from . import ops

MAX_RANK = 8
_IDX = tuple(sympy.Symbol(f"i{d}", integer=True, nonnegative=True) for d in range(MAX_RANK))
def role_symbol(role: str) -> sympy.Symbol:
    """The index symbol of a site role (b0, b1, m, n, or a batch role of another layout)."""
    return sympy.Symbol(role, integer=True, nonnegative=True)


class Unsupported(Exception):
    """The evaluator has no symbolic view of this node; it becomes opaque data."""


@dataclass(frozen=True)
class Sym:
    """A tensor as an expression over its own index symbols i0..i{rank-1}."""

    expr: Any  # sympy expression (numeric) or Boolean
    shape: tuple[Any, ...]  # sympy sizes

    @property
    def is_bool(self) -> bool:
        return is_predicate(self.expr)


def is_predicate(expr: Any) -> bool:
    """True for boolean-valued expressions (a sympy Symbol is a Boolean subclass, but not one here)."""
    return isinstance(expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction,
                             sympy.logic.boolalg.BooleanAtom))


def _sizes(node: Node) -> tuple[Any, ...]:
    return tuple(ops.sym_expr(s) for s in ops.shape(node))


def _as_size(x: Any) -> Any:
    if isinstance(x, Node):
        val = ops.tensor_meta(x)
        return ops.sym_expr(val)
    return sympy.Integer(int(x))


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, float):
        if math.isinf(value):
            return sympy.oo if value > 0 else -sympy.oo
        return sympy.Integer(int(value)) if value.is_integer() else sympy.Float(value)
    return sympy.Integer(int(value))


def _pin_broadcast_dims(expr: Any, shape: tuple[Any, ...]) -> Any:
    """Size-1 dims are read at index 0, whatever index a broadcast asks for."""
    subs = {_IDX[d]: sympy.Integer(0) for d, s in enumerate(shape) if s == 1}
    return expr.xreplace(subs) if subs else expr


def _reindex(expr: Any, mapping: dict[int, Any]) -> Any:
    """Substitute i{d} -> mapping[d] simultaneously."""
    return expr.xreplace({_IDX[d]: sympy.sympify(v) for d, v in mapping.items()})


def _align(sym: Sym, out_rank: int) -> Any:
    """`sym`'s expression read through right-aligned broadcasting into a rank-`out_rank` result."""
    shift = out_rank - len(sym.shape)
    return _reindex(sym.expr, {d: _IDX[d + shift] for d in range(len(sym.shape))})


def to_bool(expr: Any) -> Any:
    """A numeric or piecewise expression as a predicate (nonzero is True)."""
    if is_predicate(expr):
        return expr
    if isinstance(expr, sympy.Piecewise):
        result, remaining = sympy.false, sympy.true
        for value, cond in expr.args:
            result = sympy.Or(result, sympy.And(remaining, cond, to_bool(value)))
            remaining = sympy.And(remaining, sympy.Not(cond))
        return result
    if expr.is_number:
        return sympy.true if expr != 0 else sympy.false
    return sympy.Ne(expr, 0)


def to_number(expr: Any) -> Any:
    if is_predicate(expr):
        return sympy.Piecewise((1, expr), (0, True))
    return expr


def _compare(op: str, a: Any, b: Any) -> Any:
    """a <op> b, distributing over piecewise branches so results stay predicates."""
    if is_predicate(a) and not is_predicate(b):
        a = to_number(a)
    if is_predicate(b) and not is_predicate(a):
        b = to_number(b)
    if isinstance(a, sympy.Piecewise):
        return to_bool(sympy.Piecewise(*[(_compare(op, v, b), c) for v, c in a.args]))
    if isinstance(b, sympy.Piecewise):
        return to_bool(sympy.Piecewise(*[(_compare(op, a, v), c) for v, c in b.args]))
    if is_predicate(a):  # both predicates
        if op == "eq":
            return sympy.Equivalent(a, b)
        if op == "ne":
            return sympy.Xor(a, b)
        raise Unsupported(f"ordering of predicates ({op})")
    fn = {"le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt, "eq": sympy.Eq, "ne": sympy.Ne}[op]
    return fn(a, b)


def _collapse(expr: Any) -> Any:
    """A piecewise whose branches all hold the same value is that value."""
    if isinstance(expr, sympy.Piecewise) and len({value for value, _ in expr.args}) == 1:
        return expr.args[0][0]
    return expr


def _band(tensor: torch.Tensor) -> tuple[Any, Any, int, int | None] | None:
    """(inside, outside, hi, lo) when a 2-D tensor is `inside where lo <= j - i <= hi else outside`
    (lo None: no lower edge): causal buffers, and sliding-window ones."""
    rows, cols = tensor.shape
    if rows * cols == 0:
        return None
    diff = torch.arange(cols).view(1, cols) - torch.arange(rows).view(rows, 1)
    values = tensor.unique()
    if values.numel() != 2:
        return None
    inside = tensor[0, 0]  # the diagonal is inside every causal or window band
    outside = values[0] if bool(values[1] == inside) else values[1]
    hi, lo = int(diff[tensor == inside].max()), int(diff[tensor == inside].min())
    band = (diff <= hi) & (diff >= lo)
    if not torch.equal(tensor, torch.where(band, inside, outside)):
        return None
    return _number(inside.item()), _number(outside.item()), hi, (lo if lo > -(rows - 1) else None)


class MaskEvaluator:
    """Symbolic values of the nodes of one graph (memoised across sites)."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.memo: dict[Node, Sym] = {}
        self.handlers: dict[str, Callable[[Node], Sym]] = {
            "arange": self._arange, "full": self._full, "ones": self._full, "zeros": self._full,
            "new_ones": self._full, "new_zeros": self._full, "new_full": self._full,
            "ones_like": self._full, "zeros_like": self._full, "full_like": self._full,
            "scalar_tensor": self._full,
            "add": self._arith, "sub": self._arith, "mul": self._arith, "rsub": self._arith,
            "neg": self._neg, "abs": self._abs,
            "le": self._cmp, "lt": self._cmp, "ge": self._cmp, "gt": self._cmp, "eq": self._cmp, "ne": self._cmp,
            "__and__": self._logic, "bitwise_and": self._logic, "logical_and": self._logic,
            "__or__": self._logic, "bitwise_or": self._logic, "logical_or": self._logic,
            "bitwise_not": self._not, "logical_not": self._not,
            "where": self._where, "masked_fill": self._masked_fill,
            "tril": self._tri, "triu": self._tri,
            "unsqueeze": self._reshape_like, "squeeze": self._reshape_like, "view": self._reshape_like,
            "reshape": self._reshape_like, "_unsafe_view": self._reshape_like,
            "expand": self._expand, "slice": self._slice, "select": self._select, "index": self._index,
            "permute": self._permute, "transpose": self._permute,
            "to": self._cast, "_to_copy": self._cast, "type_as": self._cast,
            "clone": self._same, "contiguous": self._same, "alias": self._same, "detach": self._same,
            "lift_fresh_copy": self._same,
            "diff": self._diff, "cumsum": self._cumsum, "repeat": self._repeat,
        }

    # -- entry point ---------------------------------------------------------------------------
    def value(self, node: Any) -> Sym:
        if not isinstance(node, Node):
            return Sym(_number(node), ())
        meta = ops.tensor_meta(node)
        if isinstance(meta, (int, torch.SymInt)):  # a size computed in the graph: its symbolic value
            return Sym(ops.sym_expr(meta), ())
        if node not in self.memo:
            try:
                sym = self._evaluate(node)
            except (Unsupported, TypeError, ValueError, IndexError, KeyError, AttributeError):
                sym = self._opaque(node)
            self.memo[node] = Sym(_pin_broadcast_dims(sym.expr, sym.shape), sym.shape)
        return self.memo[node]

    def _evaluate(self, node: Node) -> Sym:
        if node.op == "get_attr":
            return self._constant(node)
        if node.op not in ("call_function", "call_method"):
            raise Unsupported(node.op)
        name = ops.target_name(node)
        if name.endswith("_") and not name.startswith("_"):
            raise Unsupported("in-place op")
        handler = self.handlers.get(name)
        if handler is None:
            raise Unsupported(name)
        return handler(node)

    def _opaque(self, node: Node) -> Sym:
        """Data the proof cannot see into: a function of the indices it is read at."""
        if not ops.is_tensor(node):
            raise Unsupported("non-tensor")
        shape = _sizes(node)
        name = f"data_{_input_name(node)}__{node.name}"
        fn = sympy.Function(name)(*_IDX[: len(shape)])
        expr = sympy.Eq(fn, 1) if ops.dtype(node) == torch.bool else fn
        return Sym(expr, shape)

    # -- leaves --------------------------------------------------------------------------------
    def _constant(self, node: Node) -> Sym:
        tensor = self.gm
        for part in str(node.target).split("."):
            tensor = getattr(tensor, part)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or any(s != 1 for s in tensor.shape[:-2]):
            raise Unsupported("constant that is not a 2-D band")
        band = _band(tensor.reshape(tensor.shape[-2:]).detach().cpu())
        if band is None:
            raise Unsupported("constant that is not a band")
        inside, outside, hi, lo = band
        r = tensor.dim()
        cond = sympy.Le(_IDX[r - 1] - _IDX[r - 2], hi)
        if lo is not None:
            cond = sympy.And(cond, sympy.Ge(_IDX[r - 1] - _IDX[r - 2], lo))
        if is_predicate(inside):
            expr = cond if inside == sympy.true else sympy.Not(cond)
        else:
            expr = sympy.Piecewise((inside, cond), (outside, True))
        return Sym(expr, tuple(sympy.Integer(s) for s in tensor.shape))

    def _arange(self, node: Node) -> Sym:
        args = [a for a in node.args]
        if len(args) == 1:
            start, end, step = 0, args[0], 1
        else:
            start, end = args[0], args[1]
            step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        start_e, step_e = _as_size(start), _as_size(step)
        return Sym(start_e + step_e * _IDX[0], _sizes(node))

    def _full(self, node: Node) -> Sym:
        name = ops.target_name(node)
        if name in ("ones", "new_ones", "ones_like"):
            value = 1
        elif name in ("zeros", "new_zeros", "zeros_like"):
            value = 0
        elif name == "scalar_tensor":
            value = node.args[0]
        else:
            value = node.kwargs.get("fill_value", node.args[-1])
        if isinstance(value, Node):
            raise Unsupported("data-dependent fill")
        expr = _number(value)
        if ops.dtype(node) == torch.bool:
            expr = sympy.true if value else sympy.false
        return Sym(expr, _sizes(node))

    # -- elementwise ---------------------------------------------------------------------------
    def _binary(self, node: Node) -> tuple[Any, Any, tuple[Any, ...]]:
        shape = _sizes(node)
        a, b = self.value(node.args[0]), self.value(node.args[1])
        return _align(a, len(shape)), _align(b, len(shape)), shape

    def _arith(self, node: Node) -> Sym:
        a, b, shape = self._binary(node)
        a, b = to_number(a), to_number(b)
        alpha = _number(node.kwargs.get("alpha", 1))
        name = ops.target_name(node)
        expr = {"add": lambda: a + alpha * b, "sub": lambda: a - alpha * b, "rsub": lambda: b - alpha * a,
                "mul": lambda: a * b}[name]()
        return Sym(expr, shape)

    def _neg(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        return Sym(-to_number(x.expr), x.shape)

    def _abs(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        return Sym(sympy.Abs(to_number(x.expr)), x.shape)

    def _cmp(self, node: Node) -> Sym:
        a, b, shape = self._binary(node)
        return Sym(_compare(ops.target_name(node), a, b), shape)

    def _logic(self, node: Node) -> Sym:
        a, b, shape = self._binary(node)
        fn = sympy.And if ops.target_name(node) in ("__and__", "bitwise_and", "logical_and") else sympy.Or
        return Sym(fn(to_bool(a), to_bool(b)), shape)

    def _not(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        return Sym(sympy.Not(to_bool(x.expr)), x.shape)

    def _where(self, node: Node) -> Sym:
        shape = _sizes(node)
        cond, a, b = (_align(self.value(x), len(shape)) for x in node.args[:3])
        cond = to_bool(cond)
        if is_predicate(a) and is_predicate(b):
            return Sym(sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), b)), shape)
        return Sym(sympy.Piecewise((to_number(a), cond), (to_number(b), True)), shape)

    def _masked_fill(self, node: Node) -> Sym:
        shape = _sizes(node)
        x, mask, value = (_align(self.value(v), len(shape)) for v in node.args[:3])
        return Sym(sympy.Piecewise((to_number(value), to_bool(mask)), (to_number(x), True)), shape)

    def _tri(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        k = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("diagonal", 0))
        r = len(x.shape)
        diff = _IDX[r - 1] - _IDX[r - 2]
        cond = sympy.Le(diff, k) if ops.target_name(node) == "tril" else sympy.Ge(diff, k)
        if x.is_bool:
            return Sym(sympy.And(cond, x.expr), x.shape)
        return Sym(sympy.Piecewise((x.expr, cond), (0, True)), x.shape)

    def _cast(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        if ops.dtype(node) == torch.bool:
            return Sym(to_bool(x.expr), x.shape)
        if ops.dtype(node).is_floating_point or not x.is_bool:
            return Sym(to_number(x.expr), x.shape)
        return Sym(to_number(x.expr), x.shape)

    def _same(self, node: Node) -> Sym:
        return self.value(node.args[0])

    def _diff(self, node: Node) -> Sym:
        """x[i] - x[i-1] along a dim, the first element against `prepend` (HF's packed-sequence
        detection runs it over position ids)."""
        x = self.value(node.args[0])
        n = ops.arg(node, "n", 1, 1)
        r = len(x.shape)
        dim = ops.normalize_dim(int(ops.arg(node, "dim", 2, -1)), r)
        prepend, append = ops.arg(node, "prepend", 3), ops.arg(node, "append", 4)
        if n != 1 or prepend is None or append is not None:
            raise Unsupported("diff form")
        first = _reindex(_align(self.value(prepend), r), {dim: 0})
        i = _IDX[dim]
        step = to_number(x.expr) - to_number(x.expr).xreplace({i: i - 1})
        start = _reindex(to_number(x.expr), {dim: 0}) - to_number(first)
        return Sym(_collapse(sympy.Piecewise((sympy.expand(step), i >= 1), (sympy.expand(start), True))), _sizes(node))

    def _repeat(self, node: Node) -> Sym:
        """Tiling a size-1 dim (or by 1) reads the same element; true tiling is left opaque."""
        x = self.value(node.args[0])
        out = _sizes(node)
        shift = len(out) - len(x.shape)
        for d, size in enumerate(x.shape):
            if size != 1 and not (size - out[d + shift]).expand() == 0:
                raise Unsupported("repeat that tiles")
        return Sym(_align(x, len(out)), out)

    def _cumsum(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        dim = ops.normalize_dim(int(ops.arg(node, "dim", 1)), len(x.shape))
        value = to_number(x.expr)
        if value.has(_IDX[dim]):
            raise Unsupported("cumsum of a varying value")
        return Sym(sympy.expand(value * (_IDX[dim] + 1)), _sizes(node))

    # -- layout --------------------------------------------------------------------------------
    def _reshape_like(self, node: Node) -> Sym:
        """Views that only insert or drop size-1 dims: the kept dims keep their indices."""
        x = self.value(node.args[0])
        out = _sizes(node)
        kept_in = [d for d, s in enumerate(x.shape) if s != 1]
        kept_out = [d for d, s in enumerate(out) if s != 1]
        if [x.shape[d] for d in kept_in] != [out[d] for d in kept_out]:
            raise Unsupported("reshape that merges or splits dims")
        return Sym(_reindex(x.expr, dict(zip(kept_in, (_IDX[d] for d in kept_out)))), out)

    def _expand(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        out = _sizes(node)
        return Sym(_align(x, len(out)), out)

    def _slice(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        r = len(x.shape)
        dim = ops.normalize_dim(int(ops.arg(node, "dim", 1, 0)), r)
        start = ops.arg(node, "start", 2, None)
        step = ops.arg(node, "step", 4, 1)
        start_e = _as_size(start) if start is not None else sympy.Integer(0)
        if start_e.is_number and start_e < 0:
            raise Unsupported("negative slice start")
        return Sym(_reindex(x.expr, {dim: start_e + _as_size(step) * _IDX[dim]}), _sizes(node))

    def _select(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        r = len(x.shape)
        dim = ops.normalize_dim(int(node.args[1]), r)
        index = _as_size(node.args[2])
        mapping = {d: (_IDX[d] if d < dim else _IDX[d - 1]) for d in range(r) if d != dim}
        mapping[dim] = index
        return Sym(_reindex(x.expr, mapping), _sizes(node))

    def _permute(self, node: Node) -> Sym:
        from .layout import _permute_source

        source = _permute_source(node)
        if source is None:
            raise Unsupported("permute")
        _src, perm = source
        x = self.value(node.args[0])
        return Sym(_reindex(x.expr, {in_dim: _IDX[out_dim] for out_dim, in_dim in enumerate(perm)}), _sizes(node))

    def _index(self, node: Node) -> Sym:
        """x[idx0, idx1, ...] with one index tensor per dim of x, broadcast together."""
        x = self.value(node.args[0])
        indices = node.args[1]
        if len(indices) != len(x.shape) or any(i is None for i in indices):
            raise Unsupported("partial advanced indexing")
        out = _sizes(node)
        exprs = [_align(self.value(i), len(out)) for i in indices]
        return Sym(_reindex(x.expr, dict(enumerate(exprs))), out)


def _input_name(node: Node) -> str:
    """The model input a data tensor is a view of (for readable proofs), else the node's name."""
    current = node
    while current.op != "placeholder":
        tensors = [a for a in current.all_input_nodes if ops.is_tensor(a)]
        if len(tensors) != 1:
            return node.name
        current = tensors[0]
    return str(current.target)


# -- classification ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskFacts:
    """What a site's keep-predicate was proven to be."""

    causal: Causal = Causal.NONE
    window: int | None = None
    key_padding: bool = False  # some conjunct reads data at (b, n) only
    unproven: tuple[str, ...] = ()  # conjuncts the proof could not place
    text: str = ""

    @property
    def structural(self) -> bool:
        """The whole mask is a causal/window band: a kernel flag can replace the tensor."""
        return not self.key_padding and not self.unproven and self.causal is not Causal.NONE


def _linear_in_mn(rel: Any) -> tuple[str, Any] | None:
    """('upper', K) for n <= m + K, ('lower', L) for n >= m + L, or None."""
    m, n = role_symbol("m"), role_symbol("n")
    if isinstance(rel, (sympy.Le, sympy.Lt)):
        d, strict = rel.lhs - rel.rhs, isinstance(rel, sympy.Lt)
    elif isinstance(rel, (sympy.Ge, sympy.Gt)):
        d, strict = rel.rhs - rel.lhs, isinstance(rel, sympy.Gt)
    else:
        return None
    d = sympy.expand(d + (1 if strict else 0))  # integers: d < 0  <=>  d + 1 <= 0
    a_n, a_m = d.coeff(n), d.coeff(m)
    rest = sympy.expand(d - a_n * n - a_m * m)
    if rest.has(m) or rest.has(n):
        return None
    if a_n == 1 and a_m == -1:
        return "upper", -rest
    if a_n == -1 and a_m == 1:
        return "lower", rest
    return None


def classify(keep: Any, q_len: Any, kv_len: Any) -> MaskFacts:
    """Split `keep` (over role symbols b0.., m, n) into causal, window, key-padding and the rest."""
    keep = sympy.simplify_logic(keep) if keep.has(sympy.Or) else keep
    conjuncts = keep.args if isinstance(keep, sympy.And) else (keep,)
    upper, lower, padding, unproven = [], [], [], []
    data_roles = {role_symbol("b0"), role_symbol("n")}
    for conj in conjuncts:
        if conj == sympy.true:
            continue
        reads = conj.atoms(sympy.core.function.AppliedUndef)
        linear = _linear_in_mn(conj) if not reads else None
        if linear is not None:
            (upper if linear[0] == "upper" else lower).append(linear[1])
        elif reads and conj.free_symbols <= data_roles and role_symbol("n") in conj.free_symbols:
            padding += sorted(_describe(str(r)) for r in reads)
        else:
            unproven.append(_describe(str(conj)))
    upper, lower = _distinct(upper), _distinct(lower)
    causal, window = Causal.NONE, None
    if len(upper) == 1:
        offset = sympy.simplify(upper[0])
        if offset == 0:
            causal = Causal.TOP_LEFT
        elif sympy.simplify(offset - (kv_len - q_len)) == 0:
            causal = Causal.BOTTOM_RIGHT
        else:
            unproven.append(f"n <= m + {offset}")
    elif upper:
        unproven += [f"n <= m + {u}" for u in upper]
    if len(lower) == 1 and causal is not Causal.NONE:
        width = sympy.simplify(causal_offset(causal, q_len, kv_len) - lower[0] + 1)
        if width.is_Integer and int(width) >= 1:
            window = int(width)
        else:
            unproven.append(f"n >= m + {lower[0]}")
    elif lower:
        unproven += [f"n >= m + {lo}" for lo in lower]
    parts = []
    if causal is not Causal.NONE:
        rule = "n <= m" if causal is Causal.TOP_LEFT else "n <= m + N - M"
        parts.append(f"causal {causal.value.replace('_', '-')} ({rule})")
    if window is not None:
        parts.append(f"sliding window of {window} keys")
    if padding:
        parts.append("key padding read from " + ", ".join(padding))
    if unproven:
        parts.append("unproven: " + "; ".join(unproven))
    return MaskFacts(causal, window, bool(padding), tuple(unproven), ", ".join(parts) or "no exclusions")


def _distinct(bounds: list[Any]) -> list[Any]:
    """The same bound proven twice (a model's own mask and the framework's) is one bound."""
    kept: list[Any] = []
    for bound in bounds:
        if not any(sympy.simplify(bound - other) == 0 for other in kept):
            kept.append(bound)
    return kept


def causal_offset(causal: Causal, q_len: Any, kv_len: Any) -> Any:
    return kv_len - q_len if causal is Causal.BOTTOM_RIGHT else sympy.Integer(0)


def _describe(keep: Any) -> str:
    text = re.sub(r"data_(\w+?)__\w+\(", r"\1(", str(keep))
    return re.sub(r"\bb0\b", "b", text)


def keep_predicate(sym: Sym, roles: tuple[str, ...], fill_is_keep: bool = False) -> Any:
    """The predicate of a bool mask (or its negation) with its dims renamed to site roles."""
    expr = _reindex(sym.expr, {d: role_symbol(r) for d, r in enumerate(roles)})
    pred = to_bool(expr)
    return sympy.Not(pred) if fill_is_keep else pred


def additive_keep(sym: Sym, roles: tuple[str, ...], is_exclusion: Callable[[float], bool]) -> Any | None:
    """For an additive mask of 0 / exclusion values: where it is 0. None if it is a real bias."""
    expr = _reindex(sym.expr, {d: role_symbol(r) for d, r in enumerate(roles)})
    if expr == 0:
        return sympy.true
    if not isinstance(expr, sympy.Piecewise):
        return None
    keep, remaining = sympy.false, sympy.true
    for value, cond in expr.args:
        if value == 0:
            keep = sympy.Or(keep, sympy.And(remaining, cond))
        elif not (value.is_number and is_exclusion(float(value))):
            return None
        remaining = sympy.And(remaining, sympy.Not(cond))
    return keep


def conjunction(predicates: list[Any]) -> Any:
    return reduce(sympy.And, predicates, sympy.true)


__all__ = ["MaskEvaluator", "MaskFacts", "Sym", "additive_keep", "classify", "conjunction", "keep_predicate", "role_symbol"]
