"""Which compiled kernels this process already holds, so a compile is charged only until it is paid.

A kernel compiled per shape (FlexAttention through Inductor) notes the site it compiled for; the
time model then drops that kernel's compile charge for sites with the same key. The key is the
site's sizes, dtype and score modifiers: what a compile specialises on.
"""
from __future__ import annotations

from .spec import AttentionSpec, ScoreMods

_COMPILED: set[tuple] = set()


def compile_key(unit: str, sizes: tuple[int, ...], dtype: str, mods: ScoreMods, bias_shape: tuple[int, ...] | None,
                alibi: bool) -> tuple:
    """The key of one compiled kernel: sizes (B, H, Hkv, M, N, E, F), dtype, modifiers and operands."""
    return (unit, tuple(sizes), dtype, mods.op_args(), bias_shape, alibi)


def spec_key(unit: str, spec: AttentionSpec) -> tuple:
    sizes = (spec.batch, spec.heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim, spec.value_dim)
    bias_shape = spec.mask_shape if spec.mask.value == "additive" else None
    return compile_key(unit, sizes, spec.dtype, spec.mods, bias_shape, spec.alibi)


def note_compiled(key: tuple) -> None:
    _COMPILED.add(key)


def is_compiled(unit: str, spec: AttentionSpec) -> bool:
    return spec_key(unit, spec) in _COMPILED
