"""Emission on its own: the replacement emitted for a lifted site, compared with the expected code."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnfx.kernels import get_variant
from attnfx.passes.attention import lift
from attnfx.passes.emit import emit
from attnfx.passes import ops
from attnfx.passes.mask_eval import MaskEvaluator
from graphs import only, rand, traced


def emitted_code(fn, variant: str, lowering: str, *args) -> list[str]:
    gm = traced(fn, *args)
    site = lift(only(gm, "softmax"), MaskEvaluator(gm))
    chosen = next(lo for lo in site.lowerings if lo.name == lowering)
    out = emit(gm.graph, site, chosen, get_variant(variant), 0)

    def show(a):
        return a.name if hasattr(a, "name") and hasattr(a, "op") else repr(a)

    lines = [f"{n.name} = {ops.target_name(n)}({', '.join(show(a) for a in n.args)})" for n in out.nodes]
    assert out.output is out.nodes[-1]
    return lines


def test_bshd_site_reuses_the_models_transposes_and_permutes_only_k() -> None:
    def attend(q, k, v):  # (b, s, h, d) operands
        p = (F.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * 0.5, -1))
        return (p @ v.transpose(1, 2)).transpose(1, 2)

    # q and v are already (b, h, s, d) after the model's own transposes; k^T is (b, h, d, s): its
    # source (b, s, h, d) is permuted once; the output is the AV contraction's own (b, h, m, f)
    assert emitted_code(attend, "sdpa", "none", rand(2, 5, 3, 4), rand(2, 5, 3, 4), rand(2, 5, 3, 4)) == [
        "permute_default = permute(args_1, [0, 2, 1, 3])",
        "scaled_dot_product_attention_default = scaled_dot_product_attention(transpose, permute_default, "
        "transpose_1, None, 0.0, False)",
    ]


def test_causal_flag_site_keeps_no_mask_tensor() -> None:
    def attend(q, k, v):
        t = q.size(-2)
        keep = torch.ones(t, t, dtype=torch.bool).tril()
        return F.softmax((q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")), -1) @ v

    code = emitted_code(attend, "attnfx_chunked", "flag", rand(2, 3, 6, 4), rand(2, 3, 6, 4), rand(2, 3, 6, 4))
    assert code == [
        "attention_default = attention(args_0, args_1, args_2, None, None, 1.0, 'top_left', -1, 0.0)",
        "getitem = getitem(attention_default, 0)",
    ]
