"""What optimize() returns is called like the model: its signature, its defaults, its errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import Projected, inputs
from generation_cases import CASES, prompt


class Flagged(nn.Module):
    """Attention with an optional additive mask, a keyword-only output scale and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Projected(cases.matmul_mul)

    def forward(self, x, bias=None, *, scale: float = 1.0, negate: bool = False):
        y = self.attn(x) * scale
        y = y if bias is None else y + bias
        return -y if negate else y


def _close(a, b) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_positional_and_keyword_forms_are_the_same_call() -> None:
    model = Flagged().eval()
    (x,), bias = inputs(), torch.randn(1, 1, 64)
    opt = attnfx.optimize(model, (x,), {"bias": bias})
    with torch.no_grad():
        expected = model(x, bias)
        for out in (opt(x, bias), opt(x=x, bias=bias), opt(x, bias=bias), opt(bias=bias, x=x)):
            _close(out, expected)
    assert opt.specializations == []


def test_a_keyword_given_at_capture_may_be_left_out() -> None:
    model = Flagged().eval()
    (x,) = inputs()
    opt = attnfx.optimize(model, (x,), {"scale": 1.0, "negate": True})
    with torch.no_grad():
        _close(opt(x, negate=True), model(x, negate=True))  # scale=1.0 is the default: same graph
        assert opt.specializations == []
        _close(opt(x), model(x))  # negate left out: the model's default, not the captured value
    assert len(opt.specializations) == 1 and opt.specializations[0].report.rewritten == 1
    assert opt.report.notes[-1] == ("re-optimised for a call with other arguments than the captured one: "
                                    "1 site(s) rewritten")


@pytest.mark.parametrize("args, kwargs", [((), {}), ((1, 2, 3), {}), ((1,), {"shift": 2})])
def test_a_call_that_does_not_fit_gets_the_models_own_type_error(args, kwargs) -> None:
    model = Flagged().eval()
    opt = attnfx.optimize(model, inputs())
    with pytest.raises(TypeError) as expected:
        model(*args, **kwargs)
    with pytest.raises(TypeError) as actual:
        opt(*args, **kwargs)
    assert str(actual.value) == str(expected.value)


def test_example_args_is_the_former_name_of_example_inputs() -> None:
    model = Projected(cases.matmul_mul).eval()
    with pytest.warns(DeprecationWarning, match=r"optimize\(example_args=...\) is now optimize\(example_inputs=...\)"):
        opt = attnfx.optimize(model, example_args=inputs())
    assert opt.report.rewritten == 1
    assert attnfx.optimize(model, example_inputs=inputs()).report.rewritten == 1


@pytest.mark.slow
def test_a_language_model_captured_without_its_cache_is_called_with_it() -> None:
    model, inputs_ = CASES["llama"].build(), prompt()
    opt = attnfx.optimize(model, (), {**inputs_, "use_cache": False})
    with torch.no_grad():
        _close(opt(inputs_["input_ids"], inputs_["attention_mask"], use_cache=False).logits,
               model(**inputs_, use_cache=False).logits)
        assert opt.specializations == []
        out = opt(**inputs_)  # use_cache left out: the model's default (on) returns a cache
        expected = model(**inputs_)
    _close(out.logits, expected.logits)
    assert type(out.past_key_values) is type(expected.past_key_values)
    _close(out.past_key_values.layers[0].keys, expected.past_key_values.layers[0].keys)
    assert len(opt.specializations) == 1
