"""Padding-free attention: where the mask proof shows key padding read from an attention_mask, the
site gets the `key_keep` lowering (the per-key keep mask (B, 1, 1, N) built from the model's own
mask, the model's exclusion value as fill) and attnfx::padded_attention; outputs match at every
position, padded query rows included. Near-misses keep the mask tensor and say why."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import attnfx
import attention_cases as cases
from attention_cases import inputs

PADDED_OP = "attnfx.padded_attention.default"


def _ops(opt) -> list[str]:
    return [str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function"]


def _padding(lengths: list[int], n: int, left: bool = False) -> torch.Tensor:
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, n - length:] = 1
        else:
            mask[row, :length] = 1
    return mask


def _bert(n: int = 128, hidden: int = 32) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * hidden, max_position_embeddings=n)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval()


def _ids(batch: int, n: int) -> torch.Tensor:
    return torch.randint(1, 100, (batch, n), generator=torch.Generator().manual_seed(batch * n))


def test_bert_right_padding_runs_padding_free_and_matches_everywhere() -> None:
    model = _bert()
    ids, mask = _ids(3, 64), _padding([64, 40, 17], 64)
    opt = attnfx.optimize(model, (ids,), {"attention_mask": mask}, variants=["padded"])
    assert [(e.status, e.variant, e.lowering) for e in opt.report.entries] == [("REWRITTEN", "padded", "key_keep")] * 2
    (entry, _) = opt.report.entries
    assert entry.mask == "key padding read from attention_mask(b, n)"
    assert entry.spec.mask.value == "bool" and entry.spec.mask_shape == (3, 1, 1, 64)
    ops = _ops(opt)
    assert ops.count(PADDED_OP) == 2 and not any("softmax" in op for op in ops)
    # the keep row is narrowed through HF's mask construction: no (B, 1, N, N) mask is built any more
    wheres = [n.meta["val"].shape for n in opt.graph_module.graph.nodes if str(n.target).startswith("aten.where")]
    assert wheres and all(len(shape) == 4 and str(shape[2]) == "1" for shape in wheres), wheres
    for batch, n, lengths in ((3, 64, [64, 40, 17]), (4, 96, [5, 96, 60, 60]), (2, 33, [33, 33])):
        ids, mask = _ids(batch, n), _padding(lengths, n)
        with torch.no_grad():  # every position, padded query rows included
            torch.testing.assert_close(opt(ids, attention_mask=mask).last_hidden_state,
                                       model(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_cost_model_chooses_padded_for_a_padded_bert_batch() -> None:
    model = _bert(256, hidden=128)  # heads of 64
    ids, mask = _ids(4, 256), _padding([256, 200, 128, 64], 256)
    opt = attnfx.optimize(model, (ids,), {"attention_mask": mask})
    assert [(e.variant, e.lowering) for e in opt.report.entries] == [("padded", "key_keep")] * 2
    with torch.no_grad():
        torch.testing.assert_close(opt(ids, attention_mask=mask).last_hidden_state,
                                   model(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_decoder_left_padding_matches_at_rows_that_keep_no_key() -> None:
    model = _llama()
    ids, mask = _ids(3, 24), _padding([24, 19, 7], 24, left=True)
    opt = attnfx.optimize(model, (ids,), {"attention_mask": mask, "use_cache": False}, variants=["padded"])
    assert [(e.status, e.variant, e.lowering) for e in opt.report.entries] == [("REWRITTEN", "padded", "key_keep")] * 2
    entry = opt.report.entries[0]
    assert entry.mask == "causal top-left (n <= m), key padding read from attention_mask(b, n)"
    assert entry.spec.causal.value == "top_left" and entry.spec.mask_shape == (3, 1, 1, 24)
    call = next(n for n in opt.graph_module.graph.nodes if str(n.target) == PADDED_OP)
    assert call.args[-1] == torch.finfo(torch.float32).min  # HF's exclusion value: the rows of padding
    for lengths in ([24, 19, 7], [1, 24, 12]):  # query rows 0..N-len-1 keep no key: HF gives the mean of V
        ids, mask = _ids(3, 24), _padding(lengths, 24, left=True)
        with torch.no_grad():
            torch.testing.assert_close(opt(ids, attention_mask=mask, use_cache=False).last_hidden_state,
                                       model(ids, attention_mask=mask, use_cache=False).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)


class MaskedAttention(torch.nn.Module):
    """Attention whose scores are masked by `mask_scores(scores, attention_mask, t)`."""

    def __init__(self, mask_scores) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(cases.C, 3 * cases.C)
        self.mask_scores = mask_scores

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q, k, v = self.proj(x).view(b, t, 3, cases.H, cases.D).permute(2, 0, 3, 1, 4)
        return F.softmax(self.mask_scores(q @ k.transpose(-2, -1) * cases.SCALE, attention_mask, t), dim=-1) @ v


def keep_where(build, fill: float = -math.inf):
    """Scores kept where `build(bool attention_mask, t)` is True, else `fill`."""
    return lambda s, mask, t: s.masked_fill(~build(mask.bool(), t), fill)


def _causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def test_per_key_bool_mask_with_causal_is_padding_free() -> None:
    model = MaskedAttention(keep_where(lambda mask, t: mask[:, None, None, :] & _causal(t))).eval()
    x, mask = inputs(12, 3)[0], _padding([12, 9, 4], 12)
    opt = attnfx.optimize(model, (x, mask), variants=["padded"])
    (entry,) = opt.report.entries
    assert (entry.status, entry.variant, entry.lowering) == ("REWRITTEN", "padded", "key_keep")
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


NOT_PER_KEY = "padded_attention takes a per-key bool mask (B, 1, 1, N); this site's mask is not one"


@pytest.mark.parametrize("build, proof", [
    # padding read along the queries, not the keys
    (lambda mask, t: mask[:, None, :, None] & _causal(t), "unproven: Ne(attention_mask(b, m), 0)"),
    # padding that also depends on the head
    (lambda mask, t: mask[:, None, None, :] & (torch.arange(cases.H) % 2 == 0)[None, :, None, None] | _causal(t),
     None),
])
def test_padding_that_is_not_per_key_keeps_the_mask_tensor(build, proof) -> None:
    model = MaskedAttention(keep_where(build, torch.finfo(torch.float32).min)).eval()
    x, mask = inputs(12, 3)[0], _padding([12, 9, 4], 12)
    opt = attnfx.optimize(model, (x, mask))
    (entry,) = opt.report.entries
    if proof is not None:
        assert proof in entry.mask
    assert "key_keep" not in {c.lowering for c in entry.candidates}
    assert entry.variant != "padded"
    assert ("padded", "tensor", NOT_PER_KEY) in entry.unavailable
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


def two_fills(s, mask, t):
    """Padding excluded with finfo.min, causal with -inf: rows that keep no key depend on both."""
    pad = torch.where(mask.bool()[:, None, None, :], 0.0, torch.finfo(s.dtype).min)
    return (s + pad).masked_fill(~_causal(t), -math.inf)


def test_two_exclusion_values_get_no_key_keep_lowering() -> None:
    model = MaskedAttention(two_fills).eval()
    x, mask = inputs(12, 3)[0], _padding([12, 9, 4], 12, left=True)
    opt = attnfx.optimize(model, (x, mask))
    (entry,) = opt.report.entries
    assert entry.mask == "causal top-left (n <= m), key padding read from attention_mask(b, n)"
    assert "key_keep" not in {c.lowering for c in entry.candidates}
    assert ("padded", "tensor", NOT_PER_KEY) in entry.unavailable
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask), atol=1e-5, rtol=1e-5, equal_nan=True)
