"""Everything an attention site can be replaced by, each with a pure-torch reference."""
from .bounded import BoundedVariant
from .flex import FlexVariant
from .fused import ChunkedVariant, TritonDecodeVariant, TritonFlashVariant
from .padded import PaddedVariant
from .registry import Call, Operands, Variant
from .sdpa import SdpaVariant

VARIANTS: tuple[Variant, ...] = (SdpaVariant(), ChunkedVariant(), TritonFlashVariant(), TritonDecodeVariant(),
                                 FlexVariant(), PaddedVariant(), BoundedVariant())


def get_variant(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"no attention variant named {name!r}; known: {[v.name for v in VARIANTS]}")


__all__ = ["Call", "Operands", "Variant", "VARIANTS", "get_variant"]
