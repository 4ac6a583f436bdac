"""Test-session setup shared by every test module."""
import os
import sys
from pathlib import Path

# Triton reads this once, at import: kernels run on CPU tensors through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The bundled example models (examples/) are importable from tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

# Property tests draw the same examples on every run, so a CI result never depends on luck.
from hypothesis import settings  # noqa: E402

settings.register_profile("attnfx", derandomize=True, deadline=None)
settings.load_profile("attnfx")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _fixed_host_profile(tmp_path_factory):
    """Price target="cpu" on the fixed sandbox profile, not on a calibration of whatever machine runs
    the tests (a busy CI machine measures other rates and the cost model would choose otherwise)."""
    from attnfx.cost_model.hardware import SANDBOX_CPU
    from attnfx.cost_model.profiles import CACHE_ENV, cache_path, save_profile

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("attnfx-cache"))
    save_profile(SANDBOX_CPU, cache_path())
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous
