"""attnfx::padded_attention: exact on every path against the float64 oracle, and the path the data
chose is the one that ran (ATen calls counted under a dispatch mode)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_cases import Case, assert_close
from attnfx.cost_model import AttentionSpec, Causal, MaskInput, canonical_cascade, evaluate
from attnfx.kernels import get_variant
from attnfx.kernels.padded import padded_forward, plan_keys

N = 40
MIN32 = torch.finfo(torch.float32).min
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu.default"
ATTNFX = "attnfx.attention.default"

CONFIGS = {
    "encoder": Case(batch=3, heads=2, kv_heads=2, q_len=N, kv_len=N),
    "causal": Case(batch=3, heads=2, kv_heads=2, q_len=N, kv_len=N, causal="top_left"),
    "decode_bottom_right": Case(batch=3, heads=2, kv_heads=2, q_len=5, kv_len=N, causal="bottom_right"),
    "window": Case(batch=3, heads=2, kv_heads=2, q_len=N, kv_len=N, causal="top_left", window=7),
    "gqa_softcap_alibi": Case(batch=3, heads=4, kv_heads=2, q_len=N, kv_len=N, causal="top_left", softcap=2.0,
                              alibi=True),
    "bias": Case(batch=3, heads=2, kv_heads=2, q_len=N, kv_len=N, bias="1HMN"),
    "bias_causal_mqa": Case(batch=3, heads=2, kv_heads=1, q_len=N, kv_len=N, causal="bottom_right", bias="B1MN"),
}


def _runs(*runs: tuple[int, int]) -> torch.Tensor:
    keep = torch.zeros(len(runs), N, dtype=torch.bool)
    for row, (lo, hi) in enumerate(runs):
        keep[row, lo:hi] = True
    return keep


def _holes() -> torch.Tensor:
    keep = _runs((0, N), (0, 30), (3, N))
    keep[0, 11] = keep[2, 20:23] = False
    return keep


PADDINGS = {
    "all_kept": (_runs((0, N), (0, N), (0, N)), "all_kept"),
    "right": (_runs((0, N), (0, 25), (0, 9)), "padding_free"),
    "left": (_runs((0, N), (15, N), (31, N)), "padding_free"),
    "mixed_runs": (_runs((0, 30), (20, N), (5, 30)), "padding_free"),
    "empty_row": (_runs((0, N), (0, 0), (0, 12)), "padding_free"),
    "holes": (_holes(), "dense"),
}


def _reference(case: Case, t: dict, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """The oracle on one additive mask: bias + 0 where kept (key and band), + fill elsewhere."""
    m, n = torch.arange(case.q_len).view(-1, 1), torch.arange(case.kv_len).view(1, -1)
    band = torch.ones(case.q_len, case.kv_len, dtype=torch.bool)
    if case.causal != "none":
        offset = Causal(case.causal).offset(case.q_len, case.kv_len)
        band = n <= m + offset
        if case.window:
            band = band & (n > m + offset - case.window)
    kept = keep.view(-1, 1, 1, case.kv_len) & band
    bias = t.get("BIAS", torch.zeros(1, 1, 1, 1)).double()
    total = bias + torch.where(kept, 0.0, fill).double()
    spec = replace(case.spec(), causal=Causal.NONE, window=None, mask=MaskInput.ADDITIVE,
                   mask_shape=tuple(torch.broadcast_shapes(total.shape, (case.batch, 1, case.q_len, case.kv_len))))
    return evaluate(canonical_cascade(spec), {**t, "BIAS": total.expand(spec.mask_shape)})


def _run(case: Case, t: dict, keep: torch.Tensor, fill: float) -> torch.Tensor:
    return padded_forward(t["Q"], t["K"], t["V"], keep, t.get("BIAS"), t.get("SLOPES"), case.scale_value,
                          case.causal, case.window or -1, case.softcap or 0.0, fill)


class _Calls(TorchDispatchMode):
    """Counts the ops that ran and records SDPA's mask argument."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.sdpa_masks: list = []
        self.sdpa_key_lengths: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[str(func)] += 1
        if str(func) == SDPA:
            self.sdpa_masks.append(kwargs.get("attn_mask"))
            self.sdpa_key_lengths.append(args[1].shape[2])
        return func(*args, **kwargs)


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fill", [-math.inf, MIN32], ids=["fill_-inf", "fill_finfo_min"])
def test_every_path_is_exact(config, padding, fill):
    case, (keep, path) = CONFIGS[config], PADDINGS[padding]
    t = case.tensors()
    assert plan_keys(keep).path == path
    assert_close(_run(case, t, keep, fill), _reference(case, t, keep, fill), "float32", f"{config}/{padding}")


def test_all_kept_causal_runs_sdpa_is_causal_without_a_mask():
    case = CONFIGS["causal"]
    t = case.tensors()
    with _Calls() as calls:
        _run(case, t, PADDINGS["all_kept"][0], MIN32)
    assert calls.counts[SDPA] == 1 and calls.counts[ATTNFX] == 0
    assert calls.sdpa_masks == [None] and calls.sdpa_key_lengths == [N]


def test_right_padding_attends_over_each_length_only():
    case = CONFIGS["causal"]
    t = case.tensors()
    with _Calls() as calls:
        _run(case, t, PADDINGS["right"][0], MIN32)
    assert calls.counts[SDPA] == 3 and calls.counts[ATTNFX] == 0
    assert calls.sdpa_masks == [None] * 3 and calls.sdpa_key_lengths == [N, 25, 9]


def test_rows_with_one_length_share_one_call():
    case = CONFIGS["encoder"]
    t = case.tensors()
    with _Calls() as calls:
        _run(case, t, _runs((0, 25), (0, 25), (0, 9)), -math.inf)
    assert calls.sdpa_key_lengths == [25, 9]


def test_left_padding_slices_queries_and_keys_top_left():
    case = CONFIGS["causal"]
    t = case.tensors()
    with _Calls() as calls:
        out = _run(case, t, PADDINGS["left"][0], MIN32)
    assert calls.sdpa_key_lengths == [N, 25, 9] and calls.sdpa_masks == [None] * 3
    # rows before the first kept key keep nothing: with finfo.min they average V over all keys
    assert_close(out[2, :, :31], t["V"][2].mean(1, keepdim=True).expand(2, 31, 16), "float32", "padded rows")


def test_holes_take_one_dense_masked_call():
    case = CONFIGS["causal"]
    t = case.tensors()
    with _Calls() as calls:
        _run(case, t, PADDINGS["holes"][0], -math.inf)
    assert calls.counts[SDPA] == 1 and tuple(calls.sdpa_masks[0].shape) == (3, 1, N, N)


def test_modifiers_sdpa_cannot_take_run_attnfx_attention_per_group():
    case = CONFIGS["gqa_softcap_alibi"]
    t = case.tensors()
    with _Calls() as calls:
        _run(case, t, PADDINGS["left"][0], -math.inf)
    assert calls.counts[ATTNFX] == 3 and calls.counts[SDPA] == 0


def test_gradients_match_the_oracle():
    case = CONFIGS["bias_causal_mqa"].with_(dtype="float64")
    t = case.tensors()
    keep = PADDINGS["left"][0]
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V", "BIAS")}
    out = torch.ops.attnfx.padded_attention(leaves["Q"], leaves["K"], leaves["V"], keep, leaves["BIAS"], None,
                                            case.scale_value, case.causal, -1, 0.0, MIN32)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V", "BIAS")}
    _reference(case, {**t, **ref_leaves}, keep, MIN32).backward(grad)
    for name in ("Q", "K", "V", "BIAS"):
        assert_close(leaves[name].grad, ref_leaves[name].grad, "float64", f"d{name}")


def test_opcheck():
    case = CONFIGS["window"]
    t = case.tensors()
    for keep in (PADDINGS["right"][0], PADDINGS["holes"][0]):
        args = (t["Q"], t["K"], t["V"], keep, None, None, case.scale_value, "top_left", 7, 0.0, MIN32)
        torch.library.opcheck(torch.ops.attnfx.padded_attention.default, args)


class _Padded(torch.nn.Module):
    def forward(self, q, k, v, attention_mask):
        return torch.ops.attnfx.padded_attention(q, k, v, attention_mask.bool(), None, None, 0.25, "top_left", -1,
                                                 0.0, MIN32)


def test_a_graph_holding_the_op_exports_and_runs():
    case = CONFIGS["causal"]
    t = case.tensors()
    mask = PADDINGS["left"][0].long()
    exported = torch.export.export(_Padded(), (t["Q"], t["K"], t["V"], mask))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.attnfx.padded_attention.default) == 1
    assert torch.equal(exported.module()(t["Q"], t["K"], t["V"], mask), _Padded()(t["Q"], t["K"], t["V"], mask))


def test_bad_key_masks_are_refused_by_name():
    t = CONFIGS["causal"].tensors()
    with pytest.raises(ValueError, match=r"key_keep must be bool of shape \(B\|1, N\)"):
        padded_forward(t["Q"], t["K"], t["V"], torch.ones(3, N), None, None, 1.0, "none", -1, 0.0, -math.inf)


KEY_MASK = AttentionSpec(2, 4, 4, 64, 64, 16, 16, causal=Causal.TOP_LEFT, mask=MaskInput.BOOL,
                         mask_shape=(2, 1, 1, 64))


@pytest.mark.parametrize("spec,reason", [
    (KEY_MASK, None),
    (replace(KEY_MASK, mask_shape=(2, 1, 64, 64)),
     "padded_attention takes a per-key bool mask (B, 1, 1, N); this site's mask is not one"),
    (replace(KEY_MASK, mask=MaskInput.ADDITIVE),
     "padded_attention takes a per-key bool mask (B, 1, 1, N); this site's mask is not one"),
])
def test_variant_refusals(spec, reason):
    assert get_variant("padded").refusal(spec, "cpu") == reason


def test_variant_call_runs_the_site():
    case = CONFIGS["causal"]
    t = case.tensors()
    keep = PADDINGS["right"][0]
    spec = replace(case.spec("float32"), mask=MaskInput.BOOL, mask_shape=(3, 1, 1, N))
    from attnfx.kernels import Operands
    call = get_variant("padded").call(spec, Operands(q=t["Q"], k=t["K"], v=t["V"], mask=keep.view(3, 1, 1, N)))
    assert call.target.name() == "attnfx::padded_attention"
    assert_close(call.run(), _reference(case, t, keep, -math.inf), "float32")


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("config", ["encoder", "causal", "decode_bottom_right", "window"])
def test_output_is_stored_as_the_fake_says_and_reshapes_to_tokens_without_a_copy(config, padding):
    case, (keep, _) = CONFIGS[config], PADDINGS[padding]
    t = case.tensors()
    out = _run(case, t, keep, MIN32)
    fake = torch.ops.attnfx.padded_attention.default(
        *(x.to("meta") for x in (t["Q"], t["K"], t["V"], keep)), None, None, case.scale_value, case.causal,
        case.window or -1, 0.0, MIN32)
    assert out.stride() == fake.stride() == (case.q_len * 2 * 16, 16, 2 * 16, 1)
    tokens = out.transpose(1, 2).reshape(3, case.q_len, 2 * 16)
    assert tokens.data_ptr() == out.data_ptr() and tokens._base is not None


@pytest.mark.parametrize("padding", ["right", "left", "mixed_runs", "empty_row"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_padding_free_writes_every_position_of_its_uninitialised_output(config, padding, monkeypatch):
    """The padding-free path allocates its output without zeroing it: poisoned with NaN, every
    position must still come out as the oracle's (rows that keep no key included)."""
    from attnfx.kernels import padded

    allocate = padded._new_output
    monkeypatch.setattr(padded, "_new_output", lambda q, d: allocate(q, d).fill_(math.nan))
    case, (keep, path) = CONFIGS[config], PADDINGS[padding]
    t = case.tensors()
    assert path == "padding_free"
    for fill in (-math.inf, MIN32):
        assert_close(_run(case, t, keep, fill), _reference(case, t, keep, fill), "float32", f"{config}/{padding}")
