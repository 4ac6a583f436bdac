"""Find the attention calls in an optimised graph and state what each one computes.

Each call is read by the variant that emits its op (`Variant.read`, over `attnfx.kernels.VARIANTS`),
so a new variant exports without a change here. What a call computes is then stated as an
`AttentionSpec` from the call's own arguments (what the graph really runs) and the operands' fx
metadata (sizes), not from the report: the export must reproduce the graph, whatever the report
says. The report only supplies site numbers and module names, and is cross-checked: a site it
calls REWRITTEN must be here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.fx import Node

from attnfx import kernels
from attnfx.cost_model.spec import AttentionSpec, MaskInput, dtype_name
from attnfx.errors import ExportError
from attnfx.kernels.variant import CallSite, Variant
from attnfx.passes import ops


@dataclass(frozen=True)
class SiteFacts:
    """One attention call, read through its variant: `spec` in canonical layout q (B,H,M,E),
    k (B,Hkv,N,E), v (B,Hkv,N,F), with sizes at the example inputs."""

    site: int | None  # report entry index; None for an SDPA call the model made itself
    node: str  # the fx node of the call
    module: str  # owning module path ("" for the root module), as the report names it
    op: str  # the op, as its variant names it in messages
    call: CallSite
    spec: AttentionSpec
    same_length: bool  # M and N are the same (symbolic) size, so every causal alignment agrees

    @property
    def label(self) -> str:
        return f"site {self.site}" if self.site is not None else f"{self.op} call {self.node}"


def read_call(node: Node) -> tuple[Variant, CallSite] | None:
    """The first variant that reads `node` as a call of its op, with the call site; None if none does.
    ExportError when a variant recognises the call but cannot read it."""
    for variant in kernels.VARIANTS:
        try:
            call = variant.read(node)
        except ValueError as exc:
            raise ExportError(f"{node.name}: {exc}") from exc
        if call is not None:
            return variant, call
    return None


def find_sites(gm: torch.fx.GraphModule, report: Any = None) -> list[SiteFacts]:
    """Every attention call a variant reads, in graph order, numbered by the report where it can be."""
    entries = getattr(report, "entries", None) or []
    by_name = {e.replacement: i for i, e in enumerate(entries) if getattr(e, "replacement", None)}
    sites = []
    for node in gm.graph.nodes:
        found = read_call(node)
        if found is not None:
            variant, call = found
            site = _site_index(node, by_name)
            sites.append(_facts(node, site, _module(node, site, entries), variant.op, call))
    _check_reported_sites_present(entries, sites)
    return sites


def _site_index(node: Node, by_name: dict[str, int]) -> int | None:
    if "attnfx_site" in node.meta:
        return int(node.meta["attnfx_site"])
    for candidate in (node, *node.users):  # the report may name the call or its getitem
        if candidate.name in by_name:
            return by_name[candidate.name]
    return None


def _module(node: Node, site: int | None, entries: list[Any]) -> str:
    """The report's name for the call's module (it leaves out what the capture's own wrapper
    added), else the call's own module path."""
    reported = [e for i, e in enumerate(entries)
                if i == site or (site is None and getattr(e, "node", None) == node.name)]
    path = getattr(reported[0], "module_path", None) if reported else None
    return ops.module_path(node) if path is None else path


def _check_reported_sites_present(entries: list[Any], sites: list[SiteFacts]) -> None:
    found = {s.site for s in sites}
    for i, entry in enumerate(entries):
        if getattr(entry, "status", None) == "REWRITTEN" and i not in found:
            ops_by_variant = {v.name: v.op for v in kernels.VARIANTS}
            op = ops_by_variant.get(getattr(entry, "variant", None), "attention")
            raise ExportError(
                f"site {i} is reported REWRITTEN (node {getattr(entry, 'replacement', None)!r}) but the graph "
                f"has no {op} call for it"
            )


def _facts(node: Node, site: int | None, module: str, op: str, call: CallSite) -> SiteFacts:
    if call.dropout:
        raise ExportError(
            f"{node.name}: {op} has dropout_p={call.dropout}; ONNX attention has no dropout: capture the model "
            "in eval() mode"
        )
    q, k, v = (_meta(o) for o in (call.operands.q, call.operands.k, call.operands.v))
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        raise ExportError(f"{node.name}: q, k and v need 4-D tensor metadata (meta['val']) to be exported")
    try:
        spec = _spec(call, q, k, v)
    except ValueError as exc:
        raise ExportError(f"{node.name}: {exc}") from exc
    return SiteFacts(site, node.name, module, op, call, spec, ops.same_size(q.shape[2], k.shape[2]))


def _spec(call: CallSite, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionSpec:
    """What the call computes, sized at the example inputs; ValueError for what a spec cannot state."""
    dtype = dtype_name(q.dtype)
    if dtype is None:
        raise ValueError(f"attention in {q.dtype} has no AttentionSpec dtype")
    mask, mask_shape = _mask(call.operands.mask)
    batch, heads, q_len, head_dim = q.shape
    mods, operands = call.mods, call.operands
    return AttentionSpec(
        batch=ops.hint_int(batch), heads=ops.hint_int(heads), kv_heads=ops.hint_int(k.shape[1]),
        q_len=ops.hint_int(q_len), kv_len=ops.hint_int(k.shape[2]), head_dim=ops.hint_int(head_dim),
        value_dim=ops.hint_int(v.shape[3]), dtype=dtype, **asdict(mods), mask=mask, mask_shape=mask_shape,
        alibi=operands.slopes is not None, kind=call.kind,
        dynamic=frozenset(name for name, size in (("batch", batch), ("q_len", q_len), ("kv_len", k.shape[2]))
                          if ops.static_int(size) is None),
    )


def _mask(mask: Any) -> tuple[MaskInput, tuple[int, ...] | None]:
    """The mask operand's kind and its shape padded to 4-D (None when there is no mask)."""
    if mask is None:
        return MaskInput.NONE, None
    val = _meta(mask)
    if not isinstance(val, torch.Tensor):
        raise ExportError(f"mask operand {mask} has no tensor metadata")
    shape = (1,) * (4 - val.dim()) + tuple(ops.hint_int(s) for s in val.shape)
    return (MaskInput.BOOL if val.dtype == torch.bool else MaskInput.ADDITIVE), shape


def _meta(operand: Any) -> Any:
    return operand.meta.get("val") if isinstance(operand, Node) else None
