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
