"""A call of the model, read against the model's own signature.

Every call is bound to `inspect.signature(model.forward)`, defaults included. So positional and
keyword spellings of the same arguments are the same call, a keyword left out means the model's
default, and a call the model itself would reject gets the model's own TypeError. A captured graph
serves every call with its `structure` (each argument's constants, container layout and tensor
rank and dtype), re-spelled in the form the graph was captured with (`in_form_of`), so that hooks
and wrappers see the arguments where they saw them at capture.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

P = inspect.Parameter


@dataclass(frozen=True)
class BoundCall:
    args: tuple[Any, ...]  # the call as it was made
    kwargs: dict[str, Any]
    arguments: dict[str, Any]  # every parameter's value, defaults included (*args a tuple, **kwargs a dict)
    positional: tuple[str, ...]  # the parameters this call gave by position, in order
    var_positional: str | None  # the names of the model's *args and **kwargs parameters
    var_keyword: str | None
    structure: tuple[Any, ...]  # what a graph captured from this call is specialised to

    def same_structure(self, other: BoundCall | None) -> bool:
        try:
            return other is not None and bool(self.structure == other.structure)
        except Exception:  # noqa: BLE001 - constants whose == is not a bool (arrays) never match
            return False

    def in_form_of(self, captured: BoundCall) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """This call's values spelled as `captured` was: the same parameters by position, the same
        names by keyword (a call of the same structure has a value for each)."""
        args: list[Any] = []
        for name in captured.positional:
            if name == self.var_positional:
                args.extend(self.arguments[name])
            else:
                args.append(self.arguments[name])
        kwargs = {name: self._value(name) for name in captured.kwargs}
        return tuple(args), kwargs

    def _value(self, name: str) -> Any:
        if name in self.arguments and name != self.var_keyword:
            return self.arguments[name]
        return self.arguments[self.var_keyword][name]


def bind_call(forward: Callable[..., Any], args: tuple, kwargs: dict) -> BoundCall:
    """`forward(*args, **kwargs)` bound to forward's signature; a call that does not fit it raises
    the TypeError `forward` itself raises."""
    signature = inspect.signature(forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as mismatch:
        forward(*args, **kwargs)  # raises the model's own error before running anything
        raise mismatch  # the model took it: its real signature differs from the one it declares
    bound.apply_defaults()
    params = signature.parameters
    var_positional = next((n for n, p in params.items() if p.kind is P.VAR_POSITIONAL), None)
    var_keyword = next((n for n, p in params.items() if p.kind is P.VAR_KEYWORD), None)
    positional = _positional_names(signature, len(args))
    structure = tuple((name, _structure(value)) for name, value in bound.arguments.items())
    return BoundCall(tuple(args), dict(kwargs), dict(bound.arguments), positional, var_positional, var_keyword,
                     structure)


def _positional_names(signature: inspect.Signature, count: int) -> tuple[str, ...]:
    names = []
    for name, param in signature.parameters.items():
        if count <= 0:
            break
        if param.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            names.append(name)
            count -= 1
        elif param.kind is P.VAR_POSITIONAL:
            names.append(name)
            count = 0
    return tuple(names)


def _structure(value: Any) -> tuple[Any, ...]:
    leaves, spec = pytree.tree_flatten(value)
    return str(spec), tuple(("tensor", leaf.dim(), leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf
                            for leaf in leaves)
