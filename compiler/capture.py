"""Capture a model as an ATen-level fx graph that keeps module paths and source lines.

`torch.export` (non-strict) first, with every tensor dim `Dim.AUTO` so batch and sequence stay
dynamic wherever the model allows it (size-oblivious, so a batch-1 example does not pin batch to 1);
plain `torch.fx.symbolic_trace` as the fallback for modules export cannot take. Either way the
result is called exactly like the model and returns the same output structure.
"""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .errors import CaptureError


@dataclass
class Captured:
    graph_module: GraphModule
    method: str  # "torch.export" | "symbolic_trace"
    dynamic_shapes: Any
    notes: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict)  # non-tensor kwargs baked into the graph
    module_prefix: str = ""  # prefix of module paths added by capture's own wrapper


class _Bound(nn.Module):
    """The model with its non-tensor keyword arguments (flags such as output_attentions) bound,
    behind a forward whose signature names each remaining input: export mishandles inputs that
    arrive through **kwargs."""

    def __init__(self, model: nn.Module, constants: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.constants = constants


def _bind(model: nn.Module, args: tuple, tensor_kwargs: dict, constants: dict) -> nn.Module:
    def forward(self: _Bound, *a: Any, **k: Any) -> Any:
        return self.model(*a, **k, **self.constants)

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(f"arg{i}", P.POSITIONAL_ONLY) for i in range(len(args))]
    params += [P(name, P.KEYWORD_ONLY) for name in tensor_kwargs]
    forward.__signature__ = inspect.Signature(params)
    bound_class = type(f"Bound{type(model).__name__}", (_Bound,), {"forward": forward})
    return bound_class(model, constants)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """`Dim.AUTO` on every dim of every tensor input, keyed by forward's parameter names."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    params = inspect.signature(model.forward).parameters

    def spec(value: Any) -> Any:
        return pytree.tree_map(lambda t: {d: Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) else None, value)

    shapes = {}
    for name, value in bound.arguments.items():
        if params[name].kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        else:
            shapes[name] = spec(value)
    return shapes


def capture(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None) -> Captured:
    """Capture `model` at the example inputs, or raise `CaptureError` naming why it could not be."""
    shapes = dynamic_shapes if dynamic_shapes is not None else auto_dynamic_shapes(model, args, kwargs)
    errors: list[Exception] = []
    captured = _export(model, args, kwargs, shapes, errors)
    constants = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    if captured is None and kwargs and dynamic_shapes is None:
        tensors = {k: v for k, v in kwargs.items() if k not in constants}
        wrapper = _bind(model, args, tensors, constants)
        captured = _export(wrapper, args, tensors, auto_dynamic_shapes(wrapper, args, tensors), [])
        if captured is not None:
            captured.constants, captured.module_prefix = constants, "model."
    if captured is not None:
        return captured
    try:
        traced = torch.fx.symbolic_trace(model)
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        ShapeProp(traced).propagate(*[bound.arguments[n.target] for n in traced.graph.nodes if n.op == "placeholder"])
        note = f"torch.export failed ({_first_line(errors[-1])}); captured with symbolic_trace at fixed shapes"
        return Captured(traced, "symbolic_trace", None, (note,))
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    raise CaptureError(_explain(model, errors[1] if len(errors) > 1 else errors[0], errors[-1])) from errors[-1]


def _export(model: nn.Module, args: tuple, kwargs: dict, shapes: Any, errors: list[Exception]) -> Captured | None:
    for oblivious in (True, False):
        try:
            with fx_config.patch(backed_size_oblivious=oblivious):
                program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
            module = program.module()
            # The model's state (may change after optimisation), as opposed to constants made in forward.
            signature = program.graph_signature
            module.meta["attnfx_state"] = frozenset(signature.parameters) | frozenset(signature.buffers)
            return Captured(module, "torch.export", shapes)
        except Exception as exc:  # noqa: BLE001 - every export failure falls through to the next way
            errors.append(exc)
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _explain(model: nn.Module, export_error: Exception, trace_error: Exception) -> str:
    name = type(model).__name__
    lines = [f"attnfx could not capture {name}; nothing was rewritten.",
             f"  torch.export (non-strict): {_first_line(export_error)}"]
    location = _user_frame(export_error)
    if location:
        lines.append(f"    at {location}")
    lines.append(f"  torch.fx.symbolic_trace: {_first_line(trace_error)}")
    if "Cache" in str(export_error):
        lines.append("  hint: the model returns a transformers cache object; pass use_cache=False in "
                     "example_kwargs (or set model.config.use_cache = False) to optimize it")
    elif "data-dependent" in str(export_error).lower() or "GuardOnDataDependent" in type(export_error).__name__:
        lines.append("  hint: the model branches on tensor values; attnfx needs a graph that does not")
    return "\n".join(lines)


def _user_frame(exc: Exception) -> str:
    """The last frame of the traceback that is not inside torch or attnfx."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/attnfx/" not in frame.filename and "compiler/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return ""
