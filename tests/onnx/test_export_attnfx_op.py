"""Sites rewritten to attnfx::attention: softcap, ALiBi, key padding, bottom-right causal, window, bias.

They run once the kernels branch registers the op (skipped before that).
"""
import importlib
import re

import pytest
import torch

from attnfx.errors import ExportError
from attnfx.onnx import export_onnx
from onnx_helpers import attributes, fused_nodes, stand_in

try:  # the kernels branch registers the op on import
    importlib.import_module("attnfx.kernels.attention_ops")
except ModuleNotFoundError:
    pass
pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.attnfx, "attention"), reason="attnfx::attention is not registered (kernels branch)"
)


class OpAttention(torch.nn.Module):
    """q from x, k/v from x or memory, through attnfx::attention with fixed site parameters."""

    def __init__(self, kv_heads=2, causal="none", window=-1, softcap=0.0, alibi=False, use_lse=False):
        super().__init__()
        self.kv_heads, self.causal, self.window, self.softcap, self.use_lse = kv_heads, causal, window, softcap, use_lse
        self.q = torch.nn.Linear(32, 32)
        self.kv = torch.nn.Linear(32, 2 * kv_heads * 8)
        self.slopes = torch.nn.Parameter(torch.rand(4)) if alibi else None

    def forward(self, x, memory=None, bias=None):
        b, m, _ = x.shape
        src = x if memory is None else memory
        q = self.q(x).view(b, m, 4, 8).transpose(1, 2)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.kv_heads, 8).permute(2, 0, 3, 1, 4)
        out, lse = torch.ops.attnfx.attention(
            q, k, v, bias, self.slopes, 0.4, self.causal, self.window, self.softcap
        )
        y = out.transpose(1, 2).reshape(b, m, 32)
        return y + lse.transpose(1, 2).sum(-1, keepdim=True) if self.use_lse else y


def _inputs(cross=False, bias=None, key_padding=False, n=9):
    torch.manual_seed(1)
    n = n if cross else 6
    inputs = {"x": 2 * torch.randn(2, 6, 32)}
    if cross:
        inputs["memory"] = torch.randn(2, n, 32)
    if bias == "bool":
        inputs["bias"] = torch.ones(2, 1, 6, n, dtype=torch.bool)
        inputs["bias"][1, ..., n - 2:] = False
    elif bias == "additive":
        inputs["bias"] = torch.randn(2, 1, 6, n)
    if key_padding:  # keys past 4 removed in batch 1, through a bool (2, 1, 1, N) mask or the bool bias
        keep = torch.arange(n).view(1, 1, 1, n) < torch.tensor([n, 4]).view(2, 1, 1, 1)
        inputs["bias"] = keep & inputs["bias"] if "bias" in inputs else keep
    return inputs


CASES = [
    # (model kwargs, input kwargs, opset, became, ONNX attributes expected on the fused node)
    (dict(softcap=2.0), {}, 23, "Attention", {"softcap": 2.0, "is_causal": 0}),
    (dict(softcap=2.0, causal="top_left"), dict(bias="additive"), 20, "GroupQueryAttention",
     {"softcap": 2.0, "num_heads": 4, "kv_num_heads": 2}),
    (dict(alibi=True, causal="top_left"), {}, 23, "Attention", {"is_causal": 1}),
    (dict(causal="bottom_right", window=4, softcap=3.0), dict(cross=True), 23, "Attention",
     {"is_causal": 0, "softcap": 3.0}),
    (dict(causal="bottom_right", window=3), {}, 20, "GroupQueryAttention", {"local_window_size": 3}),
    (dict(kv_heads=4), dict(cross=True, bias="bool", key_padding=True), 23, "Attention", {"is_causal": 0}),
    (dict(kv_heads=4, causal="bottom_right", alibi=True), dict(cross=True, key_padding=True), 18,
     "MultiHeadAttention", {"unidirectional": 0}),
    # M = 6 > N = 4, bottom-right: queries 0 and 1 see no key (0 in PyTorch, NaN in the contrib op)
    (dict(causal="bottom_right"), dict(cross=True, n=4), 20, "MultiHeadAttention", {"unidirectional": 0}),
]


@pytest.mark.parametrize("model_kw, input_kw, opset, became, attrs", CASES)
def test_attnfx_site_exports_as_one_fused_node(tmp_path, model_kw, input_kw, opset, became, attrs):
    torch.manual_seed(0)
    opt = stand_in(OpAttention(**model_kw), _inputs(**input_kw))
    summary = export_onnx(opt, tmp_path / "op.onnx", opset=opset)
    (node,) = fused_nodes(tmp_path / "op.onnx")
    assert node.op_type == became and summary.sites[0].became == became
    got = attributes(node)
    assert {k: got.get(k) for k in attrs} == pytest.approx(attrs)
    assert got["scale"] == pytest.approx(0.4)
    assert summary.softmax_nodes == 0
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_softcap_outside_causal_self_attention_is_decomposed_below_opset_23(tmp_path):
    opt = stand_in(OpAttention(kv_heads=4, softcap=1.5), _inputs(bias="bool"))
    summary = export_onnx(opt, tmp_path / "softcap.onnx", opset=20)
    assert summary.sites[0].became == "decomposed"
    assert summary.sites[0].why.startswith("softcap: MultiHeadAttention has none")
    assert summary.fused_nodes == {} and summary.softmax_nodes == 1
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_a_used_lse_is_refused_by_name(tmp_path):
    opt = stand_in(OpAttention(use_lse=True), _inputs())
    with pytest.raises(ExportError, match=re.escape("site 0: node ") + r"\w+ uses attnfx::attention's lse, "
                       "which ONNX attention operators do not return"):
        export_onnx(opt, tmp_path / "lse.onnx")
    assert list(tmp_path.iterdir()) == []
