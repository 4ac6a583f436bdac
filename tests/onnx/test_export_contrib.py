"""Opset < 23: onnxruntime's com.microsoft MultiHeadAttention / GroupQueryAttention where exact."""
import pytest
import torch

from attnfx.onnx import export_onnx
from onnx_helpers import Decoder, SelfAttention, attributes, decoder_inputs, fused_nodes, stand_in


def test_decoder_at_opset_20_uses_gqa_for_causal_self_attention_and_mha_for_cross(tmp_path):
    torch.manual_seed(0)
    summary = export_onnx(stand_in(Decoder(), decoder_inputs()), tmp_path / "decoder.onnx", opset=20)
    assert summary.fused_nodes == {"GroupQueryAttention": 2, "MultiHeadAttention": 1}
    assert summary.softmax_nodes == 0
    assert [s.became for s in summary.sites] == ["GroupQueryAttention"] * 2 + ["MultiHeadAttention"]
    assert summary.sites[2].why == (
        "GQA heads=4/2; scale=0.3536; GroupQueryAttention needs causal self-attention with E = F, so K/V "
        "heads repeated x2 for MultiHeadAttention; bool mask as attention_bias"
    )
    gqa, _, mha = fused_nodes(tmp_path / "decoder.onnx")
    assert gqa.domain == mha.domain == "com.microsoft"
    assert attributes(gqa) == {"num_heads": 4, "kv_num_heads": 2, "scale": pytest.approx(0.3)}
    assert attributes(mha)["unidirectional"] == 0 and mha.input[5]  # the mask is attention_bias
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_causal_cross_attention_builds_its_diagonal_instead_of_unidirectional(tmp_path):
    """SDPA's is_causal with M != N is top-left; MultiHeadAttention's unidirectional is not (ORT 1.31)."""

    class CausalCross(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SelfAttention(causal=True)

        def forward(self, x, memory):
            return self.attn(x, memory)

    torch.manual_seed(0)
    opt = stand_in(CausalCross(), {"x": torch.randn(2, 5, 32), "memory": torch.randn(2, 9, 32)})
    summary = export_onnx(opt, tmp_path / "cross.onnx", opset=18)
    (node,) = fused_nodes(tmp_path / "cross.onnx")
    assert node.op_type == "MultiHeadAttention" and attributes(node)["unidirectional"] == 0
    assert "top_left causal as attention_bias" in summary.sites[0].why
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_causal_mha_self_attention_uses_unidirectional(tmp_path):
    torch.manual_seed(0)
    opt = stand_in(SelfAttention(causal=True), {"x": torch.randn(2, 7, 32)})
    summary = export_onnx(opt, tmp_path / "causal.onnx", opset=18)
    (node,) = fused_nodes(tmp_path / "causal.onnx")
    assert node.op_type == "MultiHeadAttention"
    assert attributes(node) == {"num_heads": 4, "scale": pytest.approx(8**-0.5), "unidirectional": 1}
    assert summary.softmax_nodes == 0
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_rows_with_every_key_masked_are_zero_as_in_sdpa(tmp_path):
    """Causal + left padding leaves the padded queries no key: SDPA gives 0 there, the contrib ops NaN."""

    class LeftPadded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SelfAttention()

        def forward(self, x, keep):
            n = x.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            return self.attn(x, mask=causal & keep[:, None, None, :])

    torch.manual_seed(0)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False
    opt = stand_in(LeftPadded(), {"x": torch.randn(2, 8, 32), "keep": keep})
    with torch.no_grad():  # attention output 0, so the output projection gives its bias
        out = opt.graph_module(**opt.example_kwargs)
        assert torch.equal(out[1, :3], opt.graph_module.attn.o.bias.expand(3, 32))
    summary = export_onnx(opt, tmp_path / "left.onnx", opset=20)
    assert summary.fused_nodes == {"MultiHeadAttention": 1}
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)
