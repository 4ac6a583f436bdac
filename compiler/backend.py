"""`torch.compile(model, backend="attnfx")`: attnfx's rewrite inside PyTorch's compiler.

For each graph Dynamo hands over: trace it to ATen ops before autograd (under Dynamo's fake mode,
so shapes and guards stay Dynamo's), run the same pipeline as `optimize()` on it (rule, mask
proofs, cost model, per-site and end-to-end verification on the real example inputs), then
compile the result with Inductor, whose AOTAutograd differentiates through the rewritten sites, or
with `options={"inductor": False}` run the rewritten ATen graph as it is (autograd records it like
eager code), for inspection and debugging. Training works either way.

attnfx never breaks a user's compile: if anything inside attnfx raises, the graph is compiled as
Dynamo captured it and its report says why.
"""
from __future__ import annotations

import time
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch._dynamo.exc import RestartAnalysis
from torch.fx import GraphModule

from attnfx.kernels import VARIANTS
from attnfx.passes.site import Reason, Refusal

from .compiled_reports import record
from .dynamo_graph import (aten_graph, copy_written_inputs, drop_input_copies, specialize_score_floats,
                           verification_inputs)
from .errors import AttnfxError
from .inductor_cache import keyed_by_kernels
from .pipeline import Options, rewrite
from .report import Report

NAME = "attnfx"
_ATTNFX_OPTIONS = ("verify", "target", "memory_budget", "variants", "exact_dropout", "inductor")
# flex compiles FlexAttention itself: inside a graph Dynamo and Inductor are compiling, building its
# block mask fails (Gemma 2: TorchRuntimeError), so by default the backend never offers it
_COMPILED_GRAPH_VARIANTS = (*(v.name for v in VARIANTS if v.name != "flex"), "eager")


@dataclass(frozen=True)
class BackendOptions:
    """`torch.compile(..., options=...)`: optimize()'s options, `inductor`, and (with Inductor)
    any other key as an Inductor config patch, like torch.compile's own options."""

    rewrite: Options = Options()
    inductor: bool = True
    inductor_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict[str, Any] | None, mode: str | None = None) -> BackendOptions:
        options = dict(options or {})
        ours = {k: options.pop(k) for k in _ATTNFX_OPTIONS if k in options}
        inductor = bool(ours.pop("inductor", True))
        if not inductor and (options or mode):
            extra = sorted(options) + ([f"mode={mode!r}"] if mode else [])
            raise AttnfxError(f"backend 'attnfx' got {extra} with inductor=False; without Inductor it takes "
                              f"only {list(_ATTNFX_OPTIONS)}")
        config = dict(options)
        if mode:
            from torch._inductor import list_mode_options

            config = {**list_mode_options(mode), **config}
        ours.setdefault("variants", _COMPILED_GRAPH_VARIANTS)
        return cls(Options(**ours), inductor, config)


def attnfx_backend(gm: GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None,
                   mode: str | None = None) -> Callable[..., Any]:
    """The `torch.compile` backend registered as "attnfx" (see the module docstring)."""
    settings = BackendOptions.parse(options, mode)
    started = time.perf_counter()
    code, name = _compiled_frame()
    report = Report(model=name, capture=f"torch.compile ({_graph_name()})")
    try:
        graph = _rewrite(gm, example_inputs, settings.rewrite, report)
    except RestartAnalysis:
        raise  # Dynamo's own control flow (e.g. re-tracing with a float specialised)
    except Exception as exc:  # noqa: BLE001 - attnfx must never break the user's compile
        _unrewritten(report, f"attnfx raised {_describe(exc)}", "rewrite")
        graph = gm
    report.optimize_seconds = time.perf_counter() - started
    compiled = _compile_or_fall_back(graph, gm, example_inputs, settings, report)
    record(report, code, example_inputs)
    return compiled


def _rewrite(gm: GraphModule, example_inputs: Sequence[Any], options: Options, report: Report) -> GraphModule:
    specialize_score_floats(gm)
    aten = aten_graph(gm, example_inputs)
    copy_written_inputs(aten)
    result = rewrite(aten, verification_inputs(example_inputs), {}, options, report, _device_of(example_inputs))
    if not report.rewritten:
        return gm
    drop_input_copies(result)
    return result


def _compile_or_fall_back(graph: GraphModule, original: GraphModule, example_inputs: Sequence[Any],
                          settings: BackendOptions, report: Report) -> Callable[..., Any]:
    if graph is original:
        return _compile(original, example_inputs, settings)
    try:
        return _compile(graph, example_inputs, settings)
    except RestartAnalysis:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a compiler that cannot take a rewritten site
        _unrewritten(report, f"compiling the rewritten graph raised {_describe(exc)}", "compile")
        return _compile(original, example_inputs, settings)


def _unrewritten(report: Report, why: str, stage: str) -> None:
    """Say in the report that the graph runs as Dynamo captured it: a site already decided
    REWRITTEN is RESTORED with the reason."""
    restored = Refusal(Reason.INTERNAL_ERROR, f"{why}; the site was left as written (please report this)", stage)
    report.entries[:] = [replace(e, status="RESTORED", reason_code=restored.code.value, reason=restored.message,
                                 failed_stage=stage) if e.status == "REWRITTEN" else e for e in report.entries]
    report.notes.append(f"{why}; the graph is compiled unrewritten")


def _compile(gm: GraphModule, example_inputs: Sequence[Any], settings: BackendOptions) -> Callable[..., Any]:
    """Inductor (which runs AOTAutograd); without it the graph runs as it is: its ATen ops sit
    above autograd, so running them records gradients like any eager code."""
    if not settings.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=keyed_by_kernels(settings.inductor_config))


def _device_of(example_inputs: Sequence[Any]) -> str:
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _compiled_frame() -> tuple[types.CodeType | None, str]:
    """The code Dynamo is compiling (`reports()` finds a function's graphs by it) and a name for
    the report: the module's class for a method ("LlamaForCausalLM.forward")."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:  # not inside a Dynamo compilation (the backend called by hand)
        return None, "graph"
    owner = tx.f_locals.get("self")
    name = tx.f_code.co_name if owner is None else f"{type(owner).__name__}.{tx.f_code.co_name}"
    return tx.f_code, name


def _graph_name() -> str:
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return f"Dynamo graph {compile_id}" if compile_id is not None else "Dynamo graph"


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def register() -> None:
    """Make backend="attnfx" available after `import attnfx`. When torch already found the
    `torch_dynamo_backends` entry point, torch registers it itself on first use (registering it
    here too would be a duplicate)."""
    from torch._dynamo.backends import registry

    if NAME in registry._COMPILER_FNS or registry._BACKENDS.get(NAME) is not None:
        return
    registry.register_backend(attnfx_backend, name=NAME)
