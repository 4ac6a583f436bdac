"""PyTorch's fused `scaled_dot_product_attention` as a rewrite target.

On CPU it dispatches to a flash-style 1-pass kernel; elsewhere to flash / memory-efficient / cuDNN.
It takes a scale, a top-left `is_causal` flag *or* one mask tensor, and GQA through `enable_gqa`.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from attnfx.cost_model.spec import AttentionSpec, Causal, Kind, MaskInput, ScoreMods

from .variant import Call, CallSite, Operands, call_arguments, kind_refusal, untaken_modifier


class SdpaVariant:
    name = "sdpa"
    op = "SDPA"
    algorithm = "sdpa"
    exact = True
    description = "torch.nn.functional.scaled_dot_product_attention"
    takes: tuple[str, ...] = ()  # no optional score term (spec.SCORE_TERMS)

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        if spec.kind is not Kind.SOFTMAX:
            return kind_refusal(self.name, Kind.SOFTMAX, spec)
        if spec.softcap is not None:
            return "SDPA has no softcap"
        if spec.alibi:
            return "SDPA takes no ALiBi slopes (the bias-tensor form can)"
        if spec.window is not None:
            return "SDPA has no sliding-window flag (the mask-tensor form can)"
        if spec.causal is Causal.BOTTOM_RIGHT and spec.diagonal_hides_keys:
            return "SDPA's is_causal is top-left aligned and this site's diagonal is bottom-right with M != N"
        if spec.diagonal_hides_keys and spec.mask is not MaskInput.NONE:
            return "SDPA cannot combine is_causal with a mask tensor"
        return untaken_modifier(self.op, spec, self.takes)

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        kwargs = {"scale": spec.scale}
        if spec.kv_heads != spec.heads:
            kwargs["enable_gqa"] = True
        is_causal = spec.causal is Causal.TOP_LEFT
        return Call(
            torch.ops.aten.scaled_dot_product_attention.default,
            (operands.q, operands.k, operands.v, operands.mask, spec.dropout_p, is_causal),
            kwargs,
        )

    def read(self, node: Node) -> CallSite | None:
        """Every aten SDPA call, the model's own included; the default scale 1/sqrt(E) is read from
        q's metadata (ValueError when it has none)."""
        if node.op != "call_function" or node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            return None
        a = call_arguments(node)
        scale = a["scale"]
        if scale is None:
            q = a["query"].meta.get("val")
            if not isinstance(q, torch.Tensor):
                raise ValueError(f"{node.name}: SDPA's default scale needs q's tensor metadata (meta['val'])")
            scale = q.shape[-1] ** -0.5
        causal = Causal.TOP_LEFT if a["is_causal"] else Causal.NONE
        return CallSite(Operands(a["query"], a["key"], a["value"], a["attn_mask"]), ScoreMods(float(scale), causal),
                        dropout=float(a["dropout_p"]))
