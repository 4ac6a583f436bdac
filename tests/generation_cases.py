"""Tiny Hugging Face generative models (2 layers, hidden 64, random seeded weights, eager
attention) and left-padded prompts, for generate() through attnfx."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB = 96
PROMPT = 10
NEW_TOKENS = 6
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB + 1)  # eos never sampled: full length
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **SPECIAL)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    encoder_decoder: bool = False


def _decoder(model: str, config: str, **overrides: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        settings = {**DECODER, **overrides}
        cfg = getattr(transformers, config)(**settings)
        cfg._attn_implementation = "eager"
        return getattr(transformers, model)(cfg).eval()
    return build


CASES = {c.name: c for c in (
    Case("llama", _decoder("LlamaForCausalLM", "LlamaConfig")),
    Case("qwen2", _decoder("Qwen2ForCausalLM", "Qwen2Config")),
    # a window shorter than prompt + new tokens: the cache outgrows it while generating
    Case("mistral", _decoder("MistralForCausalLM", "MistralConfig", sliding_window=7)),
    # softcapped scores, alternating sliding (window 7) and full layers
    Case("gemma2", _decoder("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=7,
                            attn_logit_softcapping=20.0, final_logit_softcapping=None,
                            query_pre_attn_scalar=16)),
    Case("gpt2", _decoder("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    Case("opt", _decoder("OPTForCausalLM", "OPTConfig", ffn_dim=128, word_embed_proj_dim=64,
                         enable_bias=True)),
    Case("phi3", _decoder("Phi3ForCausalLM", "Phi3Config")),
    Case("falcon", _decoder("FalconForCausalLM", "FalconConfig", new_decoder_architecture=False,
                            multi_query=True, alibi=False)),
    Case("bart", _decoder("BartForConditionalGeneration", "BartConfig", d_model=64, encoder_layers=2,
                          decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_start_token_id=1,
                          forced_eos_token_id=None), encoder_decoder=True),
)}


def prompt(batch: int = 2, length: int = PROMPT, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with the first row left-padded by 3 (pad id 0 never appears elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model: Any, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


class AtenOps(TorchDispatchMode):
    """Counts the ATen ops that run, compiled code included (the mode stays out of compilation,
    so Dynamo does not fall back to eager while it is active)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def softmaxes(self) -> int:
        return sum(n for name, n in self.counts.items() if "softmax" in name)
