"""Einsum-cascade analysis of attention: the IR, pass counts, symbolic costs and selection."""
from .cascade import Cascade, Stage, alibi_slopes, canonical_cascade, evaluate
from .spec import AttentionSpec, Causal, MaskInput

__all__ = [
    "AttentionSpec",
    "Cascade",
    "Causal",
    "MaskInput",
    "Stage",
    "alibi_slopes",
    "canonical_cascade",
    "evaluate",
]
