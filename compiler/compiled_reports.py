"""The reports of graphs the `torch.compile` backend compiled, and how a user finds them.

Dynamo may hand the backend many graphs for one compiled model (graph breaks, recompilations on
new shapes, prefill and decode steps of `generate()`), each with its own report. Every report is
kept here in compile order and logged on the `attnfx` logger (one line at INFO, the whole report
at DEBUG); `reports(obj)` returns those of one model or function.
"""
from __future__ import annotations

import logging
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .report import Report

log = logging.getLogger("attnfx")


@dataclass(frozen=True)
class _Compiled:
    report: Report
    code: types.CodeType | None  # the frame Dynamo compiled
    tensors: tuple[Callable[[], Any], ...]  # weak references to the graph's tensor inputs


_COMPILED: list[_Compiled] = []


def record(report: Report, code: types.CodeType | None, inputs: Iterable[Any]) -> None:
    """Keep one graph's report (it is found again by the parameters it read or by its frame)."""
    tensors = tuple(weakref.ref(t) for t in inputs if isinstance(t, torch.Tensor))
    _COMPILED.append(_Compiled(report, code, tensors))
    log.info("%s", report_headline(report))
    log.debug("%s", report)


def report_headline(report: Report) -> str:
    return str(report).splitlines()[0]


def reports(obj: Any = None) -> list[Report]:
    """Every report of a graph compiled with backend="attnfx" from `obj`, in compile order.

    `obj` is a model (reports of graphs that read its parameters or buffers), what `torch.compile`
    returned, or a function; with no argument, every report of this process.
    """
    if obj is None:
        return [c.report for c in _COMPILED]
    tensor_ids, codes = _owned(obj)
    return [c.report for c in _COMPILED if c.code in codes or any(_alive_id(t) in tensor_ids for t in c.tensors)]


def _alive_id(ref: Callable[[], Any]) -> int | None:
    tensor = ref()
    return None if tensor is None else id(tensor)


def _owned(obj: Any) -> tuple[set[int], set[types.CodeType]]:
    """What identifies `obj`'s graphs: a module's parameters and buffers (by id), or, for a plain
    function, its code (a module's code is shared by every instance of its class)."""
    while True:
        original = getattr(obj, "_orig_mod", None) or getattr(obj, "_torchdynamo_orig_callable", None)
        if original is None:
            break
        obj = original
    if isinstance(obj, types.MethodType) and isinstance(obj.__self__, nn.Module):
        obj = obj.__self__
    if isinstance(obj, nn.Module):
        return {id(t) for t in (*obj.parameters(), *obj.buffers())}, set()
    code = getattr(obj, "__code__", None)
    return set(), ({code} if isinstance(code, types.CodeType) else set())
