"""Print the ATen neighbourhood of each distinct attention site in the zoo's exported graphs.

For every softmax: the ops that feed it (QK contraction, scale, bias, softcap, mask construction
back to the inputs), and the ops from it to the AV contraction and the output layout. Sites whose
neighbourhoods spell the same op sequence are printed once. Run by hand::

    python examples/zoo_survey.py [--models a,b] > /tmp/zoo_survey.md
"""
from __future__ import annotations

import argparse
from collections import deque

import torch
from torch import fx

import zoo

CONTRACTIONS = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default, torch.ops.aten.einsum.default,
                torch.ops.aten.baddbmm.default, torch.ops.aten.mm.default}
BARRIERS = {torch.ops.aten.linear.default, torch.ops.aten.layer_norm.default,
            torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.rms_norm.default}
NOISE = {torch.ops.aten.sym_size.int, torch.ops.aten._assert_tensor_metadata.default}
DEEP, SHALLOW = 16, 4  # hops explored on the score side / past a contraction


def _inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.target not in NOISE]


def neighbourhood(softmax: fx.Node) -> set[fx.Node]:
    """Nodes near one softmax: its producers (deep on the score/mask side, shallow past the QK
    contraction) and its consumers up to the AV contraction plus a few layout ops after it."""
    seen: set[fx.Node] = {softmax}
    queue = deque([(softmax, DEEP)])
    while queue:  # backward
        node, budget = queue.popleft()
        for src in _inputs(node):
            if src in seen or src.op != "call_function":
                continue
            seen.add(src)
            if src.target in BARRIERS or budget <= 1:
                continue
            queue.append((src, min(budget - 1, SHALLOW) if src.target in CONTRACTIONS else budget - 1))
    frontier, done = [softmax], []
    for _ in range(8):  # forward to the AV contraction
        frontier = [u for n in frontier for u in n.users if u.op == "call_function" and u.target not in NOISE]
        seen.update(frontier)
        done = [n for n in frontier if n.target in CONTRACTIONS]
        if done:
            break
    for av in done:
        tail = [av]
        for _ in range(SHALLOW):
            tail = [u for n in tail for u in n.users if u.op == "call_function" and n.target not in BARRIERS]
            seen.update(tail)
        for src in _inputs(av):  # the V side
            _back(src, SHALLOW, seen)
    return seen


def _back(node: fx.Node, budget: int, seen: set[fx.Node]) -> None:
    if node in seen or node.op != "call_function" or budget == 0:
        return
    seen.add(node)
    if node.target not in BARRIERS:
        for src in _inputs(node):
            _back(src, budget - 1, seen)


def _fmt_arg(a: object) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    if isinstance(a, float):
        return f"{a:.6g}"
    return str(a)


def _fmt_val(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).removeprefix("torch.")
        return f"{dtype}[{','.join(str(s) for s in val.shape)}]"
    return type(val).__name__ if val is not None else "?"


def format_node(node: fx.Node) -> str:
    """``name: dtype[shape] = op(args, key=val)``, dropping device/layout noise."""
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("device", "pin_memory", "layout")}
    parts = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in kwargs.items()]
    target = getattr(node.target, "__name__", str(node.target)) if callable(node.target) else str(node.target)
    target = str(node.target).removeprefix("aten.") if isinstance(node.target, torch._ops.OpOverload) else target
    return f"{node.name}: {_fmt_val(node)} = {target}({', '.join(parts)})"


def survey(graph: fx.Graph) -> list[tuple[int, list[str]]]:
    """Distinct neighbourhoods as (how many sites share it, formatted lines in graph order)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    distinct: dict[tuple[str, ...], list] = {}
    for sm in zoo.softmax_nodes(graph):
        nodes = sorted(neighbourhood(sm), key=order.__getitem__)
        key = tuple(sorted(str(n.target) for n in nodes))  # layers interleave differently
        if key in distinct:
            distinct[key][0] += 1
        else:
            distinct[key] = [1, [format_node(n) for n in nodes]]
    return [(count, lines) for count, lines in distinct.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--seq-len", type=int, default=8)
    opts = parser.parse_args()
    names = opts.models.split(",") if opts.models else list(zoo.REGISTRY)
    for name in names:
        entry = zoo.REGISTRY[name]
        print(f"## {name} ({entry.family}; {', '.join(entry.structure) or 'plain'})\n")
        try:
            model, args, kwargs = entry.build(opts.seq_len)
            graph = zoo.export(model, args, kwargs).graph
        except Exception as exc:  # noqa: BLE001 - one model failing should not end the survey
            print(f"capture failed: {type(exc).__name__}: {exc}\n")
            continue
        print(f"{entry.notes}\n" if entry.notes else "", end="")
        for count, lines in survey(graph):
            print(f"{count} site(s) spelled:\n```")
            print("\n".join(lines))
            print("```\n")


if __name__ == "__main__":
    main()
