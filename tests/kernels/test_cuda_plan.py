"""A plan made for CUDA on a CPU machine: the variants take the target device (not the example
inputs' device), and what they emit still runs on CPU tensors, exactly, for verification."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import COMBINED, FEATURES, assert_close, reference
from attnfx.cost_model import select
from attnfx.cost_model.hardware import H100_SXM
from attnfx.cost_model.select import Option
from attnfx.kernels import VARIANTS, Operands, get_variant

CASES = {**FEATURES, **COMBINED}


def _operands(t: dict[str, torch.Tensor]) -> Operands:
    return Operands(q=t["Q"], k=t["K"], v=t["V"], mask=t.get("BIAS", t.get("MASK")), slopes=t.get("SLOPES"))


@pytest.mark.parametrize("name", ["softcap", "window_bottom_right", "alibi_softcap_padding",
                                  "all_additive_gqa"])
def test_a_cuda_plan_runs_on_cpu_tensors(name):
    case = CASES[name]
    spec = case.spec("float32")
    options = [Option(v.name, v.algorithm, spec, "canonical", v.refusal(spec, "cuda")) for v in VARIANTS]
    winner = select(options, target=H100_SXM).winner
    assert winner is not None and winner.option.variant == "triton_flash"
    t = case.tensors()
    call = get_variant(winner.option.variant).call(spec, _operands(t))
    assert call.target.name() == "attnfx::attention"  # the CPU implementation runs it here
    assert_close(call.run(), reference(case, t), "float32")


def test_cpu_only_variants_say_so_for_cuda():
    spec = FEATURES["plain"].spec("float32")
    assert get_variant("attnfx_chunked").refusal(spec, "cuda") == (
        "attnfx_chunked is attnfx's CPU kernel; on cuda attnfx::attention runs its Triton kernels")
    assert get_variant("flex").refusal(spec, "cuda") == (
        "attnfx offers FlexAttention on CPU only; on cuda attnfx::attention runs its own Triton kernels")
