"""Run kto-train and kill -9 itself in the middle of optimizer step CRASH_AT + 1.

usage: python train_crash_driver.py CRASH_AT [kto-train args...]"""

import os
import signal
import sys

import train.trainer as trainer_module
from train.cli import main

crash_at = int(sys.argv[1])
original = trainer_module.Trainer._optimizer_step


def step_then_die(self):
    if self.step == crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)


if __name__ == "__main__":
    trainer_module.Trainer._optimizer_step = step_then_die
    sys.argv = ["kto-train", *sys.argv[2:]]
    main()
