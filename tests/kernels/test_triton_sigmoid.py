"""The Triton flash kernels with sigmoid weights (attnfx::sigmoid_attention on CUDA), run by Triton's
interpreter on CPU tensors at small awkward sizes, against the float64 oracle."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import COMBINED, FEATURES, Case, assert_close, reference, reference_grads
from attnfx.errors import KernelUnavailable

pytest.importorskip("triton")
from attnfx.kernels.triton_flash_bwd import sigmoid_flash_backward  # noqa: E402
from attnfx.kernels.triton_flash_fwd import sigmoid_flash_forward  # noqa: E402

LOGIT_BIAS = 0.8
ALL = {name: case.with_(kind="sigmoid", logit_bias=LOGIT_BIAS) for name, case in {**FEATURES, **COMBINED}.items()}


def grads(case: Case, t: dict[str, torch.Tensor], grad_out: torch.Tensor, **blocks) -> dict[str, torch.Tensor]:
    bias_grad = "BIAS" in t
    dq, dk, dv, dbias = sigmoid_flash_backward(grad_out, *case.launch_args(t), LOGIT_BIAS, bias_grad, **blocks)
    return {"Q": dq, "K": dk, "V": dv, **({"BIAS": dbias} if bias_grad else {})}


def check_gradients(case: Case, **blocks) -> None:
    t = case.tensors()
    grad_out = torch.randn(case.batch, case.heads, case.q_len, case.f).to(t["Q"].dtype)
    expected = reference_grads(case, t, grad_out.double())
    for n, g in grads(case, t, grad_out, **blocks).items():
        assert g.dtype == t[n].dtype
        assert_close(g, expected[n], case.dtype, what=f"d{n}")


@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("q_len,kv_len", [(m, n) for m in (1, 37, 128) for n in (1, 37, 128)])
def test_sizes_match_oracle(q_len, kv_len, head_dim):
    case = Case(q_len=q_len, kv_len=kv_len, head_dim=head_dim, causal="bottom_right", kind="sigmoid",
                logit_bias=LOGIT_BIAS)
    t = case.tensors()
    assert_close(sigmoid_flash_forward(*case.launch_args(t), LOGIT_BIAS), reference(case, t), "float32")


@pytest.mark.parametrize("name", list(ALL))
def test_features_match_oracle(name):
    case = ALL[name]
    t = case.tensors()
    assert_close(sigmoid_flash_forward(*case.launch_args(t), LOGIT_BIAS), reference(case, t), "float32")


@pytest.mark.parametrize("name", list(ALL))
def test_gradients_match_oracle(name):
    check_gradients(ALL[name])


@pytest.mark.parametrize("name", ["causal_bottom_right_m_gt_n", "window_top_left", "all_additive_gqa", "all_bool_mqa"])
def test_small_blocks_skip_nothing_they_need(name):
    case = ALL[name]
    t = case.tensors()
    out = sigmoid_flash_forward(*case.launch_args(t), LOGIT_BIAS, block_m=16, block_n=16)
    assert_close(out, reference(case, t), "float32")
    check_gradients(case, block_m=16, block_n=16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    case = ALL["all_additive_gqa"].with_(dtype=dtype)
    t = case.tensors()
    out = sigmoid_flash_forward(*case.launch_args(t), LOGIT_BIAS)
    assert out.dtype == t["Q"].dtype
    assert_close(out, reference(case, t), dtype)
    check_gradients(case)


def test_keys_no_query_can_see_are_never_read():
    case = Case(q_len=37, kv_len=232, causal="bottom_right", window=20, kind="sigmoid", logit_bias=LOGIT_BIAS)
    t = case.tensors()
    poisoned = {n: t[n].clone() for n in ("K", "V")}
    for x in poisoned.values():
        x[:, :, :128] = float("nan")  # before every window (the first query sees keys 176..195)
    args = case.launch_args({**t, **poisoned})
    out = sigmoid_flash_forward(*args, LOGIT_BIAS, block_m=16, block_n=16)
    assert_close(out, reference(case, t), "float32")
    dq, dk, dv, _ = sigmoid_flash_backward(torch.ones_like(out), *args, LOGIT_BIAS, False, block_m=16, block_n=16)
    assert_close(dq, reference_grads(case, t, torch.ones_like(out))["Q"], "float32", what="dQ")
    assert torch.equal(dk[:, :, :128], torch.zeros_like(dk[:, :, :128]))


@pytest.mark.parametrize("launch,kernel", [
    (lambda case, t: sigmoid_flash_forward(*case.launch_args(t), LOGIT_BIAS), "sigmoid forward"),
    (lambda case, t: sigmoid_flash_backward(t["Q"], *case.launch_args(t), LOGIT_BIAS, False), "sigmoid backward"),
])
def test_float64_is_kernel_unavailable(launch, kernel):
    case = Case(q_len=4, kv_len=8, dtype="float64", kind="sigmoid")
    with pytest.raises(KernelUnavailable) as err:
        launch(case, case.tensors())
    assert str(err.value) == f"attnfx {kernel} kernel: the Triton kernels take float32/float16/bfloat16, not float64"
