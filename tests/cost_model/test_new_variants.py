"""Pricing of flex and padded_attention: the kept share of pairs, the compile charge, per-call
overhead at tiny shapes, and the GEMM fraction explain() reports."""
from __future__ import annotations

from dataclasses import replace

import pytest

from attnfx.cost_model import AttentionSpec, Causal, MaskInput, explain, predict, select
from attnfx.cost_model.algorithms import assume_kept_keys, kept_pairs
from attnfx.cost_model.hardware import SANDBOX_CPU
from attnfx.cost_model.select import Option
from attnfx.cost_model.timing import gemm_fraction, useful_flops
from attnfx.kernels import VARIANTS

KEY_MASKED = AttentionSpec(8, 8, 8, 1024, 1024, 64, 64, scale=0.125, causal=Causal.TOP_LEFT, mask=MaskInput.BOOL,
                           mask_shape=(8, 1, 1, 1024))


def _winner(spec: AttentionSpec) -> str:
    options = [Option(v.name, v.algorithm, spec, "canonical", v.refusal(spec, "cpu")) for v in VARIANTS]
    options.append(Option("eager", "eager", spec, "as written"))
    return select(options, target=SANDBOX_CPU).winner.option.variant


@pytest.mark.parametrize("causal,kept,pairs", [(Causal.NONE, 0.25, 0.25), (Causal.TOP_LEFT, 0.25, 0.4375),
                                               (Causal.TOP_LEFT, 1.0, 1.0)])
def test_kept_pairs_follow_the_padding(causal, kept, pairs):
    assert kept_pairs(replace(KEY_MASKED, causal=causal), kept) == pytest.approx(pairs)


def test_padding_free_is_priced_on_the_kept_pairs_only_when_told():
    full = predict("padded", KEY_MASKED, SANDBOX_CPU)
    with assume_kept_keys(0.5):
        half = predict("padded", KEY_MASKED, SANDBOX_CPU)
    assert half.flops_mm == pytest.approx(0.75 * full.flops_mm)
    assert predict("padded", KEY_MASKED, SANDBOX_CPU).total_s == full.total_s  # the assumption was undone
    with pytest.raises(ValueError, match=r"kept key fraction must be in \(0, 1\], got 0"):
        with assume_kept_keys(0.0):
            pass


def test_a_key_masked_site_takes_the_run_time_dispatch():
    assert _winner(KEY_MASKED) == "padded"


def test_at_tiny_shapes_sdpa_on_the_dense_mask_beats_the_dispatch():
    """Measured here (B4 H8 N64 d16, causal + key mask): SDPA with the mask 0.4x eager, padded 0.6x."""
    tiny = replace(TINY, mask=MaskInput.BOOL, mask_shape=(4, 1, 1, 64))
    dense = replace(TINY, causal=Causal.NONE, mask=MaskInput.BOOL, mask_shape=(4, 1, 64, 64))
    assert predict("sdpa", dense, SANDBOX_CPU).total_s < predict("padded", tiny, SANDBOX_CPU).total_s \
        < predict("eager", dense, SANDBOX_CPU).total_s


def test_flex_pays_its_compile_once_per_compile_calls():
    spec = AttentionSpec(1, 8, 8, 2048, 2048, 64, 64, scale=0.125, causal=Causal.TOP_LEFT, window=256)
    base = predict("flex", spec, SANDBOX_CPU).total_s
    fewer = predict("flex", spec, replace(SANDBOX_CPU, compile_calls=500)).total_s
    assert fewer - base == pytest.approx(SANDBOX_CPU.compile_s["flex_compile"] / 1000)


@pytest.mark.parametrize("n,winner", [(1024, "attnfx_chunked"), (8192, "flex")])
def test_windows_go_to_flex_when_long(n, winner):
    spec = AttentionSpec(1, 8, 8, n, n, 64, 64, scale=0.125, causal=Causal.TOP_LEFT, window=256)
    assert _winner(spec) == winner


TINY = AttentionSpec(4, 8, 8, 64, 64, 16, 16, scale=0.25, causal=Causal.TOP_LEFT)


@pytest.mark.parametrize("features,winner", [
    ({}, "sdpa"),
    (dict(softcap=50.0), "eager"),
    (dict(alibi=True), "eager"),
    (dict(window=16), "eager"),
    (dict(mask=MaskInput.BOOL, mask_shape=(4, 1, 1, 64)), "padded"),  # SDPA takes no mask beside is_causal
])
def test_tiny_shapes_keep_eager_where_only_attnfx_kernels_could_run(features, winner):
    """Measured here (B4 H8 N64 d16): SDPA 0.4x eager's time, padded 0.6x, chunked 1.7x, flex 1.8x."""
    assert _winner(replace(TINY, **features)) == winner


def test_explain_reports_each_variants_share_of_gemm():
    spec = AttentionSpec(1, 8, 8, 2048, 2048, 64, 64, scale=0.125, causal=Causal.TOP_LEFT)
    text = explain(spec, target=SANDBOX_CPU)
    sdpa = predict("sdpa", spec, SANDBOX_CPU).total_s
    share = gemm_fraction(sdpa, spec, SANDBOX_CPU.mm_rate("float32", "gemm"))
    assert useful_flops(spec) == 2 * 8 * (2048 * 2049 // 2) * 128
    assert f"useful FLOPs 2*B*H*pairs*(E+F) = {useful_flops(spec):.4g}; GEMM on this target 152 GFLOP/s" in text
    assert f"{useful_flops(spec) / sdpa / 1e9:.3g} useful GFLOP/s = {share:.0%} of GEMM" in text


def test_a_compiled_shape_is_no_longer_charged_its_compile():
    from attnfx.cost_model.compiled import _COMPILED, note_compiled, spec_key

    spec = AttentionSpec(3, 8, 8, 777, 777, 64, 64, scale=0.125, causal=Causal.TOP_LEFT, window=100)
    before = predict("flex", spec, SANDBOX_CPU).total_s
    note_compiled(spec_key("flex_compile", spec))
    try:
        after = predict("flex", spec, SANDBOX_CPU).total_s
    finally:
        _COMPILED.discard(spec_key("flex_compile", spec))
    assert before - after == pytest.approx(SANDBOX_CPU.compile_s["flex_compile"] / SANDBOX_CPU.compile_calls)
