"""generate() with a KV cache through attnfx, both ways: HF's documented
`model.forward = torch.compile(model.forward, backend="attnfx")` and `attnfx.optimize(model, ...)`.
Greedy tokens must be eager's, for every model family, with left padding in the batch."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnfx
from generation_cases import CASES, NEW_TOKENS, AtenOps, greedy, prompt

# Every site rewritten (eager is no candidate), and the rewritten graphs run as they are.
OPTIONS = {"inductor": False, "variants": ["sdpa", "attnfx_chunked"]}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_for_generation(model: torch.nn.Module, **kwargs) -> None:
    """HF's pattern: compile forward (and, for an encoder-decoder, the encoder generate() calls)."""
    model.forward = torch.compile(model.forward, backend="attnfx", **kwargs)
    if model.config.is_encoder_decoder:
        encoder = model.get_encoder()
        encoder.forward = torch.compile(encoder.forward, backend="attnfx", **kwargs)


def assert_every_site_rewritten(model: torch.nn.Module, graphs: int) -> None:
    reports = attnfx.reports(model)
    assert len(reports) == graphs
    assert all(e.status == "REWRITTEN" for r in reports for e in r.entries) and all(r.entries for r in reports)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_generates_eagers_tokens_and_runs_no_softmax(name: str) -> None:
    model, inputs = CASES[name].build(), prompt()
    expected = greedy(model, inputs)
    compile_for_generation(model, options=OPTIONS)
    with AtenOps() as ops:
        tokens = greedy(model, inputs)
    assert torch.equal(tokens, expected)
    assert ops.softmaxes() == 0
    # prefill, the first decode step (static shapes), then one graph for every later step
    assert_every_site_rewritten(model, graphs=4 if CASES[name].encoder_decoder else 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_optimize_returns_a_model_that_generates_eagers_tokens(name: str) -> None:
    model, inputs = CASES[name].build(), prompt()
    expected = greedy(model, inputs)
    opt = attnfx.optimize(model, (), inputs, variants=OPTIONS["variants"])
    assert type(opt) is type(model) and opt is not model and opt.config is model.config
    assert "forward" not in model.__dict__  # the user's model is not modified
    with AtenOps() as ops:
        tokens = greedy(opt, inputs)
    assert torch.equal(tokens, expected)
    assert ops.softmaxes() == 0
    assert torch.equal(greedy(model, inputs), expected)
    # the example call, then generate()'s prefill, first and later decode steps (and its encoder)
    assert_every_site_rewritten(opt, graphs=5 if CASES[name].encoder_decoder else 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_static_cache_generates_eagers_tokens(name: str) -> None:
    model, inputs = CASES[name].build(), prompt()
    expected = greedy(model, inputs, cache_implementation="static")
    compile_for_generation(model, options=OPTIONS)
    with AtenOps() as ops:
        tokens = greedy(model, inputs, cache_implementation="static")
    assert torch.equal(tokens, expected) and ops.softmaxes() == 0
    assert_every_site_rewritten(model, graphs=2)  # prefill, decode (the cache's shape never changes)


def _two_turns(model: torch.nn.Module) -> torch.Tensor:
    """A second prompt continues the first conversation over its cache: that prefill's queries sit
    at the bottom right of a longer key range (with left padding and, for Mistral, a window)."""
    inputs = prompt()
    first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    more = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(7))
    ids = torch.cat([first.sequences, more], 1)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, ids.shape[1] - inputs["attention_mask"].shape[1]), value=1)
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, max_new_tokens=4,
                          do_sample=False)


@pytest.mark.slow
def test_a_prompt_over_an_existing_cache_generates_eagers_tokens() -> None:
    model = CASES["mistral"].build()
    expected = _two_turns(model)
    compile_for_generation(model, options=OPTIONS)
    with AtenOps() as ops:
        tokens = _two_turns(model)
    assert torch.equal(tokens, expected) and ops.softmaxes() == 0
    reports = attnfx.reports(model)
    over_cache = [e.spec for r in reports for e in r.entries if e.spec.q_len > 1 and e.spec.kv_len > e.spec.q_len]
    assert over_cache and all(e.status == "REWRITTEN" for r in reports for e in r.entries)


@pytest.mark.slow
def test_inductor_and_dynamic_shapes_generate_eagers_tokens() -> None:
    model, inputs = CASES["qwen2"].build(), prompt()
    expected = greedy(model, inputs)
    model.forward = torch.compile(model.forward, backend="attnfx", dynamic=True)
    assert torch.equal(greedy(model, inputs), expected)
    reports = attnfx.reports(model)
    # prefill and decode (Inductor's cache layout after prefill may cost one more decode graph)
    assert len(reports) in (2, 3) and all(r.rewritten == 2 and r.notes == [] for r in reports)


class SdpaMasks(TorchDispatchMode):
    """The mask argument of every SDPA kernel that runs, by query length (compiled code included)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[tuple[int, torch.Tensor | None]] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.masks.append((args[0].shape[2], kwargs.get("attn_mask")))
        return func(*args, **kwargs)


@pytest.mark.slow
def test_decode_steps_reuse_one_graph_and_run_sdpa_without_a_mask() -> None:
    """generate() compiles prefill, the first decode step and one graph for every later step: a
    longer generate() adds none. A decode step's query sees every cached key (a bottom-right
    diagonal over one row), so its sites run SDPA with no mask tensor to build and read."""
    model, inputs = CASES["llama"].build(), prompt(batch=1)
    inputs["attention_mask"][:] = 1
    inputs["input_ids"][inputs["input_ids"] == 0] = 3
    expected = model.generate(**inputs, max_new_tokens=3 * NEW_TOKENS, do_sample=False)
    compile_for_generation(model, options={"inductor": False})
    assert torch.equal(greedy(model, inputs), expected[:, :-2 * NEW_TOKENS])
    assert len(attnfx.reports(model)) == 3
    with SdpaMasks() as sdpa:
        tokens = model.generate(**inputs, max_new_tokens=3 * NEW_TOKENS, do_sample=False)
    assert torch.equal(tokens, expected)
    assert len(attnfx.reports(model)) == 3  # no recompilation for the longer caches
    decode = [e for r in attnfx.reports(model) for e in r.entries if e.spec.q_len == 1]
    assert len(decode) == 4 and all((e.variant, e.lowering, e.spec.causal.value, e.spec.mask.value)
                                    == ("sdpa", "flag", "bottom_right", "none") for e in decode)
    decode_calls = [mask for rows, mask in sdpa.masks if rows == 1]
    assert len(decode_calls) == 2 * (3 * NEW_TOKENS - 1) and all(mask is None for mask in decode_calls)
