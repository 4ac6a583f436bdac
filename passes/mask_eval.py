"""Symbolic values of the nodes that build a mask, for every sequence length.

Each node of a mask's subgraph is evaluated symbolically: its value is a sympy expression in its own
index symbols i0, i1, ... and the ShapeEnv's size symbols. `arange` becomes an index, comparisons
become relations, `tril`/`triu` and registered band-shaped buffers become piecewise functions, and
anything data-dependent (a user's attention_mask, an unknown op) becomes an opaque function of the
indices it is read at. Handlers are keyed by `ops.kind`, the vocabulary the matcher uses too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
from torch.fx import GraphModule, Node

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


def in_roles(sym: Sym, roles: tuple[str, ...]) -> Any:
    """`sym`'s expression with its dims renamed to the site roles they play (b0, m, n, ...)."""
    return _reindex(sym.expr, {d: role_symbol(r) for d, r in enumerate(roles)})


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
        self.handlers: dict[str, Callable[[Node], Sym]] = {  # keyed by ops.kind
            "arange": self._arange, "fill": self._full,
            "add": self._arith, "sub": self._arith, "mul": self._arith, "rsub": self._arith,
            "neg": self._neg, "abs": self._abs,
            "le": self._cmp, "lt": self._cmp, "ge": self._cmp, "gt": self._cmp, "eq": self._cmp, "ne": self._cmp,
            "and": self._logic, "or": self._logic, "not": self._not,
            "where": self._where, "masked_fill": self._masked_fill,
            "tril": self._tri, "triu": self._tri,
            "unsqueeze": self._reshape_like, "squeeze": self._reshape_like, "reshape": self._reshape_like,
            "expand": self._expand, "slice": self._slice, "select": self._select, "index": self._index,
            "permute": self._permute, "transpose": self._permute,
            "cast": self._cast, "identity": self._same,
            "diff": self._diff, "cumsum": self._cumsum, "repeat": self._repeat,
            "pow": self._pow, "exp": self._exp, "log": self._exp, "clamp_min": self._clamp,
            "reciprocal": self._reciprocal,
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
        if ops.is_inplace(node):
            raise Unsupported("in-place op")
        handler = self.handlers.get(ops.kind(node))
        if handler is None:
            raise Unsupported(ops.target_name(node))
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
        expr = {"add": lambda: a + alpha * b, "sub": lambda: a - alpha * b, "rsub": lambda: b - alpha * a,
                "mul": lambda: a * b}[ops.kind(node)]()
        return Sym(expr, shape)

    def _neg(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        return Sym(-to_number(x.expr), x.shape)

    def _abs(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        return Sym(sympy.Abs(to_number(x.expr)), x.shape)

    def _pow(self, node: Node) -> Sym:
        """base ** exponent (decay masks: lambda[h] ** (i - j))."""
        a, b, shape = self._binary(node)
        return Sym(sympy.Pow(to_number(a), to_number(b)), shape)

    def _exp(self, node: Node) -> Sym:
        """exp or log of a value (decay masks: exp(log_lambda[h] * (i - j)))."""
        x = self.value(node.args[0])
        fn = sympy.exp if ops.kind(node) == "exp" else sympy.log
        return Sym(fn(to_number(x.expr)), x.shape)

    def _reciprocal(self, node: Node) -> Sym:
        x = self.value(node.args[0])
        return Sym(1 / to_number(x.expr), x.shape)

    def _clamp(self, node: Node) -> Sym:
        """max(x, lo) and min(x, hi) (decay masks clamp the age i - j at 0)."""
        shape = _sizes(node)
        x = to_number(_align(self.value(node.args[0]), len(shape)))
        if ops.target_name(node) == "clamp":
            lo, hi = ops.arg(node, "min", 1), ops.arg(node, "max", 2)
        else:
            lo, hi = node.args[1], None
        for bound, fn in ((lo, sympy.Max), (hi, sympy.Min)):
            if bound is not None:
                x = fn(x, to_number(_align(self.value(bound), len(shape))))
        return Sym(x, shape)

    def _cmp(self, node: Node) -> Sym:
        a, b, shape = self._binary(node)
        return Sym(_compare(ops.kind(node), a, b), shape)

    def _logic(self, node: Node) -> Sym:
        a, b, shape = self._binary(node)
        fn = sympy.And if ops.kind(node) == "and" else sympy.Or
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
        k = _as_size(ops.arg(node, "diagonal", 1, 0))  # an int, or a size computed in the graph
        r = len(x.shape)
        diff = _IDX[r - 1] - _IDX[r - 2]
        cond = sympy.Le(diff, k) if ops.kind(node) == "tril" else sympy.Ge(diff, k)
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


__all__ = ["MaskEvaluator", "Sym", "in_roles", "role_symbol", "to_bool"]
