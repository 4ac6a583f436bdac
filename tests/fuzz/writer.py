"""Accumulates the source of one attention block and aligns role-labelled tensors to its scores.

Roles name tensor dims: _ a singleton (a 4-D mask broadcast in the model's own layout), b batch, h query head, k kv head and g group (h split as k*G+g), B batch and
heads merged (b*H), m query, n key, d feature. The layout sets `score_roles`; every mask, bias and
temperature is written in its own roles and aligned to the scores here, in one place.
"""
from __future__ import annotations

from .grammar import H, Block


class Writer:
    def __init__(self, block: Block) -> None:
        self.block = block
        self.init_lines: list[str] = []
        self.lines: list[str] = []
        self.score_roles = ""
        self.einsum_roles = ("", "")  # (q roles, k/v roles) of an einsum layout's operands
        self.extras: list[str] = []  # expressions the block returns after its output
        self._taken: set[str] = set()

    def line(self, code: str) -> None:
        self.lines.append(code)

    def init(self, code: str) -> None:
        self.init_lines.append(code)

    def fresh(self, stem: str) -> str:
        """A forward-local name not used yet in this block."""
        name, i = stem, 1
        while name in self._taken:
            i += 1
            name = f"{stem}{i}"
        self._taken.add(name)
        return name

    def dim(self, role: str) -> int:
        """The (negative) index of a role's dim in the scores."""
        return self.score_roles.index(role) - len(self.score_roles)

    def align(self, expr: str, roles: str) -> str:
        """`expr`, whose dims are `roles`, as an expression that broadcasts against the scores."""
        target = self.score_roles
        if "_" in roles:
            if len(roles) == len(target) and all(r in ("_", t) for r, t in zip(roles, target)):
                return expr
            expr = f"{_paren(expr)}[{', '.join('0' if r == '_' else ':' for r in roles)}]"
            roles = roles.replace("_", "")
        if "B" in target and set(roles) & set("bh"):
            full = _index(_permuted(expr, roles, "bhmn"), sorted(roles, key="bhmn".index), "bhmn", keep_leading=True)
            return f"{full}.expand(b, {H}, -1, -1).flatten(0, 1)"
        if "B" in target:
            target = "mn"
        if "k" in target and "h" in roles:
            expr = f"{_paren(expr)}.unflatten({roles.index('h')}, ({self.block.kv_heads}, {self.block.groups}))"
            roles = roles.replace("h", "kg")
        ordered = sorted(roles, key=target.index)
        return _index(_permuted(expr, roles, target), ordered, target, keep_leading=False)


def _permuted(expr: str, roles: str, target: str) -> str:
    order = sorted(range(len(roles)), key=lambda i: target.index(roles[i]))
    if order == list(range(len(roles))):
        return expr
    return f"{_paren(expr)}.permute({', '.join(map(str, order))})"


def _index(expr: str, roles: list[str], target: str, keep_leading: bool) -> str:
    start = 0 if keep_leading else min(target.index(r) for r in roles)
    index = [":" if r in roles else "None" for r in target[start:]]
    while index and index[-1] == ":":
        index.pop()
    return f"{_paren(expr)}[{', '.join(index)}]" if index else expr


def _paren(expr: str) -> str:
    """`expr` safe to call a method on."""
    depth = 0
    for ch in expr:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch in " +-*/<>=&|~":
            return f"({expr})"
    return expr
