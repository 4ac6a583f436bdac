"""Linear-attention sites as rewrite targets: both emit `attnfx::linear_attention(...)[0]`, each
with its own contraction order (the op's `algorithm` argument), priced by the algorithm of the
same name:
  * attnfx_linear: right to left, Q (K^T V), for sites without a causal band or decay
    (algorithm linear_right_to_left, O(N E F));
  * attnfx_lightning: chunked (Lightning), for causal sites with or without decay, with
    `cost_model.tiles.LINEAR_CHUNK` rows per chunk (algorithm linear_chunked, O(N E F + N C E)).
Both run on any device (pure torch) and take GQA/MQA, normalize / norm_eps and top-left or
bottom-right bands; q and k must arrive feature-mapped (phi is applied by the model's graph).
"""
from __future__ import annotations

import torch

from attnfx.cost_model.spec import AttentionSpec, Causal, Kind
from attnfx.cost_model.tiles import LINEAR_CHUNK

from . import linear_ops  # noqa: F401  (registers torch.ops.attnfx.linear_attention)
from .registry import Call, Operands, kind_refusal


def linear_call(spec: AttentionSpec, operands: Operands, algorithm: str) -> Call:
    """`attnfx::linear_attention(...)[0]` for `spec` on canonical operands, in the given order."""
    args = (operands.q, operands.k, operands.v, operands.decay if spec.decay else None, spec.scale,
            spec.causal.value, spec.normalize, spec.norm_eps, algorithm, LINEAR_CHUNK)
    return Call(torch.ops.attnfx.linear_attention.default, args, {}, output_index=0)


class LinearVariant:
    name = "attnfx_linear"
    algorithm = "linear_right_to_left"
    exact = True
    description = "attnfx::linear_attention right to left: Q (K^T V), O(N E F)"

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        reason = kind_refusal(self.name, Kind.LINEAR, spec)
        if reason is None and spec.causal is not Causal.NONE:
            return "a causal band needs the chunked order (attnfx_lightning): K^T V would sum keys a query cannot see"
        if reason is None and spec.decay:
            return "no attnfx linear algorithm takes a decay without a causal band"
        return reason

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return linear_call(spec, operands, "right_to_left")


class LightningVariant:
    name = "attnfx_lightning"
    algorithm = "linear_chunked"
    exact = True
    description = (f"attnfx::linear_attention chunked (Lightning, {LINEAR_CHUNK} rows a chunk): intra-chunk "
                   "product + decayed running state")

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        reason = kind_refusal(self.name, Kind.LINEAR, spec)
        if reason is None and spec.causal is Causal.NONE:
            return "no causal band: the right-to-left order (attnfx_linear) computes this site in one state"
        return reason

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return linear_call(spec, operands, "chunked")
