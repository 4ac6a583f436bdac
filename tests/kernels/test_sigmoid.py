"""attnfx::sigmoid_attention: the op, its chunked CPU implementation and its registrations, against
the float64 oracle."""
from __future__ import annotations

import pytest
import torch

import attnfx.kernels  # noqa: F401  (registers torch.ops.attnfx)
from kernel_cases import COMBINED, FEATURES, Case, LargestOutput, assert_close, reference, reference_grads
from attnfx.cost_model.tiles import SCORE_BUDGET
from attnfx.kernels import sigmoid_ops
from attnfx.kernels.chunked_sigmoid import sigmoid_backward, sigmoid_forward

OP = torch.ops.attnfx.sigmoid_attention.default
BACKWARD = torch.ops.attnfx.sigmoid_attention_backward.default
LOGIT_BIAS = -1.7
ALL = {name: case.with_(kind="sigmoid", logit_bias=LOGIT_BIAS) for name, case in {**FEATURES, **COMBINED}.items()}


def test_schemas():
    assert str(OP._schema) == (
        "attnfx::sigmoid_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, "
        "float scale, str causal, int window, float softcap, float logit_bias) -> Tensor")
    assert str(BACKWARD._schema).endswith(
        "float logit_bias, bool bias_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)")


@pytest.mark.parametrize("name", list(ALL))
def test_features_match_oracle(name):
    case = ALL[name]
    t = case.tensors()
    assert_close(OP(*case.op_args(t)), reference(case, t), "float32")


@pytest.mark.parametrize("name", list(ALL))
def test_gradients_match_oracle(name):
    case = ALL[name]
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V", "BIAS") if n in t}
    out = OP(*case.op_args({**t, **leaves}))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = reference_grads(case, t, grad_out)
    for n, leaf in leaves.items():
        assert_close(leaf.grad, expected[n], "float32", what=f"d{n}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("name", ["plain", "all_additive_gqa", "all_bool_mqa"])
def test_dtypes_match_oracle(name, dtype):
    case = ALL[name].with_(dtype=dtype)
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V")}
    out = OP(*case.op_args({**t, **leaves}))
    assert out.dtype == t["Q"].dtype
    assert_close(out, reference(case, t), dtype)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    expected = reference_grads(case, t, grad_out.to(out.dtype).double())
    for n, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, expected[n], dtype, what=f"d{n}")


def test_gradcheck_every_feature_in_float64():
    case = ALL["all_additive_gqa"].with_(q_len=5, kv_len=9, head_dim=4, window=4, dtype="float64")
    t = case.tensors()
    args = case.op_args(t)

    def f(q, k, v, bias):
        return OP(q, k, v, bias, *args[4:])

    assert torch.autograd.gradcheck(f, [x.clone().requires_grad_() for x in args[:4]])


def test_rows_that_see_no_key_are_zero_with_zero_gradients():
    case = ALL["key_padding"]  # batch 2 has no keys
    t = case.tensors()
    q = t["Q"].clone().requires_grad_()
    out = OP(q, *case.op_args(t)[1:])
    out.sum().backward()
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(q.grad[2], torch.zeros_like(q.grad[2]))


@pytest.mark.parametrize("budget", [1, 64, 1000])
def test_small_budgets_give_the_same_result(budget):
    case = ALL["all_additive_gqa"]
    t = case.tensors()
    args = case.launch_args(t)
    out = sigmoid_forward(*args, LOGIT_BIAS, budget=budget)
    assert_close(out, reference(case, t), "float32")
    grad_out = torch.randn_like(out)
    grads = sigmoid_backward(grad_out, *args, LOGIT_BIAS, True, budget=budget)
    expected = reference_grads(case, t, grad_out)
    for name, grad in zip(("Q", "K", "V", "BIAS"), grads):
        assert_close(grad, expected[name], "float32", what=f"d{name}")


def test_no_intermediate_exceeds_the_score_budget():
    case = Case(batch=1, heads=2, q_len=232, kv_len=232, causal="bottom_right", bias="1HMN", softcap=2.0,
                alibi=True, kind="sigmoid", logit_bias=LOGIT_BIAS)
    t = case.tensors()
    args = case.launch_args(t)
    budget = 2048
    bound = max(budget, t["Q"].numel(), t["K"].numel())  # a chunk, or one of q/k/v/out/dq/dk/dv
    assert 2 * 232 * 232 > 10 * bound
    with LargestOutput() as fwd:
        out = sigmoid_forward(*args, LOGIT_BIAS, budget=budget)
    with LargestOutput() as bwd:
        sigmoid_backward(torch.ones_like(out), *args, LOGIT_BIAS, False, budget=budget)
    assert fwd.largest <= bound
    assert bwd.largest <= bound


def test_memory_is_linear_in_the_length_at_4096():
    # NOTE: the default budget, a real length: 4096^2 scores per head would be 8x the largest tensor
    case = Case(batch=1, heads=2, q_len=4096, kv_len=4096, head_dim=16, causal="top_left", kind="sigmoid")
    t = case.tensors()
    with LargestOutput() as fwd:
        out = OP(*case.op_args(t))
    assert fwd.largest <= max(SCORE_BUDGET, t["Q"].numel())
    assert 2 * 4096 * 4096 >= 32 * fwd.largest
    first_rows = case.with_(q_len=64)  # top-left: the first 64 rows see the same keys
    assert_close(out[:, :, :64], reference(first_rows, {**t, "Q": t["Q"][:, :, :64]}), "float32")


@pytest.mark.parametrize("name", ["plain", "bool_mask", "key_padding", "softcap"])
def test_opcheck_forward(name):
    case = ALL[name]
    t = case.tensors()
    args = list(case.op_args(t))
    for i in range(3):
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(OP, tuple(args))


def test_opcheck_forward_with_every_feature():
    case = ALL["all_additive_gqa"].with_(q_len=5, kv_len=9, window=4)
    args = [x.clone().requires_grad_() if i < 4 else x for i, x in enumerate(case.op_args(case.tensors()))]
    torch.library.opcheck(OP, tuple(args))


@pytest.mark.parametrize("bias_grad", [True, False])
def test_opcheck_backward(bias_grad):
    case = ALL["all_additive_gqa"].with_(q_len=5, kv_len=9, window=4)
    args = case.op_args(case.tensors())
    out = OP(*args)
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), *args, bias_grad))


class _Sigmoid(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return OP(q, k, v, bias, None, 0.25, "bottom_right", -1, 2.0, LOGIT_BIAS)


def test_export_with_dynamic_lengths_round_trips(tmp_path):
    case = Case(batch=2, heads=4, kv_heads=2, q_len=7, kv_len=20, causal="bottom_right", bias="1HMN",
                key_padding=True, scale=0.25, softcap=2.0, kind="sigmoid", logit_bias=LOGIT_BIAS)
    t = case.tensors()
    args = (t["Q"], t["K"], t["V"], t["BIAS"])
    m, n = torch.export.Dim("m", min=2, max=512), torch.export.Dim("n", min=2, max=512)
    ep = torch.export.export(_Sigmoid(), args, dynamic_shapes=({2: m}, {2: n}, {2: n}, {2: m, 3: n}))
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"].count(OP) == 1
    torch.export.save(ep, tmp_path / "sigmoid.pt2")
    loaded = torch.export.load(tmp_path / "sigmoid.pt2").module()
    bigger = case.with_(q_len=11, kv_len=40)
    t2 = bigger.tensors(seed=1)
    assert_close(loaded(t2["Q"], t2["K"], t2["V"], t2["BIAS"]), reference(bigger, t2), "float32")


def test_compile_traces_forward_and_backward_through_the_fake_kernels():
    case = ALL["causal_bias_gqa"]
    args = case.op_args(case.tensors())

    def loss(q, k, v, bias):
        return OP(q, k, v, bias, *args[4:]).square().sum()

    compiled = [x.clone().requires_grad_() for x in args[:4]]
    eager = [x.clone().requires_grad_() for x in args[:4]]
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*compiled).backward()
    loss(*eager).backward()
    for a, b in zip(compiled, eager):
        assert_close(a.grad, b.grad, "float32")


def test_cuda_registration_runs_the_triton_kernels():
    pytest.importorskip("triton")
    case = ALL["causal_bias_gqa"]
    t = case.tensors()
    args = case.op_args(t)
    out = sigmoid_ops._sigmoid_attention_cuda(*args)
    assert_close(out, reference(case, t), "float32")
    grads = sigmoid_ops._sigmoid_attention_backward_cuda(torch.ones_like(out), *args, True)
    cpu_grads = sigmoid_ops.sigmoid_attention_backward(torch.ones_like(out), *args, True)
    for g, c in zip(grads, cpu_grads):
        assert_close(g, c, "float32")


@pytest.mark.parametrize("change,message", [
    (dict(causal="diagonal"),
     "attnfx::sigmoid_attention: causal must be one of ['none', 'top_left', 'bottom_right'], got 'diagonal'"),
    (dict(window=4), "attnfx::sigmoid_attention: window must be >= 1 with a causal diagonal; got window=4, "
                     "causal='none'"),
    (dict(bias=torch.zeros(1, 3, 4, 8)),
     "attnfx::sigmoid_attention: bias of shape (1, 3, 4, 8) does not broadcast to (B,H,M,N)=(1, 2, 4, 8)"),
])
def test_malformed_calls_are_value_errors_naming_the_op(change, message):
    case = Case(q_len=4, kv_len=8, kind="sigmoid")
    names = ("q", "k", "v", "bias", "alibi_slopes", "scale", "causal", "window", "softcap",
             "logit_bias")
    args = dict(zip(names, case.op_args(case.tensors())))
    with pytest.raises(ValueError) as err:
        OP(**{**args, **change})
    assert str(err.value) == message
