"""`attnfx optimize FILE.py[:FACTORY]`: optimise a model defined in a Python file and show the report.

FACTORY (default `example`) is a function `(seq_len=..., batch=...) -> (model, args, kwargs)`.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import AttnfxError
from .pipeline import optimize
from .report import format_report
from .benchmark import time_interleaved


def _load_factory(spec: str) -> Callable[..., tuple]:
    path, _, name = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"attnfx: no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent.resolve()))
    sys.modules[module_spec.name] = module  # dataclasses and pickling look modules up by name
    module_spec.loader.exec_module(module)
    factory = getattr(module, name or "example", None)
    if factory is None:
        raise SystemExit(f"attnfx: {path} defines no function {name or 'example'!r} returning (model, args, kwargs)")
    return factory


def _call_factory(factory: Callable[..., tuple], seq_len: int | None, batch: int | None) -> tuple:
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = {}
    if seq_len is not None and "seq_len" in params:
        kwargs["seq_len"] = seq_len
    if batch is not None and "batch" in params:
        kwargs["batch"] = batch
    return factory(**kwargs)


def _optimize_command(ns: argparse.Namespace) -> int:
    model, args, kwargs = _call_factory(_load_factory(ns.model), ns.seq_len, ns.batch)
    try:
        opt = optimize(model, args, kwargs, verify=not ns.no_verify, variants=ns.variants)
    except AttnfxError as exc:
        print(f"attnfx: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(opt.report.to_json() if ns.json else format_report(opt.report, details=ns.details))
    print(f"\noptimize() took {opt.report.optimize_seconds:.2f} s")
    if ns.onnx:
        from .onnx import export_onnx

        try:
            print(export_onnx(opt, ns.onnx, opset=ns.opset))
        except AttnfxError as exc:
            print(f"attnfx: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    if not ns.no_bench:
        times = time_interleaved({"eager": lambda: model(*args, **kwargs), "attnfx": lambda: opt(*args, **kwargs)},
                                 repeats=ns.repeats)
        print(f"latency at the example inputs (median of {ns.repeats}, interleaved): "
              f"attnfx is {times['eager'] / times['attnfx']:.2f}x eager")
    return 0


def _explain_command(ns: argparse.Namespace) -> int:
    from attnfx.cost_model import explain

    shape = {k: v for k, v in (("B", ns.B), ("H", ns.H), ("Hkv", ns.Hkv), ("M", ns.M), ("N", ns.N),
                               ("E", ns.E), ("F", ns.F)) if v is not None}
    shape["causal"] = ns.causal
    shape["dtype"] = ns.dtype
    try:
        print(explain(shape, target=ns.target, memory_budget=ns.memory_budget))
    except (ValueError, KeyError) as exc:
        print(f"attnfx: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnfx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="optimise a model from a Python file and print the report")
    opt.add_argument("model", help="FILE.py[:FACTORY], FACTORY returns (model, args, kwargs); default 'example'")
    opt.add_argument("--seq-len", type=int, help="passed to the factory as seq_len")
    opt.add_argument("--batch", type=int, help="passed to the factory as batch")
    opt.add_argument("--variants", nargs="+", help="only consider these variants (e.g. sdpa eager)")
    opt.add_argument("--no-verify", action="store_true", help="skip the numerical check of each site")
    opt.add_argument("--no-bench", action="store_true", help="do not time eager vs optimised")
    opt.add_argument("--repeats", type=int, default=5, help="timed calls per contender")
    opt.add_argument("--details", action="store_true", help="print each site's cascade and candidates")
    opt.add_argument("--json", action="store_true", help="print the report as JSON")
    opt.add_argument("--onnx", metavar="OUT.onnx", help="also export the optimised graph to ONNX (verified in onnxruntime)")
    opt.add_argument("--opset", type=int, default=23, help="ONNX opset: 23+ standard Attention, lower onnxruntime contrib ops")
    exp = commands.add_parser("explain", help="the cost model's analysis of one attention shape, no model needed")
    for name, default in (("B", 1), ("H", 8), ("Hkv", None), ("M", None), ("N", 2048), ("E", 64), ("F", None)):
        exp.add_argument(f"--{name}", type=int, default=default)
    exp.add_argument("--causal", action="store_true")
    exp.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    exp.add_argument("--target", default="cpu", help='"cpu" (this host, calibrated), "cuda", or a spec sheet name')
    exp.add_argument("--memory-budget", type=float, help="bytes of intermediates a variant may keep live")
    ns = parser.parse_args(argv)
    if ns.command == "explain":
        return _explain_command(ns)
    return _optimize_command(ns)


if __name__ == "__main__":
    raise SystemExit(main())
