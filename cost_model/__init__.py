"""Einsum-cascade analysis of attention: the IR, pass counts, symbolic costs and selection."""
from .algorithms import ALGORITHMS, Algorithm, Kernel
from .cascade import Cascade, Stage, alibi_slopes, canonical_cascade, evaluate
from .catalog import CATALOG
from .einsums import Einsum, EinsumCascade
from .explain import explain
from .hardware import GPU_PROFILES, HardwareProfile
from .pass_count import PassAnalysis, analyze
from .select import Candidate, Option, Selection, select
from .spec import AttentionSpec, Causal, MaskInput
from .timing import Prediction, predict

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AttentionSpec",
    "CATALOG",
    "Candidate",
    "Cascade",
    "Causal",
    "Einsum",
    "EinsumCascade",
    "GPU_PROFILES",
    "HardwareProfile",
    "Kernel",
    "MaskInput",
    "Option",
    "PassAnalysis",
    "Prediction",
    "Selection",
    "Stage",
    "alibi_slopes",
    "analyze",
    "canonical_cascade",
    "evaluate",
    "explain",
    "predict",
    "select",
]
