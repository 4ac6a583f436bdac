"""Attention test cases: one description per site, its tensors, the op's arguments and the oracle.

Every kernel test compares against `evaluate(canonical_cascade(spec))` in float64, and gradients
against autograd through that same oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnfx.cost_model import AttentionSpec, Causal, MaskInput, alibi_slopes, canonical_cascade, evaluate
from attnfx.cost_model.spec import Kind
from attnfx.kernels.attention_args import ScoreTensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# max |error| / max(1, max |expected|): 16-bit inputs round q/k/v and p before the dots.
TOLERANCE = {"float64": 1e-10, "float32": 5e-5, "float16": 1e-2, "bfloat16": 4e-2}


@dataclass(frozen=True)
class Case:
    """One attention site. `bias` names the mask tensor's full dims, e.g. "BHMN", "1H1N", "11MN";
    `bias_kind` is "additive" or "bool". `key_padding` right-pads the keys through that mask (a
    bool B11N one when there is none): -inf or False at keys past each batch entry's length."""

    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    q_len: int = 37
    kv_len: int = 37
    head_dim: int = 16
    value_dim: int | None = None
    dtype: str = "float32"
    scale: float | None = None
    causal: str = "none"
    window: int | None = None
    bias: str | None = None
    bias_kind: str = "additive"
    softcap: float | None = None
    alibi: bool = False
    key_padding: bool = False
    kind: str = "softmax"
    logit_bias: float = 0.0  # sigmoid only

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)

    @property
    def f(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        bias = self.bias if self.bias is not None or not self.key_padding else "B11N"
        if bias is None:
            return None
        if self.key_padding:
            bias = "B" + bias[1:3] + "N"
        full = (self.batch, self.heads, self.q_len, self.kv_len)
        return tuple(n if c != "1" else 1 for c, n in zip(bias, full))

    @property
    def mask_kind(self) -> MaskInput:
        if self.bias is None:
            return MaskInput.BOOL if self.key_padding else MaskInput.NONE
        return MaskInput(self.bias_kind)

    def spec(self, dtype: str = "float64") -> AttentionSpec:
        return AttentionSpec(
            self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim, self.f,
            dtype=dtype, scale=self.scale_value, causal=Causal(self.causal), window=self.window,
            mask=self.mask_kind, mask_shape=self.bias_shape, softcap=self.softcap, alibi=self.alibi, kind=Kind(self.kind), logit_bias=self.logit_bias,
        )

    @property
    def scale_value(self) -> float:
        return self.scale if self.scale is not None else 1 / math.sqrt(self.head_dim)

    def tensors(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Q, K, V (in the case's dtype) and the BIAS/MASK and SLOPES its features need."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        t = {
            "Q": torch.randn(self.batch, self.heads, self.q_len, self.head_dim, generator=g).to(dt),
            "K": torch.randn(self.batch, self.kv_heads, self.kv_len, self.head_dim, generator=g).to(dt),
            "V": torch.randn(self.batch, self.kv_heads, self.kv_len, self.f, generator=g).to(dt),
        }
        if self.mask_kind is MaskInput.ADDITIVE:
            t["BIAS"] = torch.randn(self.bias_shape, generator=g).to(dt)
        if self.mask_kind is MaskInput.BOOL:
            t["MASK"] = torch.rand(self.bias_shape, generator=g) > (0.25 if self.bias is not None else -1.0)
        if self.alibi:
            t["SLOPES"] = alibi_slopes(self.heads)
        if self.key_padding:
            name = "BIAS" if self.mask_kind is MaskInput.ADDITIVE else "MASK"
            t[name] = self.pad_keys(t[name], [max(1, self.kv_len - self.kv_len // 4), max(1, self.kv_len // 3), 0])
        return t

    def pad_keys(self, mask: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """`mask` with the keys at n >= lengths[b] removed (NOTE: a length 0 leaves rows with no key:
        they must come out 0)."""
        live = torch.arange(self.kv_len).view(1, 1, 1, -1) < torch.tensor(lengths[: self.batch]).view(-1, 1, 1, 1)
        return mask & live if mask.dtype == torch.bool else mask.masked_fill(~live, -math.inf)

    def op_args(self, t: dict[str, torch.Tensor]) -> tuple:
        """Positional arguments of attnfx::attention, or of attnfx::sigmoid_attention (+ logit_bias)."""
        args = (t["Q"], t["K"], t["V"], t.get("BIAS", t.get("MASK")), t.get("SLOPES"),
                *self.spec().mods.op_args())
        return args + (self.logit_bias,) if self.kind == "sigmoid" else args

    def launch_args(self, t: dict[str, torch.Tensor]) -> tuple:
        """(q, k, v, extras, mods), as the implementations and the Triton launchers take them."""
        extras = ScoreTensors(t.get("BIAS", t.get("MASK")), t.get("SLOPES"))
        return t["Q"], t["K"], t["V"], extras, self.spec().mods

    def __str__(self) -> str:
        return self.spec(self.dtype).describe().replace(" ", ",")


def reference(case: Case | LinearCase, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float64 oracle's output (B, H, M, F)."""
    return evaluate(canonical_cascade(case.spec()), t)


def reference_grads(case: Case | LinearCase, t: dict[str, torch.Tensor],
                    grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(sum(out * grad_out)) / d{Q, K, V, BIAS} by autograd through the float64 oracle."""
    leaves = {n: x.detach().double().requires_grad_() for n, x in t.items() if n in ("Q", "K", "V", "BIAS")}
    out = evaluate(canonical_cascade(case.spec()), {**t, **leaves})
    out.backward(grad_out.double())
    return {n: x.grad for n, x in leaves.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: str, what: str = "") -> None:
    """max |actual - expected| within TOLERANCE[dtype] of max(1, max |expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    bound = TOLERANCE[dtype] * max(1.0, expected.double().abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# Every feature alone, at an awkward M != N: none of 37 and 100 is a multiple of a block.
BASE = Case(q_len=37, kv_len=100, head_dim=16)
FEATURES: dict[str, Case] = {
    "plain": BASE,
    "scale": BASE.with_(scale=0.37),
    "softcap": BASE.with_(scale=1.0, softcap=1.5),
    "bias_BHMN": BASE.with_(batch=2, bias="BHMN"),
    "bias_1HMN": BASE.with_(batch=2, bias="1HMN"),
    "bias_B1MN": BASE.with_(batch=2, bias="B1MN"),
    "bias_11MN": BASE.with_(batch=2, bias="11MN"),
    "bias_BH1N": BASE.with_(batch=2, bias="BH1N"),
    "bias_111N": BASE.with_(batch=2, bias="111N"),
    "bool_mask": BASE.with_(batch=2, bias="B1MN", bias_kind="bool"),
    "alibi": BASE.with_(heads=3, kv_heads=3, alibi=True),
    "causal_top_left": BASE.with_(causal="top_left"),
    "causal_top_left_m_gt_n": BASE.with_(q_len=100, kv_len=37, causal="top_left"),
    "causal_bottom_right": BASE.with_(causal="bottom_right"),
    "causal_bottom_right_m_gt_n": BASE.with_(q_len=100, kv_len=37, causal="bottom_right"),
    "window_bottom_right": BASE.with_(causal="bottom_right", window=20),
    "window_top_left": BASE.with_(q_len=100, causal="top_left", window=20),
    "gqa": BASE.with_(heads=4, kv_heads=2),
    "mqa": BASE.with_(heads=4, kv_heads=1),
    "key_padding": BASE.with_(batch=3, key_padding=True),
    "value_dim": BASE.with_(value_dim=24),
}
# Features together, including the ones that interact (mask kinds with causal skipping, GQA with
# per-head bias and slopes, padding with bottom-right alignment).
COMBINED: dict[str, Case] = {
    "all_additive_gqa": Case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=100, scale=0.3, causal="bottom_right",
                             window=30, bias="1HMN", softcap=2.0, alibi=True, key_padding=True),
    "all_bool_mqa": Case(batch=2, heads=4, kv_heads=1, q_len=100, kv_len=37, causal="top_left", window=25,
                         bias="B1MN", bias_kind="bool", softcap=2.0, alibi=True, key_padding=True),
    "causal_bias_gqa": Case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=100, causal="bottom_right", bias="BHMN"),
    "alibi_softcap_padding": Case(batch=2, heads=2, q_len=100, kv_len=100, causal="top_left", softcap=1.0,
                                  alibi=True, key_padding=True),
}


def finfo_min_mask_case() -> tuple[Case, dict[str, torch.Tensor]]:
    """Hugging Face's additive mask: 0 or finfo.min, with rows 0-3 masked entirely. Those rows
    are not empty for softmax (every score equals finfo.min): the oracle averages V over them."""
    case = Case(batch=2, q_len=37, kv_len=100, bias="B1MN")
    t = case.tensors()
    keep = torch.rand(case.bias_shape, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[:, :, :4] = False
    t["BIAS"] = torch.zeros(case.bias_shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return case, t


@dataclass(frozen=True)
class LinearCase:
    """One linear-attention site: q and k feature-mapped (elu + 1, so the normaliser stays positive)."""

    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    q_len: int = 37
    kv_len: int = 37
    head_dim: int = 8
    value_dim: int = 12
    dtype: str = "float32"
    scale: float = 0.5
    causal: str = "top_left"
    decay: bool = False
    normalize: bool = False
    norm_eps: float = 0.0

    def with_(self, **changes) -> "LinearCase":
        return replace(self, **changes)

    def spec(self, dtype: str = "float64") -> AttentionSpec:
        return AttentionSpec(self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim,
                             self.value_dim, dtype=dtype, scale=self.scale, causal=Causal(self.causal),
                             kind=Kind.LINEAR, decay=self.decay, normalize=self.normalize, norm_eps=self.norm_eps)

    @property
    def algorithm(self) -> str:
        return "right_to_left" if self.causal == "none" else "chunked"

    def tensors(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Q, K, V in the case's dtype, and DECAY (H,) in (0.5, 0.99] when the case decays."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
        t = {
            "Q": phi(torch.randn(self.batch, self.heads, self.q_len, self.head_dim, generator=g)).to(dt),
            "K": phi(torch.randn(self.batch, self.kv_heads, self.kv_len, self.head_dim, generator=g)).to(dt),
            "V": torch.randn(self.batch, self.kv_heads, self.kv_len, self.value_dim, generator=g).to(dt),
        }
        if self.decay:
            t["DECAY"] = torch.linspace(0.5, 0.99, self.heads).to(dt)
        return t

    def op_args(self, t: dict[str, torch.Tensor], chunk: int = 16) -> tuple:
        """Positional arguments of attnfx::linear_attention."""
        return (t["Q"], t["K"], t["V"], t.get("DECAY"), self.scale, self.causal, self.normalize, self.norm_eps,
                self.algorithm, chunk)

    def __str__(self) -> str:
        return self.spec(self.dtype).describe().replace(" ", ",")


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out
