"""The bundled nanoGPT example: every site rewritten to causal SDPA, exact at several lengths."""
from __future__ import annotations

import torch

import attnfx
import nanogpt
from attnfx.cli import main


def test_example_model_is_fully_rewritten_with_is_causal() -> None:
    config = nanogpt.GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=256, vocab_size=128)
    model = nanogpt.build(config)
    idx = torch.randint(0, 128, (2, 48))
    opt = attnfx.optimize(model, (idx,))
    assert opt.report.rewritten == 4 and len(opt.report.entries) == 4
    sdpa = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 4 and all(n.args[5] is True and n.args[3] is None for n in sdpa)
    for batch, length in ((2, 48), (1, 17), (3, 200)):
        x = torch.randint(0, 128, (batch, length))
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_cli_optimizes_the_example_file(capsys) -> None:
    assert main(["optimize", "examples/nanogpt.py", "--seq-len", "32", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "attnfx report for GPT (captured with torch.export): 4 site(s): 4 rewritten" in out
    assert out.count("sdpa [flag]") == 4
