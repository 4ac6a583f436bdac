"""generate() with a KV cache: time to first token and decode speed, attnfx against PyTorch and HF.

Run by hand: `python benchmarks/bench_generate.py [--prompts 512 2048] [--batches 1 4] [--new 64] [--threads 1]`.
Decoders built from configs with random weights (fp32, 2 layers, hidden 512, 8 heads of 64, 2
key/value heads): Llama-like (GQA), Mistral-like (sliding window 256, shorter than every prompt)
and Gemma-2-like (tanh softcap, alternating windows). Batches of 4 are left-padded (the rows lose
0, 1/8, 1/4 and 3/8 of the prompt). Contenders, each on its own copy of the same weights:

  eager           HF eager attention
  compile         torch.compile(model.forward) (Inductor, default options)
  sdpa            HF attn_implementation="sdpa"
  sdpa+compile    HF sdpa and torch.compile(model.forward)
  optimize        attnfx.optimize(model, example inputs)
  attnfx          torch.compile(model.forward, backend="attnfx")

Every contender first generates once at each row's shapes (compiling what it compiles), then all
run interleaved, `--repeats` times each: a one-token generate (time to first token, median of the
repeats) and a `--new`-token generate whose decode steps' forward calls are timed one by one (decode
time per token: the median over every step of every repeat; generate()'s own per-token work, the same
Python for every contender, is left out). The difference of the two generate() totals would give
the decode time too, but on a loaded machine it subtracts two noisy totals of seconds to find a few
milliseconds. All of them must produce eager's greedy tokens. Ratios are contender time / attnfx
time (> 1: attnfx is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from typing import Any, Callable, Iterator

import torch
import transformers

import attnfx

VOCAB = 1024
BASE = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
            pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB + 1)
MODELS = {
    "llama (GQA)": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral (window 256)": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 256}),
    "gemma2 (softcap)": ("Gemma2ForCausalLM", "Gemma2Config", {"sliding_window": 256, "attn_logit_softcapping": 50.0,
                                                               "final_logit_softcapping": None,
                                                               "query_pre_attn_scalar": 64}),
}
CONTENDERS = ("eager", "compile", "sdpa", "sdpa+compile", "optimize", "attnfx")


def build(name: str, attention: str) -> torch.nn.Module:
    model_class, config_class, overrides = MODELS[name]
    config = getattr(transformers, config_class)(**{**BASE, **overrides})
    config._attn_implementation = attention
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def prompt(batch: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length + batch))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = row * length // 8
        mask[row, :pad], ids[row, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def contenders(name: str, example: dict[str, torch.Tensor], wanted: tuple[str, ...] = CONTENDERS) -> dict[str, Any]:
    """Each wanted contender (eager always: it gives the reference tokens), on its own copy of the weights."""
    compiled = {"compile": ("eager", "inductor"), "sdpa+compile": ("sdpa", "inductor"), "attnfx": ("eager", "attnfx")}
    models = {}
    for key in wanted:
        if key == "optimize":
            started = time.perf_counter()
            models[key] = attnfx.optimize(build(name, "eager"), (), example)
            print(f"  attnfx.optimize() took {time.perf_counter() - started:.1f} s")
            continue
        attention, backend = compiled.get(key, (key, None))
        try:
            models[key] = build(name, attention)
        except ValueError as exc:  # HF has no sdpa attention for this family (Gemma 2)
            print(f"  no {key} contender: {str(exc).splitlines()[0][:120]}")
            continue
        if backend is not None:
            models[key].forward = torch.compile(models[key].forward, backend=backend)
    return {key: models[key] for key in CONTENDERS if key in models}


def generate(model: Any, inputs: dict[str, torch.Tensor], new: int) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def measure(models: dict[str, Any], inputs: dict[str, torch.Tensor], new: int, repeats: int
            ) -> dict[str, tuple[float, float]]:
    """(time to first token s, decode s per new token) per contender, medians of interleaved runs."""
    reference = generate(models["eager"], inputs, new)
    for key, model in models.items():  # warm-up: compiles for these shapes
        tokens = generate(model, inputs, new)
        generate(model, inputs, 1)
        if not torch.equal(tokens, reference):
            print(f"  WARNING: {key} generated other tokens than eager")
    first: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for key, model in models.items():
            first[key].append(_seconds(lambda: generate(model, inputs, 1)))
            with _forward_clock(model) as calls:
                _seconds(lambda: generate(model, inputs, new))
            decode[key] += calls[1:]  # the first call is the prefill
    return {k: (statistics.median(first[k]), statistics.median(decode[k])) for k in models}


@contextlib.contextmanager
def _forward_clock(model: Any) -> Iterator[list[float]]:
    """The seconds of each forward call while inside; the wrapper keeps forward's signature, which
    generate() inspects to choose the arguments it passes."""
    forward, calls = model.forward, []

    @functools.wraps(forward)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    model.forward = timed
    try:
        yield calls
    finally:
        model.forward = forward


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def report_sites(models: dict[str, Any]) -> None:
    """What attnfx did in each graph of the backend contender (and why, where it kept a site)."""
    for key in ("attnfx", "optimize"):
        if key not in models:
            continue
        for report in attnfx.reports(models[key]):
            kept = [f"{e.reason_code}" for e in report.entries if e.status != "REWRITTEN"]
            variants = sorted({e.variant for e in report.entries if e.status == "REWRITTEN"})
            print(f"  {key:<8} {report.capture}: {report.rewritten}/{len(report.entries)} rewritten "
                  f"{variants} {('kept: ' + ', '.join(kept)) if kept else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new", type=int, default=64, help="new tokens per generate")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS),
                        help="eager and attnfx always run (eager's tokens are the reference)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps OpenMP barrier stalls out of a loaded "
                             "machine's timings")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    # The compiled contenders share one code object (HF's forward wrapper), whose compiled entries
    # Dynamo caps at 8 by default: past it, a contender would silently run eager.
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for name in ns.models:
        print(f"{name}:")
        wanted = tuple(c for c in CONTENDERS if c in ns.contenders or c in ("eager", "attnfx"))
        models = contenders(name, prompt(ns.batches[0], ns.prompts[0]), wanted)
        for length in ns.prompts:
            for batch in ns.batches:
                times = measure(models, prompt(batch, length), ns.new, ns.repeats)
                rows.append((name, length, batch, times))
                print("  " + _row(name, length, batch, times))
        report_sites(models)
    print(f"\n{torch.get_num_threads()} threads, fp32, {ns.new} new tokens, median of {ns.repeats}; "
          "time to first token (TTFT) and decode time per token of each contender / attnfx's:")
    print(_header())
    for row in rows:
        print(_row(*row))


def _header() -> str:
    names = [c for c in CONTENDERS if c != "attnfx"]
    cells = " | ".join(f"{c} TTFT, decode" for c in names)
    return f"| model | prompt | batch | attnfx TTFT ms | attnfx decode ms/token | {cells} |"


def _row(name: str, length: int, batch: int, times: dict[str, tuple[float, float]]) -> str:
    ttft, decode = times["attnfx"]
    cells = " | ".join(f"{times[c][0] / ttft:.2f}x, {times[c][1] / decode:.2f}x" if c in times else "n/a"
                       for c in CONTENDERS if c != "attnfx")
    return f"| {name} | {length} | {batch} | {ttft * 1e3:.0f} | {decode * 1e3:.1f} | {cells} |"


if __name__ == "__main__":
    main()
