"""What one attention site computes, independent of how the model spelled it.

`AttentionSpec` is the contract between the matcher (which proves it from the graph), the cost model
(which prices it) and the kernels (which implement it). Everything is in canonical layout:

    q (B, H, M, E)   k (B, Hkv, N, E)   v (B, Hkv, N, F)   out (B, H, M, F),   H = Hkv * G

and the score of query m for key n, in this order:

    s = scale * <q[m], k[n]>
    s = softcap * tanh(s / softcap)              if softcap
    s = s + bias[b, h, m, n]                     if mask is ADDITIVE (bias or -inf/finfo.min mask)
    s = s + slopes[h] * (n - m)                  if alibi
    s = -inf where not keep[b, h, m, n]          if mask is BOOL (True keeps)
    s = -inf where n > m + offset                if causal (offset 0 top-left, N - M bottom-right)
    s = -inf where n <= m + offset - window      if window (needs causal)
    s = -inf where n >= kv_lengths[b]            if key_padding
    out = softmax(s, over n) @ v
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class Causal(str, enum.Enum):
    """Where the causal diagonal sits when M != N."""

    NONE = "none"
    TOP_LEFT = "top_left"  # keep n <= m
    BOTTOM_RIGHT = "bottom_right"  # keep n <= m + (N - M): the last query sees every key

    def offset(self, q_len: int, kv_len: int) -> int:
        return kv_len - q_len if self is Causal.BOTTOM_RIGHT else 0


class MaskInput(str, enum.Enum):
    """The kind of mask *tensor* a site passes (proven structure goes into `causal`/`window`)."""

    NONE = "none"
    BOOL = "bool"  # True = attend
    ADDITIVE = "additive"  # added to the scores: relative bias, ALiBi tensors, 0/-inf masks


DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class AttentionSpec:
    """The proven meaning of one attention site, with sizes at the example inputs."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: str = "float32"
    scale: float = 1.0
    causal: Causal = Causal.NONE
    window: int | None = None
    mask: MaskInput = MaskInput.NONE
    mask_shape: tuple[int, ...] | None = None  # 4-D, broadcastable to (B, H, M, N)
    softcap: float | None = None
    alibi: bool = False
    key_padding: bool = False
    dynamic: frozenset[str] = field(default_factory=frozenset)  # e.g. {"batch", "q_len"}

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttentionSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"AttentionSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if (self.mask is MaskInput.NONE) != (self.mask_shape is None):
            raise ValueError("mask_shape must be given exactly when a mask tensor is")
        if self.mask_shape is not None and len(self.mask_shape) != 4:
            raise ValueError(f"mask_shape must be 4-D, got {self.mask_shape}")
        if self.window is not None and (self.window < 1 or self.causal is Causal.NONE):
            raise ValueError("window needs a causal diagonal and a width >= 1")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be positive, got {self.softcap}")

    @property
    def groups(self) -> int:
        """Query heads per K/V head (G): 1 for MHA, H for MQA."""
        return self.heads // self.kv_heads

    @property
    def is_decode(self) -> bool:
        return self.q_len <= 16 and self.kv_len >= 4 * self.q_len

    @property
    def element_size(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[self.dtype]

    def live_pairs(self) -> int:
        """(m, n) pairs per head that are not excluded by the causal/window structure."""
        if self.causal is Causal.NONE:
            return self.q_len * self.kv_len
        offset = self.causal.offset(self.q_len, self.kv_len)
        total = 0
        for m in range(self.q_len):
            hi = min(self.kv_len - 1, m + offset)
            lo = 0 if self.window is None else max(0, m + offset - self.window + 1)
            total += max(0, hi - lo + 1)
        return total

    def with_sizes(self, **sizes: int) -> "AttentionSpec":
        """The same site at other sizes (the cost model asks this for dynamic dims)."""
        return replace(self, **sizes)

    def describe(self) -> str:
        parts = [f"B={self.batch} H={self.heads}"]
        if self.kv_heads != self.heads:
            parts.append(f"Hkv={self.kv_heads}")
        parts.append(f"M={self.q_len} N={self.kv_len} E={self.head_dim}")
        if self.value_dim != self.head_dim:
            parts.append(f"F={self.value_dim}")
        parts.append(self.dtype)
        parts.append(f"scale={self.scale:.6g}")
        if self.causal is not Causal.NONE:
            parts.append(f"causal={self.causal.value}")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.mask is not MaskInput.NONE:
            parts.append(f"mask={self.mask.value}{list(self.mask_shape or ())}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.alibi:
            parts.append("alibi")
        if self.key_padding:
            parts.append("key_padding")
        return " ".join(parts)
