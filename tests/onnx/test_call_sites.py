"""Export reads every attention call through the variant that emits it (`Variant.read`), so a new
variant exports without a change in attnfx.onnx, and a kind ONNX has no operator for is refused."""
import re
from dataclasses import dataclass

import pytest
import torch

import attnfx
from attnfx import kernels
from attnfx.cost_model.spec import Causal, Kind, ScoreMods
from attnfx.errors import ExportError
from attnfx.kernels import Operands
from attnfx.kernels.fused import CHUNKED, TRITON_DECODE, TRITON_FLASH
from attnfx.kernels.variant import CallSite, call_arguments
from attnfx.kernels.sdpa import SdpaVariant
from attnfx.onnx import export_onnx
from onnx_helpers import attributes, fused_nodes, stand_in


@torch.library.custom_op("attnfx_test::attention", mutates_args=())
def _test_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


@_test_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(*q.shape[:3], v.shape[3])


@torch.library.custom_op("attnfx_test::sigmoid_attention", mutates_args=())
def _test_sigmoid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(q @ k.transpose(-1, -2)) @ v


@_test_sigmoid_attention.register_fake
def _(q, k, v):
    return q.new_empty(*q.shape[:3], v.shape[3])


@dataclass
class NewVariant:
    """A variant attnfx.onnx has never heard of: its own op and its own reader."""

    target: object
    op: str
    kind: Kind = Kind.SOFTMAX
    name: str = "new_variant"

    def read(self, node):
        if node.op != "call_function" or node.target is not self.target:
            return None
        a = call_arguments(node)
        return CallSite(Operands(a["q"], a["k"], a["v"]), ScoreMods(a.get("scale", 1.0)), kind=self.kind)


class OpModel(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, m, _ = x.shape
        q, k, v = self.qkv(x).view(b, m, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return self.op(q, k, v).transpose(1, 2).reshape(b, m, 32)


def test_a_new_variant_exports_through_its_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "VARIANTS", (*kernels.VARIANTS, NewVariant(
        torch.ops.attnfx_test.attention.default, "attnfx_test::attention")))
    torch.manual_seed(0)
    model = OpModel(lambda q, k, v: torch.ops.attnfx_test.attention(q, k, v, 0.25))
    opt = stand_in(model, {"x": torch.randn(2, 6, 32)})
    summary = export_onnx(opt, tmp_path / "new.onnx")
    assert [(s.site, s.became, s.why) for s in summary.sites] == [(0, "Attention", "heads=4; scale=0.25")]
    (node,) = fused_nodes(tmp_path / "new.onnx")
    assert attributes(node) == {"scale": pytest.approx(0.25), "is_causal": 0}
    assert summary.softmax_nodes == 0
    assert len(summary.checks) == 2 and all(diff <= 1e-4 for _, diff in summary.checks)


def test_a_kind_onnx_cannot_express_is_an_error_naming_the_site(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "VARIANTS", (*kernels.VARIANTS, NewVariant(
        torch.ops.attnfx_test.sigmoid_attention.default, "attnfx_test::sigmoid_attention", Kind.SIGMOID)))
    opt = stand_in(OpModel(torch.ops.attnfx_test.sigmoid_attention), {"x": torch.randn(2, 6, 32)})
    with pytest.raises(ExportError) as err:
        export_onnx(opt, tmp_path / "sigmoid.onnx")
    assert str(err.value) == (
        "site 0 (<root>, attnfx_test::sigmoid_attention): sigmoid attention has no ONNX operator (Attention and "
        "onnxruntime's contrib attention ops normalise with a softmax)"
    )
    assert list(tmp_path.iterdir()) == []


def _only_call(gm: torch.fx.GraphModule, target) -> torch.fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.target is target]
    return node


def test_sdpa_reader_states_the_default_scale_causal_and_dropout():
    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.25)

    gm = torch.export.export(Sdpa(), tuple(torch.randn(3, 1, 2, 4, 16))).module()
    node = _only_call(gm, torch.ops.aten.scaled_dot_product_attention.default)
    call = SdpaVariant().read(node)
    assert call.mods == ScoreMods(0.25, Causal.TOP_LEFT)
    assert call.dropout == 0.25 and call.kind is Kind.SOFTMAX and call.output_index is None
    o = call.operands
    assert [o.q.name, o.k.name, o.v.name, o.mask, o.slopes] == ["q", "k", "v", None, None]
    assert CHUNKED.read(node) is None


def test_variants_emitting_attnfx_attention_share_one_reader():
    class Op(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.attnfx.attention(q, k, v, None, None, 0.5, "bottom_right", 3, 30.0)[0]

    gm = torch.export.export(Op(), tuple(torch.randn(3, 1, 2, 4, 8))).module()
    node = _only_call(gm, torch.ops.attnfx.attention.default)
    readers = {variant.read for variant in (CHUNKED, TRITON_FLASH, TRITON_DECODE)}
    assert len(readers) == 1
    call = readers.pop()(node)
    assert call.mods == ScoreMods(0.5, Causal.BOTTOM_RIGHT, 3, 30.0) and call.output_index == 0
    assert SdpaVariant().read(node) is None


def test_every_op_has_one_reader_that_states_its_kind():
    """Each attnfx op is read by the variants that emit it, and by no other."""
    keep = torch.tensor([[True, True, True, False]]).view(1, 1, 1, 4)
    calls = {
        "attnfx::sigmoid_attention": (lambda q, k, v: torch.ops.attnfx.sigmoid_attention.default(
            q, k, v, None, None, 0.5, "top_left", -1, 0.0, -1.5), Kind.SIGMOID),
        "attnfx::linear_attention": (lambda q, k, v: torch.ops.attnfx.linear_attention.default(
            q, k, v, None, 0.5, "top_left", True, 1e-6, "chunked", 64)[0], Kind.LINEAR),
        "attnfx::bounded_attention": (lambda q, k, v: torch.ops.attnfx.bounded_attention.default(
            q, k, v, None, None, 0.5, "top_left", -1, 0.0)[0], Kind.SOFTMAX),
        "attnfx::padded_attention": (lambda q, k, v: torch.ops.attnfx.padded_attention.default(
            q, k, v, keep, None, None, 0.5, "top_left", -1, 0.0, float("-inf")), Kind.SOFTMAX),
    }
    for op, (call_op, kind) in calls.items():
        class Op(torch.nn.Module):
            def forward(self, q, k, v):
                return call_op(q, k, v)

        gm = torch.fx.symbolic_trace(Op())
        (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and op.split("::")[1] in str(n.target)]
        readers = [variant for variant in kernels.VARIANTS if variant.read(node) is not None]
        assert {variant.op for variant in readers} == {op}
        call = readers[0].read(node)
        assert call.kind is kind and call.mods == ScoreMods(0.5, Causal.TOP_LEFT)


def test_a_padded_call_with_a_finite_fill_is_not_read_as_a_bool_mask():
    class Op(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return torch.ops.attnfx.padded_attention.default(q, k, v, keep, None, None, 0.5, "none", -1, 0.0, -1e9)

    gm = torch.fx.symbolic_trace(Op())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    padded = next(variant for variant in kernels.VARIANTS if variant.op == "attnfx::padded_attention")
    with pytest.raises(ValueError, match=re.escape("attnfx::padded_attention with fill=-1000000000.0 gives rows "
                                                   "that keep no key a value a bool mask cannot state")):
        padded.read(node)


def test_summary_and_report_name_a_module_alike(tmp_path):
    """A model whose flags reach it through **kwargs is captured behind attnfx's own wrapper, which adds
    `model.` to every module path; the report leaves it out, and so must the export summary."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
            weights = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
            return (weights @ v).transpose(1, 2).reshape(b, s, 32)

    class Flagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x, **flags):
            y = self.attn(x)
            return 2 * y if flags.get("double") else y

    torch.manual_seed(0)
    opt = attnfx.optimize(Flagged(), (), {"x": torch.randn(2, 8, 32), "double": True})
    assert opt.constants == {"double": True} and opt.report.rewritten == 1
    summary = export_onnx(opt, tmp_path / "flagged.onnx")
    assert [(s.site, s.module) for s in summary.sites] == [(0, opt.report.entries[0].module_path)] == [(0, "attn")]
    assert re.search(r"^0\s+attn\s+Attention\s", str(summary), re.M)
