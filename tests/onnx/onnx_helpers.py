"""Test helpers: a stand-in for attnfx.optimize's result, small attention models, ONNX readers.

The stand-in captures a model that calls SDPA (or attnfx::attention) itself, the way optimize()
captures, and tags every attention call as a REWRITTEN site, so export_onnx sees what it will see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch.export import Dim

from attnfx.onnx.sites import read_call


@dataclass
class Entry:
    status: str
    variant: str
    replacement: str


@dataclass
class Report:
    entries: list[Entry] = field(default_factory=list)


@dataclass
class StandIn:
    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any
    report: Report


def auto_dynamic(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    """Dim.AUTO on every axis, as the zoo's capture does: export keeps static what must be."""
    return {name: {axis: Dim.AUTO for axis in range(t.dim())} for name, t in inputs.items()}


def stand_in(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *, refused: int = 0) -> StandIn:
    """Capture `model(**inputs)`; every attention call becomes a REWRITTEN report entry, plus
    `refused` REFUSED entries (sites optimize() would have left alone)."""
    dynamic = auto_dynamic(inputs)
    gm = torch.export.export(model.eval(), (), inputs, dynamic_shapes=dynamic, strict=False).module()
    report = Report()
    for node in gm.graph.nodes:
        found = read_call(node)
        if found is not None:
            node.meta["attnfx_site"] = len(report.entries)
            report.entries.append(Entry("REWRITTEN", found[0].name, node.name))
    report.entries += [Entry("REFUSED", "", "") for _ in range(refused)]
    return StandIn(gm, (), dict(inputs), dynamic, report)


def run_onnx_file(path: str, inputs: dict[str, torch.Tensor]) -> list:
    """Outputs of the exported file in onnxruntime (CPU), fed by input name."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})


def fused_nodes(path: str) -> list[onnx.NodeProto]:
    """The fused attention nodes of an exported file, in graph order."""
    return [n for n in onnx.load(str(path)).graph.node
            if n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention")]


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class SelfAttention(torch.nn.Module):
    """Projections around one SDPA call, batch-first (B, S, D) in and out."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 4, causal: bool = False, scale: float | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.scale = causal, scale
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        b, m, _ = x.shape
        src = x if memory is None else memory
        q = self.q(x).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale,
            enable_gqa=self.kv_heads != self.heads,
        )
        return self.o(y.transpose(1, 2).reshape(b, m, -1))


class Decoder(torch.nn.Module):
    """Two causal GQA self-attention layers, then cross-attention (M != N) over a padded memory."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.layers = torch.nn.ModuleList([SelfAttention(dim, 4, 2, causal=True, scale=0.3) for _ in range(2)])
        self.cross = SelfAttention(dim, 4, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x + self.cross(x, memory, memory_mask[:, None, None, :])


class BiasedEncoder(torch.nn.Module):
    """Non-causal self-attention with a learned additive (1, H, S, S) position bias, cut to the length."""

    def __init__(self, dim: int = 32, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.bias = torch.nn.Parameter(torch.randn(1, heads, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        return self.attn(x, mask=self.bias[:, :, :s, :s])


def decoder_inputs(batch: int = 2, length: int = 8, memory: int = 11) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, memory, dtype=torch.bool)
    mask[-1, memory - 3:] = False
    return {"x": torch.randn(batch, length, 32), "memory": torch.randn(batch, memory, 32), "memory_mask": mask}
