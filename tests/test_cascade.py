"""The cascade IR: it validates itself, prints itself, and evaluate() is a correct oracle."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from attnfx.cost_model import AttentionSpec, Causal, MaskInput, alibi_slopes, canonical_cascade, evaluate
from attnfx.cost_model.spec import Kind, ScoreMods


def qkv(b=2, h=4, hkv=2, m=5, n=7, e=8, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, m, e, generator=g), torch.randn(b, hkv, n, e, generator=g),
            torch.randn(b, hkv, n, f, generator=g))


def reference(q, k, v, scale, bias=None):
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    return (F.softmax(s, -1) @ v.double()).float()


def test_evaluate_matches_grouped_attention_with_bias() -> None:
    q, k, v = qkv()
    bias = torch.randn(2, 1, 5, 7)
    spec = AttentionSpec(2, 4, 2, 5, 7, 8, 6, scale=0.3, mask=MaskInput.ADDITIVE, mask_shape=(2, 1, 5, 7))
    out = evaluate(canonical_cascade(spec), {"Q": q, "K": k, "V": v, "BIAS": bias})
    torch.testing.assert_close(out, reference(q, k, v, 0.3, bias))


@pytest.mark.parametrize("causal,offset", [(Causal.TOP_LEFT, 0), (Causal.BOTTOM_RIGHT, 2)])
def test_evaluate_causal_alignments(causal: Causal, offset: int) -> None:
    q, k, v = qkv()
    spec = AttentionSpec(2, 4, 2, 5, 7, 8, 6, scale=0.3, causal=causal)
    keep = torch.arange(7)[None, :] <= torch.arange(5)[:, None] + offset
    expected = reference(q, k, v, 0.3, torch.where(keep, 0.0, -math.inf))
    torch.testing.assert_close(evaluate(canonical_cascade(spec), {"Q": q, "K": k, "V": v}), expected)


def test_evaluate_softcap_alibi_window_and_key_mask() -> None:
    q, k, v = qkv(hkv=4, m=7, n=7)
    slopes = alibi_slopes(4)
    lengths = torch.tensor([7, 4])
    key_mask = torch.arange(7).view(1, 1, 1, 7) < lengths.view(2, 1, 1, 1)
    spec = AttentionSpec(2, 4, 4, 7, 7, 8, 6, scale=0.5, causal=Causal.TOP_LEFT, window=3, softcap=5.0,
                         alibi=True, mask=MaskInput.BOOL, mask_shape=(2, 1, 1, 7))
    m, n = torch.arange(7)[:, None], torch.arange(7)[None, :]
    s = 5.0 * torch.tanh((q.double() @ k.double().transpose(-1, -2)) * 0.5 / 5.0)
    s = s + slopes.double().view(1, 4, 1, 1) * (n - m)
    keep = (n <= m) & (n > m - 3) & (n < lengths.view(2, 1, 1, 1))
    expected = (F.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0) @ v.double()).float()
    assert not keep[1, 0, 6].any()  # a row with no visible key: the oracle gives 0, not NaN
    out = evaluate(canonical_cascade(spec), {"Q": q, "K": k, "V": v, "SLOPES": slopes, "MASK": key_mask})
    torch.testing.assert_close(out, expected)


def test_fully_masked_rows_are_zero() -> None:
    q, k, v = qkv(hkv=4)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, 0, 2] = False
    spec = AttentionSpec(2, 4, 4, 5, 7, 8, 6, mask=MaskInput.BOOL, mask_shape=(2, 1, 5, 7))
    out = evaluate(canonical_cascade(spec), {"Q": q, "K": k, "V": v, "MASK": mask})
    assert torch.equal(out[0, :, 2], torch.zeros(4, 6))


def test_cascade_prints_its_stages() -> None:
    spec = AttentionSpec(1, 8, 2, 16, 16, 64, 64, scale=0.125, causal=Causal.TOP_LEFT)
    text = str(canonical_cascade(spec))
    assert text.splitlines() == [
        "cascade(b=1 h=2 g=4 m=16 n=16 e=64 f=64; float32)",
        "  QK = contract[bhgme,bhne->bhgmn](Q, K)",
        "  S = map[mul 0.125](QK)",
        "  SF = map[filter n <= m](S)",
        "  GM = reduce[max over n](SF)",
        "  SN = map[exp(s - GM)](SF, GM)",
        "  SD = reduce[sum over n](SN)",
        "  A = map[div](SN, SD)",
        "  AV = contract[bhgmn,bhnf->bhgmf](A, V)",
        "  softmax as written: 3 pass(es) [pass 1: QK, S, SF, GM; pass 2: SN, SD; pass 3: A, AV] re-reads: Kx3, Vx1",
    ]
    assert canonical_cascade(spec).inputs == ("Q", "K", "V")


@pytest.mark.parametrize("kwargs,message", [
    (dict(heads=6, kv_heads=4), "heads (6) must be a multiple of kv_heads (4)"),
    (dict(q_len=0), "AttentionSpec.q_len must be >= 1, got 0"),
    (dict(dtype="int8"), "AttentionSpec.dtype must be one of"),
    (dict(mask=MaskInput.BOOL), "mask_shape must be given exactly when a mask tensor is"),
    (dict(window=4), "window must be >= 1 with a causal diagonal; got window=4, causal='none'"),
    (dict(softcap=-1.0), "softcap must be positive, got -1.0"),
    (dict(logit_bias=-2.0), "logit_bias is a sigmoid-attention field (a constant cancels in a softmax)"),
    (dict(normalize=True), "decay/normalize/norm_eps are linear-attention fields"),
    (dict(kind=Kind.LINEAR, softcap=2.0), "linear attention takes a causal band and a decay, no masks"),
])
def test_spec_validates_itself(kwargs, message) -> None:
    base = dict(batch=1, heads=4, kv_heads=4, q_len=8, kv_len=8, head_dim=16, value_dim=16)
    with pytest.raises(ValueError, match=re.escape(message)):
        AttentionSpec(**{**base, **kwargs})


@pytest.mark.parametrize("mods,args", [
    (ScoreMods(), (1.0, "none", -1, 0.0)),
    (ScoreMods(0.125, Causal.BOTTOM_RIGHT, 4, 30.0), (0.125, "bottom_right", 4, 30.0)),
])
def test_score_mods_have_one_op_argument_encoding(mods, args) -> None:
    assert mods.op_args() == args
    assert ScoreMods.from_op_args(*args) == mods


@pytest.mark.parametrize("args,message", [
    ((1.0, "diagonal", -1, 0.0), "causal must be one of ['none', 'top_left', 'bottom_right'], got 'diagonal'"),
    ((1.0, "top_left", 0, 0.0), "window must be -1 (none) or >= 1, got 0"),
    ((1.0, "none", 3, 0.0), "window must be >= 1 with a causal diagonal; got window=3, causal='none'"),
    ((1.0, "none", -1, -2.0), "softcap must be 0 (none) or positive, got -2.0"),
])
def test_malformed_op_arguments_name_the_argument(args, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ScoreMods.from_op_args(*args)


def test_live_pairs_count_causal_and_window() -> None:
    dense = AttentionSpec(1, 1, 1, 8, 8, 4, 4)
    causal = AttentionSpec(1, 1, 1, 8, 8, 4, 4, causal=Causal.TOP_LEFT)
    window = AttentionSpec(1, 1, 1, 8, 8, 4, 4, causal=Causal.TOP_LEFT, window=3)
    decode = AttentionSpec(1, 1, 1, 2, 10, 4, 4, causal=Causal.BOTTOM_RIGHT)
    assert (dense.live_pairs(), causal.live_pairs(), window.live_pairs(), decode.live_pairs()) == (64, 36, 21, 19)
