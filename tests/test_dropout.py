"""Training-mode attention dropout goes to a fused variant (SDPA's dropout_p), verified with dropout
off; `exact_dropout=True` keeps eager's random stream by leaving those sites as written."""
from __future__ import annotations

import torch

import attnfx
import attention_cases as cases
from attention_cases import Projected, inputs
from zoo import REGISTRY


def sdpa_calls(opt) -> list[torch.fx.Node]:
    return [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


def test_training_dropout_is_fused_into_sdpa() -> None:
    model = Projected(cases.training_dropout).train()
    opt = attnfx.optimize(model, inputs())
    (entry,) = opt.report.entries
    assert (entry.status, entry.variant, entry.spec.dropout_p) == ("REWRITTEN", "sdpa", 0.5), opt.report
    assert "dropout=0.5" in entry.spec.describe()
    (call,) = sdpa_calls(opt)
    assert call.args[4] == 0.5
    # the random masks differ from eager's, so compare expectations: the mean over many draws of
    # dropout(P) @ V is P @ V, which is the model with dropout off
    (x,) = inputs(6, 1)
    with torch.no_grad():
        torch.manual_seed(0)
        draws = opt(x.expand(4000, -1, -1))  # each batch row draws its own masks
        expected = Projected(cases.matmul_mul).eval()(x)[0]  # the same weights (seeded) without dropout
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), expected, atol=0.02, rtol=0.0)


def test_gradients_flow_through_the_fused_dropout() -> None:
    model = Projected(cases.training_dropout).train()
    opt = attnfx.optimize(model, inputs())
    opt(*inputs()).square().sum().backward()
    assert model.qkv.weight.grad is not None and model.qkv.weight.grad.abs().sum() > 0


def test_exact_dropout_keeps_the_site_as_written() -> None:
    model = Projected(cases.training_dropout).train()
    opt = attnfx.optimize(model, inputs(), exact_dropout=True)
    (entry,) = opt.report.entries
    assert (entry.status, entry.reason_code) == ("REFUSED", "DROPOUT_TRAINING")
    assert entry.reason == ("dropout (p=0.5) on the attention probabilities in training mode, and exact_dropout=True "
                            "keeps eager's random stream, which a fused variant does not draw")
    assert sdpa_calls(opt) == []
    torch.manual_seed(3)
    expected = model(*inputs())
    torch.manual_seed(3)
    torch.testing.assert_close(opt(*inputs()), expected)  # the same random stream as eager


def test_bert_in_train_mode_is_rewritten() -> None:
    model, args, kwargs = REGISTRY["bert"].build(seq_len=10)
    assert model.config.attention_probs_dropout_prob == 0.1
    opt = attnfx.optimize(model.train(), args, kwargs)
    statuses = [(e.status, e.variant, e.spec.dropout_p) for e in opt.report.entries]
    assert statuses == [("REWRITTEN", "sdpa", 0.1)] * 2, opt.report
    assert [n.args[4] for n in sdpa_calls(opt)] == [0.1, 0.1]
