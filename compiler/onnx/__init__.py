"""attnfx's ONNX export: each attention site written as the one ONNX operator that computes it.

Needs the `[onnx]` extra (onnx, onnxruntime, onnxscript); `attnfx.export_onnx` loads this on first use.
"""
from .export import ExportSummary, SiteExport, export_onnx

__all__ = ["ExportSummary", "SiteExport", "export_onnx"]
