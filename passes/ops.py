"""Canonical views of fx nodes: one vocabulary for every spelling of the same operation.

`torch.export` yields ATen overloads (`aten.softmax.int`, `aten._softmax.default`), symbolic tracing
yields torch functions, methods and operators (`F.softmax`, `x.softmax`, `operator.matmul`). The
matcher never looks at a target directly: it asks `kind(node)` and reads arguments by name with
`arg(node, name)`, so a new spelling is one line in the tables below, not a new pattern.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten

# Canonical kind -> names a target may carry (ATen packet name, torch function or method name).
_KIND_NAMES: dict[str, tuple[str, ...]] = {
    "matmul": ("matmul", "bmm", "mm"),
    "einsum": ("einsum",),
    "baddbmm": ("baddbmm",),
    "softmax": ("softmax", "_softmax", "_safe_softmax"),
    "log_softmax": ("log_softmax", "_log_softmax"),
    "mul": ("mul", "multiply"),
    "div": ("div", "divide", "true_divide"),
    "add": ("add",),
    "sub": ("sub", "subtract"),
    "neg": ("neg",),
    "masked_fill": ("masked_fill",),
    "where": ("where",),
    "tanh": ("tanh",),
    "clamp_min": ("maximum", "clamp_min", "clamp"),
    "cast": ("to", "_to_copy", "type_as", "float", "half", "bfloat16", "double", "type"),
    "dropout": ("dropout", "native_dropout", "feature_dropout"),
    "identity": ("clone", "contiguous", "alias", "detach", "lift_fresh_copy"),
    "transpose": ("transpose", "swapaxes", "swapdims", "t"),
    "permute": ("permute",),
    "reshape": ("view", "reshape", "_unsafe_view", "_reshape_alias"),
    "unsqueeze": ("unsqueeze",),
    "squeeze": ("squeeze",),
    "expand": ("expand",),
    "repeat_interleave": ("repeat_interleave",),
    "flatten": ("flatten",),
    "slice": ("slice",),
    "sdpa": ("scaled_dot_product_attention",),
    # what masks are built from (the mask proof evaluates these kinds)
    "arange": ("arange",),
    "fill": ("full", "ones", "zeros", "new_ones", "new_zeros", "new_full", "ones_like", "zeros_like",
             "full_like", "scalar_tensor"),
    "rsub": ("rsub",),
    "abs": ("abs",),
    "le": ("le", "less_equal"),
    "lt": ("lt", "less"),
    "ge": ("ge", "greater_equal"),
    "gt": ("gt", "greater"),
    "eq": ("eq",),
    "ne": ("ne", "not_equal"),
    "and": ("__and__", "bitwise_and", "logical_and", "and"),
    "or": ("__or__", "bitwise_or", "logical_or", "or"),
    "not": ("bitwise_not", "logical_not", "invert", "__invert__"),
    "tril": ("tril",),
    "triu": ("triu",),
    "select": ("select",),
    "index": ("index",),
    "diff": ("diff",),
    "cumsum": ("cumsum",),
    "repeat": ("repeat",),
    # what a softmax written out by hand is made of
    "exp": ("exp",),
    "pow": ("pow",),
    "log": ("log",),
    "sigmoid": ("sigmoid",),
    "sum": ("sum",),
    "reduce_max": ("amax",),
    "logsumexp": ("logsumexp",),
    "reciprocal": ("reciprocal",),
}
_NAME_TO_KIND = {name: kind for kind, names in _KIND_NAMES.items() for name in names}
_OPERATORS = {
    operator.matmul: "matmul",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.add: "add",
    operator.sub: "sub",
    operator.neg: "neg",
    operator.le: "le",
    operator.lt: "lt",
    operator.ge: "ge",
    operator.gt: "gt",
    operator.eq: "eq",
    operator.ne: "ne",
    operator.and_: "and",
    operator.or_: "or",
    operator.invert: "not",
}
_INPLACE_SUFFIX = "_"


def target_name(node: Node) -> str:
    """A short, stable name for what a node calls (for kinds and for the report)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def kind(node: Node) -> str | None:
    """The canonical kind of a call node, or None when the matcher has no view of it."""
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target in _OPERATORS:
        return _OPERATORS[node.target]
    name = target_name(node)
    if name.endswith(_INPLACE_SUFFIX) and not name.startswith("_"):
        name = name[:-1]
    if name == "max":  # elementwise max(a, b), or the reduction over a dim
        return "clamp_min" if len(node.args) == 2 and isinstance(node.args[1], Node) else "reduce_max"
    return _NAME_TO_KIND.get(name)


def is_inplace(node: Node) -> bool:
    """An op that writes into its first argument (`masked_fill_`, `add_`, ...)."""
    name = target_name(node)
    return node.op in ("call_function", "call_method") and name.endswith(_INPLACE_SUFFIX) \
        and not name.startswith("_") and node.target not in _OPERATORS


def arg(node: Node, name: str, index: int, default: Any = None) -> Any:
    """Argument `name` of `node`, whether passed by keyword or at position `index`."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    for alias in _ALIASES.get(name, ()):
        if alias in node.kwargs:
            return node.kwargs[alias]
    return default


_ALIASES = {"self": ("input",), "dim": ("axis",), "other": ("mat2",)}


def softmax_args(node: Node) -> tuple[Node, int, torch.dtype | None]:
    """(input, dim, dtype) of any softmax spelling; dtype is the requested output dtype."""
    name = target_name(node)
    x, dim = arg(node, "self", 0), arg(node, "dim", 1)
    if name in ("_softmax", "_log_softmax"):
        half_to_float = arg(node, "half_to_float", 2, False)
        return x, dim, (torch.float32 if half_to_float else None)
    index = 3 if node.target in (F.softmax, F.log_softmax) else 2  # F.softmax has _stacklevel
    return x, dim, arg(node, "dtype", index)


def tensor_meta(node: Any) -> Any:
    """The example value fx recorded for a node (a FakeTensor, SymInt, or TensorMetadata)."""
    if not isinstance(node, Node):
        return None
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("tensor_meta")


def is_tensor(node: Any) -> bool:
    meta = tensor_meta(node)
    return meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype")


def shape(node: Node) -> tuple[Any, ...]:
    """Sizes of a tensor node: ints, or SymInts for dynamic dims."""
    return tuple(tensor_meta(node).shape)


def rank(node: Node) -> int:
    return len(shape(node))


def dtype(node: Node) -> torch.dtype:
    return tensor_meta(node).dtype


def static_int(size: Any) -> int | None:
    """`size` as an int when it is one for every input (not a dynamic SymInt)."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else None
    return None


def hint_int(size: Any) -> int:
    """`size` at the example inputs."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else int(size)
    return int(size)


def sym_expr(size: Any):
    """`size` as a sympy expression (dynamic dims are the ShapeEnv's symbols, e.g. s27)."""
    import sympy

    if isinstance(size, torch.SymInt):
        return size.node.expr
    if isinstance(size, sympy.Basic):
        return size
    return sympy.Integer(int(size))


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are equal for every input (not just at the example)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def same_shape(a: Node, b: Node) -> bool:
    sa, sb = shape(a), shape(b)
    return len(sa) == len(sb) and all(same_size(x, y) for x, y in zip(sa, sb))


def unflatten_size(size: Any) -> int:
    """`size` for an unflatten/view argument: its value, or -1 for a dynamic size."""
    value = static_int(size)
    return -1 if value is None else value


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def scalar_value(x: Any) -> float | None:
    """A Python number an argument holds for every input, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.SymFloat) and x.node.expr.is_number:
        return float(x.node.expr)
    return None


def numel_is_one(node: Any) -> bool:
    """A tensor node holding one element (a 0-d or all-ones-shaped scalar tensor)."""
    if not is_tensor(node):
        return False
    return all(static_int(s) == 1 for s in shape(node))


def is_exclusion_fill(value: float, score_dtype: torch.dtype) -> bool:
    """A fill value that removes a score from the softmax (-inf or a huge negative number)."""
    if math.isinf(value):
        return value < 0
    return value <= -1e4 or value <= torch.finfo(score_dtype).min / 2


_METADATA_CHECKS = ("_assert_tensor_metadata",)


def is_metadata_check(node: Node) -> bool:
    """Nodes export adds to re-check a tensor's dtype/device; they compute nothing."""
    return node.op == "call_function" and target_name(node) in _METADATA_CHECKS


# Arguments an op reads only for their shape, dtype or device, never their values.
_SHAPE_ONLY_ARGS = {
    "type_as": 1, "expand_as": 1, "view_as": 1, "reshape_as": 1,
    "new_zeros": 0, "new_ones": 0, "new_full": 0, "new_empty": 0,
    "zeros_like": 0, "ones_like": 0, "empty_like": 0, "full_like": 0,
    "sym_size": 0, "sym_numel": 0, "sym_stride": 0, "size": 0,
}


def data_inputs(node: Node) -> list[Node]:
    """The inputs whose values `node` reads (not those it only takes a shape or dtype from)."""
    index = _SHAPE_ONLY_ARGS.get(target_name(node)) if node.op in ("call_function", "call_method") else None
    if index is None:
        return node.all_input_nodes
    shape_only = node.args[index] if index < len(node.args) else None
    return [n for n in node.all_input_nodes if n is not shape_only]


def users(node: Node) -> list[Node]:
    """The nodes that consume `node`'s value (metadata checks and shape/dtype reads do not count)."""
    return [u for u in node.users if not is_metadata_check(u) and node in data_inputs(u)]


def metadata_checks(node: Node) -> list[Node]:
    return [u for u in node.users if is_metadata_check(u)]


def depends_on(node: Node, targets: set[Node]) -> bool:
    """Whether `node`'s value is computed (transitively) from any of `targets`."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in targets:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(data_inputs(current))
    return False


def module_path(node: Node) -> str:
    """Dotted path of the user's module that produced this node ('' for the root module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path.replace("L__self__", "").replace("L['self']", "").lstrip(".") if path else ""


def source_line(node: Node) -> str:
    """`file.py:LINE` of the user's source line that produced this node, if fx recorded it."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return ""
    last = lines[-1]  # 'File "/path/x.py", line 12, in forward'
    try:
        path = last.split('"')[1]
        lineno = last.split(", line ")[1].split(",")[0]
    except IndexError:
        return ""
    return f"{path.rsplit('/', 1)[-1]}:{lineno}"

