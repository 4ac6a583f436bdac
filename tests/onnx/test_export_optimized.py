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


def test_left_padded_decoder_matches_onnxruntime_on_padding_rows(tmp_path) -> None:
    """Rows whose every key is masked with finfo.min average V in PyTorch; onnxruntime zeroes rows
    of exactly finfo.min, so the export must not hand it that value."""
    transformers = __import__("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, use_cache=False,
                                     attn_implementation="eager")
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding: query rows 0-2 of sequence 1 see no key
    opt = attnfx.optimize(model, (), {"input_ids": ids, "attention_mask": mask})
    summary = attnfx.export_onnx(opt, tmp_path / "gpt2.onnx")
    assert summary.attention_nodes == 1
    assert max(diff for _, diff in summary.checks) < 1e-4
