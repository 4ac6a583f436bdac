"""attnfx's kernels as rewrite targets: what each variant refuses, and that its Call runs the site."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernel_cases import COMBINED, FEATURES, Case, LinearCase, assert_close, reference
from attnfx.cost_model import ALGORITHMS, AttentionSpec, Causal
from attnfx.cost_model.spec import Kind
from attnfx.kernels import VARIANTS, Operands, get_variant

ALL = {**FEATURES, **COMBINED}


def operands(t: dict[str, torch.Tensor]) -> Operands:
    return Operands(q=t["Q"], k=t["K"], v=t["V"], mask=t.get("BIAS", t.get("MASK")), slopes=t.get("SLOPES"),
                    decay=t.get("DECAY"))


def test_registered_in_order_with_their_algorithms():
    assert [(v.name, v.algorithm, v.exact) for v in VARIANTS[1:]] == [
        ("attnfx_chunked", "chunked", True), ("triton_flash", "flash", True),
        ("triton_decode", "decode_split_kv", True), ("flex", "flex", True), ("padded", "padded", True),
        ("attnfx_bounded", "bounded", True), ("attnfx_sigmoid_chunked", "sigmoid_chunked", True),
        ("triton_sigmoid", "sigmoid_flash", True), ("attnfx_linear", "linear_right_to_left", True),
        ("attnfx_lightning", "linear_chunked", True)]
    assert all(v.algorithm in ALGORITHMS for v in VARIANTS)


@pytest.mark.parametrize("name", list(ALL))
def test_every_feature_is_taken_where_the_device_fits(name):
    spec = ALL[name].spec("float32")
    assert get_variant("attnfx_chunked").refusal(spec, "cpu") is None
    assert get_variant("triton_flash").refusal(spec, "cuda") is None
    assert get_variant("triton_decode").refusal(replace(spec, q_len=4, kv_len=64), "cuda") is None


@pytest.mark.parametrize("name", list(ALL))
def test_the_call_computes_the_site(name):
    case = ALL[name]
    t = case.tensors()
    call = get_variant("attnfx_chunked").call(case.spec("float32"), operands(t))
    assert call.target.name() == "attnfx::attention" and call.output_index == 0 and call.kwargs == {}
    assert_close(call.run(), reference(case, t), "float32")


def test_the_call_passes_only_what_the_spec_uses():
    case = Case(causal="bottom_right", window=8, softcap=3.0, scale=0.5)
    t = case.tensors()
    extra = Operands(q=t["Q"], k=t["K"], v=t["V"], mask=torch.zeros(1), slopes=torch.zeros(2))
    call = get_variant("triton_flash").call(case.spec("float32"), extra)
    assert call.args[3:] == (None, None, 0.5, "bottom_right", 8, 3.0)


SPEC = AttentionSpec(1, 8, 8, 128, 128, 64, 64)


@pytest.mark.parametrize("variant,spec,device,reason", [
    ("attnfx_chunked", SPEC, "cuda",
     "attnfx_chunked is attnfx's CPU kernel; on cuda attnfx::attention runs its Triton kernels"),
    ("triton_flash", SPEC, "cpu",
     "Triton kernels run on cuda only; on cpu interpreted Triton is never chosen for speed"),
    ("triton_decode", replace(SPEC, q_len=1), "cpu",
     "Triton kernels run on cuda only; on cpu interpreted Triton is never chosen for speed"),
    ("triton_flash", AttentionSpec(1, 8, 8, 128, 128, 64, 64, dtype="float64"), "cuda",
     "the Triton kernels take float32/float16/bfloat16, not float64"),
    ("triton_flash", replace(SPEC, head_dim=512), "cuda",
     "the Triton kernels take head dims up to 256, got E=512 F=64"),
    ("triton_decode", replace(SPEC, q_len=1, value_dim=320), "cuda",
     "the Triton kernels take head dims up to 256, got E=64 F=320"),
    ("triton_flash", replace(SPEC, q_len=1), "cuda",
     "M=1 N=128 is decode-shaped (M <= 16, N >= 4M): attnfx::attention runs its split-KV kernel there "
     "(triton_decode)"),
    ("triton_decode", replace(SPEC, q_len=17), "cuda",
     "M=17 N=128 is not decode-shaped (needs M <= 16 and N >= 4M): attnfx::attention runs its flash kernel "
     "there (triton_flash)"),
    ("triton_decode", replace(SPEC, q_len=16, kv_len=63), "cuda",
     "M=16 N=63 is not decode-shaped (needs M <= 16 and N >= 4M): attnfx::attention runs its flash kernel "
     "there (triton_flash)"),
])
def test_refusals(variant, spec, device, reason):
    assert get_variant(variant).refusal(spec, device) == reason


SIGMOID_OP = "attnfx::sigmoid_attention"
LINEAR_OP = "attnfx::linear_attention"


@pytest.mark.parametrize("name", list(ALL))
def test_every_sigmoid_feature_is_taken_and_the_call_computes_the_site(name):
    case = ALL[name].with_(kind="sigmoid", logit_bias=-2.5)
    spec, t = case.spec("float32"), case.tensors()
    assert get_variant("attnfx_sigmoid_chunked").refusal(spec, "cpu") is None
    assert get_variant("triton_sigmoid").refusal(spec, "cuda") is None
    call = get_variant("attnfx_sigmoid_chunked").call(spec, operands(t))
    assert call.target.name() == SIGMOID_OP and call.output_index is None and call.args[-1] == -2.5
    assert_close(call.run(), reference(case, t), "float32")
    assert get_variant("triton_sigmoid").call(spec, operands(t)) == call


@pytest.mark.parametrize("case,variant,algorithm", [
    (LinearCase(causal="none", normalize=True, norm_eps=1e-3), "attnfx_linear", "right_to_left"),
    (LinearCase(causal="bottom_right", kv_len=100, decay=True, normalize=True), "attnfx_lightning", "chunked"),
    (LinearCase(causal="top_left", kv_heads=1), "attnfx_lightning", "chunked"),
])
def test_linear_calls_compute_the_site_in_their_order(case, variant, algorithm):
    spec, t = case.spec("float32"), case.tensors()
    assert get_variant(variant).refusal(spec, "cpu") is None and get_variant(variant).refusal(spec, "cuda") is None
    call = get_variant(variant).call(spec, operands(t))
    assert call.target.name() == LINEAR_OP and call.output_index == 0
    assert call.args[3:] == (t.get("DECAY"), case.scale, case.causal, case.normalize, case.norm_eps, algorithm, 64)
    assert_close(call.run(), reference(case, t), "float32")


LINEAR = AttentionSpec(1, 8, 8, 128, 128, 64, 64, kind=Kind.LINEAR)
SIGMOID = AttentionSpec(1, 8, 8, 128, 128, 64, 64, kind=Kind.SIGMOID, logit_bias=-4.0)


@pytest.mark.parametrize("variant,spec,device,reason", [
    ("sdpa", SIGMOID, "cpu", "sdpa computes softmax attention; this site's weights are sigmoid"),
    ("attnfx_chunked", LINEAR, "cpu", "attnfx_chunked computes softmax attention; this site's weights are linear"),
    ("triton_flash", SIGMOID, "cuda", "triton_flash computes softmax attention; this site's weights are sigmoid"),
    ("triton_decode", replace(LINEAR, q_len=1), "cuda",
     "triton_decode computes softmax attention; this site's weights are linear"),
    ("attnfx_sigmoid_chunked", SPEC, "cpu",
     "attnfx_sigmoid_chunked computes sigmoid attention; this site's weights are softmax"),
    ("attnfx_sigmoid_chunked", SIGMOID, "cuda",
     "attnfx_sigmoid_chunked is attnfx's CPU kernel; on cuda attnfx::sigmoid_attention runs its Triton kernel"),
    ("triton_sigmoid", SIGMOID, "cpu",
     "Triton kernels run on cuda only; on cpu interpreted Triton is never chosen for speed"),
    ("triton_sigmoid", replace(SIGMOID, dtype="float64"), "cuda",
     "the Triton kernels take float32/float16/bfloat16, not float64"),
    ("triton_sigmoid", LINEAR, "cuda", "triton_sigmoid computes sigmoid attention; this site's weights are linear"),
    ("attnfx_linear", SIGMOID, "cpu", "attnfx_linear computes linear attention; this site's weights are sigmoid"),
    ("attnfx_linear", replace(LINEAR, causal=Causal.TOP_LEFT), "cpu",
     "a causal band needs the chunked order (attnfx_lightning): K^T V would sum keys a query cannot see"),
    ("attnfx_linear", replace(LINEAR, decay=True), "cpu",
     "no attnfx linear algorithm takes a decay without a causal band"),
    ("attnfx_lightning", SPEC, "cuda", "attnfx_lightning computes linear attention; this site's weights are softmax"),
    ("attnfx_lightning", LINEAR, "cpu",
     "no causal band: the right-to-left order (attnfx_linear) computes this site in one state"),
    ("attnfx_chunked", replace(SPEC, dropout_p=0.1), "cpu",
     "attnfx::attention has no dropout (sdpa fuses training dropout)"),
    ("triton_sigmoid", replace(SIGMOID, dropout_p=0.1), "cuda",
     "attnfx::sigmoid_attention has no dropout (sdpa fuses training dropout)"),
    ("attnfx_lightning", replace(LINEAR, causal=Causal.TOP_LEFT, dropout_p=0.1), "cpu",
     "attnfx::linear_attention has no dropout (sdpa fuses training dropout)"),
])
def test_refusals_of_other_kinds(variant, spec, device, reason):
    assert get_variant(variant).refusal(spec, device) == reason


DECODE = Case(heads=8, kv_heads=2, q_len=1, kv_len=45, causal="bottom_right")


@pytest.mark.parametrize("bias", [None, "B11N"])
def test_sdpa_runs_a_decode_steps_bottom_right_diagonal_unmasked(bias):
    """One query row sees every key under a bottom-right diagonal: SDPA takes it with no flag."""
    case = DECODE.with_(batch=2, bias=bias)
    spec = case.spec("float32")
    assert not spec.diagonal_hides_keys and get_variant("sdpa").refusal(spec, "cpu") is None
    t = case.tensors()
    call = get_variant("sdpa").call(spec, operands(t))
    assert call.args[3] is t.get("BIAS") and call.args[5] is False  # the mask as given, is_causal off
    assert_close(call.run(), reference(case, t), "float32")


@pytest.mark.parametrize("spec", [DECODE.with_(q_len=2).spec(), replace(DECODE.spec(), dynamic=frozenset({"q_len"}))],
                         ids=["two_rows", "dynamic_rows"])
def test_sdpa_refuses_a_bottom_right_diagonal_that_can_hide_keys(spec):
    assert spec.diagonal_hides_keys
    assert get_variant("sdpa").refusal(spec, "cpu") == (
        "SDPA's is_causal is top-left aligned and this site's diagonal is bottom-right with M != N")
