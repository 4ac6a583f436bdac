"""Opset 23: every site becomes one standard ONNX Attention node, and onnxruntime matches PyTorch."""
import onnx
import pytest
import torch
from torch.export import Dim

from attnfx.onnx import export_onnx
from onnx_helpers import (
    BiasedEncoder,
    Decoder,
    SelfAttention,
    attributes,
    decoder_inputs,
    fused_nodes,
    run_onnx_file,
    stand_in,
)


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory):
    torch.manual_seed(0)
    opt = stand_in(Decoder(), decoder_inputs(), refused=1)
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    return opt, path, export_onnx(opt, path)


def test_gqa_causal_and_padded_cross_attention_are_one_attention_node_each(decoder_export):
    opt, path, summary = decoder_export
    assert summary.fused_nodes == {"Attention": 3}
    assert summary.softmax_nodes == 0
    assert [s.became for s in summary.sites] == ["Attention"] * 3
    nodes = fused_nodes(path)
    assert len(nodes) == 3
    causal = [attributes(n) for n in nodes[:2]]
    assert all(a["is_causal"] == 1 and a["scale"] == pytest.approx(0.3) for a in causal)
    cross = attributes(nodes[2])
    assert cross["is_causal"] == 0 and cross["scale"] == pytest.approx(8**-0.5)
    assert len(nodes[2].input) == 4  # q, k, v and the padding mask
    assert [label for label, _ in summary.checks] == ["example inputs", summary.checks[1][0]]
    assert summary.checks[1][0].startswith("second length (")
    assert all(diff <= 1e-4 for _, diff in summary.checks)


def test_batch_and_sequence_axes_stay_dynamic(decoder_export):
    opt, path, summary = decoder_export
    x, memory, mask = summary.inputs["x"], summary.inputs["memory"], summary.inputs["memory_mask"]
    assert isinstance(x[0], str) and isinstance(x[1], str) and x[2] == 32
    assert memory[0] == x[0] and isinstance(memory[1], str) and memory[1] != x[1]
    assert mask == (x[0], memory[1])
    inputs = decoder_inputs(batch=3, length=5, memory=13)
    (got,) = run_onnx_file(path, inputs)
    with torch.no_grad():
        expected = opt.graph_module(**inputs)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)


def test_summary_table_names_each_site_module_and_reason(decoder_export):
    _, path, summary = decoder_export
    lines = str(summary).splitlines()
    assert lines[0] == f"attnfx ONNX export -> {path} (opset 23)"
    assert lines[1].split() == ["site", "module", "became", "why"]
    assert lines[2].split(None, 3) == ["0", "layers.0", "Attention", "GQA heads=4/2; scale=0.3; is_causal=1"]
    assert lines[4].split(None, 3) == ["2", "cross", "Attention", "GQA heads=4/2; scale=0.3536; bool mask"]
    assert lines[5].split(None, 3) == ["3", "-", "unfused", "not rewritten (REFUSED): the model's own ops"]
    assert lines[6] == "fused attention nodes: Attention x3; Softmax nodes left: 0"


def test_additive_bias_goes_in_through_the_float_mask(tmp_path):
    torch.manual_seed(0)
    opt = stand_in(BiasedEncoder(), {"x": torch.randn(2, 12, 32)})
    summary = export_onnx(opt, tmp_path / "biased.onnx")
    assert summary.fused_nodes == {"Attention": 1} and summary.softmax_nodes == 0
    assert summary.sites[0].why == "heads=4; scale=0.3536; additive mask"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "biased.onnx")))
    (node,) = [n for n in model.graph.node if n.op_type == "Attention"]
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    assert types[node.input[3]] == onnx.TensorProto.FLOAT
    assert all(diff <= 1e-4 for _, diff in summary.checks) and len(summary.checks) == 2


def test_batch_first_multihead_attention_with_key_padding_mask(tmp_path):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, keep):
            return self.mha(x, x, x, key_padding_mask=~keep, need_weights=False)[0]

    torch.manual_seed(0)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    summary = export_onnx(stand_in(Block(), {"x": torch.randn(2, 9, 32), "keep": keep}), tmp_path / "mha.onnx")
    assert summary.fused_nodes == {"Attention": 1} and summary.softmax_nodes == 0
    assert summary.sites[0].module == "mha"
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_static_export_has_fixed_axes_and_checks_only_the_example(tmp_path):
    torch.manual_seed(0)
    opt = stand_in(SelfAttention(causal=True), {"x": torch.randn(2, 6, 32)})
    summary = export_onnx(opt, tmp_path / "static.onnx", dynamic=False)
    assert summary.inputs == {"x": (2, 6, 32)}
    assert [label for label, _ in summary.checks] == ["example inputs"]
    assert summary.checks[0][1] <= 1e-4
    assert summary.no_second_length == "static export"


def test_a_length_the_model_refuses_is_not_the_second_length(tmp_path):
    class AtLeastSix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SelfAttention(causal=True)

        def forward(self, x):
            torch._check(x.shape[1] >= 6)
            return self.attn(x)

    torch.manual_seed(0)
    summary = export_onnx(stand_in(AtLeastSix(), {"x": torch.randn(2, 8, 32)}), tmp_path / "six.onnx")
    (length,) = [axis for axis in summary.inputs["x"][1:] if isinstance(axis, str)]
    assert [label for label, _ in summary.checks] == ["example inputs", f"second length ({length} 8->12)"]


def test_without_placeholder_metadata_the_captures_dynamic_shapes_are_used(tmp_path):
    torch.manual_seed(0)
    opt = stand_in(SelfAttention(causal=True), {"x": torch.randn(2, 6, 32)})
    opt.dynamic_shapes = {"x": {0: Dim.AUTO, 1: Dim.AUTO}}
    for node in opt.graph_module.graph.nodes:
        if node.op == "placeholder":
            del node.meta["val"]
    summary = export_onnx(opt, tmp_path / "nometa.onnx")
    batch, length, hidden = summary.inputs["x"]
    assert isinstance(batch, str) and isinstance(length, str) and hidden == 32
    assert [label for label, _ in summary.checks] == ["example inputs"]
    assert summary.no_second_length == "no symbolic axis besides the batch"  # none known without metadata


def test_an_axis_derived_from_two_lengths_stays_dynamic(tmp_path):
    """A key mask over cache + new tokens has length P + M: an expression, not a symbol of its own."""

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SelfAttention()

        def forward(self, x, past, keep):
            return self.attn(x, torch.cat([past, x], dim=1), keep[:, None, None, :])

    torch.manual_seed(0)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, :2] = False
    inputs = {"x": torch.randn(2, 4, 32), "past": torch.randn(2, 6, 32), "keep": keep}
    summary = export_onnx(stand_in(Cached(), inputs), tmp_path / "cached.onnx")
    assert isinstance(summary.inputs["keep"][1], str)
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)
