"""onnxruntime latency and peak memory: attnfx's ONNX export vs the plain torch.onnx.export (run by hand).

For each model, both files are exported once (dynamic batch/sequence, same opset), then each is run
in a fresh process at every sequence length so peak RSS belongs to that file alone:

    .venv/bin/python benchmarks/bench_onnx.py [--lengths 512 2048] [--opset 23] [--threads 2]

Models (random weights, built from code): a hand-written causal decoder (matmul/softmax attention),
a BERT-like encoder (transformers, eager attention, padded batch), a GQA Llama-like decoder
(transformers, eager attention). The optimised module comes from attnfx.optimize when this checkout
has it; otherwise from a stand-in: the same weights with the attention computed by SDPA (the hand
decoder's fused path; transformers' "sdpa" for BERT; SDPA with is_causal and enable_gqa for Llama),
captured as optimize() captures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxscript.optimizer
import torch
from torch.export import Dim

import attnfx
from attnfx.onnx import export_onnx

BATCH = 2
CAPTURE_LENGTH = 64


class HandDecoder(torch.nn.Module):
    """Pre-norm causal decoder whose attention is written out by hand (or SDPA when `fused`)."""

    def __init__(self, dim: int = 256, heads: int = 8, layers: int = 4, vocab: int = 1000, max_len: int = 4096):
        super().__init__()
        self.heads, self.fused = heads, False
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(dim) for _ in range(2 * layers)])
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(dim, 3 * dim) for _ in range(layers)])
        self.proj = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(layers)])
        self.mlp = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
             for _ in range(layers)]
        )
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def attention(self, q, k, v):
        if self.fused:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        n = q.shape[2]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~self.tril[:n, :n], float("-inf"))
        return scores.softmax(-1) @ v

    def forward(self, input_ids):
        x = self.embed(input_ids)
        b, n, d = x.shape
        for i, (qkv, proj, mlp) in enumerate(zip(self.qkv, self.proj, self.mlp)):
            q, k, v = qkv(self.norms[2 * i](x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + proj(self.attention(q, k, v).transpose(1, 2).reshape(b, n, d))
            x = x + mlp(self.norms[2 * i + 1](x))
        return x


def hand_decoder():
    model = HandDecoder().eval()

    def inputs(n):
        return {"input_ids": torch.randint(0, 1000, (BATCH, n))}

    def fused():
        model.fused = True
        return model

    return model, inputs, fused


def bert_encoder():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                        max_position_embeddings=4096, attn_implementation="eager")
    model = BertModel(config).eval()

    def inputs(n):
        mask = torch.ones(BATCH, n, dtype=torch.long)
        mask[-1, n - n // 4:] = 0  # one padded sequence
        return {"input_ids": torch.randint(0, config.vocab_size, (BATCH, n)), "attention_mask": mask}

    def fused():
        model.set_attn_implementation("sdpa")
        return model

    return model, inputs, fused


def llama_gqa():
    from transformers import AttentionInterface, LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=688, vocab_size=1000, max_position_embeddings=4096, use_cache=False,
                         attn_implementation="eager")
    model = LlamaModel(config).eval()

    def inputs(n):
        return {"input_ids": torch.randint(0, 1000, (BATCH, n))}

    def fused():
        AttentionInterface.register("causal_gqa_sdpa", causal_gqa_sdpa)
        model.set_attn_implementation("causal_gqa_sdpa")
        return model

    return model, inputs, fused


def causal_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """What attnfx makes of an unpadded Llama site: SDPA with is_causal and enable_gqa (transformers'
    own "sdpa" passes an explicit mask while tracing and then repeats K/V heads instead)."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


MODELS = {"hand causal decoder": hand_decoder, "BERT-like encoder": bert_encoder, "GQA Llama-like": llama_gqa}


def dynamic_shapes(inputs):
    return {name: {0: Dim.AUTO, 1: Dim.AUTO} for name in inputs}


def export_plain(model, inputs, path, opset):
    """The unoptimised model through torch.onnx.export, with the same exporter settings as attnfx's
    (onnxscript's generic optimiser, not its opset-23 fusions, whose RotaryEmbedding fails in ORT)."""
    program = torch.onnx.export(model, (), kwargs=inputs, dynamic_shapes=dynamic_shapes(inputs), opset_version=opset,
                                dynamo=True, verbose=False, optimize=False)
    onnxscript.optimizer.optimize_ir(program.model)
    program.save(path)


def optimised(model, inputs, fused):
    """attnfx.optimize's result, or the stand-in (the SDPA version of the same weights, captured)."""
    if hasattr(attnfx, "optimize"):
        return attnfx.optimize(model, (), inputs), "attnfx.optimize"
    ep = torch.export.export(fused(), (), inputs, dynamic_shapes=dynamic_shapes(inputs), strict=False)
    opt = SimpleNamespace(graph_module=ep.module(), example_args=(), example_kwargs=inputs,
                          dynamic_shapes=dynamic_shapes(inputs), report=None)
    return opt, "stand-in (same weights through SDPA)"


def measure(path: Path, feed: dict[str, np.ndarray], threads: int, repeats: int) -> dict[str, float]:
    """Latency and peak RSS of one file, in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
        np.savez(f, **feed)
    cmd = [sys.executable, __file__, "--measure", str(path), f.name, str(threads), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    Path(f.name).unlink()
    return json.loads(out.strip().splitlines()[-1])


def _measure_child(path: str, feed_path: str, threads: int, repeats: int) -> None:
    import onnxruntime as ort

    feed = dict(np.load(feed_path))
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    sess.run(None, feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1e3 * statistics.median(times), "peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--opset", type=int, default=23)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, make_inputs, fused = MODELS[name]()
            example = make_inputs(CAPTURE_LENGTH)
            plain = Path(tmp) / "plain.onnx"
            export_plain(model, example, plain, args.opset)
            opt, source = optimised(model, example, fused)
            summary = export_onnx(opt, Path(tmp) / "attnfx.onnx", opset=args.opset)
            print(f"\n{name}: optimised module from {source}\n{summary}\n", flush=True)
            for n in args.lengths:
                feed = {k: v.numpy() for k, v in make_inputs(n).items()}
                repeats = 10 if n <= 512 else 5
                base = measure(plain, feed, args.threads, repeats)
                ours = measure(summary.path, feed, args.threads, repeats)
                rows.append((name, n, base, ours))
                print(f"  N={n}: plain {base['ms']:.1f} ms / {base['peak_mb']:.0f} MB, "
                      f"attnfx {ours['ms']:.1f} ms / {ours['peak_mb']:.0f} MB", flush=True)
    print(f"\nonnxruntime CPU, {args.threads} threads, batch {BATCH}, fp32, opset {args.opset}; "
          "peak = RSS growth over loading and running the file")
    print(f"{'model':<22}{'N':>6}{'plain ms':>11}{'attnfx ms':>11}{'speed-up':>10}"
          f"{'plain MB':>10}{'attnfx MB':>11}{'mem ratio':>11}")
    for name, n, base, ours in rows:
        print(f"{name:<22}{n:>6}{base['ms']:>11.1f}{ours['ms']:>11.1f}{base['ms'] / ours['ms']:>9.2f}x"
              f"{base['peak_mb']:>10.0f}{ours['peak_mb']:>11.0f}{base['peak_mb'] / max(ours['peak_mb'], 1):>10.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        _measure_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
