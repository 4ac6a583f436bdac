"""The score terms are declared once (spec.SCORE_TERMS, spec.SCORE_ARGS) and read from there: the
cascade's stages, the op schemas, and every variant's refusal of a term it does not compute."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attnfx.cost_model import spec as spec_module
from attnfx.cost_model.cascade import canonical_cascade
from attnfx.cost_model.spec import SCORE_TERMS, AttentionSpec, Causal, MaskInput, ScoreMods, ScoreTerm
from attnfx.kernels import VARIANTS, get_variant
from attnfx.kernels.score_mods import APPLIED

PLAIN = AttentionSpec(1, 2, 2, 64, 64, 16, 16)
SOFTCAP_ALIBI = AttentionSpec(1, 2, 2, 64, 64, 16, 16, causal=Causal.TOP_LEFT, softcap=30.0, alibi=True)


def test_the_cascade_has_one_stage_per_present_term_in_the_declared_order():
    spec = AttentionSpec(1, 2, 2, 8, 8, 16, 16, scale=0.5, causal=Causal.TOP_LEFT, softcap=30.0, alibi=True,
                         mask=MaskInput.ADDITIVE, mask_shape=(1, 1, 8, 8))
    stages = [st.output for st in canonical_cascade(spec).stages]
    assert stages[1:7] == ["S", "SC", "SB", "SA", "SF", "GM"]
    assert [t.stage for t in SCORE_TERMS if t.present(spec)] == ["S", "SC", "SB", "SA", "SF"]


def test_op_schemas_take_the_declared_score_arguments():
    tail = "float scale, str causal, int window, float softcap"
    for op in (torch.ops.attnfx.attention, torch.ops.attnfx.flex_attention, torch.ops.attnfx.bounded_attention):
        assert f"Tensor? alibi_slopes, {tail})" in str(op.default._schema)
    assert f"Tensor? alibi_slopes, {tail}, float logit_bias)" in str(torch.ops.attnfx.sigmoid_attention.default._schema)


def test_op_arguments_round_trip_and_fewer_leave_later_modifiers_absent():
    mods = ScoreMods(0.5, Causal.BOTTOM_RIGHT, 4, 30.0)
    assert mods.op_args() == (0.5, "bottom_right", 4, 30.0)
    assert ScoreMods.from_op_args(*mods.op_args()) == mods
    assert ScoreMods.from_op_args(0.5, "top_left", -1) == ScoreMods(0.5, Causal.TOP_LEFT)
    with pytest.raises(TypeError, match="ScoreMods takes 4 op arguments, got 5"):
        ScoreMods.from_op_args(0.5, "none", -1, 0.0, 1.0)


def test_modifiers_are_the_optional_terms_present():
    assert PLAIN.modifiers() == ()
    assert SOFTCAP_ALIBI.modifiers() == ("softcap", "alibi")


@pytest.mark.parametrize("name", ["sdpa", "attnfx_linear", "attnfx_lightning"])
def test_variants_that_do_not_compute_softcap_refuse_it(name):
    assert get_variant(name).refusal(SOFTCAP_ALIBI, "cpu") is not None


@pytest.mark.parametrize("name", ["attnfx_chunked", "attnfx_bounded"])
def test_variants_that_compute_softcap_and_alibi_take_them(name):
    assert get_variant(name).refusal(SOFTCAP_ALIBI, "cpu") is None
    assert set(get_variant(name).takes) == {"softcap", "alibi"} == set(APPLIED)


def test_a_new_optional_term_is_refused_by_every_variant_that_does_not_list_it(monkeypatch):
    """What adding a term to SCORE_TERMS does before any kernel computes it: every variant that
    states what it takes refuses it, on every device, naming it."""
    new = ScoreTerm("new_term", "SX", lambda s: True, lambda s: "new", lambda run, x: x, optional=True)
    monkeypatch.setattr(spec_module, "SCORE_TERMS", (*SCORE_TERMS, new))
    assert PLAIN.modifiers() == ("new_term",)
    assert all(hasattr(v, "takes") for v in VARIANTS)
    for variant in VARIANTS:
        for device in ("cpu", "cuda"):
            assert variant.refusal(PLAIN, device) is not None, (variant.name, device)
    assert get_variant("attnfx_chunked").refusal(PLAIN, "cpu") == "attnfx::attention has no new_term"
    assert get_variant("sdpa").refusal(PLAIN, "cpu") == "SDPA has no new_term"
    key_mask = replace(PLAIN, mask=MaskInput.BOOL, mask_shape=(PLAIN.batch, 1, 1, PLAIN.kv_len))
    assert get_variant("padded").refusal(key_mask, "cpu") == "attnfx::padded_attention has no new_term"
