"""attnfx's kernels as rewrite targets: what each variant refuses, and that its Call runs the site."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernel_cases import COMBINED, FEATURES, Case, assert_close, reference
from attnfx.cost_model import AttentionSpec
from attnfx.kernels import VARIANTS, Operands, get_variant

ALL = {**FEATURES, **COMBINED}


def operands(t: dict[str, torch.Tensor]) -> Operands:
    return Operands(q=t["Q"], k=t["K"], v=t["V"], mask=t.get("BIAS", t.get("MASK")), slopes=t.get("SLOPES"),
                    kv_lengths=t.get("KV_LENGTHS"))


def test_registered_in_order_with_their_cascades():
    assert [(v.name, v.algorithm, v.exact) for v in VARIANTS[1:]] == [
        ("attnfx_chunked", "chunked", True), ("triton_flash", "flash", True),
        ("triton_decode", "decode_split_kv", True), ("flex", "flex", True), ("padded", "padded", True),
        ("attnfx_bounded", "bounded", True)]


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
    extra = Operands(q=t["Q"], k=t["K"], v=t["V"], mask=torch.zeros(1), slopes=torch.zeros(2),
                     kv_lengths=torch.zeros(1))
    call = get_variant("triton_flash").call(case.spec("float32"), extra)
    assert call.args[3:] == (None, None, None, 0.5, "bottom_right", 8, 3.0)


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
