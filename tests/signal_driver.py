"""Run kto-train or kto-precompute and send this very process a real signal at a chosen
point, as a scheduler would (the handlers under test are the CLIs' own).

usage: python signal_driver.py POINT N SIGNAL [command args...]
  train-step          during optimizer step N + 1 (before its weights change)
  train-step-rank1    the same, in the process of rank 1 only (torchrun's RANK)
  train-setup         after the cache was copied to the temporary folder
  precompute-shard    after shard N + 1 was written to its temporary name
  precompute-prepare  after the first chunk of rows was spilled to the temporary file"""

import os
import signal
import sys

SIGNAL = getattr(signal, sys.argv[3]) if __name__ == "__main__" else None


def send():
    os.kill(os.getpid(), SIGNAL)


def patch_train(point, n):
    import train.trainer as trainer_module

    if point.startswith("train-step"):
        original = trainer_module.Trainer._optimizer_step
        mine = point == "train-step" or os.environ.get("RANK") == "1"

        def step(self):
            if self.step == n and mine:
                send()
            return original(self)
        trainer_module.Trainer._optimizer_step = step
    else:
        original_open = trainer_module.open_cache

        def open_then_signal(*args, **kwargs):
            rows = original_open(*args, **kwargs)
            send()
            return rows
        trainer_module.open_cache = open_then_signal


def patch_precompute(point, n):
    import pyarrow.parquet as pq

    import precompute.prepare as prepare_module

    if point == "precompute-shard":
        original, calls = pq.write_table, []

        def write_then_signal(table, where, **kwargs):
            original(table, where, **kwargs)
            calls.append(where)
            if len(calls) == n + 1 and ".tmp-" in str(getattr(where, "name", where)):
                send()
        pq.write_table = write_then_signal
    else:
        original_flush = prepare_module._flush

        def flush_then_signal(*args, **kwargs):
            original_flush(*args, **kwargs)
            send()
        prepare_module._flush = flush_then_signal


if __name__ == "__main__":
    point, n = sys.argv[1], int(sys.argv[2])
    args = sys.argv[4:]
    if point.startswith("train"):
        patch_train(point, n)
        from train.cli import main
        sys.argv = ["kto-train", *args]
    else:
        patch_precompute(point, n)
        from precompute.cli import main
        sys.argv = ["kto-precompute", *args]
    main()
