"""The float64 oracle for sigmoid and linear attention (evaluate(canonical_cascade(spec))) against
the formulas written out by hand, and the cascades it runs."""
from __future__ import annotations

import math

import pytest
import torch

from kernel_cases import Case, LinearCase, reference
from attnfx.cost_model import AttentionSpec, Causal, canonical_cascade
from attnfx.cost_model.spec import Kind


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.double().repeat_interleave(groups, dim=1)


def test_sigmoid_oracle_is_the_written_formula():
    case = Case(batch=3, heads=4, kv_heads=2, q_len=5, kv_len=9, scale=0.4, causal="bottom_right", window=3,
                bias="1HMN", softcap=2.0, alibi=True, key_padding=True, kind="sigmoid", logit_bias=-1.5)
    t = case.tensors()
    q, k, v = t["Q"].double(), _repeat(t["K"], 2), _repeat(t["V"], 2)
    s = 2.0 * torch.tanh(0.4 * q @ k.transpose(-1, -2) / 2.0) + t["BIAS"].double()
    m, n = torch.arange(5).view(-1, 1), torch.arange(9).view(1, -1)
    s = s + t["SLOPES"].double().view(1, -1, 1, 1) * (n - m)
    keep = (n <= m + 4) & (n > m + 4 - 3) & (n < torch.tensor([7, 3, 0]).view(-1, 1, 1, 1))
    expected = torch.where(keep, torch.sigmoid(s - 1.5), 0.0) @ v
    torch.testing.assert_close(reference(case, t).double(), expected, rtol=1e-12, atol=1e-12)
    assert expected[2].abs().max() == 0  # batch 2 has no keys: its rows are 0


@pytest.mark.parametrize("causal,offset", [("top_left", 0), ("bottom_right", 4)])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_oracle_is_the_written_formula(causal, offset, normalize):
    case = LinearCase(q_len=5, kv_len=9, causal=causal, decay=True, normalize=normalize, norm_eps=0.25)
    t = case.tensors()
    q, k, v = t["Q"].double(), _repeat(t["K"], 2), _repeat(t["V"], 2)
    m, n = torch.arange(5).view(-1, 1), torch.arange(9).view(1, -1)
    decay = t["DECAY"].double().view(1, -1, 1, 1) ** (m + offset - n).double()
    w = 0.5 * (q @ k.transpose(-1, -2)) * (n <= m + offset) * decay
    expected = w @ v
    if normalize:
        expected = expected / (w.sum(-1, keepdim=True) + 0.25)
    torch.testing.assert_close(reference(case, t).double(), expected, rtol=1e-12, atol=1e-12)


def test_non_causal_linear_oracle_without_decay_is_q_kt_v():
    case = LinearCase(q_len=5, kv_len=9, causal="none", normalize=True)
    t = case.tensors()
    q, k, v = t["Q"].double(), _repeat(t["K"], 2), _repeat(t["V"], 2)
    w = 0.5 * q @ k.transpose(-1, -2)
    torch.testing.assert_close(reference(case, t).double(), (w @ v) / w.sum(-1, keepdim=True))


def test_cascades_print_each_kind():
    sigmoid = AttentionSpec(1, 2, 2, 4, 4, 8, 8, scale=0.5, causal=Causal.TOP_LEFT, kind=Kind.SIGMOID, logit_bias=-2.0)
    assert [str(st) for st in canonical_cascade(sigmoid).stages] == [
        "QK = contract[bhgme,bhne->bhgmn](Q, K)",
        "S = map[mul 0.5](QK)",
        "SF = map[filter n <= m](S)",
        "SG = map[sigmoid(s + -2), 0 where excluded](SF)",
        "AV = contract[bhgmn,bhnf->bhgmf](SG, V)",
    ]
    linear = AttentionSpec(1, 2, 2, 4, 6, 8, 8, causal=Causal.BOTTOM_RIGHT, kind=Kind.LINEAR, decay=True,
                           normalize=True, norm_eps=1e-6)
    cascade = canonical_cascade(linear)
    assert [str(st) for st in cascade.stages] == [
        "QK = contract[bhgme,bhne->bhgmn](Q, K)",
        "SF = map[zero outside n <= m + N - M](QK)",
        "SW = map[mul decay[h,g]^(m + offset - n)](SF, DECAY)",
        "RS = reduce[sum over n + 1e-06](SW)",
        "AN = map[div](SW, RS)",
        "AV = contract[bhgmn,bhnf->bhgmf](AN, V)",
    ]
    assert cascade.inputs == ("Q", "K", "DECAY", "V")


def test_a_linear_row_that_sees_no_key_divides_zero_by_norm_eps():
    # bottom-right with M > N: the first M - N rows see no key
    case = LinearCase(q_len=7, kv_len=4, causal="bottom_right", normalize=True, norm_eps=0.5)
    out = reference(case, case.tensors())
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert not math.isnan(out.abs().sum().item())
