"""attnfx::attention's CPU implementation (the chunked pure-torch kernel) against the oracle."""
from __future__ import annotations

import math

import pytest
import torch

import attnfx.kernels  # noqa: F401  (registers torch.ops.attnfx)
from kernel_cases import (COMBINED, FEATURES, Case, LargestOutput, assert_close, finfo_min_mask_case, reference,
                          reference_grads)
from attnfx.kernels.attention_args import Dims
from attnfx.kernels.chunked import chunk_sizes, chunked_backward, chunked_forward

SIZES = [(m, n) for m in (1, 37, 128, 232) for n in (1, 37, 128, 232)]


def run_op(case: Case, t: dict[str, torch.Tensor]):
    return torch.ops.attnfx.attention(*case.op_args(t))


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("q_len,kv_len", SIZES)
def test_sizes_match_oracle(q_len, kv_len, head_dim, causal):
    case = Case(q_len=q_len, kv_len=kv_len, head_dim=head_dim, causal=causal)
    t = case.tensors()
    assert_close(run_op(case, t)[0], reference(case, t), "float32")


@pytest.mark.parametrize("name", [*FEATURES, *COMBINED])
def test_features_match_oracle(name):
    case = {**FEATURES, **COMBINED}[name]
    t = case.tensors()
    assert_close(run_op(case, t)[0], reference(case, t), "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("name", ["plain", "all_additive_gqa", "all_bool_mqa"])
def test_dtypes_match_oracle(name, dtype):
    case = {**FEATURES, **COMBINED}[name].with_(dtype=dtype)
    t = case.tensors()
    out, lse = run_op(case, t)
    assert out.dtype == t["Q"].dtype
    assert lse.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert_close(out, reference(case, t), dtype)


@pytest.mark.parametrize("name", [*FEATURES, *COMBINED])
def test_gradients_match_oracle(name):
    case = {**FEATURES, **COMBINED}[name]
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V", "BIAS") if n in t}
    out, _ = run_op(case, {**t, **leaves})
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = reference_grads(case, t, grad_out)
    for n, leaf in leaves.items():
        assert_close(leaf.grad, expected[n], "float32", what=f"d{n}")


def test_gradcheck_every_feature_in_float64():
    case = COMBINED["all_additive_gqa"].with_(q_len=5, kv_len=9, head_dim=4, window=4, dtype="float64")
    t = case.tensors()
    t["BIAS"] = case.with_(key_padding=False).tensors()["BIAS"]
    t["BIAS"] = case.pad_keys(t["BIAS"], [9, 7])  # no fully masked row: its lse (-inf) has no derivative
    args = case.op_args(t)

    def f(q, k, v, bias):
        return torch.ops.attnfx.attention(q, k, v, bias, *args[4:])

    leaves = [x.clone().requires_grad_() for x in args[:4]]
    assert torch.autograd.gradcheck(f, leaves)


def test_lse_is_the_log_sum_exp_of_the_scores_and_minus_inf_on_empty_rows():
    case = Case(batch=2, q_len=37, kv_len=100, causal="bottom_right", key_padding=True, dtype="float64")
    t = case.tensors()
    t["MASK"] = case.pad_keys(torch.ones(case.bias_shape, dtype=torch.bool), [100, 0])
    _, lse = run_op(case, t)
    s = case.scale_value * t["Q"] @ t["K"].transpose(-1, -2)  # (b, h, m, n)
    keep = torch.arange(100).view(1, -1) <= torch.arange(37).view(-1, 1) + 63
    expected = torch.logsumexp(s.masked_fill(~keep, -math.inf), dim=-1)
    assert_close(lse[0], expected[0], "float64")
    assert torch.equal(lse[1], torch.full_like(lse[1], -math.inf))


def test_fully_masked_rows_give_zero_and_zero_gradients():
    case = FEATURES["key_padding"]  # batch 2 has no keys
    t = case.tensors()
    q = t["Q"].clone().requires_grad_()
    out, _ = torch.ops.attnfx.attention(q, *case.op_args(t)[1:])
    out.sum().backward()
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(q.grad[2], torch.zeros_like(q.grad[2]))


def test_lse_gradient_is_the_softmax_weighted_keys():
    # d(sum lse)/dq = scale * softmax(s) @ K, which is the oracle's output with V := K
    case = COMBINED["causal_bias_gqa"].with_(dtype="float64")
    t = case.tensors()
    q = t["Q"].clone().requires_grad_()
    _, lse = torch.ops.attnfx.attention(q, *case.op_args(t)[1:])
    lse.sum().backward()
    expected = case.scale_value * reference(case, {**t, "V": t["K"]})
    assert_close(q.grad, expected, "float64")


def test_bias_of_fewer_dims_broadcasts_and_gets_its_own_shape_back():
    case = Case(q_len=37, kv_len=100, bias="11MN")
    t = case.tensors()
    bias = t["BIAS"][0, 0].clone().requires_grad_()  # (m, n)
    out, _ = torch.ops.attnfx.attention(t["Q"], t["K"], t["V"], bias, *case.op_args(t)[4:])
    assert_close(out, reference(case, t), "float32")
    out.sum().backward()
    assert bias.grad.shape == (37, 100)


@pytest.mark.parametrize("budget", [1, 64, 1000])
def test_small_budgets_give_the_same_result(budget):
    case = COMBINED["all_additive_gqa"]
    t = case.tensors()
    args = case.launch_args(t)
    out, lse = chunked_forward(*args, budget=budget)
    assert_close(out, reference(case, t), "float32")
    grad_out = torch.randn_like(out)
    dq, dk, dv, dbias = chunked_backward(grad_out, None, *args, out, lse, True, budget=budget)
    expected = reference_grads(case, t, grad_out)
    for name, grad in zip(("Q", "K", "V", "BIAS"), (dq, dk, dv, dbias)):
        assert_close(grad, expected[name], "float32", what=f"d{name}")


def test_rows_covered_by_a_finfo_min_mask_average_like_the_oracle():
    case, t = finfo_min_mask_case()
    q = t["Q"].clone().requires_grad_()
    out = torch.ops.attnfx.attention(q, *case.op_args(t)[1:])[0]
    assert_close(out, reference(case, t), "float32")
    assert out[:, :, :4].abs().sum() > 0
    grad_out = torch.randn_like(out)
    grad_out[:, :, :4] = 0  # those rows' lse is finfo.min: only their forward is exact
    out.backward(grad_out)
    assert_close(q.grad, reference_grads(case, t, grad_out)["Q"], "float32")


def test_no_intermediate_exceeds_the_score_budget():
    case = Case(batch=1, heads=2, q_len=232, kv_len=232, head_dim=16, causal="bottom_right", bias="1HMN",
                softcap=2.0, alibi=True)
    t = case.tensors()
    args = case.launch_args(t)
    budget = 2048
    bound = max(budget, t["Q"].numel(), t["K"].numel())  # a chunk, or one of q/k/v/out/dq/dk/dv
    assert 2 * 232 * 232 > 10 * bound  # the whole (b, h, m, n) scores would break the bound
    with LargestOutput() as fwd:
        out, lse = chunked_forward(*args, budget=budget)
    with LargestOutput() as bwd:
        chunked_backward(torch.ones_like(out), None, *args, out, lse, False, budget=budget)
    assert fwd.largest <= bound
    assert bwd.largest <= bound


@pytest.mark.parametrize("batch,heads,q_len,kv_len,budget", [
    (1, 2, 232, 232, 2048), (4, 8, 1, 10_000, 1 << 22), (2, 4, 4096, 4096, 1 << 16), (64, 64, 8, 8, 100),
])
def test_chunk_sizes_respect_the_budget(batch, heads, q_len, kv_len, budget):
    dims = Dims(batch, heads, heads, q_len, kv_len, 64, 64)
    mc, nc = chunk_sizes(dims, budget)
    assert 1 <= mc <= q_len and 1 <= nc <= kv_len
    assert batch * heads * mc * nc <= max(budget, batch * heads)
