"""A drawn `Program` as Python source: a self-contained module defining the model, its inputs and
the shapes it is checked at. The source is what a failure prints, so it must run when pasted."""
from __future__ import annotations

import hashlib
import linecache
from dataclasses import dataclass
from typing import Any

from .grammar import C, D, H, PAST, TABLE, WINDOW, Block, Program
from .layouts import write_av, write_scores
from .mutations import MUTATIONS, Mutation
from .scoreops import score_ops, write_scale, write_sink, write_softmax
from .writer import Writer

TOLERANCES = {"float32": {"atol": 1e-4, "rtol": 1e-4}, "bfloat16": {"atol": 5e-2, "rtol": 5e-2}}
NO_MUTATION = Mutation(frozenset())

HEADER = f'''import math

import torch
import torch.nn.functional as F
from torch import nn

H, D, C = {H}, {D}, {C}  # query heads, head dim, model width
PAST, TABLE, W = {PAST}, {TABLE}, {WINDOW}  # cached positions, table reach, window
'''

REPRODUCE = '''

if __name__ == "__main__":
    import attnfx

    model = make_model()
    opt = attnfx.optimize(model, *example_inputs(*SHAPES[0]))
    print(opt.report)
    for shape in SHAPES:
        args, kwargs = example_inputs(*shape)
        with torch.no_grad():
            torch.testing.assert_close(opt(*args, **kwargs), model(*args, **kwargs), equal_nan=True, **TOLERANCE)
    print("outputs match at", SHAPES)
'''


def render(program: Program) -> str:
    """The program's module source (with a `__main__` block that re-runs the check)."""
    parts = [HEADER, f"DTYPE = torch.{program.dtype}",
             f"TOLERANCE = {TOLERANCES[program.dtype]!r}",
             f"SHAPES = {list(program.shapes)!r}  # (batch, query length, memory length)", ""]
    blocks = [_block_class(block, i) for i, block in enumerate(program.blocks)]
    parts += [source for source, _ in blocks]
    parts += [_model_class(program, [extra for _, extra in blocks]), _inputs_function(program)]
    return "\n".join(parts) + REPRODUCE


def _block_class(block: Block, index: int) -> tuple[str, bool]:
    """The block's class source, and whether it returns more than its output."""
    w = Writer(block)
    mutation = MUTATIONS[block.mutation] if block.mutation else NO_MUTATION
    _projection(w)
    if mutation.values:
        mutation.values(w)
    if block.scale.placement in ("q", "k"):
        write_scale(w, block.scale.placement)
    write_scores(w)
    ops = score_ops(w)
    if mutation.scores:
        mutation.scores(w, ops)
    for _, write in ops:
        write(w)
    if block.sink != "none":
        write_sink(w)
    p = mutation.normalise(w) if mutation.normalise else write_softmax(w, **mutation.softmax)
    if block.sink != "none" and mutation.sink_slice:
        w.line(f"p = {p}{mutation.sink_slice}  # the sink's weight dropped")
        p = "p"
    if mutation.probs:
        p = mutation.probs(w, p)
    p = _dropout(w, p)
    write_av(w, p, mutation.transposed_av)
    if block.out_proj:
        w.init("self.o_proj = nn.Linear(C, C)")
        w.line("o = self.o_proj(o)")
    w.line("return " + ", ".join(["o", *w.extras]))
    init = "\n".join(f"        {line}" for line in ["super().__init__()", *w.init_lines])
    body = "\n".join(f"        {line}" for line in w.lines)
    return (f"class Attention{index}(nn.Module):\n    def __init__(self):\n{init}\n\n"
            f"    def forward(self, x, memory=None, key_mask=None):\n{body}\n\n"), bool(w.extras)


def _projection(w: Writer) -> None:
    block, kv = w.block, w.block.kv_heads
    w.line("b, m, _ = x.shape")
    if block.projection == "fused":
        w.init(f"self.qkv = nn.Linear(C, {(H + 2 * kv) * D})")
        w.line(f"q, k, v = self.qkv(x).split([{H * D}, {kv * D}, {kv * D}], dim=-1)")
        w.line("n = m")
        w.line(f"q, k, v = q.view(b, m, H, D), k.view(b, n, {kv}, D), v.view(b, n, {kv}, D)")
        return
    source = "memory" if block.projection == "cross" else "x"
    w.init("self.q_proj = nn.Linear(C, C)")
    for name in ("k", "v"):
        w.init(f"self.{name}_proj = nn.Linear(C, {kv * D})")
    w.line("q = self.q_proj(x).view(b, m, H, D)")
    w.line(f"k = self.k_proj({source}).view(b, -1, {kv}, D)")
    w.line(f"v = self.v_proj({source}).view(b, -1, {kv}, D)")
    if block.projection == "cache":
        for name in ("k", "v"):
            w.init(f'self.register_buffer("past_{name}", torch.randn(1, PAST, {kv}, D))')
            w.line(f"{name} = torch.cat([self.past_{name}.expand(b, -1, -1, -1), {name}], dim=1)")
    w.line("n = k.shape[1]" if block.projection != "separate" else "n = m")


def _dropout(w: Writer, p: str) -> str:
    if w.block.dropout == "module":
        w.init("self.dropout = nn.Dropout(0.1)")
        w.line(f"p = self.dropout({p})")
    elif w.block.dropout == "functional":
        w.line(f"p = F.dropout({p}, p=0.1, training=self.training)")
    else:
        return p
    return "p"


def _padded(block: Block) -> bool:
    return any(t.reads_key_mask for t in block.terms)


def _inputs_used(program: Program) -> tuple[bool, list[str]]:
    memory = any(b.projection == "cross" for b in program.blocks)
    return memory, list(dict.fromkeys(b.key_mask for b in program.blocks if _padded(b)))


def _model_class(program: Program, block_extras: list[bool]) -> str:
    memory, masks = _inputs_used(program)
    params = ", ".join(["self", "x", *(["memory"] if memory else []), *masks])
    init, body, extras = [], ["h = x"], []
    for i, (block, has_extra) in enumerate(zip(program.blocks, block_extras)):
        init.append(f"        self.attn{i} = Attention{i}()")
        call_args = ", ".join(["h", "memory" if block.projection == "cross" else "None",
                               block.key_mask if _padded(block) else "None"])
        extras += [f"extra{i}"] if has_extra else []
        body.append(f"{'h, extra' + str(i) if has_extra else 'h'} = self.attn{i}({call_args})")
    body.append("return " + ", ".join(["h", *extras]))
    return ("class FuzzModel(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            + "\n".join(init) + f"\n\n    def forward({params}):\n"
            + "\n".join(f"        {line}" for line in body) + "\n\n\n"
            "def make_model():\n    torch.manual_seed(0)\n    return FuzzModel().to(DTYPE).eval()\n\n")


def _inputs_function(program: Program) -> str:
    memory, masks = _inputs_used(program)
    lengths = {"attention_mask": "m", "cache_mask": "PAST + m", "memory_mask": "n"}
    if program.padding_side == "right":
        padded = "(positions < kept[:, None]).long()"
    else:
        padded = "(positions >= length - kept[:, None]).long()"
    lines = ["def key_padding(b, length, g):",
             f'    """1 for real keys, 0 for {program.padding_side} padding; row 0 is never padded."""',
             "    kept = torch.randint(1, length + 1, (b,), generator=g)",
             "    kept[0] = length",
             "    positions = torch.arange(length)",
             f"    return {padded}", "", "",
             "def example_inputs(b, m, n, seed=0):",
             "    g = torch.Generator().manual_seed(seed)",
             "    args = [torch.randn(b, m, C, generator=g).to(DTYPE)]"]
    if memory:
        lines.append("    args.append(torch.randn(b, n, C, generator=g).to(DTYPE))")
    kwargs = ", ".join(f'"{name}": key_padding(b, {lengths[name]}, g)' for name in masks)
    lines.append(f"    return tuple(args), {{{kwargs}}}")
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    """A program, its source, and the namespace the source defines once executed."""

    program: Program
    source: str
    namespace: dict[str, Any]

    @property
    def tolerance(self) -> dict[str, float]:
        return self.namespace["TOLERANCE"]


def build(program: Program) -> Case:
    """Execute the program's source; its lines stay readable in tracebacks and fx stack traces."""
    source = render(program)
    filename = f"<fuzz-{hashlib.sha1(source.encode()).hexdigest()[:10]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": "attnfx_fuzz_case"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the source is generated here
    return Case(program, source, namespace)
