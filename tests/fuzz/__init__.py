"""A property-based attention fuzzer: programs drawn from a grammar of attention spellings and
near-misses, each checked against attnfx's invariant (see `oracle.check`)."""
