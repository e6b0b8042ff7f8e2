"""kto-train under accelerate's FSDP2 on CPU processes (gloo), for the tests.

accelerate 1.15 builds its FSDP plugin from `accelerate launch --use_fsdp` but turns
FSDP on only for accelerator devices (state.py: multi-GPU types; a CPU run stays plain
gloo DDP). This driver lets a CPU run take accelerate's FSDP2 path as it is (its
fully_shard wrapping, state dicts, checkpoints): everything after that is the same
code a GPU run executes. Usage: accelerate launch --multi_gpu --use_fsdp ... fsdp_driver.py
[kto-train options]."""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_cpu_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = _init_with_cpu_fsdp

if __name__ == "__main__":
    from train.cli import main

    sys.argv[0] = "kto-train"
    main()
