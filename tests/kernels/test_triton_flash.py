"""The Triton flash forward and backward launchers, run by Triton's interpreter on CPU tensors."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import COMBINED, FEATURES, Case, assert_close, finfo_min_mask_case, reference, reference_grads

pytest.importorskip("triton")
from attnfx.kernels.triton_flash_bwd import flash_backward  # noqa: E402
from attnfx.kernels.triton_flash_fwd import flash_forward  # noqa: E402

SIZES = [(m, n) for m in (1, 37, 128, 232) for n in (1, 37, 128, 232)]


def backward(case: Case, t: dict[str, torch.Tensor], grad_out: torch.Tensor, **blocks) -> dict[str, torch.Tensor]:
    args = case.launch_args(t)
    out, lse = flash_forward(*args, **blocks)
    bias_grad = "BIAS" in t
    dq, dk, dv, dbias = flash_backward(grad_out, None, *args, out, lse, bias_grad, **blocks)
    grads = {"Q": dq, "K": dk, "V": dv}
    if bias_grad:
        grads["BIAS"] = dbias
    return grads


@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("q_len,kv_len", SIZES)
def test_sizes_match_oracle(q_len, kv_len, head_dim):
    case = Case(q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    t = case.tensors()
    assert_close(flash_forward(*case.launch_args(t))[0], reference(case, t), "float32")


@pytest.mark.parametrize("head_dim,value_dim", [(16, 16), (80, 80), (96, 40), (256, 256)])
@pytest.mark.parametrize("q_len,kv_len", [(37, 232), (232, 37)])
def test_head_dims_are_padded_to_a_power_of_two(q_len, kv_len, head_dim, value_dim):
    case = Case(heads=1, kv_heads=1, q_len=q_len, kv_len=kv_len, head_dim=head_dim, value_dim=value_dim,
                causal="bottom_right")
    t = case.tensors()
    assert_close(flash_forward(*case.launch_args(t))[0], reference(case, t), "float32")


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("q_len,kv_len", [(1, 232), (37, 128), (128, 37), (232, 232)])
def test_causal_with_small_blocks_skips_nothing_it_needs(q_len, kv_len, causal):
    case = Case(q_len=q_len, kv_len=kv_len, causal=causal)
    t = case.tensors()
    out, _ = flash_forward(*case.launch_args(t), block_m=16, block_n=16)
    assert_close(out, reference(case, t), "float32")


@pytest.mark.parametrize("name", [*FEATURES, *COMBINED])
def test_features_match_oracle(name):
    case = {**FEATURES, **COMBINED}[name]
    t = case.tensors()
    out, lse = flash_forward(*case.launch_args(t))
    assert_close(out, reference(case, t), "float32")
    assert lse.dtype == torch.float32 and lse.shape == out.shape[:3]


@pytest.mark.parametrize("name", ["window_bottom_right", "all_additive_gqa", "all_bool_mqa"])
def test_windows_with_small_blocks_start_at_the_right_block(name):
    case = {**FEATURES, **COMBINED}[name]
    t = case.tensors()
    assert_close(flash_forward(*case.launch_args(t), block_m=16, block_n=16)[0], reference(case, t), "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["plain", "all_additive_gqa", "all_bool_mqa"])
def test_half_precision_matches_oracle(name, dtype):
    case = {**FEATURES, **COMBINED}[name].with_(dtype=dtype)
    t = case.tensors()
    out, _ = flash_forward(*case.launch_args(t))
    assert out.dtype == t["Q"].dtype
    assert_close(out, reference(case, t), dtype)


def test_matches_the_cpu_implementation_lse_included():
    case = COMBINED["all_additive_gqa"]
    t = case.tensors()
    out, lse = flash_forward(*case.launch_args(t))
    cpu_out, cpu_lse = torch.ops.attnfx.attention(*case.op_args(t))
    assert_close(out, cpu_out, "float32")
    torch.testing.assert_close(lse, cpu_lse, atol=1e-5, rtol=1e-5)  # -inf rows included


def test_strided_inputs_are_read_in_place():
    case = Case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=100, bias="1HMN")
    t = case.tensors()
    # (b, m, h, e) storage seen as (b, h, m, e), as a model's projections leave it
    strided = {n: t[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("Q", "K", "V")}
    assert not strided["Q"].is_contiguous()
    assert_close(flash_forward(*case.launch_args({**t, **strided}))[0], reference(case, t), "float32")


@pytest.mark.parametrize("name", [*FEATURES, *COMBINED])
def test_gradients_match_oracle(name):
    case = {**FEATURES, **COMBINED}[name]
    t = case.tensors()
    grad_out = torch.randn(case.batch, case.heads, case.q_len, case.f)
    grads = backward(case, t, grad_out)
    expected = reference_grads(case, t, grad_out)
    for n, g in grads.items():
        assert_close(g, expected[n], "float32", what=f"d{n}")


@pytest.mark.parametrize("name", ["causal_bottom_right_m_gt_n", "window_top_left", "all_additive_gqa",
                                  "all_bool_mqa"])
def test_gradients_with_small_blocks(name):
    case = {**FEATURES, **COMBINED}[name]
    t = case.tensors()
    grad_out = torch.randn(case.batch, case.heads, case.q_len, case.f)
    grads = backward(case, t, grad_out, block_m=16, block_n=16)
    expected = reference_grads(case, t, grad_out)
    for n, g in grads.items():
        assert_close(g, expected[n], "float32", what=f"d{n}")


@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("q_len,kv_len", [(1, 232), (37, 1), (128, 37), (232, 128)])
def test_gradients_at_awkward_sizes(q_len, kv_len, head_dim):
    case = Case(heads=2, kv_heads=1, q_len=q_len, kv_len=kv_len, head_dim=head_dim, causal="bottom_right")
    t = case.tensors()
    grad_out = torch.randn(case.batch, case.heads, case.q_len, case.f)
    grads = backward(case, t, grad_out)
    expected = reference_grads(case, t, grad_out)
    for n, g in grads.items():
        assert_close(g, expected[n], "float32", what=f"d{n}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradients(dtype):
    case = COMBINED["all_additive_gqa"].with_(dtype=dtype)
    t = case.tensors()
    grad_out = torch.randn(case.batch, case.heads, case.q_len, case.f).to(t["Q"].dtype)
    grads = backward(case, t, grad_out)
    expected = reference_grads(case, t, grad_out)
    for n, g in grads.items():
        assert g.dtype == t[n].dtype
        assert_close(g, expected[n], dtype, what=f"d{n}")


def test_lse_gradient_folds_into_delta():
    case = COMBINED["causal_bias_gqa"]
    t = case.tensors()
    args = case.launch_args(t)
    out, lse = flash_forward(*args)
    dq, *_ = flash_backward(torch.zeros_like(out), torch.ones_like(lse), *args, out, lse, False)
    expected = case.scale_value * reference(case, {**t, "V": t["K"]})  # d(sum lse)/dq = scale * P @ K
    assert_close(dq, expected, "float32")


POISONED = {  # keys no query can see, whole blocks of them: a kernel that skips them never reads them
    "causal_top_left": (Case(q_len=37, kv_len=232, causal="top_left"), (slice(None), slice(64, None))),
    "window": (Case(q_len=37, kv_len=232, causal="bottom_right", window=20), (slice(None), slice(0, 128))),
}


@pytest.mark.parametrize("blocks", [{}, {"block_m": 16, "block_n": 16}])
@pytest.mark.parametrize("name", list(POISONED))
def test_skipped_key_blocks_are_never_read(name, blocks):
    case, (batch, keys) = POISONED[name]
    t = case.tensors()
    poisoned = {n: t[n].clone() for n in ("K", "V")}
    for x in poisoned.values():
        x[batch, :, keys] = float("nan")
    args = case.launch_args({**t, **poisoned})
    out, lse = flash_forward(*args, **blocks)
    assert_close(out, reference(case, t), "float32")
    dq, dk, dv, _ = flash_backward(torch.ones_like(out), None, *args, out, lse, False, **blocks)
    expected = reference_grads(case, t, torch.ones_like(out))
    assert_close(dq, expected["Q"], "float32", what="dQ")
    assert torch.equal(dk[batch, :, keys], torch.zeros_like(dk[batch, :, keys]))
    assert torch.equal(dv[batch, :, keys], torch.zeros_like(dv[batch, :, keys]))


def test_rows_covered_by_a_finfo_min_mask_average_like_the_oracle():
    case, t = finfo_min_mask_case()
    out, lse = flash_forward(*case.launch_args(t))
    assert_close(out, reference(case, t), "float32")
    assert out[:, :, :4].abs().sum() > 0
    # NOTE: such a row's lse is finfo.min (fp32 absorbs log l), so only its forward is exact; as in
    # Hugging Face training, where padding rows get no gradient, the other rows' gradients are.
    grad_out = torch.randn_like(out)
    grad_out[:, :, :4] = 0
    expected = reference_grads(case, t, grad_out)
    args = case.launch_args(t)
    grads = flash_backward(grad_out, None, *args, out, lse, False)
    for name, grad in zip("QKV", grads):
        assert_close(grad, expected[name], "float32", what=f"d{name}")
