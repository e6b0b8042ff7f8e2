"""What kto-precompute and kto-train must agree on: input formats, tokenization,
KL pairing, the log-prob reduction, the cache schema and the fingerprints."""

CACHE_FORMAT_VERSION = 1
