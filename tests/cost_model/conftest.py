"""Cost-model tests never calibrate the host: they price on fixed profiles, and the profile cache
points at a temporary directory so a stray target="cpu" cannot read or write the user's cache."""
import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path / "attnfx-cache"))
