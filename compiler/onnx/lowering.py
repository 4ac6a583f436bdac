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

from attnfx.cost_model.spec import SCORE_ARGS, Causal, ScoreMods
from attnfx.errors import ExportError

from .plan import ATTENTION, DECOMPOSED, GQA, MHA, SitePlan

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
        o = plan.facts.call.operands
        operands = tuple(None if x is None else nodes[x.name] for x in (o.q, o.k, o.v, o.mask, o.slopes))
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
    """Plain values only (the graph is printed as code): the score modifiers in their op encoding."""
    f, s = plan.facts, plan.facts.spec
    return dict(
        op=plan.op, site=f.site, node=f.node, heads=s.heads, kv_heads=s.kv_heads, causal_flag=plan.causal_flag,
        **{arg.name: value for arg, value in zip(SCORE_ARGS, s.mods.op_args())},
    )


def _redirect_uses(graph: torch.fx.Graph, node: torch.fx.Node, new: torch.fx.Node, plan: SitePlan) -> None:
    """Uses of the attention output go to `new`; any other output of the op in use is an error."""
    index = plan.facts.call.output_index
    if index is None:
        node.replace_all_uses_with(new)
        return
    for user in list(node.users):  # a tuple-returning op: uses go through getitem
        taken = user.args[1] if user.target is operator.getitem else None
        if taken == index:
            user.replace_all_uses_with(new)
        elif taken is None or user.users:
            raise ExportError(f"{plan.facts.label}: node {user.name} uses {plan.facts.op}'s "
                              f"{_output_name(node, taken)}, which ONNX attention operators do not return")
        graph.erase_node(user)


def _output_name(node: torch.fx.Node, index: int | None) -> str:
    """The schema's name for output `index` of the call (`lse`), or what the use takes."""
    returns = getattr(getattr(node.target, "_schema", None), "returns", ())
    if index is None:
        return "whole result"
    return returns[index].name if index < len(returns) and returns[index].name else f"output {index}"


def lowered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    slopes: Tensor | None,
    *,
    op: str,
    site: int | None,
    node: str,
    heads: int,
    kv_heads: int,
    causal_flag: bool,
    **score_args: float | int | str,
) -> Tensor:
    """One site as `op`, in canonical layout: returns (B, H, M, F).

    Head counts come from the capture (ints): a re-export may see the head axis as symbolic, and the
    contrib ops take them as attributes. The score modifiers arrive as spec.SCORE_ARGS, by name."""
    meta = {SITE_KEY: "" if site is None else str(site), NODE_KEY: node}
    mods = ScoreMods.from_call(score_args)
    scale, causal, window, softcap = mods.scale, mods.causal, mods.window, mods.softcap
    flagged = causal_flag and causal is not Causal.NONE
    if op == ATTENTION:
        return _standard_attention(q, k, v, mask, slopes, meta, scale, causal, flagged, window, softcap)
    if op == MHA:
        return _multi_head_attention(
            q, k, v, mask, slopes, meta, heads, kv_heads, scale, causal, flagged, window
        )
    if op == GQA:
        return _group_query_attention(
            q, k, v, mask, slopes, meta, heads, kv_heads, scale, causal, window, softcap
        )
    if op == DECOMPOSED:
        return _decomposed(q, k, v, mask, slopes, heads, kv_heads, scale, causal, window, softcap)
    raise ValueError(f"unknown lowering {op!r}")


def _standard_attention(q, k, v, mask, slopes, meta, scale, causal, flagged, window, softcap):
    """Attention-23 zeroes rows whose every key is removed itself, as SDPA does."""
    b, h, m, _ = q.shape
    attn_mask, _ = score_terms(q, k, mask, slopes, causal=causal, flagged=flagged, window=window,
                               window_in_mask=True, allow_bool=True)
    attrs = {"scale": scale, "is_causal": int(flagged)}
    if softcap:
        attrs["softcap"] = softcap
    inputs = [q, k, v] if attn_mask is None else [q, k, v, attn_mask]
    return torch.onnx.ops.symbolic(
        "Attention", inputs, attrs, dtype=q.dtype, shape=(b, h, m, v.shape[3]), metadata_props=meta
    )


def _multi_head_attention(q, k, v, mask, slopes, meta, h, hkv, scale, causal, flagged, window):
    b, _, m, _ = q.shape
    f = v.shape[3]
    bias, kept = score_terms(q, k, mask, slopes, causal=causal, flagged=flagged, window=window,
                             window_in_mask=True, allow_bool=False)
    inputs = [_to_bsd(q, h), _to_bsd(repeat_kv(k, h, hkv), h), _to_bsd(repeat_kv(v, h, hkv), h), None, None, bias]
    attrs = {"num_heads": h, "scale": scale, "unidirectional": int(flagged)}
    y = torch.onnx.ops.symbolic(
        "com.microsoft::MultiHeadAttention", inputs, attrs, dtype=q.dtype, shape=(b, m, h * f), version=1,
        metadata_props=meta,
    )
    return _zero_empty_rows(y.reshape(b, m, h, f).transpose(1, 2), kept)


def _group_query_attention(q, k, v, mask, slopes, meta, h, hkv, scale, causal, window, softcap):
    """Causal self-attention (the plan guarantees M = N, E = F): the op's own causal and window."""
    b, _, m, e = q.shape
    n = k.shape[2]
    bias, kept = score_terms(q, k, mask, slopes, causal=causal, flagged=True, window=window,
                             window_in_mask=False, allow_bool=False)
    seqlens_k = torch.full((b,), n - 1, dtype=torch.int32, device=q.device)  # index of each row's last key
    total_len = torch.full((), n, dtype=torch.int32, device=q.device)
    inputs = [_to_bsd(q, h), _to_bsd(k, hkv), _to_bsd(v, hkv), None, None, seqlens_k, total_len, None, None, None, bias]
    attrs = {"num_heads": h, "kv_num_heads": hkv, "scale": scale}
    if softcap:
        attrs["softcap"] = softcap
    if window is not None:
        attrs["local_window_size"] = window
    y = torch.onnx.ops.symbolic(
        "com.microsoft::GroupQueryAttention", inputs, attrs, dtype=q.dtype, shape=(b, m, h * e), version=1,
        metadata_props=meta,
    )
    return _zero_empty_rows(y.reshape(b, m, h, e).transpose(1, 2), kept)


def _decomposed(q, k, v, mask, slopes, h, hkv, scale, causal, window, softcap):
    scores = torch.matmul(q, repeat_kv(k, h, hkv).transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    terms, kept = score_terms(q, k, mask, slopes, causal=causal, flagged=False, window=window,
                              window_in_mask=True, allow_bool=True)
    if terms is not None:
        scores = scores.masked_fill(~terms, float("-inf")) if terms.dtype == torch.bool else scores + terms
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return _zero_empty_rows(torch.matmul(probs, repeat_kv(v, h, hkv)), kept)


def score_terms(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    slopes: Tensor | None,
    *,
    causal: Causal,
    flagged: bool,
    window: int | None,
    window_in_mask: bool,
    allow_bool: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """What a site adds to or removes from its scores: (the op's mask input, the keep-mask).

    The mask input is one (B|1, H|1, M, N) tensor (onnxruntime wants the last two dims exactly): bool
    (True attends) when every part is a keep-mask and the op takes bool, else additive in q's dtype
    with -inf where a key is removed. It leaves out what the op does itself (a `flagged` causal
    diagonal; the window unless `window_in_mask`). The keep-mask covers every removal, the op's own
    included, so rows left with no key can be zeroed as SDPA does; it is None when no row can be
    (no bool mask, no bottom-right diagonal that can pass the first key).
    """
    m, n = q.shape[2], k.shape[2]
    rows = torch.arange(m, device=q.device).unsqueeze(1)
    cols = torch.arange(n, device=q.device).unsqueeze(0)
    diagonal = rows + causal.offset(m, n)
    causal_keep = (cols <= diagonal).reshape(1, 1, m, n) if causal is not Causal.NONE else None
    window_keep = (cols > diagonal - window).reshape(1, 1, m, n) if window is not None else None
    bool_mask = add_mask = None
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        bool_mask, add_mask = (mask, None) if mask.dtype == torch.bool else (None, _not_lowest(mask.to(q.dtype)))
    alibi = slopes.to(q.dtype).reshape(1, -1, 1, 1) * (cols - rows).to(q.dtype) if slopes is not None else None

    keep = _all([bool_mask, None if flagged else causal_keep, window_keep if window_in_mask else None])
    add = _sum([add_mask, alibi])
    if add is not None:
        op_mask = add if keep is None else torch.where(keep, add, float("-inf"))
    elif keep is not None:
        op_mask = keep if allow_bool else torch.where(keep, 0.0, float("-inf")).to(q.dtype)
    else:
        op_mask = None
    if op_mask is not None:
        op_mask = op_mask.expand(op_mask.shape[0], op_mask.shape[1], m, n)

    can_empty = bool_mask is not None or (causal is Causal.BOTTOM_RIGHT and not flagged)
    kept = _all([bool_mask, causal_keep, window_keep]) if can_empty else None
    return op_mask, kept


def _not_lowest(mask: Tensor) -> Tensor:
    """onnxruntime reads a mask value of exactly finfo.min as "removed" and returns 0 for a row of
    them; PyTorch adds it like any number, so such a row averages V. Half of finfo.min still absorbs
    any score it is added to, and onnxruntime then computes what PyTorch does."""
    lowest = torch.finfo(mask.dtype).min
    return torch.where(mask == lowest, lowest / 2, mask)


def _all(masks: list[Tensor | None]) -> Tensor | None:
    present = [t for t in masks if t is not None]
    if not present:
        return None
    out = present[0]
    for other in present[1:]:
        out = out & other
    return out


def _sum(terms: list[Tensor | None]) -> Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


def _zero_empty_rows(out: Tensor, kept: Tensor | None) -> Tensor:
    """0 for query rows whose every key is removed, as SDPA and attnfx::attention give (the contrib
    ops and a plain softmax give NaN there)."""
    if kept is None:
        return out
    return torch.where(kept.any(dim=-1, keepdim=True), out, 0.0)


def repeat_kv(t: Tensor, heads: int, kv_heads: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, H, N, D), each K/V head repeated for its group (SDPA's enable_gqa order)."""
    if heads == kv_heads:
        return t
    b, _, n, d = t.shape
    return t.unsqueeze(2).expand(b, kv_heads, heads // kv_heads, n, d).reshape(b, heads, n, d)


def _to_bsd(t: Tensor, heads: int) -> Tensor:
    """(B, H, S, D) -> (B, S, H*D), the contrib ops' layout."""
    b, _, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, heads * d)
