"""attnfx::attention as a custom op: schema, fake kernel, autograd, export, compile, device routing
and the errors that tell the selection what a kernel cannot take."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import attnfx.kernels  # noqa: F401  (registers torch.ops.attnfx)
from kernel_cases import COMBINED, FEATURES, Case, assert_close, reference
from attnfx.cost_model import AttentionSpec
from attnfx.errors import KernelUnavailable
from attnfx.kernels import attention_ops as ops
from attnfx.cost_model.spec import is_decode_shape

OP = torch.ops.attnfx.attention.default
BACKWARD = torch.ops.attnfx.attention_backward.default


def test_schemas():
    assert str(OP._schema) == (
        "attnfx::attention(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, "
        "float scale, str causal, int window, float softcap) -> (Tensor out, Tensor lse)")
    assert str(BACKWARD._schema).endswith(
        "bool bias_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)")


@pytest.mark.parametrize("name", ["plain", "bool_mask", "key_padding"])
def test_opcheck_forward(name):
    case = FEATURES[name]
    t = case.tensors()
    args = list(case.op_args(t))
    for i in range(3):
        args[i] = args[i].clone().requires_grad_()
    if "BIAS" in t:
        args[3] = args[3].clone().requires_grad_()
    torch.library.opcheck(OP, tuple(args))


def test_opcheck_forward_with_every_feature():
    case = COMBINED["all_additive_gqa"].with_(q_len=5, kv_len=9, window=4)
    t = case.tensors()
    args = [x.clone().requires_grad_() if i < 4 else x for i, x in enumerate(case.op_args(t))]
    torch.library.opcheck(OP, tuple(args))


@pytest.mark.parametrize("bias_grad", [True, False])
def test_opcheck_backward(bias_grad):
    case = COMBINED["all_additive_gqa"].with_(q_len=5, kv_len=9, window=4)
    t = case.tensors()
    args = case.op_args(t)
    out, lse = OP(*args)
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), torch.randn_like(lse), *args[:5], out, lse,
                                     *args[5:], bias_grad))


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return OP(q, k, v, bias, None, 0.25, "bottom_right", -1, 2.0)[0]


def test_export_with_dynamic_lengths_and_save_load_round_trip(tmp_path):
    case = Case(batch=2, heads=4, kv_heads=2, q_len=7, kv_len=20, causal="bottom_right", bias="1HMN",
                key_padding=True, scale=0.25, softcap=2.0)
    t = case.tensors()
    args = (t["Q"], t["K"], t["V"], t["BIAS"])
    m, n = torch.export.Dim("m", min=2, max=512), torch.export.Dim("n", min=2, max=512)
    shapes = ({2: m}, {2: n}, {2: n}, {2: m, 3: n})
    ep = torch.export.export(_Attention(), args, dynamic_shapes=shapes)
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"].count(OP) == 1
    torch.export.save(ep, tmp_path / "attention.pt2")
    loaded = torch.export.load(tmp_path / "attention.pt2").module()
    assert_close(loaded(*args), reference(case, t), "float32")
    bigger = case.with_(q_len=11, kv_len=40)
    t2 = bigger.tensors(seed=1)
    assert_close(loaded(t2["Q"], t2["K"], t2["V"], t2["BIAS"]), reference(bigger, t2), "float32")


def test_compile_traces_forward_and_backward_through_the_fake_kernels():
    case = COMBINED["causal_bias_gqa"]
    t = case.tensors()
    args = case.op_args(t)

    def loss(q, k, v, bias):
        return OP(q, k, v, bias, *args[4:])[0].square().sum()

    leaves = [x.clone().requires_grad_() for x in args[:4]]
    eager = [x.clone().requires_grad_() for x in args[:4]]
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves).backward()
    loss(*eager).backward()
    for a, b in zip(leaves, eager):
        assert_close(a.grad, b.grad, "float32")


def test_cuda_registration_routes_small_m_to_split_kv_and_the_rest_to_flash(monkeypatch):
    pytest.importorskip("triton")
    from attnfx.kernels import triton_decode, triton_flash_fwd

    calls = []
    monkeypatch.setattr(triton_decode, "decode_forward", lambda *a: calls.append("decode") or ("out", "lse"))
    monkeypatch.setattr(triton_flash_fwd, "flash_forward", lambda *a: calls.append("flash") or ("out", "lse"))
    for q_len, kv_len in [(1, 300), (16, 64), (16, 63), (17, 1000), (37, 37)]:
        case = Case(q_len=q_len, kv_len=kv_len)
        ops._attention_cuda(*case.op_args(case.tensors()))
    assert calls == ["decode", "decode", "flash", "flash", "flash"]


def test_cuda_registration_runs_the_triton_kernels():
    pytest.importorskip("triton")
    for case in (FEATURES["causal_bottom_right"], FEATURES["key_padding"].with_(q_len=3)):
        t = case.tensors()
        out, lse = ops._attention_cuda(*case.op_args(t))
        assert_close(out, reference(case, t), "float32")
        args = case.op_args(t)
        grads = ops._attention_backward_cuda(torch.ones_like(out), None, *args[:5], out, lse, *args[5:], False)
        cpu_grads = ops.attention_backward(torch.ones_like(out), None, *args[:5], out, lse, *args[5:], False)
        for g, c in zip(grads[:3], cpu_grads[:3]):
            assert_close(g, c, "float32")


@pytest.mark.parametrize("q_len,kv_len,decode", [
    (1, 1, False), (1, 4, True), (1, 4096, True), (4, 15, False), (4, 16, True), (16, 63, False),
    (16, 64, True), (17, 4096, False), (64, 4096, False)])
def test_decode_rule(q_len, kv_len, decode):
    assert is_decode_shape(q_len, kv_len) is decode
    assert AttentionSpec(1, 2, 2, q_len, kv_len, 64, 64).is_decode is decode


@pytest.mark.parametrize("launcher,kernel", [("triton_flash_fwd.flash_forward", "flash forward"),
                                             ("triton_decode.decode_forward", "split-KV decode")])
@pytest.mark.parametrize("change,reason", [
    (dict(dtype="float64"), "the Triton kernels take float32/float16/bfloat16, not float64"),
    (dict(head_dim=320), "the Triton kernels take head dims up to 256, got E=320 F=320"),
    (dict(head_dim=64, value_dim=264), "the Triton kernels take head dims up to 256, got E=64 F=264"),
])
def test_triton_launchers_raise_kernel_unavailable(launcher, kernel, change, reason):
    pytest.importorskip("triton")
    import importlib
    module, fn = launcher.split(".")
    launch = getattr(importlib.import_module(f"attnfx.kernels.{module}"), fn)
    case = Case(q_len=1, kv_len=8).with_(**change)
    with pytest.raises(KernelUnavailable) as err:
        launch(*case.launch_args(case.tensors()))
    assert str(err.value) == f"attnfx {kernel} kernel: {reason}"


def test_cuda_registration_without_triton_raises_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(ops, "triton_importable", lambda: False)
    case = Case(q_len=4, kv_len=8)
    args = case.op_args(case.tensors())
    with pytest.raises(KernelUnavailable, match="^attnfx::attention on cuda: triton is not importable$"):
        ops._attention_cuda(*args)
    with pytest.raises(KernelUnavailable, match="^attnfx::attention on cuda: triton is not importable$"):
        ops._attention_backward_cuda(args[0], None, *args[:5], args[0], args[0][..., 0], *args[5:], False)


def test_triton_backward_raises_kernel_unavailable():
    pytest.importorskip("triton")
    from attnfx.kernels.triton_flash_bwd import flash_backward

    case = Case(q_len=4, kv_len=8, dtype="float64")
    t = case.tensors()
    out, lse = OP(*case.op_args(t))
    with pytest.raises(KernelUnavailable, match="^attnfx flash backward kernel: the Triton kernels take "
                                                "float32/float16/bfloat16, not float64$"):
        flash_backward(torch.ones_like(out), None, *case.launch_args(t), out, lse, False)


@pytest.mark.parametrize("change,message", [
    (dict(causal="none", window=4),
     "attnfx::attention: window must be >= 1 with a causal diagonal; got window=4, causal='none'"),
    (dict(window=0), "attnfx::attention: window must be -1 (none) or >= 1, got 0"),
    (dict(causal="diagonal"),
     "attnfx::attention: causal must be one of ['none', 'top_left', 'bottom_right'], got 'diagonal'"),
    (dict(softcap=-1.0), "attnfx::attention: softcap must be 0 (none) or positive, got -1.0"),
])
def test_malformed_calls_are_value_errors(change, message):
    case = Case(q_len=4, kv_len=8)
    args = dict(zip(("q", "k", "v", "bias", "alibi_slopes", "scale", "causal", "window", "softcap"),
                    case.op_args(case.tensors())))
    with pytest.raises(ValueError) as err:
        OP(**{**args, **change})
    assert str(err.value) == message


def test_bias_that_does_not_broadcast_is_a_value_error():
    case = Case(q_len=4, kv_len=8)
    t = case.tensors()
    with pytest.raises(ValueError) as err:
        OP(t["Q"], t["K"], t["V"], torch.zeros(1, 3, 4, 8), *case.op_args(t)[4:])
    assert str(err.value) == ("attnfx::attention: bias of shape (1, 3, 4, 8) does not broadcast to "
                              "(B,H,M,N)=(1, 2, 4, 8)")


def test_attnfx_works_without_triton():
    """As if triton were not installed: attnfx imports, the CPU kernel runs, Triton variants refuse."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # `import triton` raises ImportError from here on
        import torch
        import attnfx.kernels
        from attnfx.cost_model import AttentionSpec
        from attnfx.kernels import get_variant
        q = torch.randn(1, 2, 5, 16)
        out, lse = torch.ops.attnfx.attention(q, q, q, None, None, 0.25, "top_left", -1, 0.0)
        spec = AttentionSpec(1, 2, 2, 64, 64, 16, 16)
        print(tuple(out.shape))
        print(get_variant("triton_flash").refusal(spec, "cuda"))
        print(get_variant("attnfx_chunked").refusal(spec, "cpu"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["(1, 2, 5, 16)", "triton is not importable", "None"]
