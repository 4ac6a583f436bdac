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


def unmasked_text(length: int) -> Inputs:
    """input_ids only, at a length the config fixes (the ``seq_len`` argument is ignored)."""
    def make(config: Any, seq_len: int, batch: int, seed: int):
        return (), {"input_ids": token_ids(batch, length, VOCAB, seed)}
    return make


def long_text(factor: int) -> Inputs:
    """Right-padded text ``factor`` times longer than ``seq_len`` (sparse patterns need length)."""
    def make(config: Any, seq_len: int, batch: int, seed: int):
        return text("right")(config, factor * seq_len, batch, seed)
    return make


def seq2seq(config: Any, seq_len: int, batch: int, seed: int):
    """Encoder tokens with right padding; a shorter decoder prefix (causal self + cross attention)."""
    dec_len = seq_len // 2 + 1
    return (), {"input_ids": token_ids(batch, seq_len, VOCAB, seed),
                "attention_mask": padding_mask(batch, seq_len, "right"),
                "decoder_input_ids": token_ids(batch, dec_len, VOCAB, seed, salt=3)}


def image(config: Any, seq_len: int, batch: int, seed: int):
    """pixel_values at the config's image size: the patch grid (hence the sequence) is fixed."""
    size = getattr(config, "image_size", IMAGE_SIDE)  # Segformer has none: any size works
    side = size if isinstance(size, int) else size[0]
    return (), {"pixel_values": randn(batch, 3, side, side, seed=seed)}


def masked_image(config: Any, seq_len: int, batch: int, seed: int):
    """pixel_values plus the shuffling ``noise`` MAE would otherwise draw inside forward."""
    patches = (config.image_size // config.patch_size) ** 2
    return (), {**image(config, seq_len, batch, seed)[1], "noise": randn(batch, patches, seed=seed, salt=5)}


def audio(config: Any, seq_len: int, batch: int, seed: int):
    """Raw waveform giving about ``seq_len`` frames, with a padded tail in the last row."""
    samples = seq_len * AUDIO_SAMPLES_PER_FRAME + 10
    return (), {"input_values": randn(batch, samples, seed=seed),
                "attention_mask": padding_mask(batch, samples, "right")}


def perceiver(config: Any, seq_len: int, batch: int, seed: int):
    """Already-embedded inputs of width d_model (PerceiverModel without a preprocessor)."""
    return (), {"inputs": randn(batch, seq_len, config.d_model, seed=seed),
                "attention_mask": padding_mask(batch, seq_len, "right")}


def speech_features(config: Any, seq_len: int, batch: int, seed: int):
    """Filterbank frames (4x conv subsampling to about ``seq_len``), padded, and decoder tokens."""
    frames = 4 * seq_len
    return (), {"input_features": randn(batch, frames, config.input_feat_per_channel, seed=seed),
                "attention_mask": padding_mask(batch, frames, "right"),
                "decoder_input_ids": token_ids(batch, seq_len // 2 + 1, VOCAB, seed, salt=3)}


def moonshine(config: Any, seq_len: int, batch: int, seed: int):
    """Raw audio for the conv stem (about 384 samples per frame) and padded decoder tokens."""
    return (), {"input_values": randn(batch, 384 * seq_len + 256, seed=seed),
                "decoder_input_ids": token_ids(batch, seq_len // 2 + 1, VOCAB, seed, salt=3),
                "decoder_attention_mask": padding_mask(batch, seq_len // 2 + 1, "right")}


def whisper(config: Any, seq_len: int, batch: int, seed: int):
    """Log-mel features (length fixed at 2 x max_source_positions) and padded decoder tokens."""
    frames = 2 * config.max_source_positions
    return (), {"input_features": randn(batch, config.num_mel_bins, frames, seed=seed),
                "decoder_input_ids": token_ids(batch, seq_len, VOCAB, seed, salt=3),
                "decoder_attention_mask": padding_mask(batch, seq_len, "right")}


def hf(name: str, family: str, model: str, config: dict[str, Any], inputs: Inputs, sites: int, *,
       structure: tuple[str, ...] = (), notes: str = "", other_softmaxes: int = 0,
       seq_dynamic: bool = True, required: bool = False, config_cls: str | None = None,
       setup: Callable[[Any], None] | None = None) -> ZooModel:
    """A zoo entry for ``transformers.<model>`` built from ``<Name>Config(**config)``.

    ``setup`` runs on the built module for models that need a call before use (Xmod's language).
    """
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
        if setup is not None:
            setup(module)
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

BREADTH: list[ZooModel] = [
    # encoders (right padding)
    hf("roberta", "encoder", "RobertaModel", dict(BERTLIKE, pad_token_id=1), text("right"), 2),
    hf("xlm_roberta", "encoder", "XLMRobertaModel", dict(BERTLIKE, pad_token_id=1), text("right"), 2),
    hf("camembert", "encoder", "CamembertModel", dict(BERTLIKE, pad_token_id=1), text("right"), 2),
    hf("distilbert", "encoder", "DistilBertModel",
       dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128),
       text("right"), 2),
    hf("albert", "encoder", "AlbertModel", dict(BERTLIKE, embedding_size=32), text("right"), 2,
       notes="one set of layer weights shared by both layers"),
    hf("electra", "encoder", "ElectraModel", dict(BERTLIKE, embedding_size=32), text("right"), 2),
    hf("deberta", "encoder", "DebertaModel", dict(BERTLIKE, relative_attention=True, max_relative_positions=16,
                                                   pos_att_type=["c2p", "p2c"]), text("right"), 2,
       structure=("relative_bias", "disentangled")),
    hf("deberta_v2", "encoder", "DebertaV2Model", dict(BERTLIKE, relative_attention=True, position_buckets=8,
                                                        max_relative_positions=16, pos_att_type=["c2p", "p2c"],
                                                        norm_rel_ebd="layer_norm", share_att_key=True),
       text("right"), 2, structure=("relative_bias", "disentangled")),
    hf("mpnet", "encoder", "MPNetModel", dict(BERTLIKE, pad_token_id=1), text("right"), 2,
       structure=("relative_bias",)),
    hf("mobilebert", "encoder", "MobileBertModel",
       dict(BERTLIKE, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
            num_feedforward_networks=2), text("right"), 2, notes="bottleneck: attention runs at width 32"),
    hf("squeezebert", "encoder", "SqueezeBertModel",
       dict(BERTLIKE, embedding_size=64, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
            intermediate_groups=2, output_groups=2), text("right"), 2,
       notes="grouped 1x1 conv projections, (B, C, L) layout"),
    hf("layoutlm", "encoder", "LayoutLMModel", BERTLIKE, text("right"), 2),
    hf("ernie", "encoder", "ErnieModel", BERTLIKE, text("right"), 2),
    hf("roformer", "encoder", "RoFormerModel", dict(BERTLIKE, embedding_size=64), text("right"), 2,
       structure=("rope",)),
    hf("convbert", "encoder", "ConvBertModel", dict(BERTLIKE, embedding_size=64, head_ratio=2), text("right"), 2,
       notes="half the heads are span-based dynamic convolution: it has its own softmax over kernel taps",
       other_softmaxes=2),
    hf("funnel", "encoder", "FunnelBaseModel",
       dict(vocab_size=VOCAB, block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128),
       text("right"), 2, config_cls="FunnelConfig", structure=("relative_bias", "pooled_query"),
       seq_dynamic=False, notes="second block attends from a pooled (half-length) query; export "
                                "specialises the sequence length (pooling branches on it)"),
    hf("splinter", "encoder", "SplinterModel", BERTLIKE, text("right"), 2),
    hf("xmod", "encoder", "XmodModel", dict(BERTLIKE, pad_token_id=1), text("right"), 2,
       setup=lambda m: m.set_default_language("en_XX"), notes="per-language adapters"),
    hf("esm", "encoder", "EsmModel", dict(BERTLIKE, pad_token_id=1, position_embedding_type="rotary"),
       text("right"), 2, structure=("rope",), notes="q scaled before QK"),
    # decoders (left padding)
    hf("opt", "decoder", "OPTModel",
       dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            max_position_embeddings=128, word_embed_proj_dim=64), text("left"), 2, structure=("causal",)),
    hf("gpt_neo", "decoder", "GPTNeoModel",
       dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
            max_position_embeddings=128, attention_types=[[["global", "local"], 1]], window_size=4),
       text("left"), 2, structure=("causal", "sliding_window", "no_scale"),
       notes="layer 1 is local (window 4); no 1/sqrt(d) scaling"),
    hf("gptj", "decoder", "GPTJModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                             n_positions=128), text("left"), 2, structure=("causal", "rope")),
    hf("gpt_neox", "decoder", "GPTNeoXModel", dict(BERTLIKE), text("left"), 2, structure=("causal", "rope")),
    hf("codegen", "decoder", "CodeGenModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                   n_positions=128, n_ctx=128), text("left"), 2,
       structure=("causal", "rope")),
    hf("bloom", "decoder", "BloomModel", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
       text("left"), 2, structure=("causal", "alibi")),
    hf("falcon", "decoder", "FalconModel", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
       text("left"), 2, structure=("causal", "gqa", "rope")),
    hf("falcon_alibi", "decoder", "FalconModel", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, alibi=True, multi_query=True),
       text("left"), 2, structure=("causal", "alibi", "mqa")),
    hf("mpt", "decoder", "MptModel", dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                                           expansion_ratio=2), text("left"), 2, structure=("causal", "alibi")),
    hf("mistral", "decoder", "MistralModel", dict(LLAMALIKE, sliding_window=4), text("left"), 2,
       structure=("causal", "gqa", "rope", "sliding_window")),
    hf("mixtral", "decoder", "MixtralModel", dict(LLAMALIKE, num_local_experts=4, num_experts_per_tok=2),
       text("left"), 2, structure=("causal", "gqa", "rope", "moe"), other_softmaxes=2,
       notes="router softmax per layer is not attention"),
    hf("qwen2", "decoder", "Qwen2Model", LLAMALIKE, text("left"), 2, structure=("causal", "gqa", "rope")),
    hf("qwen3", "decoder", "Qwen3Model", dict(LLAMALIKE, head_dim=16), text("left"), 2,
       structure=("causal", "gqa", "rope", "qk_norm")),
    hf("gemma", "decoder", "GemmaModel", dict(LLAMALIKE, head_dim=16, num_key_value_heads=1), text("left"), 2,
       structure=("causal", "mqa", "rope")),
    hf("gemma2", "decoder", "Gemma2Model", dict(LLAMALIKE, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                                 attn_logit_softcapping=50.0), text("left"), 2,
       structure=("causal", "gqa", "rope", "softcap", "sliding_window"),
       notes="layer 0 sliding (window 4), layer 1 global; tanh softcap 50 on scores"),
    hf("gemma3", "decoder", "Gemma3TextModel", dict(LLAMALIKE, head_dim=16, sliding_window=4,
                                                     layer_types=["sliding_attention", "full_attention"]),
       text("left"), 2, config_cls="Gemma3TextConfig", structure=("causal", "gqa", "rope", "sliding_window", "qk_norm")),
    hf("phi", "decoder", "PhiModel", dict(BERTLIKE), text("left"), 2, structure=("causal", "partial_rope")),
    hf("phi3", "decoder", "Phi3Model", dict(LLAMALIKE, pad_token_id=0), text("left"), 2,
       structure=("causal", "gqa", "rope")),
    hf("stablelm", "decoder", "StableLmModel", dict(LLAMALIKE), text("left"), 2,
       structure=("causal", "gqa", "partial_rope")),
    hf("starcoder2", "decoder", "Starcoder2Model", dict(LLAMALIKE), text("left"), 2,
       structure=("causal", "gqa", "rope")),
    hf("olmo", "decoder", "OlmoModel", dict(LLAMALIKE), text("left"), 2, structure=("causal", "gqa", "rope")),
    hf("olmo2", "decoder", "Olmo2Model", dict(LLAMALIKE), text("left"), 2,
       structure=("causal", "gqa", "rope", "qk_norm")),
    hf("cohere", "decoder", "CohereModel", dict(LLAMALIKE), text("left"), 2,
       structure=("causal", "gqa", "rope")),
    hf("granite", "decoder", "GraniteModel", dict(LLAMALIKE, attention_multiplier=0.5), text("left"), 2,
       structure=("causal", "gqa", "rope"), notes="scale is attention_multiplier (0.5), not 1/sqrt(d)"),
    hf("persimmon", "decoder", "PersimmonModel", dict(BERTLIKE), text("left"), 2,
       structure=("causal", "partial_rope", "qk_norm")),
    hf("qwen2_moe", "decoder", "Qwen2MoeModel", dict(LLAMALIKE, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=64, shared_expert_intermediate_size=64),
       text("left"), 2, structure=("causal", "gqa", "rope", "moe"), other_softmaxes=2,
       notes="router softmax per layer is not attention"),
    hf("biogpt", "decoder", "BioGptModel", dict(BERTLIKE), text("left"), 2, structure=("causal",)),
    hf("xglm", "decoder", "XGLMModel", dict(vocab_size=VOCAB, d_model=64, num_layers=2, attention_heads=4,
                                             ffn_dim=128, max_position_embeddings=128), text("left"), 2,
       structure=("causal",)),
    # encoder-decoders (right padding)
    hf("bart", "encoder-decoder", "BartModel", SEQ2SEQ, seq2seq, 6, structure=("cross_attention", "causal")),
    hf("mbart", "encoder-decoder", "MBartModel", SEQ2SEQ, seq2seq, 6, structure=("cross_attention", "causal")),
    hf("pegasus", "encoder-decoder", "PegasusModel", SEQ2SEQ, seq2seq, 6, structure=("cross_attention", "causal")),
    hf("marian", "encoder-decoder", "MarianModel", dict(SEQ2SEQ, decoder_vocab_size=VOCAB), seq2seq, 6,
       structure=("cross_attention", "causal")),
    hf("blenderbot", "encoder-decoder", "BlenderbotModel", SEQ2SEQ, seq2seq, 6, structure=("cross_attention", "causal")),
    hf("m2m100", "encoder-decoder", "M2M100Model", SEQ2SEQ, seq2seq, 6, structure=("cross_attention", "causal")),
    hf("mt5", "encoder-decoder", "MT5Model",
       dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
       seq2seq, 6, structure=("relative_bias", "no_scale", "cross_attention", "causal")),
    hf("umt5", "encoder-decoder", "UMT5Model",
       dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
       seq2seq, 6, structure=("relative_bias", "no_scale", "cross_attention", "causal"),
       notes="relative bias per layer (not shared from layer 0)"),
    # vision (fixed patch grid)
    hf("deit", "vision", "DeiTModel", VISION, image, 2, seq_dynamic=False, notes="cls + distillation tokens"),
    hf("beit", "vision", "BeitModel", dict(VISION, use_relative_position_bias=True), image, 2,
       seq_dynamic=False, structure=("relative_bias",)),
    hf("data2vec_vision", "vision", "Data2VecVisionModel", dict(VISION, use_relative_position_bias=True), image, 2,
       seq_dynamic=False, structure=("relative_bias",)),
    hf("dinov2", "vision", "Dinov2Model", dict(VISION, image_size=32, patch_size=8), image, 2, seq_dynamic=False),
    hf("swin", "vision", "SwinModel", dict(image_size=32, patch_size=4, embed_dim=32, depths=[2], num_heads=[4],
                                            window_size=4), image, 2, seq_dynamic=False,
       structure=("relative_bias", "windows", "shifted_window_mask"),
       notes="block 1 uses shifted windows with an additive -100 region mask"),
    hf("clip_vision", "vision", "CLIPVisionModel", VISION, image, 2, seq_dynamic=False),
    hf("siglip_vision", "vision", "SiglipVisionModel", VISION, image, 3, seq_dynamic=False,
       structure=("probe_query", "weights_discarded"),
       notes="2 layers + an attention-pooling head: nn.MultiheadAttention with a learned probe query "
             "(M=1), need_weights left True and the weights dropped"),
    hf("yolos", "vision", "YolosModel", dict(VISION, image_size=[32, 32], num_detection_tokens=4), image, 2,
       seq_dynamic=False),
    # multimodal text towers
    hf("clip_text", "text-tower", "CLIPTextModel", dict(BERTLIKE, eos_token_id=2), text("right"), 2,
       structure=("causal",), notes="causal mask + padding mask in a text encoder"),
    hf("siglip_text", "text-tower", "SiglipTextModel", BERTLIKE, text("right"), 2),
    # audio
    hf("wav2vec2", "audio", "Wav2Vec2Model", AUDIO, audio, 2),
    hf("hubert", "audio", "HubertModel", AUDIO, audio, 2),
    hf("data2vec_audio", "audio", "Data2VecAudioModel", dict(AUDIO, num_conv_pos_embeddings=2), audio, 2),
    hf("data2vec_text", "encoder", "Data2VecTextModel", dict(BERTLIKE, pad_token_id=1), text("right"), 2),
    # second wave
    hf("gpt_bigcode", "decoder", "GPTBigCodeModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                          n_positions=128, multi_query=True), text("left"), 2,
       structure=("causal", "mqa")),
    hf("ctrl", "decoder", "CTRLModel", dict(vocab_size=VOCAB, n_embd=64, dff=128, n_layer=2, n_head=4,
                                             n_positions=128), text("left"), 2, structure=("causal",)),
    hf("imagegpt", "decoder", "ImageGPTModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                     n_positions=128), text("left"), 2, structure=("causal",)),
    hf("megatron_bert", "encoder", "MegatronBertModel", BERTLIKE, text("right"), 2),
    hf("rembert", "encoder", "RemBertModel", dict(BERTLIKE, input_embedding_size=32, output_embedding_size=32),
       text("right"), 2),
    hf("flaubert", "encoder", "FlaubertModel", dict(vocab_size=VOCAB, emb_dim=64, n_layers=2, n_heads=4,
                                                     max_position_embeddings=128), text("right"), 2),
    hf("xlm", "encoder", "XLMModel", dict(vocab_size=VOCAB, emb_dim=64, n_layers=2, n_heads=4,
                                           max_position_embeddings=128), text("right"), 2),
    hf("xlnet", "encoder", "XLNetModel", dict(vocab_size=VOCAB, d_model=64, n_layer=2, n_head=4, d_inner=128,
                                               d_head=16), text("right"), 2, structure=("relative_bias", "einsum")),
    hf("canine", "encoder", "CanineModel", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, downsampling_rate=2, num_hash_buckets=97),
       text("right"), 4, seq_dynamic=False, structure=("local_blocks", "downsampled"),
       notes="2 deep layers + a local character encoder layer + a final layer; export specialises the "
             "character length (downsampling)"),
    hf("modernbert", "encoder", "ModernBertModel", dict(BERTLIKE, local_attention=4,
                                                         layer_types=["full_attention", "sliding_attention"]),
       text("right"), 2, structure=("rope", "sliding_window")),
    hf("wavlm", "audio", "WavLMModel", dict(AUDIO, num_buckets=16, max_bucket_distance=32), audio, 2,
       structure=("relative_bias", "gated_bias")),
    hf("sew_d", "audio", "SEWDModel", dict(AUDIO, squeeze_factor=2, relative_attention=True, position_buckets=8,
                                            max_position_embeddings=64, pos_att_type=("p2c", "c2p"),
                                            share_att_key=True, norm_rel_ebd="layer_norm"), audio, 2,
       seq_dynamic=False, structure=("relative_bias", "disentangled"),
       notes="export specialises the waveform length (squeeze/unsqueeze of frames)"),
    hf("unispeech", "audio", "UniSpeechModel", AUDIO, audio, 2),
    hf("speech_to_text", "audio-encoder-decoder", "Speech2TextModel",
       dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, input_feat_per_channel=16,
            conv_channels=32, max_source_positions=128, max_target_positions=128), speech_features, 6,
       structure=("cross_attention", "causal")),
    hf("prophetnet", "encoder-decoder", "ProphetNetModel",
       dict(vocab_size=VOCAB, hidden_size=64, encoder_ffn_dim=128, decoder_ffn_dim=128, num_encoder_layers=2,
            num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4, ngram=2,
            num_buckets=8, relative_max_distance=16, max_position_embeddings=128), seq2seq, 8,
       structure=("cross_attention", "relative_bias", "ngram_stream"),
       notes="decoder self-attention has a main stream and an n-gram predict stream: 2 softmaxes, "
             "so 2 enc + 2 x (main + predict + cross)"),
    hf("longt5", "encoder-decoder", "LongT5Model",
       dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            local_radius=2), seq2seq, 6, structure=("relative_bias", "local_blocks", "cross_attention"),
       seq_dynamic=False, notes="local blocks of 3: export guards seq_len % 3 != 0, so length 8 only"),
    hf("blenderbot_small", "encoder-decoder", "BlenderbotSmallModel", SEQ2SEQ, seq2seq, 6,
       structure=("cross_attention", "causal")),
    hf("perceiver", "latent", "PerceiverModel", dict(num_latents=8, d_latents=64, d_model=32, num_blocks=1,
                                                      num_self_attends_per_block=2, num_self_attention_heads=4,
                                                      num_cross_attention_heads=1), perceiver, 3,
       structure=("cross_attention", "latent_queries")),
    hf("levit", "vision", "LevitModel", dict(image_size=64, hidden_sizes=[64, 128], num_attention_heads=[4, 8],
                                              depths=[1, 1], key_dim=[16, 16], attention_ratio=[2, 2],
                                              mlp_ratio=[2, 2], down_ops=[["Subsample", 16, 4, 4, 2, 2]]),
       image, 3, seq_dynamic=False, structure=("attention_bias_table", "subsample_attention", "no_mask"),
       notes="2 stage blocks + 1 subsampling attention (strided queries); learned bias indexed by offsets"),
    hf("segformer", "vision", "SegformerModel", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                      hidden_sizes=[32, 64], num_attention_heads=[1, 2]),
       image, 2, seq_dynamic=False, structure=("spatial_reduction_kv",)),
    hf("pvt", "vision", "PvtModel", dict(image_size=32, num_encoder_blocks=2, depths=[1, 1],
                                          sequence_reduction_ratios=[2, 1], hidden_sizes=[32, 64],
                                          num_attention_heads=[1, 2]), image, 2, seq_dynamic=False,
       structure=("spatial_reduction_kv",)),
    hf("vit_mae", "vision", "ViTMAEModel", dict(VISION, mask_ratio=0.25), masked_image, 2, seq_dynamic=False,
       notes="random masking keeps 3/4 of the patches; the noise is an input so runs are deterministic"),
    hf("dinov2_registers", "vision", "Dinov2WithRegistersModel", dict(VISION, num_register_tokens=2), image, 2,
       seq_dynamic=False),
    hf("hiera", "vision", "HieraModel", dict(embed_dim=32, image_size=[32, 32], patch_stride=[4, 4], depths=[1, 1],
                                              num_heads=[1, 2], query_stride=[2, 2], masked_unit_size=[4, 4],
                                              num_query_pool=1, masked_unit_attention=[True, False]),
       image, 2, seq_dynamic=False, structure=("mask_unit_attention",)),
    hf("qwen3_moe", "decoder", "Qwen3MoeModel", dict(LLAMALIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=64), text("left"), 2,
       structure=("causal", "gqa", "rope", "qk_norm", "moe"), other_softmaxes=2),
    hf("gpt_oss", "decoder", "GptOssModel", dict(LLAMALIKE, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=4), text("left"), 2,
       structure=("causal", "gqa", "rope", "sinks", "sliding_window", "moe"), other_softmaxes=2),
    hf("deepseek_v3", "decoder", "DeepseekV3Model",
       dict(LLAMALIKE, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            moe_intermediate_size=64, first_k_dense_replace=1), text("left"), 2,
       structure=("causal", "mla", "rope", "qk_dim_ne_v_dim", "moe"), other_softmaxes=0),
    hf("smollm3", "decoder", "SmolLM3Model", dict(LLAMALIKE, no_rope_layers=[1, 0]), text("left"), 2,
       structure=("causal", "gqa", "nope_layers")),
    hf("cohere2", "decoder", "Cohere2Model", dict(LLAMALIKE, sliding_window=4,
                                                   layer_types=["sliding_attention", "full_attention"]),
       text("left"), 2, structure=("causal", "gqa", "rope", "sliding_window")),
    hf("moonshine", "audio-encoder-decoder", "MoonshineModel",
       dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
            max_position_embeddings=128), moonshine, 6, structure=("cross_attention", "causal", "rope")),
    hf("big_bird", "encoder", "BigBirdModel", dict(BERTLIKE, attention_type="block_sparse", block_size=2,
                                                    num_random_blocks=1), text("right"), 2,
       notes="block_sparse requested, but at seq <= 14 transformers falls back to full attention"),
    hf("big_bird_sparse", "encoder", "BigBirdModel", dict(BERTLIKE, attention_type="block_sparse", block_size=2,
                                                           num_random_blocks=1), long_text(4), 10,
       structure=("block_sparse", "einsum", "random_blocks"), seq_dynamic=False,
       notes="sequence 4 x seq_len so block-sparse engages: 5 softmaxes per layer (first/last query blocks "
             "global, second/second-last, and the middle band over concatenated band+random+global keys); "
             "export specialises the block count"),
]
UNSUPPORTED: dict[str, str] = {
    "nystromformer": "landmark path (num_landmarks < seq): export materialises a [B,1,S,S] mask even without "
                     "attention_mask and adds it to [B,H,landmarks,S] scores: 'size of tensor a (4) must match "
                     "the size of tensor b (8) at non-singleton dimension 2' (transformers 5.23)",
    "longformer": "export fails: GuardOnDataDependentSymNode 'Could not guard on data-dependent expression "
                  "4*u1 < 8' (attention_window=4, seq 8)",
    "led": "encoder uses Longformer's self-attention; export fails the same way: GuardOnDataDependentSymNode "
           "'4*u1 < 8'",
    "reformer": "local + LSH attention layers; export fails: GuardOnDataDependentSymNode 'u0 < 16'",
    "dbrx": "export fails: GuardOnDataDependentSymNode 'Eq(u0, 0)' (size-like u0); with clip_qkv unset the "
            "eager forward already fails in torch.clamp(min=None, max=None)",
}
