"""The split-KV decode launcher (M <= 16 over long K/V), run by Triton's interpreter on CPU tensors."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import Case, assert_close, finfo_min_mask_case, reference
from attnfx.kernels.attention_args import Dims

pytest.importorskip("triton")
from attnfx.kernels.triton_decode import decode_forward, row_block, split_count  # noqa: E402
from attnfx.kernels.triton_flash_fwd import flash_forward  # noqa: E402

DECODE = Case(batch=2, heads=4, kv_heads=2, q_len=1, kv_len=300, head_dim=64)
FEATURES: dict[str, Case] = {
    "plain": DECODE,
    "mqa_packed_rows": DECODE.with_(heads=8, kv_heads=1, q_len=4),
    "two_row_blocks": DECODE.with_(heads=8, kv_heads=1, q_len=16, kv_len=128),  # G*M = 128 rows > 64
    "causal_bottom_right": DECODE.with_(q_len=16, causal="bottom_right"),
    "causal_top_left": DECODE.with_(q_len=5, kv_len=37, causal="top_left"),
    "window": DECODE.with_(q_len=3, causal="bottom_right", window=70),
    "key_padding": DECODE.with_(batch=3, key_padding=True),
    "bias": DECODE.with_(q_len=3, bias="1HMN"),
    "bool_mask": DECODE.with_(q_len=3, bias="B11N", bias_kind="bool"),
    "alibi": DECODE.with_(heads=6, kv_heads=2, alibi=True),
    "softcap": DECODE.with_(scale=1.0, softcap=2.0),
    "head_dim_80": DECODE.with_(head_dim=80, value_dim=48),
    "all": DECODE.with_(q_len=4, scale=0.2, causal="bottom_right", window=150, bias="BHMN", softcap=3.0,
                        alibi=True, key_padding=True),
}


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("name", list(FEATURES))
def test_features_match_oracle_for_any_split_count(name, splits):
    case = FEATURES[name]
    t = case.tensors()
    out, lse = decode_forward(*case.launch_args(t), num_splits=splits)
    assert_close(out, reference(case, t), "float32")
    assert lse.shape == out.shape[:3]


@pytest.mark.parametrize("q_len,kv_len", [(1, 37), (1, 232), (16, 232), (7, 1000)])
def test_awkward_lengths(q_len, kv_len):
    case = DECODE.with_(q_len=q_len, kv_len=kv_len, causal="bottom_right", key_padding=True)
    t = case.tensors()
    assert_close(decode_forward(*case.launch_args(t), num_splits=4)[0], reference(case, t), "float32")


def test_merged_lse_equals_the_flash_kernels():
    case = FEATURES["all"]
    t = case.tensors()
    _, lse = decode_forward(*case.launch_args(t), num_splits=5)
    _, flash_lse = flash_forward(*case.launch_args(t))
    torch.testing.assert_close(lse, flash_lse, atol=1e-5, rtol=1e-5)  # -inf rows included


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    case = FEATURES["all"].with_(dtype=dtype)
    t = case.tensors()
    out, _ = decode_forward(*case.launch_args(t), num_splits=3)
    assert out.dtype == t["Q"].dtype
    assert_close(out, reference(case, t), dtype)


def test_splits_outside_every_rows_reach_are_never_read():
    case = DECODE.with_(q_len=2, kv_len=1000, causal="bottom_right", window=100)
    t = case.tensors()
    v = t["V"].clone()
    v[:, :, :832] = float("nan")  # before the window of the first query (keys > 898 - 100)
    out, _ = decode_forward(*case.launch_args({**t, "V": v}), num_splits=4)
    assert_close(out, reference(case, t), "float32")


@pytest.mark.parametrize("programs,kv_len,sms,expected", [
    (8, 32_768, 132, 33),  # B*Hkv = 8 on an H100: ~2 programs per SM
    (264, 32_768, 132, 1),  # already two programs per SM
    (8, 300, 132, 1),  # too short to split into >= 4 blocks of 64
    (1, 2048, 132, 8),  # capped by 2048 / (4 * 64)
])
def test_split_count_fills_the_gpu_without_tiny_splits(programs, kv_len, sms, expected):
    assert split_count(programs, kv_len, sms) == expected


@pytest.mark.parametrize("groups,q_len,expected", [(1, 1, 16), (4, 3, 16), (8, 4, 32), (8, 16, 64)])
def test_row_block_packs_a_group_up_to_64_rows(groups, q_len, expected):
    assert row_block(Dims(2, 2 * groups, 2, q_len, 300, 64, 64)) == expected


def test_rows_covered_by_a_finfo_min_mask_average_like_the_oracle():
    case, t = finfo_min_mask_case()
    case, t = case.with_(q_len=4), {**t, "Q": t["Q"][:, :, :4], "BIAS": t["BIAS"][:, :, :4]}
    out, _ = decode_forward(*case.launch_args(t), num_splits=2)
    assert_close(out, reference(case, t), "float32")
    assert out.abs().sum() > 0
