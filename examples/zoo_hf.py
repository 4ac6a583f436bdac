"""Hugging Face architectures built offline from small configs with random weights.

Every model uses ``attn_implementation="eager"`` (the attention math stays in the graph) and
``use_cache=False`` (a returned ``DynamicCache`` does not export). Sizes are small but keep the
structure: 2 layers, hidden 64, 4 heads of 16 (GQA models: 2 key/value heads).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import transformers

from zoo_base import ZooModel, padding_mask, randn, seeded, token_ids

VOCAB = 99
Inputs = Callable[[Any, int, int, int], tuple[tuple[Any, ...], dict[str, Any]]]

BERTLIKE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=128)
LLAMALIKE = dict(BERTLIKE, num_key_value_heads=2)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              image_size=32, patch_size=8, num_channels=3)
AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
             num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
IMAGE_SIDE = 32
AUDIO_SAMPLES_PER_FRAME = 20  # product of AUDIO's conv strides


def text(side: str) -> Inputs:
    """input_ids with an attention mask padded on ``side`` in the last batch row."""
    def make(config: Any, seq_len: int, batch: int, seed: int):
        return (), {"input_ids": token_ids(batch, seq_len, VOCAB, seed),
                    "attention_mask": padding_mask(batch, seq_len, side)}
    return make


def seq2seq(config: Any, seq_len: int, batch: int, seed: int):
    """Encoder tokens with right padding; a shorter decoder prefix (causal self + cross attention)."""
    dec_len = seq_len // 2 + 1
    return (), {"input_ids": token_ids(batch, seq_len, VOCAB, seed),
                "attention_mask": padding_mask(batch, seq_len, "right"),
                "decoder_input_ids": token_ids(batch, dec_len, VOCAB, seed, salt=3)}


def image(config: Any, seq_len: int, batch: int, seed: int):
    """pixel_values at the config's image size: the patch grid (hence the sequence) is fixed."""
    return (), {"pixel_values": randn(batch, 3, IMAGE_SIDE, IMAGE_SIDE, seed=seed)}


def audio(config: Any, seq_len: int, batch: int, seed: int):
    """Raw waveform giving about ``seq_len`` frames, with a padded tail in the last row."""
    samples = seq_len * AUDIO_SAMPLES_PER_FRAME + 10
    return (), {"input_values": randn(batch, samples, seed=seed),
                "attention_mask": padding_mask(batch, samples, "right")}


def whisper(config: Any, seq_len: int, batch: int, seed: int):
    """Log-mel features (length fixed at 2 x max_source_positions) and padded decoder tokens."""
    frames = 2 * config.max_source_positions
    return (), {"input_features": randn(batch, config.num_mel_bins, frames, seed=seed),
                "decoder_input_ids": token_ids(batch, seq_len, VOCAB, seed, salt=3),
                "decoder_attention_mask": padding_mask(batch, seq_len, "right")}


def hf(name: str, family: str, model: str, config: dict[str, Any], inputs: Inputs, sites: int, *,
       structure: tuple[str, ...] = (), notes: str = "", other_softmaxes: int = 0,
       seq_dynamic: bool = True, required: bool = False, config_cls: str | None = None) -> ZooModel:
    """A zoo entry for ``transformers.<model>`` built from ``<Name>Config(**config)``."""
    config_name = config_cls or model.removesuffix("Model") + "Config"

    def build(seq_len: int, batch: int = 2, seed: int = 0):
        config_type = getattr(transformers, config_name)
        accepted = inspect.signature(config_type.__init__).parameters
        # Default special tokens index the real vocabulary, beyond our small one.
        tokens = {k: v for k, v in SPECIAL_TOKENS.items() if k in accepted}
        cfg = config_type(**{**tokens, **config})
        cfg._attn_implementation = "eager"
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        module = seeded(seed, lambda: getattr(transformers, model)(cfg))
        args, kwargs = inputs(cfg, seq_len, batch, seed)
        return module, args, kwargs

    return ZooModel(name=name, family=family, build=build, attention_sites=sites, notes=notes,
                    structure=structure, other_softmaxes=other_softmaxes, seq_dynamic=seq_dynamic,
                    required=required)


REQUIRED = [
    hf("bert", "encoder", "BertModel", BERTLIKE, text("right"), 2, required=True,
       notes="mul by 1/sqrt(d) after QK, additive where()-built padding mask"),
    hf("gpt2", "decoder", "GPT2Model",
       dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128), text("left"), 2,
       structure=("causal",), required=True, notes="fused c_attn Conv1D split into q/k/v"),
    hf("llama", "decoder", "LlamaModel", LLAMALIKE, text("left"), 2,
       structure=("causal", "gqa", "rope"), required=True, notes="repeat_kv expand+reshape"),
    hf("t5", "encoder-decoder", "T5Model",
       dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
       seq2seq, 6, structure=("relative_bias", "no_scale", "cross_attention", "causal"), required=True,
       notes="2 enc self + 2 dec self + 2 cross; bucketed relative position bias, no 1/sqrt(d)"),
    hf("vit", "vision", "ViTModel", VISION, image, 2, seq_dynamic=False, required=True),
    hf("whisper", "audio-encoder-decoder", "WhisperModel",
       dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=16, max_target_positions=64),
       whisper, 6, structure=("cross_attention", "causal"), required=True,
       notes="2 enc self + 2 dec self + 2 cross; q scaled before QK; encoder length fixed (32 frames)"),
]

BREADTH: list[ZooModel] = []
UNSUPPORTED: dict[str, str] = {}
