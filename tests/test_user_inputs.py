"""Models as users hand them to optimize(), and what users then do with the result: half
precision, hooks, torch.compile wrappers, meta or lazy weights, weights that change, state dicts,
copies and saving. Each gets correct behaviour or an error naming the cause."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import C, Projected, inputs


def causal_model() -> nn.Module:
    return Projected(cases.causal_tril_bool).eval()


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_models_on_cpu(dtype: torch.dtype, tolerance: float) -> None:
    model = causal_model().to(dtype)
    x = tuple(t.to(dtype) for t in inputs())
    opt = attnfx.optimize(model, x)
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN" and entry.spec.dtype == str(dtype).removeprefix("torch.")
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=tolerance, rtol=tolerance)


def test_forward_hooks_present_at_optimize_are_part_of_the_model() -> None:
    model = causal_model()
    model.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))
    model.register_forward_hook(lambda module, args, out: out * 2.0)
    opt = attnfx.optimize(model, inputs())
    x = inputs(9, 3)
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
    assert opt.report.rewritten == 1


def test_a_model_wrapped_by_torch_compile_is_optimised_itself() -> None:
    model = causal_model()
    opt = attnfx.optimize(torch.compile(model), inputs())
    assert opt.report.model == "Projected" and opt.report.rewritten == 1
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()), atol=1e-5, rtol=1e-5)


def test_meta_and_lazy_weights_are_refused_naming_them() -> None:
    with torch.device("meta"):
        on_meta = causal_model()
    with pytest.raises(attnfx.AttnfxError, match=r"^Projected\.qkv\.weight is on the meta device: load the weights"):
        attnfx.optimize(on_meta, inputs())
    lazy = causal_model()
    lazy.qkv = nn.LazyLinear(3 * C)
    with pytest.raises(attnfx.AttnfxError, match=r"^Projected\.qkv\.weight is not initialised yet \(a lazy module\)"):
        attnfx.optimize(lazy, inputs())


def test_the_result_sees_weights_changed_after_optimize() -> None:
    model = causal_model()
    opt = attnfx.optimize(model, inputs())
    x = inputs()
    with torch.no_grad():
        before = opt(*x)
        model.qkv.weight.mul_(1.5)
        model.load_state_dict({**model.state_dict(), "out.bias": torch.ones(C)})
        after = opt(*x)
        torch.testing.assert_close(after, model(*x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_state_dict_has_the_models_keys_and_loads_into_the_model() -> None:
    model = causal_model()
    opt = attnfx.optimize(model, inputs())
    assert list(opt.state_dict()) == list(model.state_dict())
    new = {k: v + 0.01 for k, v in model.state_dict().items()}
    assert opt.load_state_dict(new) == nn.modules.module._IncompatibleKeys([], [])
    torch.testing.assert_close(model.qkv.weight, new["qkv.weight"])
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs()), model(*inputs()), atol=1e-5, rtol=1e-5)


def test_deepcopy_is_independent_of_the_original() -> None:
    model = causal_model()
    opt = attnfx.optimize(model, inputs())
    x = inputs()
    with torch.no_grad():
        expected = opt(*x)
        clone = copy.deepcopy(opt)
        model.qkv.weight.zero_()
        torch.testing.assert_close(clone(*x), expected)
        torch.testing.assert_close(clone(*inputs(20, 1)), Projected(cases.causal_tril_bool)(*inputs(20, 1)),
                                   atol=1e-5, rtol=1e-5)  # a re-capture uses the copy's weights too
    assert clone.report.rewritten == 1


def test_torch_save_says_how_to_save_and_the_exported_program_saves_and_loads() -> None:
    opt = attnfx.optimize(causal_model(), inputs())
    with pytest.raises(TypeError, match=r"cannot be pickled \(torch\.save\): its graph is a torch\.export module"):
        torch.save(opt, io.BytesIO())
    x = inputs()
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(opt, x), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in loaded.graph.nodes) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(*x), opt(*x), atol=1e-6, rtol=1e-6)
