"""attnfx: find every attention in a PyTorch model and replace it with the fastest exact kernel."""
from .errors import AttnfxError, CaptureError, ExportError, KernelUnavailable, MatchError, VerificationError

__all__ = [
    "AttnfxError",
    "CaptureError",
    "ExportError",
    "KernelUnavailable",
    "MatchError",
    "VerificationError",
]
