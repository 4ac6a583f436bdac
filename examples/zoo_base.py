"""The zoo's entry type and the input helpers every family shares.

Kept apart from ``zoo.py`` so the family modules (``zoo_hf``, ``zoo_torch``) can import it
without importing the registry that imports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

Built = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]
Builder = Callable[..., Built]


@dataclass(frozen=True)
class ZooModel:
    """One small, structurally faithful model with the attention count it must show.

    ``build(seq_len, batch=2, seed=0)`` returns ``(model, args, kwargs)``; the weights depend on
    ``seed`` only, so two calls with the same seed and different ``seq_len`` give the same model
    and can share one exported program. ``attention_sites`` is the number of attention softmaxes
    one forward computes (layers x attention blocks, self + cross), derived from the config.
    ``other_softmaxes`` counts softmaxes that are not attention (MoE routers): a matcher must leave
    them alone. ``seq_dynamic`` is False when the sequence length is fixed by the config (vision
    patch grids, Whisper's 2 x max_source_positions frames): only the batch may then vary.
    """

    name: str
    family: str
    build: Builder
    attention_sites: int
    notes: str = ""
    structure: tuple[str, ...] = ()
    other_softmaxes: int = 0
    seq_dynamic: bool = True
    required: bool = False

    @property
    def softmax_nodes(self) -> int:
        """Softmax (or already-fused SDPA) nodes the exported graph should hold."""
        return self.attention_sites + self.other_softmaxes


def padding_mask(batch: int, seq_len: int, side: str = "right", dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1/0 attention mask whose last batch row is padded (about a third of it), as tokenizers do.

    At least one position stays valid so no row is entirely padding.
    """
    mask = torch.ones(batch, seq_len, dtype=dtype)
    pad = max(1, seq_len // 3)
    pad = min(pad, seq_len - 1)
    if side == "right":
        mask[-1, seq_len - pad:] = 0
    elif side == "left":
        mask[-1, :pad] = 0
    else:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    return mask


def generator(seed: int, salt: int) -> torch.Generator:
    """A private generator for inputs, so inputs do not disturb (or depend on) weight init."""
    return torch.Generator().manual_seed(seed * 1000 + salt)


def token_ids(batch: int, seq_len: int, vocab: int, seed: int, salt: int = 1) -> torch.Tensor:
    """Random token ids avoiding 0..2 (common pad/bos/eos ids), so no model special-cases them."""
    return torch.randint(3, vocab, (batch, seq_len), generator=generator(seed, salt))


def randn(*shape: int, seed: int, salt: int = 2) -> torch.Tensor:
    """Seeded normal noise for float inputs (images, audio, hidden states, caches)."""
    return torch.randn(*shape, generator=generator(seed, salt))


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a fixed global seed (parameter init uses the global RNG), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    return module.eval()
