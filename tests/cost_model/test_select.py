"""Selection: refusals and budgets are respected, the ranking is by predicted time, `why` explains."""
import pytest

from attnfx.cost_model import AttentionSpec, Causal, Option, select
from attnfx.cost_model.hardware import SANDBOX_CPU, H100_SXM
from attnfx.cost_model.timing import predict

SPEC = AttentionSpec(1, 8, 8, 2048, 2048, 64, 64, scale=0.125, causal=Causal.TOP_LEFT)


def _options(spec=SPEC, **refusals):
    return [Option(name, name, spec, "canonical", refusals.get(name)) for name in ("eager", "sdpa", "chunked")]


def test_ranked_fastest_first_and_winner_is_the_fastest():
    sel = select(_options(), target=SANDBOX_CPU)
    times = [c.predicted_s for c in sel.ranked]
    assert times == sorted(times) and len(times) == 3
    assert sel.winner is sel.ranked[0]
    assert sel.winner.option.variant == "sdpa"  # 1-pass at N=2048 beats materialising 128 MiB of scores
    assert "faster than eager" in sel.why and "pass(es) more" in sel.why


def test_refused_options_are_never_ranked():
    sel = select(_options(sdpa="no softcap"), target=SANDBOX_CPU)
    assert [o.variant for o in sel.refused] == ["sdpa"]
    assert "sdpa" not in {c.option.variant for c in sel.ranked}
    assert sel.winner.option.variant != "sdpa"


def test_unknown_algorithms_and_wrong_devices_are_refused_with_a_reason():
    options = [Option("mystery", "mystery", SPEC, "canonical"), Option("flash", "flash", SPEC, "canonical"),
               Option("eager", "eager", SPEC, "canonical")]
    sel = select(options, target=SANDBOX_CPU)
    reasons = {o.variant: o.refusal for o in sel.refused}
    assert "no cost model" in reasons["mystery"] and "does not run on cpu" in reasons["flash"]
    assert sel.winner.option.variant == "eager"


def test_memory_budget_excludes_the_materialising_variant():
    eager_peak = predict("eager", SPEC, SANDBOX_CPU).peak_bytes
    # eager alone: over the budget, nothing can win
    none = select(_options(sdpa="x", chunked="x"), target=SANDBOX_CPU, memory_budget=eager_peak / 2)
    assert none.winner is None and "budget" in none.why
    # a budget between the chunked loop's peak and eager's leaves only the chunked loop
    small = AttentionSpec(1, 8, 8, 128, 1024, 64, 64, scale=0.125)
    chunked_peak = predict("chunked", small, SANDBOX_CPU).peak_bytes
    peak = predict("eager", small, SANDBOX_CPU).peak_bytes
    assert chunked_peak < peak
    free = select(_options(small, sdpa="x"), target=SANDBOX_CPU)
    assert free.winner.option.variant == "eager"  # fastest when memory is free
    tight = select(_options(small, sdpa="x"), target=SANDBOX_CPU, memory_budget=(chunked_peak + peak) / 2)
    assert tight.winner.option.variant == "chunked"
    assert not next(c for c in tight.ranked if c.option.variant == "eager").fits
    assert "budget" in tight.why


def test_candidates_carry_the_cost_breakdown():
    sel = select(_options(), target=H100_SXM)
    eager = next(c for c in sel.ranked if c.option.variant == "eager")
    assert eager.passes == 3 and eager.kv_reads == 3 and eager.flops > 0 and eager.hbm_bytes > 0
    assert "eager" in sel.describe() and "winner" in sel.describe()


def test_targets_by_name():
    assert select(_options(), target="cuda").target.startswith("H100")  # no GPU here: H100 spec sheet
    assert select(_options(), target="A100-SXM4-80GB").target.startswith("A100")
    with pytest.raises(ValueError, match="unknown target"):
        select(_options(), target="tpu")


def test_why_names_lowerings_when_a_variant_has_several():
    options = [Option("sdpa", "sdpa", SPEC, "flag"), Option("sdpa", "sdpa", SPEC, "tensor"),
               Option("chunked", "chunked", SPEC, "flag"), Option("eager", "eager", SPEC, "as written")]
    sel = select(options, target=SANDBOX_CPU)
    assert sel.why.startswith("sdpa [") and "than sdpa [" in sel.why
    assert "faster than eager" in sel.why  # eager is always compared, even when not a runner-up
