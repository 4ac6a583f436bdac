"""attnfx: find every attention in a PyTorch model and replace it with the fastest exact kernel.

    opt = attnfx.optimize(model, example_inputs, example_kwargs)
    print(opt.report)

    compiled = torch.compile(model, backend="attnfx")   # registered on import
    print(*attnfx.reports(compiled))
"""
from attnfx.cost_model import explain

from .errors import AttnfxError, CaptureError, ExportError, KernelUnavailable
from .backend import attnfx_backend, register
from .compiled_reports import reports
from .module import OptimizedModule
from .pipeline import optimize
from .report import Report, SiteEntry

register()  # torch.compile(model, backend="attnfx")


def __getattr__(name: str):
    """ONNX export loads on first use: onnx, onnxruntime and onnxscript are the `[onnx]` extra."""
    if name in ("export_onnx", "ExportSummary"):
        from . import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'attnfx' has no attribute {name!r}")


__all__ = [
    "AttnfxError",
    "CaptureError",
    "ExportError",
    "ExportSummary",
    "KernelUnavailable",
    "OptimizedModule",
    "Report",
    "SiteEntry",
    "attnfx_backend",
    "explain",
    "export_onnx",
    "optimize",
    "reports",
]
