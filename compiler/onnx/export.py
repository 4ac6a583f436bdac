"""`export_onnx`: an optimised module to an ONNX file with one fused attention node per site.

attnfx already knows what every site computes, so instead of letting the exporter decompose
attention (or hoping a post-hoc fusion pass finds it again), each site is written directly as the
operator that expresses it (see plan.py), the file is checked (onnx.checker, one node per site,
onnxruntime vs PyTorch at two sequence lengths), and only then moved into place.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxscript.optimizer
import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from attnfx.errors import ExportError

from attnfx.verify import flat_inputs

from .check import (
    Case,
    check_file,
    count_nodes,
    localize,
    placeholder_names,
    run_onnx,
    session,
    site_of_onnx_node,
    torch_outputs,
    worst_output,
)
from .lengths import second_length_case
from .lowering import build_export_module
from .plan import SitePlan, plan_site
from .sites import find_sites


@dataclass(frozen=True)
class SiteExport:
    """What one site became in the ONNX graph, and why."""

    site: int | None  # report entry index; None for an SDPA call the model made itself
    node: str
    module: str
    became: str
    why: str


@dataclass(frozen=True)
class ExportSummary:
    """The result of `export_onnx`; `str()` is a table for people."""

    path: Path
    opset: int
    sites: tuple[SiteExport, ...]
    not_rewritten: tuple[tuple[int, str], ...]  # (site, status): left as the model's own ops
    fused_nodes: dict[str, int]  # fused attention nodes by op type
    softmax_nodes: int  # Softmax nodes left anywhere in the graph
    inputs: dict[str, tuple[int | str, ...]]  # ONNX input shapes, symbolic axes by name
    checks: tuple[tuple[str, float], ...]  # (inputs, max |onnxruntime - PyTorch|); empty if not verified
    no_second_length: str  # why only the example inputs were checked ("" when a second length was)
    atol: float

    @property
    def attention_nodes(self) -> int:
        return sum(self.fused_nodes.values())

    def __str__(self) -> str:
        rows = [("site", "module", "became", "why")]
        rows += [(str(s.site) if s.site is not None else s.node, s.module or "<root>", s.became, s.why)
                 for s in self.sites]
        rows += [(str(i), "-", "unfused", f"not rewritten ({status}): the model's own ops")
                 for i, status in self.not_rewritten]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = [f"attnfx ONNX export -> {self.path} (opset {self.opset})"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        fused = ", ".join(f"{op} x{n}" for op, n in sorted(self.fused_nodes.items())) or "none"
        lines.append(f"fused attention nodes: {fused}; Softmax nodes left: {self.softmax_nodes}")
        lines.append("inputs: " + ", ".join(f"{n} [{', '.join(map(str, s))}]" for n, s in self.inputs.items()))
        if self.checks:
            done = "; ".join(f"{label} max|diff| {d:.2g}" for label, d in self.checks)
            lines.append(f"onnxruntime vs PyTorch (atol {self.atol:g}): {done}")
            if self.no_second_length:
                lines.append(f"no second length checked: {self.no_second_length}")
        else:
            lines.append("onnxruntime vs PyTorch: not run (verify=False)")
        return "\n".join(lines)


def export_onnx(
    opt: Any,
    path: str | os.PathLike,
    *,
    opset: int = 23,
    dynamic: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    external_data: bool | None = None,
) -> ExportSummary:
    """Export `opt` (an attnfx.optimize result) to `path`; raises ExportError and leaves no file on failure.

    `opt` needs `graph_module`, `example_args`, `example_kwargs`, `dynamic_shapes` and optionally
    `report` and `constants` (keyword arguments the capture baked into the graph). `dynamic` keeps
    the axes the capture left symbolic (batch, sequence) symbolic in ONNX. `verify` runs onnxruntime
    against PyTorch at the example inputs and at a second sequence length (the structural checks
    always run). `external_data` as in ONNXProgram.save (None: only above 2 GB).
    """
    gm = opt.graph_module
    report = getattr(opt, "report", None)
    plans = [plan_site(f, opset) for f in find_sites(gm, report)]
    dynamic_shapes = _captured_dynamic_shapes(gm, opt) if dynamic else None
    program = _export(build_export_module(gm, plans), opt.example_args, _graph_kwargs(opt), dynamic_shapes, opset)
    fused, softmax = count_nodes(program.model_proto, plans)
    dest = Path(path)
    with _staged(dest) as staged:
        program.save(staged, external_data=external_data)
        check_file(str(staged))
        checks, no_second = _verify(gm, plans, staged, opt, atol, opset, dynamic) if verify else ((), "")
    return ExportSummary(
        path=dest,
        opset=opset,
        sites=tuple(SiteExport(p.facts.site, p.facts.node, p.facts.module, p.op, p.why) for p in plans),
        not_rewritten=_not_rewritten(report, plans),
        fused_nodes=dict(fused),
        softmax_nodes=softmax,
        inputs={i.name: _dims(i) for i in program.model_proto.graph.input},
        checks=checks,
        no_second_length=no_second,
        atol=atol,
    )


def _export(
    module: torch.nn.Module, args: tuple, kwargs: dict | None, dynamic_shapes: Any, opset: int
) -> torch.onnx.ONNXProgram:
    """torch.onnx.export with onnxscript's generic optimiser (constant folding, dead code) but not its
    opset-23 fusions: its RotaryEmbedding fusion feeds (1, S, D) cos/sin caches that onnxruntime
    1.31 rejects at batch > 1 (seen on Llama), and attention is fused here already."""
    try:
        program = torch.onnx.export(
            module, tuple(args), kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, opset_version=opset,
            dynamo=True, verbose=False, optimize=False,
        )
        onnxscript.optimizer.optimize_ir(program.model)
    except Exception as exc:  # the exporter raises many types; all mean the same thing here
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc
    return program


def _graph_kwargs(opt: Any) -> dict[str, Any]:
    """The example keyword arguments the graph takes: those the capture baked in are left out."""
    constants = getattr(opt, "constants", None) or {}
    return {k: v for k, v in (opt.example_kwargs or {}).items() if k not in constants}


def _captured_dynamic_shapes(gm: torch.fx.GraphModule, opt: Any) -> Any:
    """Dim.AUTO on exactly the axes the capture left symbolic, keyed by the graph's argument names.

    Re-exporting with the capture's own `dynamic_shapes` is looser: with Dim.AUTO on every axis the
    exporter keeps axes symbolic that the capture had pinned (hidden sizes). Falls back to
    `opt.dynamic_shapes` for a graph without placeholder metadata.
    """
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if any(v is None for v in vals) or not hasattr(gm, "_in_spec"):
        return opt.dynamic_shapes
    specs = [
        {axis: Dim.AUTO for axis, size in enumerate(v.shape)
         if isinstance(size, torch.SymInt) and size.node.expr.free_symbols}  # s0 or s0 + 1: not pinned
        if isinstance(v, torch.Tensor) else None
        for v in vals
    ]
    args, kwargs = pytree.tree_unflatten(specs, gm._in_spec)
    return {**dict(zip(inspect.signature(gm.forward).parameters, args)), **kwargs}


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A path in a fresh directory beside `dest`; its files (model and any external data) replace
    `dest`'s only if the block succeeds, and the directory is removed either way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp / dest.name
        for f in tmp.iterdir():
            os.replace(f, dest.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(
    gm: torch.fx.GraphModule, plans: list[SitePlan], path: Path, opt: Any, atol: float, opset: int, dynamic: bool
) -> tuple[tuple[tuple[str, float], ...], str]:
    """((label, max difference) per case, why no second length was tried); raises ExportError naming
    the first site that differs."""
    model = onnx.load(str(path), load_external_data=False)
    sites = site_of_onnx_node(model, plans)
    sess = session(str(path), sites)
    names = placeholder_names(gm)
    cases = [Case("example inputs", flat_inputs(gm, opt.example_args, _graph_kwargs(opt)))]
    second, why_not = second_length_case(gm, cases[0].inputs) if dynamic else (None, "static export")
    cases += [second] if second else []
    checks = []
    for case in cases:
        expected = case.expected if case.expected is not None else torch_outputs(gm, case.inputs)
        index, diff = worst_output(expected, run_onnx(sess, names, case.inputs, sites))
        if not diff <= atol:
            raise ExportError(_mismatch(gm, plans, case, atol, opset, index, diff))
        checks.append((case.label, diff))
    return tuple(checks), why_not


def _mismatch(
    gm: torch.fx.GraphModule, plans: list[SitePlan], case: Case, atol: float, opset: int, index: int, diff: float
) -> str:
    """The ExportError text: the first site whose own output differs, found with a probe export."""
    def export_probe(inputs: list[Any]) -> onnx.ModelProto:
        return _export(build_export_module(gm, plans, probe=True), tuple(inputs), None, None, opset).model_proto

    head = f"output {index} differs from PyTorch by max |diff| {diff:.3g} > atol {atol:g} on {case.label}"
    try:
        culprit = localize(gm, plans, case, atol, export_probe)
    except ExportError as exc:
        return f"{head}; the site could not be found: {exc}"
    if culprit is None:
        return f"{head}; every attention site matches on its own, so the difference comes from elsewhere in the graph"
    plan, site_diff = culprit
    return (f"{plan.facts.label} ({plan.facts.module or '<root>'}, exported as {plan.op}): onnxruntime differs from "
            f"PyTorch by max |diff| {site_diff:.3g} > atol {atol:g} on {case.label} (model output {index}: {diff:.3g})")


def _not_rewritten(report: Any, plans: list[SitePlan]) -> tuple[tuple[int, str], ...]:
    exported = {p.facts.site for p in plans}
    entries = getattr(report, "entries", None) or []
    return tuple((i, str(e.status)) for i, e in enumerate(entries) if i not in exported)


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)
