"""Inductor's on-disk caches keyed by attnfx's kernels, not only by the graph.

Inductor caches a compiled graph under a key made of the graph's code and its inputs; a call to
`attnfx::padded_attention` is the same text whatever the op's fake kernel says about its output,
so after an upgrade that changes an op's output strides, the cached code asserts the old strides
and fails at run time. Inductor puts the `uuid()` of a custom graph pass into the key: the backend
installs a post-grad pass that changes nothing and whose uuid is the hash of attnfx's kernel
sources, wrapping any pass the user set (which still runs, and whose uuid is kept in the key).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import attnfx.kernels

_KERNEL_SOURCES = tuple(sorted(str(p) for p in Path(attnfx.kernels.__file__).parent.rglob("*.py")))


class KernelSourcesKey(CustomGraphPass):
    """A post-grad pass whose only effect is its uuid: the kernels' sources (and the user's pass)."""

    def __init__(self, user_pass: Any = None) -> None:
        self.user_pass = user_pass

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self) -> Any:
        theirs = self.user_pass.uuid() if isinstance(self.user_pass, CustomGraphPass) else None
        if self.user_pass is not None and theirs is None:
            return None  # as without us: Inductor bypasses its cache for a pass it cannot key
        return (get_hash_for_files(_KERNEL_SOURCES), theirs)


def keyed_by_kernels(config_patches: dict[str, Any]) -> dict[str, Any]:
    """`config_patches` with the post-grad pass that puts attnfx's kernels into Inductor's cache key."""
    user_pass = config_patches.get("post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass)
    return {**config_patches, "post_grad_custom_post_pass": KernelSourcesKey(user_pass)}
