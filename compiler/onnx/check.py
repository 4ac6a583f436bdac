"""Check an exported file: its structure (one fused node per fused site), onnx.checker, and
onnxruntime's outputs against the PyTorch graph (run as attnfx.verify runs it, compared with its
`deviation`).

Everything runs on the graph's flat inputs and outputs (the order of its placeholders and of its
output node), which is also the order the exporter gives the ONNX graph; inputs are fed by name.
A numeric mismatch is traced to its site by exporting a probe that returns every site's output.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import torch

from attnfx.errors import ExportError
from attnfx.verify import deviation, run_graph

from .lowering import NODE_KEY, SITE_KEY
from .plan import FUSED_OPS, SitePlan


@dataclass(frozen=True)
class Case:
    """Flat graph inputs to compare on, how the summary names them, and PyTorch's outputs if known."""

    label: str
    inputs: list[Any]
    expected: list[torch.Tensor] | None = None


def placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def torch_outputs(gm: torch.fx.GraphModule, inputs: list[Any]) -> list[torch.Tensor]:
    """The PyTorch graph's flat tensor outputs on flat `inputs` (the ONNX graph's outputs, in order)."""
    _, outputs = run_graph(gm, inputs)
    return [o for o in outputs if isinstance(o, torch.Tensor)]


def count_nodes(model: onnx.ModelProto, plans: list[SitePlan]) -> tuple[Counter, int]:
    """(fused nodes by op type, Softmax nodes); raises unless each fused site has exactly one node."""
    model = onnx.inliner.inline_local_functions(model)
    fused: Counter = Counter()
    per_node: Counter = Counter()
    softmax = 0
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            fused[node.op_type] += 1
            per_node[_metadata(node).get(NODE_KEY)] += 1
        softmax += node.op_type == "Softmax"
    for plan in plans:
        if plan.fused and per_node[plan.facts.node] != 1:
            raise ExportError(
                f"{plan.facts.label} ({plan.facts.module}): expected one {plan.op} node, "
                f"found {per_node[plan.facts.node]}"
            )
    stray = sum(per_node.values()) - sum(p.fused for p in plans)
    if stray:
        raise ExportError(f"{stray} fused attention node(s) in the ONNX graph belong to no planned site")
    return fused, softmax


def site_of_onnx_node(model: onnx.ModelProto, plans: list[SitePlan]) -> dict[str, SitePlan]:
    """ONNX node name -> site, to name the site in onnxruntime's error messages."""
    by_fx = {p.facts.node: p for p in plans}
    out = {}
    for node in model.graph.node:
        fx_name = _metadata(node).get(NODE_KEY)
        if fx_name in by_fx:
            out[node.name] = by_fx[fx_name]
    return out


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props if p.key in (SITE_KEY, NODE_KEY)}


def check_file(path: str) -> None:
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker (full check) rejected the export: {exc}") from exc


def session(path_or_bytes: str | bytes, sites: dict[str, SitePlan]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime could not load the export{_sites_named(str(exc), sites)}: {exc}") from exc


def run_onnx(sess: ort.InferenceSession, names: list[str], inputs: list[Any], sites: dict[str, SitePlan]) -> list:
    values = dict(zip(names, inputs))
    missing = [i.name for i in sess.get_inputs() if not isinstance(values.get(i.name), torch.Tensor)]
    if missing:
        raise ExportError(f"the ONNX graph's inputs {missing} match no tensor input of the PyTorch graph {names}")
    feed = {i.name: values[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
    try:
        return sess.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime failed to run the export{_sites_named(str(exc), sites)}: {exc}") from exc


def _sites_named(message: str, sites: dict[str, SitePlan]) -> str:
    hits = [p for name, p in sites.items() if re.search(rf"\b{re.escape(name)}\b", message)]
    return "".join(f" at {p.facts.label} ({p.facts.module}, {p.op})" for p in hits)


def difference(expected: torch.Tensor, got: np.ndarray) -> float:
    """Max |expected - got| (attnfx.verify's deviation, for onnxruntime's numpy outputs)."""
    d = deviation(torch.from_numpy(np.asarray(got)), expected.detach().cpu())
    if d is None:
        return math.inf
    return float(d.max()) if d.numel() else 0.0


def worst_output(expected: list[torch.Tensor], got: list) -> tuple[int, float]:
    """(index, difference) of the output that differs most."""
    if len(expected) != len(got):
        raise ExportError(f"the ONNX graph has {len(got)} outputs, the PyTorch graph {len(expected)}")
    diffs = [difference(e, g) for e, g in zip(expected, got)]
    worst = max(range(len(diffs)), key=diffs.__getitem__, default=0)
    return worst, diffs[worst] if diffs else 0.0


def localize(
    gm: torch.fx.GraphModule,
    plans: list[SitePlan],
    case: Case,
    atol: float,
    export_probe: Callable[[list[Any]], onnx.ModelProto],
) -> tuple[SitePlan, float] | None:
    """The first site (graph order) whose onnxruntime output differs from PyTorch's, with the difference.

    Later sites see the first one's error in their inputs, so the first is the one to blame.
    """
    if not plans:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    calls = [nodes[p.facts.node] for p in plans]
    values, _ = run_graph(gm, case.inputs, calls)
    probe = export_probe(case.inputs)
    sess = session(probe.SerializeToString(), {})
    got = run_onnx(sess, placeholder_names(gm), case.inputs, {})
    for plan, call, value in zip(plans, calls, got):
        index = plan.facts.call.output_index
        diff = difference(values[call] if index is None else values[call][index], value)
        if not diff <= atol:
            return plan, diff
    return None
