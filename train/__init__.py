"""kto-train: policy-only KTO training from a reference cache (not built yet)."""
