"""kto-train under accelerate's FSDP2 or DeepSpeed on CPU processes (gloo), for the tests.

accelerate 1.15 builds its FSDP / DeepSpeed plugin from `accelerate launch --use_fsdp` /
`--use_deepspeed` but turns them on only for accelerator devices (state.py: multi-GPU
types, and `not cpu` for DeepSpeed; a CPU run stays plain gloo DDP). This driver lets a
CPU run take accelerate's FSDP2 or DeepSpeed path as it is (its wrapping, state dicts,
checkpoints): everything after that is the same code a GPU run executes. Usage:
accelerate launch --use_fsdp|--use_deepspeed ... sharded_driver.py [kto-train options]."""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_cpu_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if kwargs.get("fsdp_plugin") is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs["fsdp_plugin"]
    elif kwargs.get("deepspeed_plugin") is not None:
        self.distributed_type = DistributedType.DEEPSPEED
        plugin = kwargs["deepspeed_plugin"]
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
    PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_with_cpu_fsdp

if __name__ == "__main__":
    from train.cli import main

    sys.argv[0] = "kto-train"
    main()
