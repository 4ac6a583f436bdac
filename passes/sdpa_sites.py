"""SDPA calls already in the graph, re-examined: a dense mask the model built that is proven to be a
causal band is the same site with the kernel's causal flag, which skips the masked blocks instead
of reading a (B, H, M, N) tensor. Anything else is left as the model wrote it.

Matches: `aten.scaled_dot_product_attention` on 4-D q/k/v with an `attn_mask` (bool, or additive
0 / exclusion values) whose keep-predicate the mask evaluator proves to be causal (or a causal
window) and nothing else, without dropout or `is_causal`.
Rewrites to: a `Site` whose only lowering is the flag one, so verification and the report treat
it like any other site.
"""
from __future__ import annotations

import math

import torch
from torch.fx import Node

from attnfx.kernels.variant import call_arguments

from . import ops
from .attention import _exclusion, _with_checks
from .lowerings import tensor_and_flag_lowerings
from .layout import Arranged, Contraction
from .mask_eval import MaskEvaluator
from .mask_proof import additive_keep, classify, keep_predicate
from .site import BiasTerm, MaskTerm, Site

_BATCH = ("b0", "b1")


def lift_sdpa(node: Node, evaluator: MaskEvaluator) -> Site | None:
    """The SDPA call as a site with a proven causal flag, or None when there is nothing to gain."""
    try:
        a = call_arguments(node)
    except ValueError:
        return None
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if not isinstance(mask, Node) or a["is_causal"] or a["dropout_p"] or any(ops.rank(t) != 4 for t in (q, k, v)):
        return None
    head_dim = ops.static_int(ops.shape(q)[-1])
    if ops.rank(mask) > 4 or head_dim is None:
        return None
    roles = (*_BATCH, "m", "n")[4 - ops.rank(mask):]
    boolean = ops.dtype(mask) == torch.bool
    if boolean:
        keep = keep_predicate(evaluator.value(mask), roles)
    else:
        keep = additive_keep(evaluator.value(mask), roles, _exclusion(ops.dtype(mask)))
    if keep is None:
        return None
    facts = classify(keep, ops.sym_expr(ops.shape(q)[2]), ops.sym_expr(ops.shape(k)[2]))
    if not facts.structural:
        return None
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(head_dim)
    site = Site(
        weights=node, qk=Contraction(node, q, k, "abme", "abne", "abmn"), av=Contraction(node, node, v, "abmn", "abnf", "abmf"),
        q=Arranged(q, (*_BATCH, "m", "e")), k=Arranged(k, (*_BATCH, "n", "e")), v=Arranged(v, (*_BATCH, "n", "f")),
        batch_roles=_BATCH, out_roles=(*_BATCH, "m", "f"), scale=scale, scale_tensors=(), softcap=None,
        bias=() if boolean else (BiasTerm(mask, roles),),
        masks=(MaskTerm(mask, roles, keep_when=True, fill=-math.inf),) if boolean else (),
        facts=facts, structures={_BATCH: tuple(ops.shape(q)[:2])},
        batch_sizes=tuple(ops.hint_int(s) for s in ops.shape(q)[:2]), nodes=_with_checks((node,)),
    )
    site.lowerings = [lowering for lowering in tensor_and_flag_lowerings(site, []) if lowering.name == "flag"]
    return site if site.lowerings else None


__all__ = ["lift_sdpa"]
