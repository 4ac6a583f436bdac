"""attnfx.verify's helpers, shared by optimize()'s per-site check and the ONNX export's check."""
import math

import torch

from attnfx.verify import compare, deviation, flat_inputs, record, run_graph


def test_deviation_treats_equal_values_as_equal_and_one_sided_nan_as_infinite():
    inf, nan = math.inf, math.nan
    expected = torch.tensor([1.0, -inf, nan, 2.0, nan])
    actual = torch.tensor([1.5, -inf, nan, nan, 0.0])
    assert deviation(actual, expected).tolist() == [0.5, 0.0, 0.0, inf, inf]
    assert deviation(actual[:4], expected) is None
    assert deviation(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 3])).tolist() == [0.0, inf]


def test_compare_applies_the_dtype_tolerance_to_the_deviation():
    expected = torch.tensor([[0.0, -math.inf]])
    assert compare(expected + torch.tensor([[1e-5, 0.0]]), expected).ok
    check = compare(expected + torch.tensor([[1e-3, 0.0]]), expected)
    assert not check.ok and check.detail == "max abs error 0.001 exceeds atol 2e-05 + rtol 0.0001"
    assert compare(torch.zeros(2), torch.zeros(3)).detail == "shape (2,) instead of (3,)"


def test_flat_inputs_bind_keywords_and_defaults_of_a_traced_graph():
    class Scaled(torch.nn.Module):
        def forward(self, x, y, alpha=2.0):
            return x * alpha + y, x - y

    gm = torch.fx.symbolic_trace(Scaled())
    x, y = torch.ones(2), torch.arange(2.0)
    assert flat_inputs(gm, (x,), {"y": y}) == [x, y, 2.0]
    values, outputs = run_graph(gm, [x, y, 3.0], [n for n in gm.graph.nodes if n.name == "mul"])
    assert [v.tolist() for v in values.values()] == [[3.0, 3.0]]
    assert [o.tolist() for o in outputs] == [[3.0, 4.0], [1.0, 0.0]]


def test_record_runs_an_exported_graph_on_the_example_call():
    class Keywords(torch.nn.Module):
        def forward(self, x, *, mask):
            return {"out": x.masked_fill(mask, 0.0)}

    x, mask = torch.randn(3), torch.tensor([True, False, True])
    gm = torch.export.export(Keywords(), (x,), {"mask": mask}).module()
    _, outputs = record(gm, (x,), {"mask": mask})
    assert len(outputs) == 1 and torch.equal(outputs[0], x.masked_fill(mask, 0.0))
