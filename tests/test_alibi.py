"""ALiBi proven from real models: the bias tensor becomes the kernels' alibi_slopes argument."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import attnfx

NO_SDPA = ["attnfx_chunked", "padded"]  # SDPA takes no slopes: pin the variants that take ALiBi


def mpt(max_len: int = 64) -> nn.Module:
    config = transformers.MptConfig(vocab_size=99, d_model=64, n_heads=4, n_layers=2, max_seq_len=max_len,
                                    expansion_ratio=2)
    config._attn_implementation = "eager"
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.MptModel(config).eval()


def text(n: int, padded: int = 3) -> dict[str, torch.Tensor]:
    """Two rows of tokens, the second left-padded by `padded`."""
    ids = torch.randint(3, 99, (2, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :padded] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_mpt_alibi_is_passed_as_slopes() -> None:
    model = mpt()
    opt = attnfx.optimize(model, (), text(24), variants=NO_SDPA)
    entries = opt.report.entries
    assert [e.status for e in entries] == ["REWRITTEN", "REWRITTEN"], opt.report
    for e in entries:
        assert e.lowering.startswith("alibi+") and e.spec.alibi, e
        assert e.spec.mask_shape is None or e.spec.mask_shape[1] == 1  # no dense (B, H, M, N) bias left
        assert e.alibi.startswith("ALiBi: ") and "up to a constant per row" in e.alibi
    assert "bias: ALiBi" in str(opt.report)
    for n in (24, 40):  # the graph is dynamic in the length: the slopes slice follows it
        inputs = text(n, padded=5)
        with torch.no_grad():
            torch.testing.assert_close(opt(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                       rtol=1e-4, atol=1e-5)


class AlibiScores(nn.Module):
    """Four heads of eight with ALiBi scores: the exact form (n - m) or MPT's, shifted per row by a
    constant (n - N + 1), which only a softmax with no other logit cancels."""

    def __init__(self, exact: bool) -> None:
        super().__init__()
        self.exact = exact
        self.qkv = nn.Linear(32, 96)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, v)"""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        keys = torch.arange(n, device=x.device)
        positions = keys.view(1, -1) - keys.view(-1, 1) if self.exact else torch.arange(1 - n, 1).view(1, -1)
        return q @ k.transpose(-1, -2) / 8 ** 0.5 + self.slopes.view(-1, 1, 1) * positions, v


class SigmoidMpt(AlibiScores):
    """Sigmoid attention with MPT's bias: ALiBi only up to a per-row constant, which a sigmoid keeps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, v = self.scores(x)
        return (torch.sigmoid(scores - 2.0) @ v).transpose(1, 2).reshape(*x.shape)


@pytest.mark.parametrize("exact", [True, False])
def test_sigmoid_takes_alibi_only_when_exact(exact: bool) -> None:
    model = SigmoidMpt(exact).eval()
    x = torch.randn(2, 12, 32)
    opt = attnfx.optimize(model, (x,), variants=["attnfx_sigmoid_chunked"])
    (e,) = opt.report.entries
    assert e.status == "REWRITTEN", opt.report
    if exact:
        assert e.lowering == "alibi+none" and e.spec.alibi and e.alibi.startswith("ALiBi: ")
    else:
        assert e.lowering == "tensor" and not e.spec.alibi
        assert e.alibi.startswith("ALIBI_SHIFT_KEPT: ") and "which a sigmoid does not cancel" in e.alibi
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        model.slopes.mul_(2.0)  # the slopes are a buffer read at run time, not a literal folded in
        torch.testing.assert_close(opt(x), model(x))


def test_mpt_alibi_exports_to_onnx_from_the_slopes(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    opt = attnfx.optimize(mpt(), (), text(24), variants=NO_SDPA)
    summary = attnfx.export_onnx(opt, tmp_path / "mpt.onnx")  # checked in onnxruntime at two lengths
    ops = [n.op_type for n in onnx.load(str(tmp_path / "mpt.onnx")).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    assert str(summary).count("ALiBi from slopes") == 2


class ScaledAlibi(nn.Module):
    """(scores + slopes[h] * (n - m)) * 0.5: the bias reaches the softmax scaled, the slopes are trained."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.slopes = nn.Parameter(torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        keys = torch.arange(n, device=x.device)
        scores = (q @ k.transpose(-1, -2) + self.slopes.view(-1, 1, 1) * (keys.view(1, -1) - keys.view(-1, 1))) * 0.5
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 32)


def test_scaled_alibi_reads_its_trained_slopes_at_run_time() -> None:
    model = ScaledAlibi().eval()
    x = torch.randn(2, 12, 32)
    opt = attnfx.optimize(model, (x,), variants=["attnfx_chunked"])
    (e,) = opt.report.entries
    assert (e.status, e.lowering, e.spec.alibi, e.spec.mask.value) == ("REWRITTEN", "alibi+none", True, "none")
    assert e.alibi.startswith("ALiBi: ") and "up to a constant" not in e.alibi  # exactly slopes[h] * (n - m)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        model.slopes.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0]))  # a user changes the parameter after optimize()
        torch.testing.assert_close(opt(x), model(x))


@pytest.mark.slow
def test_mpt_generates_eagers_tokens_through_the_backend_with_slopes() -> None:
    """Prefill and decode steps (one query over the cache: the kernel's n - m is a per-row shift away)."""
    config = transformers.MptConfig(vocab_size=99, d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                    expansion_ratio=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(config).eval()
    inputs = text(12)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="attnfx", options={"inductor": False, "variants": NO_SDPA})
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
    entries = [e for r in attnfx.reports(model) for e in r.entries]
    assert entries and all(e.status == "REWRITTEN" and e.lowering.startswith("alibi+") for e in entries)
    torch._dynamo.reset()


class SinkAlibi(AlibiScores):
    """MPT's per-row-shifted ALiBi (or the exact form) on scores that also get an attention sink: the
    sink's logit is not shifted, so only the exact form is ALiBi (found by the fuzzer, long8:2)."""

    def __init__(self, exact: bool) -> None:
        super().__init__(exact)
        self.sinks = nn.Parameter(torch.tensor([0.3, -0.2, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        scores, v = self.scores(x)
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, -1)
        p = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        return (p @ v).transpose(1, 2).reshape(b, n, 32)


@pytest.mark.parametrize("exact", [True, False])
def test_with_a_sink_only_exact_alibi_is_taken(exact: bool) -> None:
    model = SinkAlibi(exact).eval()
    x = torch.randn(2, 12, 32)
    opt = attnfx.optimize(model, (x,), variants=["attnfx_chunked"])
    (e,) = opt.report.entries
    assert e.status == "REWRITTEN", opt.report
    if exact:
        assert e.spec.alibi and e.alibi.startswith("ALiBi: ")
    else:
        assert not e.spec.alibi and e.alibi.startswith("ALIBI_SHIFT_KEPT: ") and "attention sink" in e.alibi
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)
