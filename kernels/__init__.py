"""Everything an attention site can be replaced by, each a custom op with a pure-torch implementation.

What each variant takes, and the call it emits (`variant.call(spec, operands)`; every argument is
read from the spec, `spec.mods.op_args()` for the scalar score modifiers (spec.SCORE_ARGS), and
from `Operands`):

  softmax sites (AttentionSpec.kind SOFTMAX)
    sdpa                    aten.scaled_dot_product_attention        any device
    attnfx_chunked          attnfx::attention(...)[0]                cpu     algorithm chunked
    triton_flash            attnfx::attention(...)[0]                cuda    algorithm flash (M > 16 or N < 4M)
    triton_decode           attnfx::attention(...)[0]                cuda    algorithm decode_split_kv
    attnfx_bounded          attnfx::bounded_attention(...)[0]        cpu     algorithm bounded (no mask tensor)
    flex                    attnfx::flex_attention(...)              cpu     algorithm flex (compiled, inference)
    padded                  attnfx::padded_attention(...)            cpu     algorithm padded (key mask (B,1,1,N))
  sigmoid sites (kind SIGMOID, spec.logit_bias)
    attnfx_sigmoid_chunked  attnfx::sigmoid_attention(...)           cpu     algorithm sigmoid_chunked
    triton_sigmoid          attnfx::sigmoid_attention(...)           cuda    algorithm sigmoid_flash
  linear sites (kind LINEAR; q, k already feature-mapped; Operands.decay (H,) when spec.decay)
    attnfx_linear           attnfx::linear_attention(..., "right_to_left", C)[0]   any device, no causal band
                                                                      algorithm linear_right_to_left
    attnfx_lightning        attnfx::linear_attention(..., "chunked", C)[0]         any device, causal band
                                                                      algorithm linear_chunked

Each variant refuses, with a sentence, the sites of another kind and the devices or shapes it does
not take, and every optional score term (softcap, ALiBi, ...) it does not list in `takes` (the
variants whose kernels run through score_mods.py take what that module applies). The eager forms
are priced as algorithms eager, sigmoid_eager and linear_eager.
"""
from .bounded import BOUNDED
from .flex import FLEX
from .fused import CHUNKED, LIGHTNING, LINEAR, SIGMOID_CHUNKED, TRITON_DECODE, TRITON_FLASH, TRITON_SIGMOID
from .padded import PaddedVariant
from .variant import Call, Operands, Variant
from .sdpa import SdpaVariant

VARIANTS: tuple[Variant, ...] = (
    SdpaVariant(), CHUNKED, TRITON_FLASH, TRITON_DECODE, FLEX, PaddedVariant(), BOUNDED,
    SIGMOID_CHUNKED, TRITON_SIGMOID, LINEAR, LIGHTNING,
)


def get_variant(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"no attention variant named {name!r}; known: {[v.name for v in VARIANTS]}")


__all__ = ["Call", "Operands", "Variant", "VARIANTS", "get_variant"]
