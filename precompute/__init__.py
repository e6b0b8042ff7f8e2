"""kto-precompute: score a preference dataset under the reference model once and
write the reference cache (spec sections 2, 4, 5)."""
