"""attnfx::bounded_attention: exact against the float64 oracle with attnfx::attention's lse, rows
whose bound overshoots recomputed (and only then), gradients, opcheck, refusals."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_cases import COMBINED, FEATURES, Case, assert_close, reference, reference_grads
from attnfx.cost_model import AttentionSpec, MaskInput
from attnfx.kernels import Operands, get_variant
from attnfx.kernels.bounded import bounded_forward

OP = torch.ops.attnfx.bounded_attention
CASES = {name: case for name, case in {**FEATURES, **COMBINED}.items() if case.bias is None and not case.key_padding}


def _args(case: Case, t: dict) -> tuple:
    return case.op_args(t)


class _Ops(TorchDispatchMode):
    """Counts the ops a (Python-level) forward runs."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_output_and_lse_are_attnfx_attentions(name, dtype):
    case = CASES[name].with_(dtype=dtype)
    t = case.tensors()
    out, lse = OP(*_args(case, t))
    assert_close(out, reference(case, t), dtype, name)
    _, expected_lse = torch.ops.attnfx.attention(*case.op_args({n: x.double() if x.is_floating_point() else x
                                                                 for n, x in t.items()}))
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close(lse[finite], expected_lse[finite].to(lse.dtype), "float64" if dtype == "float64" else "float32")


def test_a_bound_that_overshoots_is_recomputed_exactly():
    # every key orthogonal to every query but the last key: |q||k| overshoots the scores by ~1e4
    case = Case(q_len=20, kv_len=30, head_dim=16, causal="bottom_right", scale=1.0)
    t = case.tensors()
    t["Q"] = torch.zeros_like(t["Q"]).index_fill_(-1, torch.tensor([0]), 100.0) + 0.01 * t["Q"]
    t["K"] = torch.zeros_like(t["K"]).index_fill_(-1, torch.tensor([1]), 100.0) + 0.01 * t["K"]
    with _Ops() as ops:
        out, _ = bounded_forward(*_args(case, t))
    assert ops.counts["attnfx.attention.default"] == 1
    assert_close(out, reference(case, t), "float32")


def test_an_ordinary_site_never_falls_back():
    case = COMBINED["alibi_softcap_padding"].with_(key_padding=False)
    with _Ops() as ops:
        bounded_forward(*_args(case, case.tensors()))
    assert ops.counts["attnfx.attention.default"] == 0 and ops.counts["aten.exp2_.default"] > 0


def test_gradients_match_the_oracle():
    case = Case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=100, causal="bottom_right", window=30, softcap=2.0,
                alibi=True)
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V")}
    out, _ = OP(*_args(case, {**t, **leaves}))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = reference_grads(case, t, grad)
    for name, leaf in leaves.items():
        assert_close(leaf.grad, expected[name], "float32", f"d{name}")


def test_bias_is_refused_by_the_op():
    case = Case(key_padding=True, batch=2)
    with pytest.raises(ValueError, match=r"attnfx::bounded_attention takes no bias \(attnfx::attention does\)"):
        OP(*_args(case, case.tensors()))


def test_opcheck():
    case = CASES["window_bottom_right"]
    torch.library.opcheck(OP.default, _args(case, case.tensors()))


SPEC = AttentionSpec(1, 8, 8, 128, 128, 64, 64)


@pytest.mark.parametrize("spec,device,reason", [
    (SPEC, "cpu", None),
    (SPEC, "cuda", "attnfx_bounded is a CPU kernel; on cuda attnfx::attention runs its Triton kernels"),
    (replace(SPEC, mask=MaskInput.ADDITIVE, mask_shape=(1, 1, 128, 128)), "cpu",
     "attnfx_bounded takes no mask tensor (attnfx_chunked does)"),
])
def test_refusals(spec, device, reason):
    assert get_variant("attnfx_bounded").refusal(spec, device) == reason


def test_the_call_computes_the_site():
    case = COMBINED["alibi_softcap_padding"].with_(key_padding=False)
    t = case.tensors()
    call = get_variant("attnfx_bounded").call(case.spec("float32"), Operands(q=t["Q"], k=t["K"], v=t["V"],
                                                                            slopes=t["SLOPES"]))
    assert call.target is OP.default and call.output_index == 0
    assert_close(call.run(), reference(case, t), "float32")


def test_dropout_is_refused_by_every_new_variant():
    spec = replace(SPEC, dropout_p=0.1)
    assert get_variant("attnfx_bounded").refusal(spec, "cpu") == (
        "attnfx::bounded_attention has no dropout (sdpa fuses training dropout)")
    assert get_variant("flex").refusal(spec, "cpu") == (
        "attnfx::flex_attention has no dropout (sdpa fuses training dropout)")
    keyed = replace(spec, mask=MaskInput.BOOL, mask_shape=(1, 1, 1, 128))
    assert get_variant("padded").refusal(keyed, "cpu") == (
        "attnfx::padded_attention has no dropout (sdpa fuses training dropout)")
