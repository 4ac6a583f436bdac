"""Whole models: attnfx against eager, torch.compile and Hugging Face's sdpa attention.

Run by hand: `python benchmarks/bench_models.py [--quick] [--lengths 512 2048] [--models ...]`.
Models built from configs with random weights (fp32, 2 layers, hidden 256, heads of 64):

  llama (GQA)          LlamaModel, 4 heads over 2 key/value heads, causal, batch 1
  mistral (window)     MistralModel, sliding window 256, batch 1
  gemma2 (softcap)     Gemma2Model, tanh softcap 50, alternating windows of 256 (HF has no sdpa path)
  bloom (ALiBi)        BloomModel (HF has no sdpa path)
  mpt (ALiBi)          MptModel, ALiBi built statically over max_seq_len = N (HF has no sdpa path)
  bert (padded)        BertModel, batch 8 with valid lengths spread evenly from N/4 to N (right padding)
  t5 (relative bias)   T5EncoderModel
  vit                  ViTModel, 16-pixel patches, an image giving about N patches

Contenders, each on its own copy of the same weights: eager (HF eager attention), compile
(torch.compile, Inductor), sdpa (HF attn_implementation="sdpa"), sdpa+compile, optimize
(attnfx.optimize) and attnfx (torch.compile(backend="attnfx")). After one warm-up call each (which
compiles), all run interleaved, `--repeats` times; medians. Every output must match eager's.
The table gives each contender's time over attnfx.optimize's (> 1: attnfx is faster), the setup
times (first call) of the compiled contenders, each contender's peak memory over one call (MiB above
the resident size before it, `peak_memory.py`), and what attnfx chose. `--quick`: 512 only, fewer
models and repeats. Timing on a shared machine is noisy: compare the ratios, not the milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._inductor.metrics
import transformers

import attnfx
from peak_memory import peak_mib

HIDDEN = dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=2)
DECODER = dict(**HIDDEN, vocab_size=1024, intermediate_size=1024, head_dim=64, max_position_embeddings=8192)


@dataclass(frozen=True)
class ModelCase:
    config: Callable[[int], Any]  # sequence length -> config
    model_class: str
    inputs: Callable[[int], dict[str, torch.Tensor]]
    has_sdpa: bool = True


def _tokens(batch: int, n: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 1000, (batch, n), generator=torch.Generator().manual_seed(n))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, n, dtype=torch.long)}


def padded_batch(n: int, batch: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded rows with valid lengths spread evenly from n/4 to n."""
    inputs = _tokens(batch, n)
    lengths = torch.linspace(n // 4, n, batch).round().long()
    inputs["attention_mask"] = (torch.arange(n)[None] < lengths[:, None]).long()
    return inputs


def _image(n: int) -> dict[str, torch.Tensor]:
    side = 16 * round(n ** 0.5)
    return {"pixel_values": torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(n))}


def _config(name: str, **fields: Any) -> Callable[[int], Any]:
    return lambda n: getattr(transformers, name)(**fields)


MODELS: dict[str, ModelCase] = {
    "llama (GQA)": ModelCase(_config("LlamaConfig", **DECODER, num_key_value_heads=2), "LlamaModel",
                             lambda n: {**_tokens(1, n), "use_cache": False}),
    "mistral (window)": ModelCase(_config("MistralConfig", **DECODER, num_key_value_heads=2, sliding_window=256),
                                  "MistralModel", lambda n: {**_tokens(1, n), "use_cache": False}),
    "gemma2 (softcap)": ModelCase(_config("Gemma2Config", **DECODER, num_key_value_heads=2, sliding_window=256,
                                          attn_logit_softcapping=50.0, final_logit_softcapping=None,
                                          query_pre_attn_scalar=64), "Gemma2Model",
                                  lambda n: {**_tokens(1, n), "use_cache": False}, has_sdpa=False),
    "bloom (ALiBi)": ModelCase(_config("BloomConfig", vocab_size=1024, hidden_size=256, n_head=4, n_layer=2),
                               "BloomModel", lambda n: {**_tokens(1, n), "use_cache": False}, has_sdpa=False),
    "mpt (ALiBi)": ModelCase(lambda n: transformers.MptConfig(vocab_size=1024, d_model=256, n_heads=4, n_layers=2,
                                                              expansion_ratio=4, max_seq_len=n),
                             "MptModel", lambda n: {**_tokens(1, n), "use_cache": False}, has_sdpa=False),
    "bert (padded)": ModelCase(lambda n: transformers.BertConfig(**HIDDEN, vocab_size=1024, intermediate_size=1024,
                                                                 max_position_embeddings=n),
                               "BertModel", padded_batch),
    "t5 (relative bias)": ModelCase(_config("T5Config", vocab_size=1024, d_model=256, d_kv=64, d_ff=1024,
                                            num_layers=2, num_heads=4), "T5EncoderModel", lambda n: _tokens(1, n)),
    "vit": ModelCase(lambda n: transformers.ViTConfig(**HIDDEN, intermediate_size=1024, patch_size=16,
                                                      image_size=16 * round(n ** 0.5)), "ViTModel", _image),
}
QUICK_MODELS = ("llama (GQA)", "bert (padded)", "gemma2 (softcap)", "vit")
CONTENDERS = ("eager", "compile", "sdpa", "sdpa+compile", "optimize", "attnfx")


def build(case: ModelCase, n: int, attention: str) -> torch.nn.Module:
    config = case.config(n)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return getattr(transformers, case.model_class)(config).eval()


def contenders(case: ModelCase, n: int, inputs: dict, wanted: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """Each contender's callable, the seconds its preparation and first call took, and the kernels
    Inductor generated for the compiled ones (fusion around rewritten sites shows as a count close
    to torch.compile's)."""
    models, setup, kernels = {}, {}, {}
    for key in wanted:
        if key.startswith("sdpa") and not case.has_sdpa:
            continue
        started = time.perf_counter()
        torch._inductor.metrics.reset()
        try:
            model = _prepare(key, build(case, n, "sdpa" if key.startswith("sdpa") else "eager"), inputs)
        except Exception as exc:  # noqa: BLE001 - a peer that fails on a model is a row's cell, not the run
            print(f"  {key} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            continue
        models[key], setup[key] = model, time.perf_counter() - started
        if key in ("compile", "sdpa+compile", "attnfx"):
            kernels[key] = torch._inductor.metrics.generated_kernel_count
    return models, setup, kernels


def _prepare(key: str, model: torch.nn.Module, inputs: dict) -> Any:
    """The contender `key` made from `model`, called once (which compiles what it compiles)."""
    if key in ("compile", "sdpa+compile"):
        model = torch.compile(model)
    elif key == "attnfx":
        model = torch.compile(model, backend="attnfx")
    elif key == "optimize":
        model = attnfx.optimize(model, (), inputs)
    with torch.no_grad():
        model(**inputs)
    return model


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.last_hidden_state


def measure(models: dict, inputs: dict, repeats: int) -> tuple[dict[str, float], dict[str, float], dict]:
    """Median seconds per call of each contender, interleaved, its max abs error vs eager, and the
    peak memory (MiB above the resident size before the call) of one call."""
    with torch.no_grad():
        reference = _output(models["eager"](**inputs))
        errors = {k: (_output(m(**inputs)) - reference).abs().max().item() for k, m in models.items()}
        peaks = {k: peak_mib(lambda m=m: m(**inputs)) for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeats):
            for key, model in models.items():
                started = time.perf_counter()
                model(**inputs)
                times[key].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}, errors, peaks


def chosen(model: Any) -> str:
    """What attnfx chose, per site: the variants (and lowerings) of its reports."""
    reports = [model.report] if hasattr(model, "report") else attnfx.reports(model)
    entries = [e for r in reports for e in r.entries]
    picks = sorted({f"{e.variant}[{e.lowering}]" if e.status == "REWRITTEN" else e.reason_code or e.status
                    for e in entries})
    return ", ".join(picks)


def row(name: str, n: int, times: dict, errors: dict, setup: dict, kernels: dict, peaks: dict) -> str:
    base = times["optimize"]
    cells = " | ".join(f"{times[c] / base if c in times else float('nan'):.2f}x".replace("nanx", "—")
                       if c != "optimize" else f"{times[c] * 1e3:.0f} ms" for c in CONTENDERS)
    best_peer = min(times[c] for c in ("eager", "compile", "sdpa", "sdpa+compile") if c in times)
    worst = max(errors.values())
    compile_s = " / ".join(f"{setup[c]:.0f}" for c in ("compile", "optimize", "attnfx") if c in setup)
    counts = " / ".join(str(kernels[c]) for c in ("compile", "attnfx") if c in kernels)
    memory = " / ".join(f"{peaks[c]:.0f}" if peaks.get(c) is not None else "—" for c in CONTENDERS)
    return (f"| {name} | {n} | {cells} | {best_peer / min(base, times.get('attnfx', base)):.2f}x | {worst:.1e} | "
            f"{compile_s} | {counts} | {memory} |")


def header() -> str:
    cells = " | ".join("optimize" if c == "optimize" else f"{c}" for c in CONTENDERS)
    return (f"| model | N | {cells} | attnfx best vs best peer | max err | setup s (compile / optimize / backend) "
            f"| Inductor kernels (compile / backend) | peak MiB ({' / '.join(CONTENDERS)}) |\n"
            + "|" + "---|" * (len(CONTENDERS) + 7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="512 only, four models, 3 repeats")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    models = ns.models or list(QUICK_MODELS if ns.quick else MODELS)
    lengths = ns.lengths or ([512] if ns.quick else [512, 2048])
    repeats = ns.repeats or (3 if ns.quick else 5)
    torch._dynamo.config.recompile_limit = 64
    wanted = tuple(c for c in CONTENDERS if c in ns.contenders or c in ("eager", "optimize"))
    rows = []
    for name in models:
        for n in lengths:
            inputs = MODELS[name].inputs(n)
            models_, setup, kernels = contenders(MODELS[name], n, inputs, wanted)
            times, errors, peaks = measure(models_, inputs, repeats)
            rows.append(row(name, n, times, errors, setup, kernels, peaks))
            print(rows[-1], "optimize:", chosen(models_["optimize"]),
                  "| backend:", chosen(models_["attnfx"]) if "attnfx" in models_ else "-", flush=True)
            torch._dynamo.reset()
    print(f"\n{torch.get_num_threads()} threads, fp32, median of {repeats}; optimize's time per call, and each "
          "contender's time / optimize's (> 1: attnfx.optimize is faster):")
    print(header())
    print("\n".join(rows))


if __name__ == "__main__":
    main()
