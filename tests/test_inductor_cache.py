"""Inductor's cache key covers attnfx's kernels: an op whose fake changes its output strides must not
be served code compiled against the old ones, and a user's own post-grad pass still runs and keys."""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import attention_cases as cases
from attention_cases import C, Projected
from attnfx import inductor_cache
from attnfx.inductor_cache import _KERNEL_SOURCES, KernelSourcesKey


class CountingPass(CustomGraphPass):
    def __init__(self, uuid: str | None) -> None:
        self.calls, self._uuid = 0, uuid

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.calls += 1

    def uuid(self):
        return self._uuid


def test_the_key_is_the_hash_of_every_kernel_source() -> None:
    names = {p.rsplit("/", 1)[-1] for p in _KERNEL_SOURCES}
    assert {"padded.py", "attention_ops.py", "variant.py"} <= names
    assert KernelSourcesKey().uuid() == (get_hash_for_files(_KERNEL_SOURCES), None)


def test_a_user_pass_keeps_its_uuid_in_the_key_and_one_without_uuid_bypasses_the_cache() -> None:
    assert KernelSourcesKey(CountingPass("mine")).uuid() == (get_hash_for_files(_KERNEL_SOURCES), "mine")
    assert KernelSourcesKey(CountingPass(None)).uuid() is None


def _compile_and_run(user_pass: CountingPass) -> dict:
    """One fresh compile through the backend; Inductor's cache counters for it."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = Projected(cases.causal_tril_bool).eval()
    x = torch.randn(2, 12, C)
    compiled = torch.compile(model, backend="attnfx", options={"post_grad_custom_post_pass": user_pass})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    return dict(counters["inductor"])


def test_cached_code_is_reused_until_the_kernels_change(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    user_pass = CountingPass("mine")
    first = _compile_and_run(user_pass)
    assert (first.get("fxgraph_cache_miss"), first.get("fxgraph_cache_bypass"), user_pass.calls) == (1, None, 1)
    again = _compile_and_run(user_pass)
    assert (again.get("fxgraph_cache_hit"), user_pass.calls) == (1, 1)  # served from the cache
    edited = tmp_path / "edited_kernel.py"
    edited.write_text("# a kernel source that changed\n")
    monkeypatch.setattr(inductor_cache, "_KERNEL_SOURCES", (*inductor_cache._KERNEL_SOURCES, str(edited)))
    changed = _compile_and_run(user_pass)
    assert (changed.get("fxgraph_cache_miss"), user_pass.calls) == (1, 2)  # compiled anew
