"""Run kto-precompute and kill -9 itself while writing shard number CRASH_AFTER + 1,
leaving a partial temporary file behind, as a machine failure would.

usage: python crash_driver.py CRASH_AFTER [kto-precompute args...]"""

import os
import signal
import sys

import precompute.run as run_module
from precompute.cli import main

crash_after = int(sys.argv[1])
written = 0
original = run_module.write_shard


def write_then_die(directory, name, table, cache_key):
    global written
    if written == crash_after:
        (directory / f".{name}.tmp-{os.getpid()}").write_bytes(b"PAR1 half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    written += 1
    return original(directory, name, table, cache_key)


if __name__ == "__main__":
    run_module.write_shard = write_then_die
    sys.argv = ["kto-precompute", *sys.argv[2:]]
    main()
