"""optimize() as a user calls it: inputs, errors, verification, the report, the example model."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import Projected, inputs
from attnfx.kernels import Call
from attnfx.kernels.sdpa import SdpaVariant


def test_returns_a_module_with_the_models_signature_and_output_structure() -> None:
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Projected(cases.matmul_div)

        def forward(self, x, *, scale_output: float = 1.0):
            y = self.attn(x)
            return {"y": y * scale_output, "norm": y.norm()}

    model = TwoOutputs().eval()
    opt = attnfx.optimize(model, inputs(), {"scale_output": 2.0})
    assert isinstance(opt, nn.Module) and isinstance(opt.graph_module, torch.fx.GraphModule)
    out = opt(*inputs(), scale_output=2.0)
    assert set(out) == {"y", "norm"}
    torch.testing.assert_close(out["y"], model(*inputs(), scale_output=2.0)["y"], atol=1e-5, rtol=1e-5)
    # parameters are shared with the user's model, not copied
    assert opt.graph_module.attn.qkv.weight.data_ptr() == model.attn.qkv.weight.data_ptr()


def test_batch_one_example_still_serves_other_batches() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = attnfx.optimize(model, inputs(12, 1))
    for t, b in ((12, 3), (5, 1), (40, 2)):
        x = inputs(t, b)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


def test_not_a_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="attnfx.optimize\\(\\) takes an nn.Module, got function"):
        attnfx.optimize(cases.matmul_div, inputs())


def test_untraceable_model_raises_capture_error_and_nothing_is_rewritten() -> None:
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # branches on a tensor value
                return torch.softmax(x @ x.transpose(-1, -2), -1) @ x
            return x

    with pytest.raises(attnfx.CaptureError) as info:
        attnfx.optimize(DataDependent(), (torch.randn(2, 4, 8),))
    message = str(info.value)
    assert message.startswith("attnfx could not capture DataDependent; nothing was rewritten.")
    assert "torch.export (non-strict):" in message and "torch.fx.symbolic_trace:" in message
    assert "test_optimize_api.py" in message  # names the offending line


def test_unknown_variant_name_is_refused_up_front() -> None:
    with pytest.raises(attnfx.AttnfxError, match=r"unknown variant\(s\) \['flash9'\]"):
        attnfx.optimize(Projected(cases.matmul_div).eval(), inputs(), variants=["flash9"])


def test_integer_attention_is_refused_with_its_dtype() -> None:
    class IntAttention(nn.Module):
        def forward(self, q):
            s = (q @ q.transpose(-1, -2)).float()
            return (torch.softmax(s, -1) @ q.float())

    opt = attnfx.optimize(IntAttention(), (torch.randint(0, 5, (2, 3, 6, 8)),))
    (entry,) = opt.report.entries
    assert entry.reason_code == "DTYPE_UNSUPPORTED"


class WrongVariant(SdpaVariant):
    """An SDPA that silently uses the default scale: the bug verification exists to catch."""

    name = "sdpa_wrong_scale"

    def call(self, spec, operands):
        call = super().call(spec, operands)
        return Call(call.target, call.args, {**call.kwargs, "scale": spec.scale * 2}, call.output_index)


def test_a_site_that_fails_verification_is_restored(monkeypatch) -> None:
    monkeypatch.setattr("attnfx.pipeline.VARIANTS", (WrongVariant(),))
    model = Projected(cases.matmul_div).eval()
    opt = attnfx.optimize(model, inputs())
    (entry,) = opt.report.entries
    assert entry.status == "RESTORED" and entry.reason_code == "VERIFICATION_FAILED"
    assert "sdpa_wrong_scale did not reproduce the site on the example inputs: max abs error" in entry.reason
    assert torch.ops.aten.scaled_dot_product_attention.default not in [n.target for n in opt.graph_module.graph.nodes]
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()))


def test_a_rejected_replacement_gives_way_to_the_next_fastest(monkeypatch) -> None:
    monkeypatch.setattr("attnfx.pipeline.VARIANTS", (WrongVariant(), SdpaVariant()))
    model = Projected(cases.matmul_div).eval()
    opt = attnfx.optimize(model, inputs())
    (entry,) = opt.report.entries
    assert (entry.status, entry.variant, entry.reason_code) == ("REWRITTEN", "sdpa", None)
    assert re.search(r"; verification rejected sdpa_wrong_scale \[\w+\] \(max abs error \S+ exceeds atol 2e-05 "
                     r"\+ rtol 0\.0001\), so the next fastest was taken$", entry.why), entry.why
    targets = [n.target for n in opt.graph_module.graph.nodes]
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) == 1
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()))


def test_verify_false_skips_the_check(monkeypatch) -> None:
    monkeypatch.setattr("attnfx.pipeline.VARIANTS", (WrongVariant(),))
    opt = attnfx.optimize(Projected(cases.matmul_div).eval(), inputs(), verify=False)
    assert opt.report.entries[0].status == "REWRITTEN" and opt.report.entries[0].error is None


class TwoSites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Projected(cases.matmul_div), Projected(cases.causal_tril_bool)

    def forward(self, x):
        return self.second(self.first(x))


def test_an_internal_error_in_one_site_keeps_that_site_and_optimises_the_rest(monkeypatch) -> None:
    from attnfx.passes import attention

    real_lift = attention.lift

    def lift(softmax, evaluator):
        if "first" in str(softmax.meta.get("nn_module_stack", "")):
            raise IndexError("injected bug")
        return real_lift(softmax, evaluator)

    monkeypatch.setattr("attnfx.decide.lift", lift)
    model = TwoSites().eval()
    opt = attnfx.optimize(model, inputs(), variants=["sdpa"])
    first, second = opt.report.entries
    assert (first.status, first.reason_code, first.failed_stage) == ("REFUSED", "INTERNAL_ERROR", "match")
    assert first.reason.startswith("attnfx raised IndexError: injected bug (at test_optimize_api.py:")
    assert second.status == "REWRITTEN"
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()), atol=1e-5, rtol=1e-5)


def test_an_emitter_error_keeps_that_site_without_leftover_nodes(monkeypatch) -> None:
    def broken_call(self, spec, operands):
        raise RuntimeError("injected emitter bug")

    monkeypatch.setattr(SdpaVariant, "call", broken_call)
    model = Projected(cases.matmul_div).eval()
    opt = attnfx.optimize(model, inputs(), variants=["sdpa"])
    (entry,) = opt.report.entries
    assert (entry.status, entry.reason_code, entry.failed_stage) == ("REFUSED", "INTERNAL_ERROR", "emit")
    assert "attnfx raised RuntimeError: injected emitter bug" in entry.reason
    captured = attnfx.optimize(model, inputs(), variants=["eager"])  # the same graph, nothing emitted
    assert len(opt.graph_module.graph.nodes) == len(captured.graph_module.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()))


def test_report_text_and_json() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = attnfx.optimize(model, inputs())
    text = str(opt.report)
    assert text.splitlines()[0] == "attnfx report for Projected (captured with torch.export): 1 site(s): 1 rewritten"
    assert "sdpa [flag]" in text and "attention_cases.py:" in text
    assert "mask proof: causal top-left (n <= m)" in text
    assert "QK = contract[bhgme,bhne->bhgmn](Q, K)" in text and "causal=top_left" in text
    data = json.loads(opt.report.to_json())
    assert data["schema"] == "attnfx.report/1"
    assert data["summary"] == {"REWRITTEN": 1, "REFUSED": 0, "KEPT": 0, "ALREADY_FUSED": 0, "RESTORED": 0}
    (entry,) = data["entries"]
    assert entry["variant"] == "sdpa" and entry["lowering"] == "flag"
    assert entry["spec"]["causal"] == "top_left" and entry["spec"]["q_len"] == 12
    assert sorted(entry["spec"]["dynamic"]) == ["batch", "kv_len", "q_len"]
    assert entry["candidates"][0]["variant"] == "sdpa"
    assert entry["error"] < 1e-5


def test_existing_sdpa_is_reported_as_already_fused() -> None:
    mha = nn.MultiheadAttention(cases.C, cases.H, batch_first=True).eval()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    opt = attnfx.optimize(Wrapper().eval(), inputs())
    assert [e.status for e in opt.report.entries] == ["ALREADY_FUSED"]


def test_inputs_outside_the_captured_ranges_are_re_optimised() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = attnfx.optimize(model, inputs(12, 2))
    x = inputs(1, 3)  # length 1 was specialised away by capture
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
    assert len(opt.specializations) == 1
    assert opt.report.notes[-1].startswith("re-optimised for inputs outside the captured ranges (Guard failed:")
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs(1, 3)), model(*inputs(1, 3)), atol=1e-5, rtol=1e-5)
    assert len(opt.specializations) == 1  # reused, not rebuilt


def test_explain_prints_the_analysis_for_a_shape(capsys) -> None:
    from attnfx.cli import main

    text = attnfx.explain({"B": 1, "H": 8, "N": 1024, "E": 64, "causal": True})
    assert "== cascades and passes ==" in text and "== ranked variants ==" in text
    assert main(["explain", "--N", "512", "--causal"]) == 0
    assert "winner: sdpa" in capsys.readouterr().out


def test_target_and_memory_budget_reach_the_selection() -> None:
    model = Projected(cases.matmul_div).eval()
    opt = attnfx.optimize(model, inputs(), target="H100-SXM5")
    (entry,) = opt.report.entries
    # planned for the GPU even on a CPU machine: the CUDA variants compete, the CPU kernel does not
    assert entry.variant in ("sdpa", "triton_flash")
    assert [c.variant for c in entry.candidates if c.variant.startswith("triton")] == ["triton_flash"]
    assert ("attnfx_chunked", "none", "attnfx_chunked is attnfx's CPU kernel; on cuda attnfx::attention "
            "runs its Triton kernels") in entry.unavailable
    with torch.no_grad():  # and the plan still runs (and was verified) where the inputs are
        torch.testing.assert_close(opt(*inputs(20, 3)), model(*inputs(20, 3)), atol=1e-5, rtol=1e-5)
    triton_plan = attnfx.optimize(model, inputs(), target="H100-SXM5", variants=["triton_flash"])
    assert [e.variant for e in triton_plan.report.entries] == ["triton_flash"]
    with torch.no_grad():
        torch.testing.assert_close(triton_plan(*inputs(20, 3)), model(*inputs(20, 3)), atol=1e-5, rtol=1e-5)
    tight = attnfx.optimize(model, inputs(), memory_budget=1.0)
    (entry,) = tight.report.entries
    assert entry.reason_code == "NO_VARIANT"
    assert entry.reason == "no variant fits the memory budget (1 bytes of intermediates)"


@torch.fx.wrap
def _numpy_tanh(x):
    """A step torch.export cannot trace (it leaves torch) but symbolic tracing keeps as a leaf call."""
    import numpy

    return torch.from_numpy(numpy.tanh(x.detach().numpy()))


class NumpyStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Projected(cases.matmul_div)

    def forward(self, x):
        return self.attn(_numpy_tanh(x))


def test_symbolic_trace_fallback_rewrites_torch_level_graphs() -> None:
    model = NumpyStep().eval()
    opt = attnfx.optimize(model, inputs())
    assert opt.report.capture == "symbolic_trace"
    assert opt.report.notes[0].startswith("torch.export failed (")
    assert [e.status for e in opt.report.entries] == ["REWRITTEN"]
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()), atol=1e-5, rtol=1e-5)


def _softcapped(q, k, v):
    s = torch.tanh((q @ k.transpose(-2, -1)) * 0.25 / 30.0) * 30.0
    return torch.softmax(s, -1) @ v


def test_variants_without_eager_rule_out_the_models_own_code() -> None:
    model = Projected(_softcapped).eval()
    x = inputs(8, 1)  # static and small: eager is predicted faster than attnfx_chunked
    kept = attnfx.optimize(model, x, dynamic_shapes={"x": None}, variants=["attnfx_chunked", "eager"])
    assert (kept.report.entries[0].status, kept.report.entries[0].reason_code) == ("KEPT", "EAGER_FASTEST")
    forced = attnfx.optimize(model, x, dynamic_shapes={"x": None}, variants=["attnfx_chunked"])
    assert (forced.report.entries[0].status, forced.report.entries[0].variant) == ("REWRITTEN", "attnfx_chunked")
    with torch.no_grad():
        torch.testing.assert_close(forced(*x), model(*x), atol=1e-5, rtol=1e-5)
    refused = attnfx.optimize(model, x, dynamic_shapes={"x": None}, variants=["sdpa"]).report.entries[0]
    assert (refused.status, refused.reason_code) == ("REFUSED", "NO_VARIANT")
    assert refused.reason == "no variant can take this site: sdpa [none]: SDPA has no softcap"
