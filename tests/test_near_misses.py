"""Softmaxes that are *not* rewritable attention are left exactly as written, with the reason."""
from __future__ import annotations

import pytest
import torch

import attnfx
from attention_cases import Projected, inputs
import attention_cases as cases

NEAR_MISSES = {
    "softmax_over_queries": (cases.softmax_over_queries, "SOFTMAX_AXIS", "softmax over dim 2, which indexes the queries"),
    "softmax_over_heads": (cases.softmax_over_heads, "SOFTMAX_AXIS", "softmax over dim 1, which indexes a batch/head dim"),
    "mask_after_softmax": (cases.mask_after_softmax, "MASK_AFTER_SOFTMAX", "masks the weights after the softmax"),
    "probs_times_tensor": (cases.probs_times_tensor, "PROBS_MODIFIED", "applies mul to the weights"),
    "scale_on_values": (cases.scale_on_values, "SCALE_ON_VALUES", "scales V before the AV contraction"),
    "probs_returned": (cases.probs_returned, "PROBS_ESCAPE", "are returned by the model"),
    "probs_in_loss": (cases.probs_in_loss, "PROBS_ESCAPE", "are also used by"),
    "scores_returned": (cases.scores_returned, "SCORES_ESCAPE", "are also used by"),
    "log_softmax": (cases.log_softmax_attention, "LOG_SOFTMAX", "log_softmax yields log-probabilities"),
    "topk_masked": (cases.topk_masked, "SCORE_DEPENDENT_MASK", "computed from the scores themselves"),
    "fill_with_zero": (cases.fill_with_zero, "UNPROVEN_MASK", "sets scores to 0, which keeps them in the softmax"),
    "fill_with_tensor": (cases.fill_with_tensor, "UNPROVEN_MASK", "fills scores with a tensor"),
    "relu_scores": (cases.relu_scores, "SCORE_OP_UNSUPPORTED", "applies relu to the scores"),
    "gated_scores": (cases.gated_scores, "SCALE_NOT_SCALAR", "by a tensor of shape (2, 4, 12, 12) that varies along "
                     "the keys"),
    "av_over_queries": (cases.av_over_queries, "PROBS_WRONG_AXIS", "contracts the weights over [queries]"),
    "av_sums_heads": (cases.av_sums_heads, "PROBS_WRONG_AXIS", "contracts the weights over [a batch/head dim, keys]"),
    "mask_before_softcap": (cases.mask_before_softcap, "SCORE_ORDER", "comes after a bias, mask or another softcap"),
    "softmax_of_values": (cases.softmax_of_values, "NO_QK_CONTRACTION", "no contraction of two tensors produces"),
    "multiplicative_mask": (cases.multiplicative_mask, "SCALE_NOT_SCALAR", "by a tensor of shape (12, 12)"),
    "renormalised_probs": (cases.renormalised_probs, "PROBS_ESCAPE", "are also used by"),
    "softmax_over_batch": (cases.softmax_over_batch, "SOFTMAX_AXIS", "softmax over dim 0, which indexes a batch/head dim"),
    "probs_times_probs": (cases.probs_times_probs, "NO_AV_CONTRACTION", "contracts the weights with themselves"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_miss_is_left_alone_with_its_reason(name: str) -> None:
    attend, code, text = NEAR_MISSES[name]
    model = Projected(attend, returns_extra=name in ("probs_returned", "probs_in_loss", "scores_returned")).eval()
    opt = attnfx.optimize(model, inputs())
    entries = opt.report.entries
    assert len(entries) == 1 and entries[0].status == "REFUSED", opt.report
    assert entries[0].reason_code == code
    assert text in entries[0].reason
    targets = [n.target for n in opt.graph_module.graph.nodes]
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x))


def test_report_names_the_failed_stage() -> None:
    stages = {}
    for name in ("mask_after_softmax", "gated_scores", "topk_masked", "softmax_over_queries", "av_over_queries"):
        attend = NEAR_MISSES[name][0]
        stages[name] = attnfx.optimize(Projected(attend).eval(), inputs()).report.entries[0].failed_stage
    assert stages == {"mask_after_softmax": "A", "gated_scores": "S", "topk_masked": "mask",
                      "softmax_over_queries": "softmax", "av_over_queries": "AV"}


def test_eval_mode_model_with_zero_dropout_in_training_is_still_rewritten() -> None:
    def zero_dropout(q, k, v):
        return torch.nn.functional.dropout(torch.softmax(q @ k.transpose(-2, -1) * cases.SCALE, -1), 0.0, True) @ v

    model = Projected(zero_dropout).eval()
    assert attnfx.optimize(model, inputs()).report.rewritten == 1


def test_hugging_face_output_attentions_keeps_every_softmax() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, use_cache=False,
                                     attn_implementation="eager")
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    opt = attnfx.optimize(model, (), {"input_ids": ids, "output_attentions": True})
    assert [e.reason_code for e in opt.report.entries] == ["PROBS_ESCAPE", "PROBS_ESCAPE"]
    assert all("are returned by the model" in e.reason for e in opt.report.entries)
    out = opt(input_ids=ids, output_attentions=True)
    torch.testing.assert_close(out.attentions[1], model(input_ids=ids, output_attentions=True).attentions[1])
    # without the weights returned the softmaxes are attention again: that call is optimised anew
    out = opt(input_ids=ids, output_attentions=False)
    torch.testing.assert_close(out.last_hidden_state, model(input_ids=ids).last_hidden_state)
    assert opt.report.notes[-1] == ("re-optimised for a call with other arguments than the captured one: "
                                    "2 site(s) rewritten")
    assert [e.status for e in opt.specializations[0].report.entries] == ["REWRITTEN", "REWRITTEN"]
