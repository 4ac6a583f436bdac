"""optimize() then export_onnx(), as a user runs them: one Attention node per rewritten site."""
from __future__ import annotations

import onnx
import torch

import attnfx
import nanogpt
from attnfx.cli import main


def test_optimized_example_exports_one_attention_node_per_site(tmp_path) -> None:
    config = nanogpt.GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=128)
    model = nanogpt.build(config)
    opt = attnfx.optimize(model, (torch.randint(0, 128, (2, 32)),))
    path = tmp_path / "gpt.onnx"
    summary = attnfx.export_onnx(opt, path)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Attention") == opt.report.rewritten == 2
    assert "Softmax" not in ops
    assert str(summary)


def test_cli_exports_onnx(tmp_path, capsys) -> None:
    out = tmp_path / "cli.onnx"
    assert main(["optimize", "examples/nanogpt.py", "--seq-len", "16", "--no-bench", "--onnx", str(out)]) == 0
    assert out.is_file()
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Attention") == 4
