"""attnfx: find every attention in a PyTorch model and replace it with the fastest exact kernel.

    opt = attnfx.optimize(model, example_args, example_kwargs)
    print(opt.report)
"""
from .errors import AttnfxError, CaptureError, ExportError, KernelUnavailable, MatchError, VerificationError
from .module import OptimizedModule
from .pipeline import optimize
from .report import Report, SiteEntry

__all__ = [
    "AttnfxError",
    "CaptureError",
    "ExportError",
    "KernelUnavailable",
    "MatchError",
    "OptimizedModule",
    "Report",
    "SiteEntry",
    "VerificationError",
    "optimize",
]
