"""kto-train: policy-only KTO training from a reference cache (no reference model in
memory). `python -m train.cli` is the command; `python -m train.plot OUTPUT` draws a run."""
