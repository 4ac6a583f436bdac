"""attnfx's error hierarchy where users and the compiler import it (`attnfx.errors`). It is defined
in the foundation layer (cost_model/errors.py) because the kernels raise it too, and no layer
imports from one above it."""
from attnfx.cost_model.errors import AttnfxError, CaptureError, ExportError, KernelUnavailable

__all__ = ["AttnfxError", "CaptureError", "ExportError", "KernelUnavailable"]
