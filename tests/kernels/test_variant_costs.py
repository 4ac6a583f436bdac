"""The algorithms the sigmoid and linear variants declare, as the cost model prices them: the
contraction order decides the FLOPs, the chunked loops keep memory linear in the length, and the
selection prefers the written O(N^2) form only where it is cheaper."""
from __future__ import annotations

from dataclasses import replace

import pytest

from attnfx.cost_model import AttentionSpec, Causal, Option, predict, select
from attnfx.cost_model.catalog import CATALOG
from attnfx.cost_model.hardware import H100_SXM, SANDBOX_CPU
from attnfx.cost_model.pass_count import analyze
from attnfx.cost_model.spec import Kind
from attnfx.cost_model.tiles import LINEAR_CHUNK

CAUSAL_LINEAR = AttentionSpec(1, 8, 8, 4096, 4096, 64, 64, causal=Causal.TOP_LEFT, kind=Kind.LINEAR, normalize=True)
LINEAR = replace(CAUSAL_LINEAR, causal=Causal.NONE)
SIGMOID = AttentionSpec(1, 8, 8, 4096, 4096, 64, 64, causal=Causal.TOP_LEFT, kind=Kind.SIGMOID, logit_bias=-8.3)


@pytest.mark.parametrize("name", ["lightning", "linear", "sigmoid"])
def test_new_kinds_cascades_are_one_pass_reading_k_once(name):
    result = analyze(CATALOG[name])
    assert result.passes == 1 and result.reads["K"] == 1


def test_lightning_flops_are_the_three_products():
    spec = replace(CAUSAL_LINEAR, q_len=1000, kv_len=1000, kv_heads=2)
    b, h, hk, m, n, e, f, c = 1, 8, 2, 1000, 1000, 64, 65, LINEAR_CHUNK
    chunks = -(-m // c)
    intra = 2 * b * h * chunks * c * c * (e + f)
    readout = 2 * b * h * m * e * f
    update = 2 * b * hk * n * e * f
    assert predict("linear_chunked", spec, SANDBOX_CPU).flops_mm == intra + readout + update
    decayed = predict("linear_chunked", replace(spec, decay=True), SANDBOX_CPU)
    assert decayed.flops_mm == intra + readout + 2 * b * h * n * e * f  # with a decay the state is per query head


def test_right_to_left_flops_are_linear_and_as_written_quadratic():
    short, long = replace(LINEAR, q_len=2048, kv_len=2048), LINEAR
    rtl = [predict("linear_right_to_left", s, SANDBOX_CPU) for s in (short, long)]
    written = [predict("linear_eager", s, SANDBOX_CPU) for s in (short, long)]
    assert rtl[1].flops_mm == 2 * rtl[0].flops_mm
    assert written[1].flops_mm == 4 * written[0].flops_mm


@pytest.mark.parametrize("algorithm,spec", [("linear_chunked", CAUSAL_LINEAR), ("linear_right_to_left", LINEAR),
                                            ("sigmoid_chunked", SIGMOID)])
def test_memory_of_the_new_algorithms_is_at_most_linear_in_the_length(algorithm, spec):
    longer = replace(spec, q_len=2 * spec.q_len, kv_len=2 * spec.kv_len)
    peaks = [predict(algorithm, s, SANDBOX_CPU).peak_bytes for s in (spec, longer)]
    assert peaks[1] <= 2 * peaks[0]
    eager = "sigmoid_eager" if spec.kind is Kind.SIGMOID else "linear_eager"
    assert predict(eager, longer, SANDBOX_CPU).peak_bytes == 4 * predict(eager, spec, SANDBOX_CPU).peak_bytes


def _winner(spec: AttentionSpec, algorithms: tuple[str, ...], target=SANDBOX_CPU) -> str:
    return select([Option(a, a, spec, "canonical") for a in algorithms], target=target).winner.option.algorithm


@pytest.mark.parametrize("n,winner", [(32, "linear_eager"), (4096, "linear_chunked")])
def test_the_contraction_order_is_chosen_by_length_for_causal_sites(n, winner):
    spec = replace(CAUSAL_LINEAR, q_len=n, kv_len=n)
    assert _winner(spec, ("linear_eager", "linear_chunked")) == winner


def test_right_to_left_wins_a_long_non_causal_site():
    assert _winner(LINEAR, ("linear_eager", "linear_right_to_left")) == "linear_right_to_left"


def test_sigmoid_chunked_wins_on_cpu_and_the_triton_kernel_on_a_gpu():
    assert _winner(SIGMOID, ("sigmoid_eager", "sigmoid_chunked")) == "sigmoid_chunked"
    assert _winner(SIGMOID, ("sigmoid_eager", "sigmoid_flash"), H100_SXM) == "sigmoid_flash"


def test_sigmoid_flash_has_no_row_statistics():
    p = predict("sigmoid_flash", SIGMOID, H100_SXM)
    softmax = predict("flash", replace(SIGMOID, kind=Kind.SOFTMAX, logit_bias=0.0), H100_SXM)
    assert p.divides == 0 and softmax.divides > 0
    assert p.peak_bytes == 0 < softmax.peak_bytes


def test_explain_prices_a_site_with_its_own_kinds_algorithms():
    from attnfx.cost_model import explain

    ranked = explain(CAUSAL_LINEAR, target=SANDBOX_CPU).split("== ranked variants ==")[1].split("== crossovers")[0]
    assert sorted(line.split()[1] for line in ranked.splitlines() if line.strip()[:2] in ("1.", "2.", "3.", "4.")) == [
        "linear_chunked", "linear_eager", "linear_right_to_left"]
    softmax = explain(replace(SIGMOID, kind=Kind.SOFTMAX, logit_bias=0.0), target=SANDBOX_CPU)
    assert "linear_" not in softmax and "sigmoid_" not in softmax and "winner: sdpa" in softmax
