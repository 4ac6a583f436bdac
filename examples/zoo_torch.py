"""Zoo entries written with torch.nn only: MultiheadAttention, nn.Transformer layers, a KV-cache
decode step and a nanoGPT-style decoder.

Inputs use right padding (a key_padding_mask with trailing True in the last row): left padding
combined with a causal mask would leave whole rows masked, which nn.MultiheadAttention turns into NaN.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zoo_base import ZooModel, padding_mask, randn, seeded, token_ids

EMBED = 64
HEADS = 4
LAYERS = 2


def key_padding(batch: int, seq_len: int) -> torch.Tensor:
    """nn.MultiheadAttention's convention: True marks a padded key."""
    return padding_mask(batch, seq_len, "right", dtype=torch.bool).logical_not()


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A bool "masked" tensor as the float form nn accepts: -inf where masked, 0 elsewhere."""
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def causal_bool(seq_len: int) -> torch.Tensor:
    """True above the diagonal: positions a query may not attend to."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)


class MHABlock(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` with the caller choosing what to return.

    ``returns`` is "output" (weights not requested), "weights" (probabilities returned to the
    caller, so they escape the attention), or "discarded" (weights computed, then dropped).
    """

    def __init__(self, batch_first: bool, returns: str, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.returns = returns

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> Any:
        need = self.returns != "output"
        out, weights = self.attn(query, key, value, key_padding_mask=key_padding_mask,
                                 need_weights=need, attn_mask=attn_mask, average_attn_weights=False)
        return (out, weights) if self.returns == "weights" else out


def mha(name: str, *, batch_first: bool, returns: str, mask: str, cross: bool = False, notes: str = "") -> ZooModel:
    """An MHA entry; ``mask`` is "none", "bool" (causal bool attn_mask) or "float" (additive)."""
    kdim = 48 if cross else None

    def build(seq_len: int, batch: int = 2, seed: int = 0):
        module = seeded(seed, lambda: MHABlock(batch_first, returns, kdim))
        q_len = seq_len // 2 + 1 if cross else seq_len
        query = randn(batch, q_len, EMBED, seed=seed)
        key = randn(batch, seq_len, kdim, seed=seed, salt=3) if cross else query
        if not batch_first:
            query, key = query.transpose(0, 1).contiguous(), key.transpose(0, 1).contiguous()
        pad = key_padding(batch, seq_len)
        kwargs: dict[str, Any] = {"key_padding_mask": pad}
        if mask == "bool":
            kwargs["attn_mask"] = causal_bool(seq_len)
        elif mask == "float":  # both masks additive: PyTorch deprecates mixing bool and float
            kwargs["attn_mask"] = randn(q_len, seq_len, seed=seed, salt=4)
            kwargs["key_padding_mask"] = additive(pad)
        return module, (query, key, key), kwargs

    structure = ("cross_attention",) if cross else ()
    structure += ("causal",) if mask == "bool" else ("additive_mask",) if mask == "float" else ()
    structure += ("probs_escape",) if returns == "weights" else ()
    structure += ("sdpa_already",) if returns == "output" else ()
    return ZooModel(name=name, family="torch.nn.MultiheadAttention", build=build, attention_sites=1,
                    notes=notes, structure=structure, required=True)


def transformer(name: str, *, decoder: bool, norm_first: bool, masks: bool) -> ZooModel:
    """nn.TransformerEncoder / nn.TransformerDecoder with 2 layers (they call MHA with need_weights=False).

    ``enable_nested_tensor=False`` keeps eager on the same (padded, non-nested) path export takes.
    Causal masks come with ``is_causal=True``: without it the layers compare the mask against a
    generated causal one, a data-dependent branch export cannot trace (see ``UNSUPPORTED``).
    """
    def make() -> nn.Module:
        if decoder:
            layer = nn.TransformerDecoderLayer(EMBED, HEADS, 128, dropout=0.1, batch_first=True, norm_first=norm_first)
            return nn.TransformerDecoder(layer, LAYERS)
        layer = nn.TransformerEncoderLayer(EMBED, HEADS, 128, dropout=0.1, batch_first=True, norm_first=norm_first)
        return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

    def build(seq_len: int, batch: int = 2, seed: int = 0):
        module = seeded(seed, make)
        x = randn(batch, seq_len, EMBED, seed=seed)
        if not decoder:
            kwargs = {"mask": causal_bool(seq_len), "src_key_padding_mask": key_padding(batch, seq_len),
                      "is_causal": True} if masks else {}
            return module, (x,), kwargs
        tgt_len = seq_len // 2 + 1
        tgt = randn(batch, tgt_len, EMBED, seed=seed, salt=3)
        kwargs = {}
        if masks:
            # generate_square_subsequent_mask is additive (-inf); padding masks match it, since
            # PyTorch deprecates mixing bool and float masks.
            kwargs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(tgt_len),
                      "tgt_key_padding_mask": additive(key_padding(batch, tgt_len)),
                      "memory_key_padding_mask": additive(key_padding(batch, seq_len)), "tgt_is_causal": True}
        return module, (tgt, x), kwargs

    kind = "decoder" if decoder else "encoder"
    structure = ("sdpa_already",) + (("cross_attention",) if decoder else ()) + (("causal",) if masks else ())
    notes = f"norm_first={norm_first}, " + ("causal + key padding masks" if masks else "no masks")
    return ZooModel(name=name, family=f"torch.nn.Transformer{kind.title()}", build=build,
                    attention_sites=LAYERS * (2 if decoder else 1), notes=notes, structure=structure,
                    required=True)


class DecodeLayer(nn.Module):
    """One decoder layer's attention for a decode step: M new queries over past K/V plus their own.

    Keys/values: ``cat(past, new)``; K/V heads are shared by ``HEADS // kv_heads`` query heads
    through ``repeat_interleave``. The mask combines a key padding mask over the whole cache with a
    bottom-right causal mask (query i sits at absolute position total - M + i).
    """

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.head_dim = EMBED // HEADS
        self.q = nn.Linear(EMBED, EMBED)
        self.kv = nn.Linear(EMBED, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(EMBED, EMBED)
        self.norm = nn.LayerNorm(EMBED)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, m, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, m, HEADS, self.head_dim).transpose(1, 2)
        k_new, v_new = self.kv(h).view(b, m, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
        groups = HEADS // self.kv_heads
        k_heads, v_heads = (k, v) if groups == 1 else (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
        scores = q @ k_heads.transpose(-1, -2) / math.sqrt(self.head_dim)
        total = k.shape[2]
        q_pos = torch.arange(m, device=x.device) + (total - m)
        allowed = torch.arange(total, device=x.device)[None, :] <= q_pos[:, None]
        allowed = allowed[None, None] & key_mask[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        y = (probs @ v_heads).transpose(1, 2).reshape(b, m, EMBED)
        return x + self.out(y), k, v


class DecodeStep(nn.Module):
    """A stack of DecodeLayers; caches arrive stacked per layer and come back updated."""

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecodeLayer(kv_heads) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor,
                key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, past_keys[i], past_values[i], key_mask)
            keys.append(k)
            values.append(v)
        return x, torch.stack(keys), torch.stack(values)


def decode(name: str, *, new_tokens: int, kv_heads: int) -> ZooModel:
    """``seq_len`` is the past length; the cache's last row is left-padded, as batched generation does."""
    def build(seq_len: int, batch: int = 2, seed: int = 0):
        module = seeded(seed, lambda: DecodeStep(kv_heads))
        cache = (LAYERS, batch, kv_heads, seq_len, EMBED // HEADS)
        x = randn(batch, new_tokens, EMBED, seed=seed)
        past_k, past_v = randn(*cache, seed=seed, salt=3), randn(*cache, seed=seed, salt=4)
        return module, (x, past_k, past_v, padding_mask(batch, seq_len + new_tokens, "left")), {}

    structure = ("kv_cache", "padding_mask") + (("gqa",) if kv_heads < HEADS else ())
    structure += ("causal_bottom_right",) if new_tokens > 1 else ()
    return ZooModel(name=name, family="kv-cache-decode", build=build, attention_sites=LAYERS,
                    notes=f"M={new_tokens} queries over past + new keys; {kv_heads} kv heads of {HEADS}",
                    structure=structure, required=True)


class NanoBlock(nn.Module):
    """nanoGPT's block: fused c_attn, a registered ``tril`` buffer sliced to T, masked_fill(-inf)."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.c_attn, self.c_proj = nn.Linear(EMBED, 3 * EMBED), nn.Linear(EMBED, EMBED)
        self.mlp = nn.Sequential(nn.Linear(EMBED, 4 * EMBED), nn.GELU(), nn.Linear(4 * EMBED, EMBED))
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(EMBED, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Token + learned position embeddings, blocks, final LayerNorm (no LM head: hidden states out)."""

    def __init__(self, vocab: int = 99, block_size: int = 64) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, EMBED), nn.Embedding(block_size, EMBED)
        self.blocks = nn.ModuleList(NanoBlock(block_size) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(EMBED)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def nanogpt() -> ZooModel:
    def build(seq_len: int, batch: int = 2, seed: int = 0):
        return seeded(seed, NanoGPT), (token_ids(batch, seq_len, 99, seed),), {}

    return ZooModel(name="nanogpt", family="decoder", build=build, attention_sites=LAYERS,
                    notes="no padding input (nanoGPT takes none); mask from a sliced tril buffer",
                    structure=("causal", "buffer_mask"), required=True)


REQUIRED = [
    mha("mha_bf_weights", batch_first=True, returns="weights", mask="bool",
        notes="need_weights=True, per-head probabilities returned to the caller"),
    mha("mha_sf_weights_discarded", batch_first=False, returns="discarded", mask="float",
        notes="need_weights=True but the caller drops the weights"),
    mha("mha_bf_sdpa", batch_first=True, returns="output", mask="none",
        notes="need_weights=False: PyTorch already calls SDPA; key padding mask only"),
    mha("mha_sf_sdpa_causal", batch_first=False, returns="output", mask="bool",
        notes="need_weights=False, seq-first, bool causal attn_mask merged with key padding"),
    mha("mha_cross_weights", batch_first=True, returns="weights", mask="none", cross=True,
        notes="cross-attention with kdim=vdim=48 (separate q/k/v projections), weights returned"),
    transformer("encoder_post_masks", decoder=False, norm_first=False, masks=True),
    transformer("encoder_pre_nomask", decoder=False, norm_first=True, masks=False),
    transformer("decoder_post_masks", decoder=True, norm_first=False, masks=True),
    transformer("decoder_pre_nomask", decoder=True, norm_first=True, masks=False),
    decode("kv_decode_m1_gqa", new_tokens=1, kv_heads=2),
    decode("kv_decode_m4", new_tokens=4, kv_heads=HEADS),
    nanogpt(),
]

UNSUPPORTED = {
    "nn.TransformerEncoder(mask=causal) without is_causal": (
        "export fails: _detect_is_causal_mask compares the mask with a generated causal mask and "
        "branches on .item() (GuardOnDataDependentSymNode Eq(u0, 1)); passing is_causal=True exports"),
}
