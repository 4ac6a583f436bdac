"""Failures raise ExportError naming the site and the difference, and leave no file behind."""
import dataclasses
import re

import pytest
import torch

from attnfx.onnx import lowering as onnx_lowering
from attnfx.errors import ExportError
from attnfx.onnx import export_onnx
from onnx_helpers import Decoder, SelfAttention, decoder_inputs, stand_in


def test_a_wrong_site_is_named_with_its_difference_and_no_file_is_left(tmp_path, monkeypatch):
    lower = onnx_lowering._standard_attention

    def doubled_scale_at_site_1(q, k, v, mask, slopes, meta, scale, *rest):
        if meta[onnx_lowering.SITE_KEY] == "1":
            scale = 2 * scale
        return lower(q, k, v, mask, slopes, meta, scale, *rest)

    monkeypatch.setattr(onnx_lowering, "_standard_attention", doubled_scale_at_site_1)
    torch.manual_seed(0)
    opt = stand_in(Decoder(), decoder_inputs())
    previous = tmp_path / "decoder.onnx"
    previous.write_bytes(b"an earlier export")
    with pytest.raises(ExportError) as err:
        export_onnx(opt, previous)
    assert re.fullmatch(
        r"site 1 \(layers\.1, exported as Attention\): onnxruntime differs from PyTorch by max \|diff\| "
        r"(\S+) > atol 0\.0001 on example inputs \(model output 0: \S+\)",
        str(err.value),
    )
    assert float(re.search(r"max \|diff\| (\S+) >", str(err.value)).group(1)) > 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]
    assert previous.read_bytes() == b"an earlier export"


def test_external_data_is_written_beside_the_model_and_removed_on_failure(tmp_path):
    torch.manual_seed(0)
    opt = stand_in(SelfAttention(causal=True), {"x": torch.randn(2, 6, 32)})
    export_onnx(opt, tmp_path / "ok" / "model.onnx", external_data=True)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["model.onnx", "model.onnx.data"]
    with pytest.raises(ExportError, match=r"^site 0 \(<root>, exported as Attention\): onnxruntime differs"):
        export_onnx(opt, tmp_path / "tight" / "model.onnx", external_data=True, atol=0.0)
    assert list((tmp_path / "tight").iterdir()) == []


def test_a_reported_site_missing_from_the_graph_is_an_error(tmp_path):
    opt = stand_in(SelfAttention(), {"x": torch.randn(2, 6, 32)})
    opt.report.entries[0] = dataclasses.replace(opt.report.entries[0], replacement="gone")
    for node in opt.graph_module.graph.nodes:
        node.meta.pop("attnfx_site", None)
    with pytest.raises(ExportError) as err:
        export_onnx(opt, tmp_path / "missing.onnx")
    assert str(err.value) == (
        "site 0 is reported REWRITTEN (node 'gone') but the graph has no SDPA call for it"
    )
    assert list(tmp_path.iterdir()) == []


def test_training_dropout_is_refused(tmp_path):
    class Dropout(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    opt = stand_in(Dropout(), {"q": torch.randn(1, 2, 4, 8)})
    with pytest.raises(ExportError, match=r"dropout_p=0\.1; ONNX attention has no dropout"):
        export_onnx(opt, tmp_path / "dropout.onnx")
