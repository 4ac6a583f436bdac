"""`optimize()` for a Hugging Face model that generates with its KV cache on.

Such a model returns a cache object whose Python state (lengths, sliding-window offsets) changes
at every step; `torch.export` cannot carry that across calls, Dynamo can. So the model's forward
is compiled with the attnfx backend (the rewritten ATen graph runs as it is, no Inductor, as
optimize() does elsewhere), and what `optimize()` returns is a shallow copy of the model — same
class, same parameters, so `config`, `generation_config`, `device` and `generate()` work as on the
model — whose forward is the compiled one. The user's model is not modified.

The example call is compiled (and its graph verified) inside `optimize()`; the prefill and decode
calls of `generate()` are compiled on first use, each graph with its own report:
`attnfx.reports(result)` returns them all.
"""
from __future__ import annotations

import types
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .errors import AttnfxError


def uses_cache(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether calling `model` with `kwargs` returns a KV cache (a generative HF model with
    `use_cache` on, by argument or by its config)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not callable(can_generate) or config is None or not can_generate():
        return False
    use_cache = kwargs.get("use_cache")
    return bool(getattr(config, "use_cache", False) if use_cache is None else use_cache)


def optimize_generative(model: nn.Module, args: tuple, kwargs: dict, options: Any, dynamic_shapes: Any) -> nn.Module:
    """A shallow copy of `model` whose forward runs attnfx's rewrite of each graph Dynamo captures;
    the example call is compiled and verified here."""
    if dynamic_shapes is not None:
        raise AttnfxError(f"{type(model).__name__} returns a KV cache, so attnfx captures it with Dynamo, which "
                          "follows the shapes it sees; dynamic_shapes applies to torch.export only (pass "
                          "use_cache=False to capture it with torch.export)")
    settings = {f.name: getattr(options, f.name) for f in fields(options)}
    backend_options = {**settings, "inductor": False}
    copy_ = shallow_copy(model)
    _compile_forward(copy_, backend_options)
    encoder = _encoder_path(model)
    if encoder:  # generate() runs an encoder-decoder's encoder itself, outside forward
        _compile_forward(_copy_path(copy_, encoder), backend_options)
    with torch.no_grad():
        copy_(*args, **kwargs)
    return copy_


def _compile_forward(module: nn.Module, backend_options: dict[str, Any]) -> None:
    """Compile `module.forward` with the backend registered as "attnfx" (by name: backend.py runs
    optimize()'s pipeline, which calls this module, so importing it here would be a cycle)."""
    module.forward = torch.compile(types.MethodType(type(module).forward, module), backend="attnfx",
                                   options=backend_options)


def _encoder_path(model: nn.Module) -> str:
    """Where the module `generate()` encodes with sits in `model` ("" for none)."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(get_encoder):
        return ""
    encoder = get_encoder()
    return next((name for name, m in model.named_modules() if m is encoder and name), "")


def _copy_path(root: nn.Module, path: str) -> nn.Module:
    """Shallow-copy every module from `root` (already a copy) down to `path`, so that changing the
    last one leaves the user's modules as they are; returns the last copy."""
    parent = root
    for name in path.split("."):
        child = shallow_copy(getattr(parent, name))
        setattr(parent, name, child)
        parent = child
    return parent


def shallow_copy(module: nn.Module) -> nn.Module:
    """`module`'s class holding the same submodules, parameters and buffers in its own registries
    (assigning to the copy never changes the original)."""
    copy_ = type(module).__new__(type(module))
    state = dict(module.__dict__)
    for name, value in state.items():
        if isinstance(value, dict) and name.startswith("_"):
            state[name] = type(value)(value)  # _modules, _parameters, _buffers, hook tables
    copy_.__dict__.update(state)
    return copy_
