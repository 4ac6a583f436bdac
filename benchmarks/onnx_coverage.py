"""ONNX export over the model zoo: every model attnfx optimises should export with one fused node per
rewritten site and no Softmax left from them, verified in onnxruntime (run by hand).

    python benchmarks/onnx_coverage.py [--models bert,gpt2] [--seq-len 8] [--opset 23]

A row per model: rewritten sites, fused attention nodes in the file, Softmax nodes left (those of
sites attnfx refused are expected), onnxruntime's max |diff| at the example inputs, or the error.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import attnfx  # noqa: E402
import zoo  # noqa: E402
from attnfx.onnx import export_onnx  # noqa: E402

FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def check(name: str, seq_len: int, opset: int, folder: Path) -> tuple[str, bool]:
    started = time.perf_counter()
    model, args, kwargs = zoo.REGISTRY[name].build(seq_len)
    try:
        opt = attnfx.optimize(model, args, kwargs)
        rewritten = opt.report.rewritten
        refused = len(opt.report.entries) - rewritten - opt.report.count("ALREADY_FUSED")
        summary = export_onnx(opt, folder / f"{name}.onnx", opset=opset)
    except Exception as exc:  # noqa: BLE001 - the table reports every failure and goes on
        first = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
        return f"{name:<26} FAILED {type(exc).__name__}: {first}", False
    ops = [n.op_type for n in onnx.load(str(folder / f"{name}.onnx"), load_external_data=False).graph.node]
    fused = sum(ops.count(op) for op in FUSED)
    softmax = ops.count("Softmax")
    diff = max((d for _, d in summary.checks), default=float("nan"))
    expected_fused = rewritten + opt.report.count("ALREADY_FUSED")
    ok = fused == expected_fused and softmax <= refused
    line = (f"{name:<26} {rewritten:>9} {fused:>6} {softmax:>8} {refused:>8} {diff:>10.1e} "
            f"{time.perf_counter() - started:>5.0f} {'ok' if ok else 'MISMATCH'}")
    return line, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--opset", type=int, default=23)
    opts = parser.parse_args(argv)
    names = [n for n in opts.models.split(",") if n] or list(zoo.REGISTRY)
    print(f"{'model':<26} {'rewritten':>9} {'fused':>6} {'softmax':>8} {'refused':>8} {'ort diff':>10} {'sec':>5}")
    good = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            line, ok = check(name, opts.seq_len, opts.opset, Path(tmp))
            good += ok
            print(line, flush=True)
    print(f"{good} of {len(names)} models exported with one fused node per site, verified in onnxruntime")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
