"""Find the attention calls in an optimised graph and state what each one computes.

The facts are read from the call's own arguments (what the graph really runs) and the operands' fx
metadata (sizes), not from the report: the export must reproduce the graph, whatever the report says.
The report only supplies site numbers, and is cross-checked: a site it calls REWRITTEN must be here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.operator_schemas import normalize_function

from attnfx.errors import ExportError

SDPA_OP = "aten::scaled_dot_product_attention"
ATTNFX_OP = "attnfx::attention"


@dataclass(frozen=True)
class SiteFacts:
    """One attention call in canonical layout q (B,H,M,E), k (B,Hkv,N,E), v (B,Hkv,N,F)."""

    site: int | None  # report entry index; None for an SDPA call the model made itself
    node: str  # the fx node computing the attention output
    module: str  # owning module path ("" for the root module)
    source: str  # "sdpa" or "attnfx"
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    same_length: bool  # M and N are the same (symbolic) size, so every causal alignment agrees
    dtype: torch.dtype
    scale: float
    causal: str  # "none", "top_left" or "bottom_right"
    window: int  # -1: none
    softcap: float  # 0.0: none
    mask: str  # "none", "bool" (True attends) or "additive"
    alibi: bool
    kv_lengths: bool
    operands: tuple[str | None, ...]  # node names of q, k, v, mask, slopes, kv_lengths

    @property
    def label(self) -> str:
        return f"site {self.site}" if self.site is not None else f"SDPA call {self.node}"


def op_name(node: torch.fx.Node) -> str | None:
    """'namespace::name' of an OpOverload call, None for anything else."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return node.target.name()


def find_sites(gm: torch.fx.GraphModule, report: Any = None) -> list[SiteFacts]:
    """Every SDPA / attnfx::attention call in graph order, numbered by the report where it can be."""
    by_name = _report_sites_by_node(report)
    sites = []
    for node in gm.graph.nodes:
        name = op_name(node)
        if name == SDPA_OP:
            sites.append(_sdpa_facts(node, _site_index(node, by_name)))
        elif name == ATTNFX_OP:
            sites.append(_attnfx_facts(node, _site_index(node, by_name)))
    _check_reported_sites_present(report, sites)
    return sites


def _report_sites_by_node(report: Any) -> dict[str, int]:
    entries = getattr(report, "entries", None) or []
    return {e.replacement: i for i, e in enumerate(entries) if getattr(e, "replacement", None)}


def _site_index(node: torch.fx.Node, by_name: dict[str, int]) -> int | None:
    if "attnfx_site" in node.meta:
        return int(node.meta["attnfx_site"])
    for candidate in (node, *node.users):  # the report may name the call or its getitem
        if candidate.name in by_name:
            return by_name[candidate.name]
    return None


def _check_reported_sites_present(report: Any, sites: list[SiteFacts]) -> None:
    found = {s.site for s in sites}
    for i, entry in enumerate(getattr(report, "entries", None) or []):
        if getattr(entry, "status", None) == "REWRITTEN" and i not in found:
            raise ExportError(
                f"site {i} is reported REWRITTEN (node {getattr(entry, 'replacement', None)!r}) but the graph "
                "has no SDPA or attnfx::attention call for it"
            )


def _sdpa_facts(node: torch.fx.Node, site: int | None) -> SiteFacts:
    a = _named_args(node)
    if a["dropout_p"]:
        raise ExportError(
            f"{node.name}: scaled_dot_product_attention has dropout_p={a['dropout_p']}; ONNX attention has no "
            "dropout: capture the model in eval() mode"
        )
    return _facts(
        node, site, "sdpa", (a["query"], a["key"], a["value"], a["attn_mask"], None, None),
        scale=a["scale"], causal="top_left" if a["is_causal"] else "none", window=-1, softcap=0.0,
    )


def _attnfx_facts(node: torch.fx.Node, site: int | None) -> SiteFacts:
    a = _named_args(node)
    return _facts(
        node, site, "attnfx", (a["q"], a["k"], a["v"], a["bias"], a["alibi_slopes"], a["kv_lengths"]),
        scale=a["scale"], causal=a["causal"], window=a["window"], softcap=a["softcap"],
    )


def _named_args(node: torch.fx.Node) -> dict[str, Any]:
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if bound is None:
        raise ExportError(f"{node.name}: cannot bind the arguments of {node.target}")
    return bound.kwargs


def _facts(
    node: torch.fx.Node,
    site: int | None,
    source: str,
    operands: tuple[Any, ...],
    *,
    scale: float | None,
    causal: str,
    window: int,
    softcap: float,
) -> SiteFacts:
    q_node, k_node, v_node, mask, slopes, kv_lengths = operands
    q, k, v = (getattr(o, "meta", {}).get("val") for o in (q_node, k_node, v_node))
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        raise ExportError(f"{node.name}: q, k and v need 4-D tensor metadata (meta['val']) to be exported")
    head_dim = int(q.shape[3])
    return SiteFacts(
        site=site,
        node=node.name,
        module=_module_path(node, q_node),
        source=source,
        heads=int(q.shape[1]),
        kv_heads=int(k.shape[1]),
        head_dim=head_dim,
        value_dim=int(v.shape[3]),
        same_length=_same_size(q.shape[2], k.shape[2]),
        dtype=q.dtype,
        scale=float(scale) if scale is not None else head_dim**-0.5,
        causal=causal,
        window=int(window),
        softcap=float(softcap),
        mask=_mask_kind(mask),
        alibi=slopes is not None,
        kv_lengths=kv_lengths is not None,
        operands=tuple(o.name if isinstance(o, torch.fx.Node) else None for o in operands),
    )


def _mask_kind(mask: Any) -> str:
    if mask is None:
        return "none"
    val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise ExportError(f"mask operand {mask} has no tensor metadata")
    return "bool" if val.dtype == torch.bool else "additive"


def _same_size(a: Any, b: Any) -> bool:
    """True when two sizes are provably equal: equal ints, or the same symbolic expression."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr
    return int(a) == int(b)


def _module_path(node: torch.fx.Node, q_node: Any) -> str:
    """The innermost module that made the call (the emitted node may lack nn_module_stack: use q's)."""
    for candidate in (node, q_node):
        stack = candidate.meta.get("nn_module_stack")
        if stack:
            return list(stack.values())[-1][0]
    return ""
