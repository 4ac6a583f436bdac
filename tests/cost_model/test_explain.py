"""explain(): every section is there and carries the site's numbers."""
from attnfx.cost_model import AttentionSpec, Option, explain
from attnfx.cost_model.explain import spec_from
from attnfx.cost_model.hardware import SANDBOX_CPU, H100_SXM


def test_explain_prints_every_section():
    text = explain(dict(B=2, H=8, Hkv=2, N=1024, E=64, causal=True), target=SANDBOX_CPU,
                   memory_budget=32 * 2**20)
    for section in ("== cascades and passes ==", "== costs at this shape (formula = value) ==",
                    "== ranked variants ==", "== crossovers =="):
        assert section in text
    assert "B=2 H=8 Hkv=2 M=1024 N=1024 E=64" in text
    assert "3 pass(es) over K/V" in text and "1 pass(es) over K/V" in text
    assert "2*B*H*M*N*(E + F)" in text  # eager's matmul FLOPs formula
    assert "OVER BUDGET" in text and "materialising the scores breaks the budget" in text
    assert "linear attention beats softmax" in text and "winner: sdpa" in text


def test_explain_on_a_gpu_prices_the_cuda_kernels():
    text = explain(dict(B=4, H=32, Hkv=8, M=1, N=8192, E=128, dtype="bfloat16"), target=H100_SXM)
    assert "decode_split_kv" in text and "flash" in text and "winner: decode_split_kv" in text


def test_explain_takes_the_callers_options():
    spec = AttentionSpec(1, 4, 4, 256, 256, 64, 64, scale=0.125)
    options = [Option("sdpa", "sdpa", spec, "canonical", "SDPA has no softcap"), Option("eager", "eager", spec, "c")]
    text = explain(spec, target=SANDBOX_CPU, options=options)
    assert "refused: SDPA has no softcap" in text and "winner: eager" in text


def test_shape_keywords():
    spec = spec_from(dict(N=512, H=4, E=32))
    assert (spec.batch, spec.q_len, spec.kv_heads, spec.value_dim) == (1, 512, 4, 32)
    assert spec.scale == 32 ** -0.5
    assert spec_from(dict(batch=2, heads=2, kv_len=8, q_len=1, head_dim=8, mask="bool")).mask_shape == (2, 1, 1, 8)


def test_dynamic_sizes_stay_symbolic():
    spec = AttentionSpec(1, 8, 8, 128, 128, 64, 64, scale=0.125, dynamic=frozenset({"kv_len", "q_len"}))
    text = explain(spec, target=SANDBOX_CPU)
    assert "in the dynamic sizes (kv_len, q_len" in text
    assert "matmul FLOPs  ~ 2048*M*N" in text  # eager: 2*B*H*M*N*(E+F) with B=1, H=8, E=F=64
