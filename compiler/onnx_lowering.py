"""Rewrite each planned site into the torch code that exports to its ONNX operator.

Every site call is replaced by `lowered_attention(...)`, whose body emits the operator through
`torch.onnx.ops.symbolic` (so the exporter writes exactly that node, tagged with the site in its
metadata) plus the layout changes and mask-building it needs, written as ordinary torch ops so
they stay shape-generic (batch and sequence symbolic). The result is for export only: symbolic ops
do not compute attention in PyTorch.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import Tensor

from attnfx.errors import ExportError

from .onnx_plan import ATTENTION, DECOMPOSED, GQA, MHA, SitePlan

SITE_KEY = "attnfx.site"  # ONNX node metadata: the report's site index ("" for untracked SDPA calls)
NODE_KEY = "attnfx.node"  # ONNX node metadata: the fx node the operator replaces


def build_export_module(
    gm: torch.fx.GraphModule, plans: list[SitePlan], *, probe: bool = False
) -> torch.fx.GraphModule:
    """A copy of `gm` (sharing its parameters) with every planned site lowered.

    With `probe`, the module takes the flat graph inputs and returns only the sites' outputs, in
    plan order: verification exports it to find which site an onnxruntime mismatch comes from.
    """
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    lowered = []
    for plan in plans:
        node = nodes[plan.facts.node]
        operands = tuple(nodes[name] if name else None for name in plan.facts.operands)
        with graph.inserting_before(node):
            new = graph.call_function(lowered_attention, operands, _lowering_kwargs(plan))
        for key in ("nn_module_stack", "stack_trace"):  # keeps the exporter's name scopes
            if key in node.meta:
                new.meta[key] = node.meta[key]
        _redirect_uses(graph, node, new, plan)
        graph.erase_node(node)
        lowered.append(new)
    if probe:
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = (tuple(lowered),)
        graph.set_codegen(torch.fx.graph.CodeGen())
    module = torch.fx.GraphModule(gm, graph)
    if probe:
        module.graph.eliminate_dead_code()
    module.eval()  # exported for inference; GraphModule() starts in training mode
    module.recompile()
    return module


def _lowering_kwargs(plan: SitePlan) -> dict[str, object]:
    f = plan.facts
    return dict(
        op=plan.op, site=f.site, node=f.node, scale=f.scale, causal=f.causal,
        causal_flag=plan.causal_flag, window=f.window, softcap=f.softcap,
    )


def _redirect_uses(graph: torch.fx.Graph, node: torch.fx.Node, new: torch.fx.Node, plan: SitePlan) -> None:
    if plan.facts.source == "sdpa":
        node.replace_all_uses_with(new)
        return
    for user in list(node.users):  # attnfx::attention returns (out, lse): uses go through getitem
        if user.target is operator.getitem and user.args[1] == 0:
            user.replace_all_uses_with(new)
        elif user.target is operator.getitem and not user.users:
            pass  # an unused lse
        else:
            raise ExportError(
                f"{plan.facts.label}: node {user.name} uses attnfx::attention's lse, which ONNX attention "
                "operators do not return"
            )
        graph.erase_node(user)


def lowered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    slopes: Tensor | None,
    kv_lengths: Tensor | None,
    *,
    op: str,
    site: int | None,
    node: str,
    scale: float,
    causal: str,
    causal_flag: bool,
    window: int,
    softcap: float,
) -> Tensor:
    """One site as `op`, in canonical layout: returns (B, H, M, F)."""
    meta = {SITE_KEY: "" if site is None else str(site), NODE_KEY: node}
    flagged = causal_flag and causal != "none"
    if op == ATTENTION:
        return _standard_attention(q, k, v, mask, slopes, kv_lengths, meta, scale, causal, flagged, window, softcap)
    if op == MHA:
        return _multi_head_attention(q, k, v, mask, slopes, kv_lengths, meta, scale, causal, flagged, window)
    if op == GQA:
        return _group_query_attention(q, k, v, mask, slopes, kv_lengths, meta, scale, window, softcap)
    if op == DECOMPOSED:
        return _decomposed(q, k, v, mask, slopes, kv_lengths, scale, causal, window, softcap)
    raise ValueError(f"unknown lowering {op!r}")


def _standard_attention(q, k, v, mask, slopes, kv_lengths, meta, scale, causal, flagged, window, softcap):
    b, h, m, _ = q.shape
    attn_mask = score_mask(q, k, mask, slopes, kv_lengths, causal=causal, causal_in_mask=not flagged,
                           window=window, allow_bool=True)
    attrs = {"scale": scale, "is_causal": int(flagged)}
    if softcap:
        attrs["softcap"] = softcap
    inputs = [q, k, v] if attn_mask is None else [q, k, v, attn_mask]
    return torch.onnx.ops.symbolic(
        "Attention", inputs, attrs, dtype=q.dtype, shape=(b, h, m, v.shape[3]), metadata_props=meta
    )


def _multi_head_attention(q, k, v, mask, slopes, kv_lengths, meta, scale, causal, flagged, window):
    b, h, m, _ = q.shape
    f = v.shape[3]
    bias = score_mask(q, k, mask, slopes, kv_lengths, causal=causal, causal_in_mask=not flagged,
                      window=window, allow_bool=False)
    inputs = [_to_bsd(q), _to_bsd(repeat_kv(k, h)), _to_bsd(repeat_kv(v, h)), None, None, bias]
    attrs = {"num_heads": h, "scale": scale, "unidirectional": int(flagged)}
    y = torch.onnx.ops.symbolic(
        "com.microsoft::MultiHeadAttention", inputs, attrs, dtype=q.dtype, shape=(b, m, h * f), version=1,
        metadata_props=meta,
    )
    return y.reshape(b, m, h, f).transpose(1, 2)


def _group_query_attention(q, k, v, mask, slopes, kv_lengths, meta, scale, window, softcap):
    """Causal self-attention (the plan guarantees M = N, E = F): the op's own causal and window."""
    b, h, m, e = q.shape
    n = k.shape[2]
    bias = score_mask(q, k, mask, slopes, kv_lengths, causal="none", causal_in_mask=False, window=-1,
                      allow_bool=False)
    seqlens_k = torch.full((b,), n - 1, dtype=torch.int32, device=q.device)  # index of each row's last key
    total_len = torch.full((), n, dtype=torch.int32, device=q.device)
    inputs = [_to_bsd(q), _to_bsd(k), _to_bsd(v), None, None, seqlens_k, total_len, None, None, None, bias]
    attrs = {"num_heads": h, "kv_num_heads": k.shape[1], "scale": scale}
    if softcap:
        attrs["softcap"] = softcap
    if window >= 0:
        attrs["local_window_size"] = window
    y = torch.onnx.ops.symbolic(
        "com.microsoft::GroupQueryAttention", inputs, attrs, dtype=q.dtype, shape=(b, m, h * e), version=1,
        metadata_props=meta,
    )
    return y.reshape(b, m, h, e).transpose(1, 2)


def _decomposed(q, k, v, mask, slopes, kv_lengths, scale, causal, window, softcap):
    h = q.shape[1]
    scores = torch.matmul(q, repeat_kv(k, h).transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    keep = score_mask(q, k, mask, slopes, kv_lengths, causal=causal, causal_in_mask=True, window=window,
                      allow_bool=True)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf")) if keep.dtype == torch.bool else scores + keep
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, repeat_kv(v, h))


def score_mask(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    slopes: Tensor | None,
    kv_lengths: Tensor | None,
    *,
    causal: str,
    causal_in_mask: bool,
    window: int,
    allow_bool: bool,
) -> Tensor | None:
    """Everything a site adds to or removes from its scores, as one (B|1, H|1, M, N) tensor.

    Bool (True attends) when every part is a keep-mask and the op takes bool; else additive in q's
    dtype, -inf where a key is removed. onnxruntime wants the last two dims exactly (M, N).
    """
    m, n = q.shape[2], k.shape[2]
    keep: list[Tensor] = []
    add: list[Tensor] = []
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        (keep if mask.dtype == torch.bool else add).append(mask if mask.dtype == torch.bool else mask.to(q.dtype))
    rows = torch.arange(m, device=q.device).unsqueeze(1)
    cols = torch.arange(n, device=q.device).unsqueeze(0)
    if slopes is not None:
        add.append(slopes.to(q.dtype).reshape(1, -1, 1, 1) * (cols - rows).to(q.dtype))
    diagonal = rows + (n - m if causal == "bottom_right" else 0)
    if causal != "none" and causal_in_mask:
        keep.append((cols <= diagonal).reshape(1, 1, m, n))
    if window >= 0:
        keep.append((cols > diagonal - window).reshape(1, 1, m, n))
    if kv_lengths is not None:
        keep.append((cols < kv_lengths.reshape(-1, 1)).reshape(-1, 1, 1, n))
    if not keep and not add:
        return None
    kept = _all(keep)
    if add:
        out = sum(add[1:], add[0])
        if kept is not None:
            out = torch.where(kept, out, float("-inf"))
    elif allow_bool:
        out = kept
    else:
        out = torch.where(kept, 0.0, float("-inf")).to(q.dtype)
    return out.expand(out.shape[0], out.shape[1], m, n)


def _all(masks: list[Tensor]) -> Tensor | None:
    if not masks:
        return None
    out = masks[0]
    for other in masks[1:]:
        out = out & other
    return out


def repeat_kv(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, heads, N, D), each K/V head repeated for its group (SDPA's enable_gqa order)."""
    b, hkv, n, d = t.shape
    if hkv == heads:
        return t
    return t.unsqueeze(2).expand(b, hkv, heads // hkv, n, d).reshape(b, heads, n, d)


def _to_bsd(t: Tensor) -> Tensor:
    """(B, H, S, D) -> (B, S, H*D), the contrib ops' layout."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)
