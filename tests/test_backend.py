"""torch.compile(model, backend="attnfx"): registration, rewriting, Inductor, graph breaks,
recompilation, training, reports, and falling back instead of breaking a user's compile."""
from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import C, Projected, inputs
from generation_cases import AtenOps

NO_INDUCTOR = {"inductor": False}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(model, **kwargs):
    return torch.compile(model, backend="attnfx", **kwargs)


class TwoBlocks(nn.Module):
    """Two causal attention blocks with a graph break between them."""

    def __init__(self, graph_break: bool = True) -> None:
        super().__init__()
        self.first = Projected(cases.causal_tril_bool)
        self.second = Projected(cases.matmul_mul)
        self.graph_break = graph_break

    def forward(self, x):
        x = x + self.first(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.second(x)


def test_import_registers_the_backend_and_the_entry_point_names_it() -> None:
    assert "attnfx" in torch._dynamo.list_backends()
    (point,) = [p for p in entry_points(group="torch_dynamo_backends") if p.name == "attnfx"]
    assert point.load() is attnfx.attnfx_backend


@pytest.mark.slow
def test_backend_works_without_importing_attnfx() -> None:
    script = (
        "import sys, torch\n"
        "def attend(q, k, v):\n"
        "    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v\n"
        "q = torch.randn(2, 4, 8, 16)\n"
        "out = torch.compile(attend, backend='attnfx', options={'inductor': False})(q, q, q)\n"
        "torch.testing.assert_close(out, attend(q, q, q), atol=1e-5, rtol=1e-5)\n"
        "import attnfx\n"
        "print(attnfx.reports(attend)[0].entries[0].status)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "REWRITTEN"


def test_rewritten_graph_runs_no_softmax_and_matches_eager() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = compiled(model, options=NO_INDUCTOR)
    x = inputs()
    with torch.no_grad(), AtenOps() as ops:
        out = opt(*x)
    torch.testing.assert_close(out, model(*x), atol=1e-5, rtol=1e-5)
    assert ops.softmaxes() == 0 and ops.counts["_scaled_dot_product_flash_attention_for_cpu"] == 1
    (report,) = attnfx.reports(model)
    (entry,) = report.entries
    assert (entry.status, entry.variant, entry.lowering, entry.mask) == ("REWRITTEN", "sdpa", "flag",
                                                                       "causal top-left (n <= m)")
    assert entry.module_path == "" and entry.source.startswith("attention_cases.py:")
    assert report.model == "Projected.forward" and report.capture.startswith("torch.compile (Dynamo graph")


@pytest.mark.slow
def test_inductor_compiles_the_rewritten_graph() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = compiled(model)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
    (report,) = attnfx.reports(opt)
    assert [e.status for e in report.entries] == ["REWRITTEN"] and report.notes == []


def test_options_reach_the_rewrite() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = compiled(model, options={"inductor": False, "variants": ["attnfx_chunked"], "verify": True})
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
    (report,) = attnfx.reports(model)
    assert report.entries[0].variant == "attnfx_chunked"


def test_bad_options_are_reported_as_the_users_error() -> None:
    x = inputs()
    with pytest.raises(Exception, match=r"unknown variant\(s\) \['flash9'\]"):
        compiled(Projected(cases.matmul_mul).eval(), options={"variants": ["flash9"]})(*x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"backend 'attnfx' got \['max_autotune'\] with inductor=False"):
        compiled(Projected(cases.matmul_mul).eval(), options={"inductor": False, "max_autotune": True})(*x)


def test_graph_breaks_give_one_report_per_graph() -> None:
    model = TwoBlocks().eval()
    opt = compiled(model, options=NO_INDUCTOR)
    x = inputs()
    with torch.no_grad(), AtenOps() as ops:
        out = opt(*x)
    torch.testing.assert_close(out, model(*x), atol=1e-5, rtol=1e-5)
    assert ops.softmaxes() == 0
    reports = attnfx.reports(opt)
    assert [r.rewritten for r in reports] == [1, 1]
    assert [r.entries[0].module_path for r in reports] == ["first", "second"]
    assert attnfx.reports(model) == reports  # the model and what torch.compile returned


def test_new_shapes_recompile_and_dynamic_true_serves_them_with_one_graph() -> None:
    model = Projected(cases.causal_tril_bool).eval()
    opt = compiled(model, options=NO_INDUCTOR)
    with torch.no_grad():
        for t, b in ((12, 2), (20, 3), (7, 2)):
            x = inputs(t, b)
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
    reports = attnfx.reports(model)
    assert len(reports) == 2 and all(r.rewritten == 1 for r in reports)  # static, then dynamic
    assert "M=12 N=12" in reports[0].entries[0].spec.describe()
    torch._dynamo.reset()
    dynamic = Projected(cases.causal_tril_bool).eval()
    opt = compiled(dynamic, dynamic=True, options=NO_INDUCTOR)
    with torch.no_grad():
        for t, b in ((12, 2), (20, 2), (7, 3)):
            x = inputs(t, b)
            torch.testing.assert_close(opt(*x), dynamic(*x), atol=1e-5, rtol=1e-5)
    (report,) = attnfx.reports(dynamic)
    assert report.entries[0].spec.dynamic >= {"q_len", "kv_len"}


class ScaledByAttribute(nn.Module):
    """Scores scaled by a Python float attribute (Dynamo makes it an input with dynamic=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Projected(self.attend)
        self.scaling = 0.25

    def attend(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.scaling, -1) @ v

    def forward(self, x):
        return self.inner(x)


def test_dynamic_float_scale_is_specialised_and_guarded() -> None:
    model = ScaledByAttribute().eval()
    opt = compiled(model, dynamic=True, options=NO_INDUCTOR)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
        (report,) = attnfx.reports(model)
        assert report.entries[0].status == "REWRITTEN" and report.entries[0].spec.scale == 0.25
        model.scaling = 0.5  # a guarded constant: a new value recompiles
        torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)
    assert [r.entries[0].spec.scale for r in attnfx.reports(model)] == [0.25, 0.5]


class CacheWriter(nn.Module):
    """Writes new keys into a cache it is given (in place, as a static KV cache does) and counts
    the writes, then attends over the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(C, C)

    def forward(self, x, cache, position, writes):
        cache.index_copy_(1, position, self.proj(x))
        writes.add_(1)
        q = x.view(x.shape[0], x.shape[1], 4, -1).transpose(1, 2)
        k = cache.view(cache.shape[0], cache.shape[1], 4, -1).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ k


def test_verification_never_changes_the_users_inputs() -> None:
    model = CacheWriter().eval()
    x, position = torch.randn(2, 3, C), torch.tensor([1, 4, 6])
    cache, writes = torch.zeros(2, 8, C), torch.zeros((), dtype=torch.long)
    expected_cache, expected_writes = cache.clone(), writes.clone()
    with torch.no_grad():
        expected = model(x, expected_cache, position, expected_writes)
        out = compiled(model, options=NO_INDUCTOR)(x, cache, position, writes)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache, expected_cache) and int(writes) == 1  # written once, by the call itself
    assert attnfx.reports(model)[0].rewritten == 1


def test_an_exception_inside_attnfx_compiles_the_graph_unrewritten(monkeypatch) -> None:
    def broken(gm, example_inputs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("attnfx.backend.aten_graph", broken)
    model = Projected(cases.matmul_mul).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, options=NO_INDUCTOR)(*x), model(*x))
    (report,) = attnfx.reports(model)
    assert report.entries == []
    assert report.notes == ["attnfx raised RuntimeError: injected failure; the graph is compiled unrewritten"]


def test_a_rewritten_graph_that_does_not_compile_falls_back_to_the_original(monkeypatch) -> None:
    import attnfx.backend as backend

    real_compile = backend._compile

    def fussy(gm, example_inputs, settings):
        if any(n.op == "call_function" and "attention" in str(n.target) for n in gm.graph.nodes):
            raise NotImplementedError("no lowering for the rewritten site")
        return real_compile(gm, example_inputs, settings)

    monkeypatch.setattr(backend, "_compile", fussy)
    model = Projected(cases.matmul_mul).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, options=NO_INDUCTOR)(*x), model(*x))
    (report,) = attnfx.reports(model)
    (entry,) = report.entries
    why = "compiling the rewritten graph raised NotImplementedError: no lowering for the rewritten site"
    assert (entry.status, entry.reason_code, entry.failed_stage) == ("RESTORED", "INTERNAL_ERROR", "compile")
    assert entry.reason == f"{why}; the site was left as written (please report this)"
    assert report.notes == [f"{why}; the graph is compiled unrewritten"] and report.rewritten == 0


def test_reports_are_found_by_function_and_logged(caplog) -> None:
    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v

    q = torch.randn(2, 4, 8, 16)
    with caplog.at_level(logging.INFO, logger="attnfx"):
        torch.compile(attend, backend="attnfx", options=NO_INDUCTOR)(q, q, q)
    (report,) = attnfx.reports(attend)
    assert report.model == "attend" and report in attnfx.reports()
    assert attnfx.reports(Projected(cases.matmul_mul)) == []  # another model's parameters
    assert [r.getMessage() for r in caplog.records] == [str(report).splitlines()[0]]


def _sgd_run(model: nn.Module, step, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i in range(steps):
        optimizer.zero_grad()
        loss = step(i)
        loss.backward()
        losses.append(float(loss))
        optimizer.step()
    return losses, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_training_through_the_backend_gives_eagers_losses_and_gradients(inductor: bool) -> None:
    eager, trained = TwoBlocks(graph_break=False).train(), TwoBlocks(graph_break=False).train()
    trained.load_state_dict(eager.state_dict())
    opt = compiled(trained, options={"inductor": inductor})
    batches = [inputs(12, 2)[0] * (i + 1) for i in range(3)]
    expected = _sgd_run(eager, lambda i: eager(batches[i]).square().mean())
    actual = _sgd_run(trained, lambda i: opt(batches[i]).square().mean())
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert [e.status for r in attnfx.reports(trained) for e in r.entries] == ["REWRITTEN", "REWRITTEN"]


def test_the_backend_never_offers_flex_unless_asked() -> None:
    """FlexAttention compiles itself; inside a graph being compiled its block mask cannot be built."""
    from attnfx.backend import BackendOptions

    default = BackendOptions.parse(None).rewrite
    assert "flex" not in default.variants and {"sdpa", "attnfx_chunked", "eager"} <= set(default.variants)
    assert tuple(BackendOptions.parse({"variants": ["flex"]}).rewrite.variants) == ("flex",)
