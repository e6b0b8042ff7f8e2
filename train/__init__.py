"""kto-train: policy-only KTO training from a reference cache (no reference model in
memory). `kto-train` (train.cli) is the command; `kto-plot OUTPUT` (train.plot) draws a run."""
