"""Greedy shrinking of a failing program: try simpler choices one at a time and keep each that
leaves the failure's class unchanged, so a regression test can hold the smallest module that fails.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

from .grammar import H, Block, Program, Scale, consistent
from .oracle import Outcome


def shrink(program: Program, failure: str, check: Callable[[Program], Outcome], classify: Callable[[Outcome], set[str]],
           budget: int = 40) -> tuple[Program, Outcome | None]:
    """The simplest program found (within `budget` checks) that still fails with class `failure`."""
    best, best_outcome, tries, changed = program, None, 0, True
    while changed and tries < budget:
        changed = False
        for candidate in simplifications(best):
            if tries >= budget:
                break
            tries += 1
            outcome = check(candidate)
            if failure in classify(outcome):
                best, best_outcome, changed = candidate, outcome, True
                break
    return best, best_outcome


def simplifications(program: Program) -> Iterator[Program]:
    blocks = program.blocks
    for i in range(len(blocks) if len(blocks) > 1 else 0):
        yield replace(program, blocks=blocks[:i] + blocks[i + 1:])
    if program.dtype != "float32":
        yield replace(program, dtype="float32")
    for i, block in enumerate(blocks):
        for simpler in _block_simplifications(block):
            if consistent(simpler):
                yield replace(program, blocks=blocks[:i] + (simpler,) + blocks[i + 1:])


def _block_simplifications(block: Block) -> Iterator[Block]:
    edits = [{"mutation": None}]
    edits += [{"terms": block.terms[:i] + block.terms[i + 1:]} for i in range(len(block.terms))]
    edits += [{"softcap": None, "softcap_spelling": ""}, {"scale": Scale("none")}, {"sink": "none"},
              {"scale": replace(block.scale, form="literal", op="mul")},
              {"kv_heads": H, "gqa": "none"}, {"layout": "matmul", "einsum": None, "qk": "at"},
              {"projection": "separate"}, {"softmax": "F.softmax", "upcast": "none"}, {"upcast": "none"},
              {"dropout": "none"}, {"out_proj": False}]
    for edit in edits:
        simpler = replace(block, **edit)
        if simpler != block:
            yield simpler

