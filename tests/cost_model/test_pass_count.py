"""The pass-count analysis must reproduce FuseMax's pass counts for every cascade in the catalog."""
import pytest

from attnfx.cost_model import catalog
from attnfx.cost_model.einsums import EinsumCascade
from attnfx.cost_model.pass_count import analyze

TABLE = [
    # cascade, passes, re-reads of the key-ranked inputs (with recompute)
    (catalog.FUSEMAX_1, 2, {"A": 2, "B": 1}),
    (catalog.FUSEMAX_2, 1, {"A": 1, "B": 1}),
    (catalog.FUSEMAX_3, 1, {"A": 1, "B": 1}),
    (catalog.THREE_PASS, 3, {"K": 3, "V": 1}),
    (catalog.DEFERRED, 2, {"K": 2, "V": 1}),
    (catalog.LOCAL_MAX, 2, {"K": 2, "V": 1}),
    (catalog.ONLINE_SOFTMAX, 2, None),
    (catalog.UNSAFE_SOFTMAX, 2, None),
    (catalog.ONE_PASS, 1, {"K": 1, "V": 1}),
    (catalog.SIGMOID, 1, {"K": 1, "V": 1}),
    (catalog.LINEAR, 1, {"K": 1, "V": 1}),
    (catalog.LINFORMER, 1, {"K": 1, "V": 1}),
    (catalog.SPLIT_KV, 1, {"K": 1, "V": 1}),
]


@pytest.mark.parametrize("cascade, passes, reads", TABLE, ids=[row[0].name for row in TABLE])
def test_design_note_table(cascade, passes, reads):
    result = analyze(cascade)
    assert result.passes == passes
    if reads is not None:
        assert {t: result.reads[t] for t in reads} == reads


def test_three_pass_levels_follow_the_cascade_order():
    level = analyze(catalog.THREE_PASS).level
    assert level == {"QK": 1, "GM": 1, "SN": 2, "SD": 2, "A": 3, "AV": 3}


def test_local_max_statistics_are_light():
    # GM, PRM and SD only touch n1: they run between the passes and get no level of their own
    level = analyze(catalog.LOCAL_MAX).level
    assert {"GM", "PRM", "SD"}.isdisjoint(level)
    assert level["A"] == 2


def test_gqa_and_decode_keep_the_pass_count():
    gqa = EinsumCascade.of(
        "gqa 1-pass decode",
        "BQK[g,n1,n0] = Q[g,e] * K[n1,n0,e]",
        "LM[g,n1] = max_n0 BQK[g,n1,n0]",
        "RM[g,n1+1] = max(RM[g,n1], LM[g,n1])",
        "SLN[g,n1,n0] = exp(BQK[g,n1,n0] - RM[g,n1+1])",
        "SLD[g,n1] = sum_n0 SLN[g,n1,n0]",
        "SLNV[g,f,n1] = SLN[g,n1,n0] * V[n1,n0,f]",
        "PRM[g,n1] = exp(RM[g,n1] - RM[g,n1+1])",
        "RD[g,n1+1] = SLD[g,n1] + RD[g,n1] * PRM[g,n1]",
        "RNV[g,f,n1+1] = SLNV[g,f,n1] + RNV[g,f,n1] * PRM[g,n1]",
        "AV[g,f] = RNV[g,f,C] / RD[g,C]",
    )
    result = analyze(gqa)
    assert (result.passes, result.reads) == (1, {"K": 1, "V": 1})


def test_reading_a_final_value_forces_a_new_pass():
    # the same recurrence, once consumed at its last coordinate by a heavy Einsum
    cascade = EinsumCascade.of("final", "RS[n+1] = RS[n] + A[n]", "Z[n] = A[n] / RS[N]")
    assert analyze(cascade).passes == 2


def test_loop_carried_reads_add_no_edge():
    graph = catalog.ONE_PASS.graph
    assert not graph.has_edge("RM", "RM")
    assert graph.has_edge("RM", "PRM") and graph.edges["RNV", "AV"]["final"]


def test_malformed_cascades_are_rejected():
    with pytest.raises(ValueError, match="produced twice"):
        EinsumCascade.of("dup", "X[n] = A[n]", "X[n] = B[n]")
    with pytest.raises(ValueError, match="not an Einsum"):
        EinsumCascade.of("bad", "just words")


def _lifted(**features):
    from attnfx.cost_model.cascade import canonical_cascade
    from attnfx.cost_model.spec import AttentionSpec

    return canonical_cascade(AttentionSpec(1, 4, 2, 64, 64, 16, 16, **features))


def test_a_lifted_softmax_cascade_has_the_catalog_three_pass_analysis():
    """The site as written is analysed like the catalog's 3-pass cascade, modifiers included."""
    from attnfx.cost_model.spec import Causal, MaskInput

    catalog_three = analyze(catalog.THREE_PASS)
    for features in ({}, dict(scale=0.25, causal=Causal.TOP_LEFT),
                     dict(softcap=30.0, mask=MaskInput.ADDITIVE, mask_shape=(1, 1, 64, 64))):
        result = _lifted(**features).passes
        assert (result.passes, result.reads["K"], result.reads["V"]) == (3, 3, 1)
        assert {name: result.level[name] for name in catalog_three.level} == catalog_three.level
    assert _lifted(mask=MaskInput.ADDITIVE, mask_shape=(1, 1, 64, 64)).passes.reads["BIAS"] == 3


def test_lifted_sigmoid_and_normalised_linear_cascades():
    from attnfx.cost_model.spec import Causal, Kind

    assert _lifted(kind=Kind.SIGMOID, logit_bias=-2.0).passes.passes == 1
    linear = _lifted(kind=Kind.LINEAR, causal=Causal.TOP_LEFT, normalize=True).passes
    assert linear.passes == 2 and linear.level["AN"] == 2  # the row sum is complete before the division


def test_eager_is_priced_with_the_sites_own_cascade():
    from attnfx.cost_model.algorithms import ALGORITHMS
    from attnfx.cost_model.hardware import SANDBOX_CPU
    from attnfx.cost_model.spec import MaskInput
    from attnfx.cost_model.timing import predict

    site = _lifted(mask=MaskInput.ADDITIVE, mask_shape=(1, 1, 64, 64))
    assert ALGORITHMS["eager"].einsums(site.spec) is site.einsums
    prediction = predict("eager", site.spec, SANDBOX_CPU)
    assert (prediction.passes, prediction.kv_reads) == (3, 3)
    assert predict("sdpa", site.spec, SANDBOX_CPU).passes == 1
