"""The model zoo: every required entry builds, exports with dynamic shapes, reproduces eager at two
shapes, and shows exactly its ground-truth number of attention softmaxes.

The breadth entries (other Hugging Face architectures) are covered by a structural sample here; set
ATTNFX_ZOO_ALL=1 to sweep all of them (several minutes), or run benchmarks/coverage.py.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo

ATOL = 1e-5
SEQ, SEQ2 = 8, 12
REQUIRED = [m.name for m in zoo.required()]
# One breadth entry per structure the required set lacks: disentangled/relative bias, ALiBi, softcap +
# sliding window, MoE router softmaxes, MQA, windows, probe-query pooling, n-gram streams, audio.
BREADTH_SAMPLE = ["deberta_v2", "bloom", "gemma2", "mixtral", "falcon_alibi", "bart", "beit", "siglip_vision",
                  "wav2vec2", "gpt_oss", "deepseek_v3", "modernbert"]
BREADTH_ALL = [m.name for m in zoo.REGISTRY.values() if not m.required]
BREADTH = BREADTH_ALL if os.environ.get("ATTNFX_ZOO_ALL") else BREADTH_SAMPLE


@functools.cache
def captured(name: str) -> tuple[zoo.ZooModel, torch.nn.Module, tuple, dict, Any]:
    """Build and export once per module; several tests read the same program."""
    entry = zoo.REGISTRY[name]
    model, args, kwargs = entry.build(SEQ)
    return entry, model, args, kwargs, zoo.export(model, args, kwargs)


def eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def test_required_set_is_complete() -> None:
    names = set(REQUIRED)
    assert {"bert", "gpt2", "llama", "t5", "vit", "whisper", "nanogpt"} <= names
    mha = [zoo.REGISTRY[n] for n in names if n.startswith("mha_")]
    assert {"probs_escape", "sdpa_already"} <= {s for m in mha for s in m.structure}
    assert any("weights_discarded" in m.name for m in mha)
    decode = {n for n in names if n.startswith("kv_decode")}
    assert decode == {"kv_decode_m1_gqa", "kv_decode_m4"}
    families = {zoo.REGISTRY[n].family for n in names}
    assert {"torch.nn.TransformerEncoder", "torch.nn.TransformerDecoder"} <= families
    assert len(zoo.REGISTRY) >= 40


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_layouts_present(batch_first: bool) -> None:
    """Both layouts are really built: the module flag matches and the query is laid out to match."""
    layouts = []
    for name in REQUIRED:
        if name.startswith("mha_"):
            model, args, _ = zoo.REGISTRY[name].build(SEQ)
            layouts.append(model.attn.batch_first)
            assert args[0].shape[0 if model.attn.batch_first else 1] == 2  # batch of 2
    assert batch_first in layouts


@pytest.mark.parametrize("name", REQUIRED)
def test_softmax_count_matches_ground_truth(name: str) -> None:
    entry, *_, program = captured(name)
    assert len(zoo.softmax_nodes(program.graph)) == entry.softmax_nodes


@pytest.mark.parametrize("name", REQUIRED)
def test_export_reproduces_eager(name: str) -> None:
    entry, model, args, kwargs, program = captured(name)
    assert zoo.max_abs_diff(program.module()(*args, **kwargs), eager(model, args, kwargs)) <= ATOL
    # Same weights (same seed), new inputs: another sequence length where the config allows one,
    # and another batch size always. The program must accept them without re-export.
    _, args2, kwargs2 = entry.build(SEQ2 if entry.seq_dynamic else SEQ, batch=3, seed=0)
    assert zoo.max_abs_diff(program.module()(*args2, **kwargs2), eager(model, args2, kwargs2)) <= ATOL


def _padding_masks(kwargs: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in kwargs.items() if k.endswith("attention_mask") or k.endswith("padding_mask")}


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """True where a key is real: HF masks are 1/0, nn's are True-or--inf for padding."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask == 0 if mask.is_floating_point() else mask != 0


def _unpadded(mask: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(mask) if mask.dtype in (torch.int64, torch.int32) else torch.zeros_like(mask)


PADDED = ["bert", "gpt2", "llama", "t5", "whisper", "mha_bf_weights", "mha_sf_weights_discarded", "mha_bf_sdpa",
          "mha_sf_sdpa_causal", "mha_cross_weights", "encoder_post_masks", "decoder_post_masks"]


@pytest.mark.parametrize("name", PADDED)
def test_inputs_exercise_padding(name: str) -> None:
    """Only the last batch row is padded, not entirely, and the padding changes the model's output."""
    _, model, args, kwargs, _ = captured(name)
    masks = _padding_masks(kwargs)
    assert masks, "no padding mask among the inputs"
    for mask in masks.values():
        valid = _valid(mask)
        assert valid[:-1].all() and valid[-1].any() and not valid[-1].all()
    unpadded = {**kwargs, **{k: _unpadded(v) for k, v in masks.items()}}
    assert zoo.max_abs_diff(eager(model, args, unpadded), eager(model, args, kwargs)) > 1e-3


@pytest.mark.parametrize("name", ["kv_decode_m1_gqa", "kv_decode_m4"])
def test_decode_step_reads_the_cache(name: str) -> None:
    _, model, args, kwargs, _ = captured(name)
    x, past_k, past_v, mask = args
    out = eager(model, args, kwargs)[0]
    assert out.shape == x.shape
    assert past_k.shape[-2] > x.shape[1]  # a longer cache than new tokens
    changed = eager(model, (x, past_k, past_v + 1.0, mask), kwargs)[0]
    assert (changed - out).abs().max() > 1e-3


def test_decode_m4_is_bottom_right_causal() -> None:
    """Query i sees the cache and new tokens 0..i: changing new token 3 leaves queries 0..2 alone."""
    _, model, args, kwargs, _ = captured("kv_decode_m4")
    x, *rest = args
    later = x.clone()
    later[:, 3] += 1.0
    a, b = eager(model, args, kwargs)[0], eager(model, (later, *rest), kwargs)[0]
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-3


def test_nanogpt_is_causal() -> None:
    _, model, (idx,), _, _ = captured("nanogpt")
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 99
    a, b = eager(model, (idx,), {}), eager(model, (changed,), {})
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)


def test_llama_is_gqa_and_t5_unscaled() -> None:
    llama, _, _ = zoo.REGISTRY["llama"].build(SEQ)
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    t5, _, _ = zoo.REGISTRY["t5"].build(SEQ)
    assert t5.config.num_layers + 2 * t5.config.num_decoder_layers == zoo.REGISTRY["t5"].attention_sites


def test_build_is_deterministic_and_seeded() -> None:
    entry = zoo.REGISTRY["gpt2"]
    (m1, a1, k1), (m2, a2, k2) = entry.build(SEQ), entry.build(SEQ)
    assert zoo.max_abs_diff(eager(m1, a1, k1), eager(m2, a2, k2)) == 0.0
    m3, _, _ = entry.build(SEQ, seed=1)
    assert zoo.max_abs_diff(eager(m3, a1, k1), eager(m1, a1, k1)) > 1e-3


@pytest.mark.parametrize("name", BREADTH)
def test_breadth_exports_with_its_softmax_count(name: str) -> None:
    entry = zoo.REGISTRY[name]
    model, args, kwargs = entry.build(SEQ)
    program = zoo.export(model, args, kwargs)
    assert len(zoo.softmax_nodes(program.graph)) == entry.softmax_nodes
    assert zoo.max_abs_diff(program.module()(*args, **kwargs), eager(model, args, kwargs)) <= ATOL


def test_unsupported_entries_have_reasons() -> None:
    assert zoo.UNSUPPORTED
    for name, reason in zoo.UNSUPPORTED.items():
        assert name not in zoo.REGISTRY and len(reason) > 20


def test_max_abs_diff_flags_nan_and_shape() -> None:
    x = torch.zeros(3)
    assert zoo.max_abs_diff((x,), (x.clone(),)) == 0.0
    assert zoo.max_abs_diff(x, torch.tensor([0.0, float("nan"), 0.0])) == float("inf")
    both = torch.tensor([float("nan"), float("-inf")])
    assert zoo.max_abs_diff(both, both.clone()) == 0.0
    with pytest.raises(ValueError):
        zoo.max_abs_diff(x, torch.zeros(4))


class _TextbookAttention(torch.nn.Module):
    """Inductor's own first pattern: matmul, divide by sqrt(d), softmax, matmul."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, k.transpose(-2, -1)).div(q.shape[-1] ** 0.5).softmax(dim=-1).matmul(v)


def test_coverage_benchmark_counts_inductor_fusions() -> None:
    """The benchmark's Inductor column is a real measurement: a pattern Inductor knows counts as 1."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "coverage.py"
    spec = importlib.util.spec_from_file_location("zoo_coverage_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is built
    spec.loader.exec_module(bench)

    def build(seq_len: int, batch: int = 2, seed: int = 0):
        q = torch.randn(batch, 4, seq_len, 16, generator=torch.Generator().manual_seed(seed))
        return _TextbookAttention(), (q, q + 1, q - 1), {}

    entry = zoo.ZooModel(name="textbook", family="test", build=build, attention_sites=1)
    row = bench.Row(entry.name, entry.attention_sites)
    bench.measure_inductor(row, entry, SEQ)
    assert row.problems == [] and row.inductor == 1 and row.inductor_err <= ATOL
