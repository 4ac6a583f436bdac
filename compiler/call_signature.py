"""A call of the model, read against the model's own signature.

Every call is bound to `inspect.signature(model.forward)` and put in one canonical form: positional
only for positional-only and `*args` parameters, by keyword for everything else. So positional
and keyword spellings of the same call are the same call, a keyword left out means the model's
default, and a call the model itself would reject gets the model's own TypeError. What a capture
is specialised to (`structure`: every argument's constants, container layout and tensor
rank/dtype, defaults included) says whether a captured graph can serve a call.
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
    args: tuple[Any, ...]  # positional-only and *args values
    kwargs: dict[str, Any]  # every other argument given, by name
    defaults: dict[str, Any]  # the model's defaults for the parameters not given
    structure: tuple[Any, ...]  # what a graph captured from this call is specialised to

    def value(self, name: str) -> Any:
        return self.kwargs[name] if name in self.kwargs else self.defaults[name]

    def same_structure(self, other: BoundCall) -> bool:
        try:
            return bool(self.structure == other.structure)
        except Exception:  # noqa: BLE001 - constants whose == is not a bool (arrays) never match
            return False


def bind_call(forward: Callable[..., Any], args: tuple, kwargs: dict) -> BoundCall:
    """`forward(*args, **kwargs)` in canonical form; a call that does not fit the signature raises
    the TypeError `forward` itself raises."""
    signature = inspect.signature(forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as mismatch:
        forward(*args, **kwargs)  # raises the model's own error before running anything
        raise mismatch  # the model took it: its real signature differs from the one it declares
    positional, named = _split(signature, bound.arguments)
    given = set(bound.arguments)
    bound.apply_defaults()
    defaults = {k: v for k, v in bound.arguments.items() if k not in given}
    structure = tuple((name, _structure(value)) for name, value in bound.arguments.items())
    return BoundCall(tuple(positional), named, defaults, structure)


def _split(signature: inspect.Signature, arguments: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    params = signature.parameters
    var_positional = next((n for n, p in params.items() if p.kind is P.VAR_POSITIONAL), None)
    keep_positional = var_positional is not None and bool(arguments.get(var_positional))
    positional, named = [], {}
    for name, value in arguments.items():
        kind = params[name].kind
        if kind is P.VAR_POSITIONAL:
            positional.extend(value)
        elif kind is P.VAR_KEYWORD:
            named.update(value)
        elif kind is P.POSITIONAL_ONLY or (kind is P.POSITIONAL_OR_KEYWORD and keep_positional):
            positional.append(value)  # before a non-empty *args a parameter cannot be named
        else:
            named[name] = value
    return positional, named


def _structure(value: Any) -> tuple[Any, ...]:
    leaves, spec = pytree.tree_flatten(value)
    return spec, tuple(("tensor", leaf.dim(), leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf
                       for leaf in leaves)
