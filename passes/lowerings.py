"""The exact ways to hand a lifted site to a kernel (`Lowering`s): proven flags, the mask tensor as
the model built it, the per-key keep mask of proven padding, and ALiBi slopes for a proven ALiBi
bias. The cost model prices each (variant, lowering) pair; the last lowering is the site as written.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from attnfx.cost_model.spec import AttentionSpec, MaskInput, dtype_name

from . import ops
from .mask_eval import MaskEvaluator
from .mask_proof import exclusion_values
from .site import Alibi, BiasTerm, Lowering, MaskTerm, Site


def _canonical_mask_shape(terms: list[BiasTerm | MaskTerm], site: Site) -> tuple[int, ...]:
    """The hint shape of the combined mask in 4-D canonical (B, H, M, N) layout."""
    batch_roles = site.batch_roles
    target = (*batch_roles, "m", "n")
    sizes = {r: 1 for r in target}
    for term in terms:
        for role, size in zip(term.roles, ops.shape(term.node)):
            if role in sizes:
                sizes[role] = max(sizes[role], ops.hint_int(size))
            elif ops.hint_int(size) != 1:  # another batch layout, converted whole
                sizes.update(zip(batch_roles, site.batch_sizes))
    dims = [sizes[r] for r in target]
    nb = len(batch_roles)
    if nb < 2:
        dims = [1] * (2 - nb) + dims
    elif nb > 2:
        dims = [dims[0], math.prod(dims[1:nb]), *dims[nb:]]
    return tuple(dims)


def tensor_and_flag_lowerings(site: Site, real_bias: list[BiasTerm]) -> list[Lowering]:
    base = _base_spec(site)
    lowerings = []
    facts = site.facts
    rescaled = any(t.scaled_by for t in site.masks)  # excluded scores are fill * a tensor: only the tensor says so
    # A finite fill (-1e9) is only a score: where a bias (say -1e9 on padded keys) brings every kept
    # score of a row down to it, eager spreads the row over the "excluded" keys too, a flag does not.
    fill_competes = bool(real_bias) and any(not math.isinf(t.fill) for t in site.masks)
    if facts.structural and not rescaled and not fill_competes:
        flags = dict(causal=facts.causal, window=facts.window)
        if not real_bias:
            lowerings.append(Lowering("flag", replace(base, **flags)))
        else:
            shape = _canonical_mask_shape(real_bias, site)
            spec = replace(base, mask=MaskInput.ADDITIVE, mask_shape=shape, **flags)
            lowerings.append(Lowering("bias+flag", spec, bias=tuple(real_bias)))
    if not site.bias and not site.masks:
        lowerings.append(Lowering("none", base))
    else:
        terms = [*site.bias, *site.masks]
        # A huge finite fill (finfo.min) absorbs the score it is added to, so an additive mask
        # reproduces masked_fill exactly, fully masked rows included; a boolean mask would not.
        absorbing = any(not math.isinf(t.fill) and t.fill <= torch.finfo(ops.dtype(site.weights)).min / 2
                        for t in site.masks)
        single_bool = not site.bias and len(site.masks) == 1 and not absorbing and not rescaled
        kind = MaskInput.BOOL if single_bool else MaskInput.ADDITIVE
        scales = [scale for t in site.masks for scale in t.scaled_by if ops.rank(scale.node)]
        spec = replace(base, mask=kind, mask_shape=_canonical_mask_shape([*terms, *scales], site))
        lowerings.append(Lowering("tensor", spec, bias=site.bias, masks=site.masks))
    return lowerings


def _key_keep_lowering(site: Site, fills: set[float]) -> list[Lowering]:
    """For proven key padding (with causal/window flags and nothing unproven): the per-key keep mask
    (B|1, 1, 1, N) as the mask, for attnfx::padded_attention, which skips padded keys at run time.
    Needs one exclusion value for every excluded score (it decides rows that keep no key) and the
    canonical (batch, heads) layout, whose first dim the padding is read along."""
    facts = site.facts
    if not facts.key_padding or facts.unproven or len(site.batch_roles) < 2 or len(fills) != 1:
        return []
    if any(site.bias[t.later_bias:] or t.scaled_by for t in site.masks):  # the fill varies: bias on top, scaled
        return []
    shape = _canonical_mask_shape([*site.bias, *site.masks], site)
    spec = replace(_base_spec(site), mask=MaskInput.BOOL, mask_shape=(shape[0], 1, 1, shape[3]),
                   causal=facts.causal, window=facts.window)
    return [Lowering("key_keep", spec, bias=site.bias, masks=site.masks, per_key=True, fill=fills.pop(),
                     only=("padded",))]


def _base_spec(site: Site) -> AttentionSpec:
    sizes = {}
    for arranged in (site.q, site.k, site.v):
        for role, size in zip(arranged.roles, ops.shape(arranged.node)):
            sizes[role] = max(sizes.get(role, 1), ops.hint_int(size))
    nb = len(site.batch_roles)
    batch_sizes = list(site.batch_sizes)
    if nb == 0:
        batch, heads = 1, 1
    elif nb == 1:
        batch, heads = 1, batch_sizes[0]
    else:
        batch, heads = batch_sizes[0], math.prod(batch_sizes[1:])
    dynamic = {name for name, arranged, role in (("q_len", site.q, "m"), ("kv_len", site.k, "n"))
               if ops.static_int(arranged.size(role)) is None}
    if site.batch_roles and ops.static_int(site.q.size(site.batch_roles[0])) is None:
        dynamic.add("batch")
    kv_heads = heads
    head_roles = site.batch_roles[min(1, nb - 1):] if nb else ()
    if head_roles and all(r in site.k.roles for r in head_roles):
        kv_heads = math.prod(ops.hint_int(site.k.size(r)) for r in head_roles)
    return AttentionSpec(
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=sizes["m"], kv_len=sizes["n"],
        head_dim=sizes["e"], value_dim=sizes["f"], dtype=dtype_name(ops.dtype(site.q.node)),
        scale=site.scale, **site.modifiers, dynamic=frozenset(dynamic), dropout_p=site.dropout_p,
        kind=site.kind, logit_bias=site.logit_bias,
    )


def site_lowerings(site: Site, real_bias: list[BiasTerm], evaluator: MaskEvaluator) -> list[Lowering]:
    """Every lowering of `site`, the tensor one (the site as written) last."""
    lowerings = tensor_and_flag_lowerings(site, real_bias)
    if not real_bias:
        fills = {t.fill for t in site.masks}.union(*(exclusion_values(evaluator.value(t.node), t.roles)
                                                     for t in site.bias))
        lowerings[-1:-1] = _key_keep_lowering(site, fills)
    return lowerings


def alibi_lowerings(site: Site, alibi: Alibi, real_bias: list[BiasTerm], evaluator: MaskEvaluator
                     ) -> list[Lowering]:
    """The site's lowerings without the ALiBi term, which the kernel adds from its slopes instead of
    reading a dense bias; masks keep pointing at the bias terms added after them."""
    index = next(i for i, t in enumerate(site.bias) if t is alibi.term)
    masks = tuple(replace(t, later_bias=t.later_bias - (index < t.later_bias)) for t in site.masks)
    view = replace(site, bias=site.bias[:index] + site.bias[index + 1:], masks=masks, lowerings=[])
    rest = [t for t in real_bias if t is not alibi.term]
    return [replace(lowering, name=f"alibi+{lowering.name}", spec=replace(lowering.spec, alibi=True), alibi=alibi)
            for lowering in site_lowerings(view, rest, evaluator)]


__all__ = ["alibi_lowerings", "site_lowerings", "tensor_and_flag_lowerings"]
