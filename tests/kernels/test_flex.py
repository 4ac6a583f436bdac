"""attnfx::flex_attention: block tables from the proven structure, exactness against the float64
oracle, gradients (through attnfx::attention), refusals, fake tensors and export.

Inductor compiles FlexAttention once per (shape, modifiers), tens of seconds each here: every test
that runs the op uses the one site below, so the suite compiles it once."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_cases import COMBINED, Case, assert_close, reference, reference_grads
from attnfx.cost_model import AttentionSpec, Causal, MaskInput
from attnfx.kernels import Operands, get_variant
from attnfx.kernels.flex import block_tables, inductor_cpu_refusal

# softcap, an additive bias carrying key padding, ALiBi, bottom-right causal with a window, GQA
SITE = COMBINED["all_additive_gqa"]
needs_inductor = pytest.mark.skipif(inductor_cpu_refusal() is not None, reason=str(inductor_cpu_refusal()))


def _dense_keep(q_len, kv_len, offset, window):
    m, n = torch.arange(q_len).view(-1, 1), torch.arange(kv_len).view(1, -1)
    keep = torch.ones(q_len, kv_len, dtype=torch.bool)
    if offset is not None:
        keep = n <= m + offset
        if window != -1:
            keep = keep & (n > m + offset - window)
    return keep.expand(1, q_len, kv_len)


def _unpack(num, idx, nb):
    """(B, 1, mb) counts and (B, 1, mb, nb) indices back to a (B, mb, nb) block set."""
    blocks = torch.zeros(num.shape[0], num.shape[2], nb, dtype=torch.bool)
    for b in range(num.shape[0]):
        for row in range(num.shape[2]):
            blocks[b, row, idx[b, 0, row, : num[b, 0, row]].long()] = True
    return blocks


@pytest.mark.parametrize("q_len,kv_len,offset,window", [
    (300, 300, 0, -1), (37, 300, 263, -1), (300, 300, 0, 100), (300, 37, -263, 20), (300, 300, None, -1),
    (100, 300, 200, 50),
])
def test_block_tables_classify_every_block(q_len, kv_len, offset, window):
    block = 64
    kv_num, kv_idx, full_num, full_idx = block_tables(q_len, kv_len, offset, window, block)
    nb = -(-kv_len // block)
    partial, full = _unpack(kv_num, kv_idx, nb), _unpack(full_num, full_idx, nb)
    keep = _dense_keep(q_len, kv_len, offset, window)
    padded = torch.nn.functional.pad(keep, (0, nb * block - kv_len, 0, -(-q_len // block) * block - q_len))
    tiles = padded.unflatten(1, (-1, block)).unflatten(3, (-1, block))  # (b, mb, block, nb, block)
    # pad cells outside the sequence count as kept for "full" (a ragged edge block can be full)
    inside = torch.nn.functional.pad(torch.ones(q_len, kv_len, dtype=torch.bool),
                                     (0, nb * block - kv_len, 0, -(-q_len // block) * block - q_len))
    inside = inside.unflatten(0, (-1, block)).unflatten(2, (-1, block))
    some = tiles.any(4).any(2)
    every = (tiles | ~inside).all(4).all(2)
    assert torch.equal(full, every.expand_as(full))
    assert torch.equal(partial, (some & ~every).expand_as(partial))


@needs_inductor
def test_the_site_is_exact_and_compiles_once():
    t = SITE.tensors()
    out = torch.ops.attnfx.flex_attention(*SITE.op_args(t)[:10])
    assert_close(out, reference(SITE, t), "float32")
    t2 = SITE.tensors(seed=1)
    assert_close(torch.ops.attnfx.flex_attention(*SITE.op_args(t2)[:10]), reference(SITE, t2), "float32")


@needs_inductor
def test_gradients_are_attnfx_attentions():
    t = SITE.tensors()
    leaves = {n: x.clone().requires_grad_() for n, x in t.items() if n in ("Q", "K", "V", "BIAS")}
    args = SITE.op_args({**t, **leaves})
    out = torch.ops.attnfx.flex_attention(*args)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = reference_grads(SITE, t, grad)
    for name, leaf in leaves.items():
        assert_close(leaf.grad, expected[name], "float32", f"d{name}")


@needs_inductor
def test_autograd_registration_and_fake_kernel_agree_with_the_op():
    # NOTE: opcheck's fake-tensor utilities run the real op under CrossRefFakeMode, in which
    # Dynamo cannot trace FlexAttention's block-mask construction; the fake kernel is checked here.
    t = SITE.tensors()
    args = SITE.op_args(t)
    torch.library.opcheck(torch.ops.attnfx.flex_attention.default, args, test_utils="test_autograd_registration")
    real = torch.ops.attnfx.flex_attention(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.attnfx.flex_attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                 for a in args))
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


class _Flex(torch.nn.Module):
    def forward(self, q, k, v, bias, slopes):
        return torch.ops.attnfx.flex_attention(q, k, v, bias, slopes, *SITE.op_args(SITE.tensors())[5:])


def test_a_graph_holding_the_op_exports_with_one_node():
    t = SITE.tensors()
    args = (t["Q"], t["K"], t["V"], t["BIAS"], t["SLOPES"])
    exported = torch.export.export(_Flex(), args)
    nodes = [n for n in exported.graph.nodes if getattr(n.target, "name", str)() == "attnfx::flex_attention"]
    assert len(nodes) == 1 and tuple(nodes[0].meta["val"].shape) == (2, 4, 37, 16)


def test_the_call_passes_only_what_the_spec_uses():
    t = SITE.tensors()
    call = get_variant("flex").call(SITE.spec("float32"), Operands(q=t["Q"], k=t["K"], v=t["V"], mask=t["BIAS"],
                                                                   slopes=t["SLOPES"]))
    assert call.target.name() == "attnfx::flex_attention" and call.output_index is None
    assert call.args[3:] == (t["BIAS"], t["SLOPES"], 0.3, "bottom_right", 30, 2.0)


SPEC = AttentionSpec(1, 8, 8, 2048, 2048, 64, 64, causal=Causal.TOP_LEFT, window=256)


@pytest.mark.parametrize("spec,device,reason", [
    (SPEC, "cpu", inductor_cpu_refusal()),
    (SPEC, "cuda", "attnfx offers FlexAttention on CPU only; on cuda attnfx::attention runs its own Triton kernels"),
    (replace(SPEC, dtype="float64"), "cpu", "Inductor's CPU FlexAttention takes float32/bfloat16/float16, not float64"),
    (replace(SPEC, mask=MaskInput.BOOL, mask_shape=(1, 1, 2048, 2048)), "cpu",
     "a bool mask tensor gives FlexAttention no block structure to skip (SDPA and attnfx_chunked take it)"),
    (replace(SPEC, dynamic=frozenset({"q_len", "kv_len"})), "cpu",
     "flex compiles one kernel per sequence length (seconds each) and this site's length is dynamic"),
    (replace(SPEC, q_len=200, kv_len=200, window=None), "cpu",
     "Inductor's CPU FlexAttention gave wrong outputs at key lengths that are not a multiple of its 128-key block "
     "(e.g. 200 queries x 200 keys, 4 x 8, with torch 2.13); this site has 200 keys"),
    (replace(SPEC, q_len=100, kv_len=256, window=None), "cpu", None),
])
def test_refusals(spec, device, reason):
    if device == "cpu" and spec.dtype == "float32" and spec.mask is MaskInput.NONE and inductor_cpu_refusal():
        pytest.skip(inductor_cpu_refusal())
    assert get_variant("flex").refusal(spec, device) == reason


def test_the_op_refuses_what_the_variant_refuses():
    case = Case(bias="B1MN", bias_kind="bool")
    with pytest.raises(ValueError, match="attnfx::flex_attention: a bool mask tensor gives FlexAttention no block"):
        torch.ops.attnfx.flex_attention(*case.op_args(case.tensors()))


@needs_inductor
def test_running_a_site_tells_the_cost_model_it_is_compiled():
    from attnfx.cost_model.compiled import is_compiled

    torch.ops.attnfx.flex_attention(*SITE.op_args(SITE.tensors()))
    assert is_compiled("flex_compile", SITE.spec("float32"))
    assert not is_compiled("flex_compile", replace(SITE.spec("float32"), q_len=38))
