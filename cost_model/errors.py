"""One error hierarchy, so users can catch `AttnfxError` and read which stage failed and why."""
from __future__ import annotations


class AttnfxError(Exception):
    """Base of every error attnfx raises on purpose."""


class CaptureError(AttnfxError):
    """The model could not be captured as an fx graph (nothing was rewritten)."""


class KernelUnavailable(AttnfxError):
    """A kernel was asked for a site it cannot take (device, dtype, shape or feature)."""


class ExportError(AttnfxError):
    """ONNX export or its onnxruntime check failed (no file is left behind)."""
