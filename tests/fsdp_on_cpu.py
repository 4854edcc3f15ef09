"""Run a script with accelerate's FSDP on the CPU (gloo), for the tests: `accelerate launch --use_fsdp
--fsdp_version 2 --num_processes 2 tests/fsdp_on_cpu.py finetune/train.py ...` with ACCELERATE_USE_CPU=1.

accelerate turns FSDP on only for accelerator devices (`AcceleratorState` keeps the FSDP plugin for MULTI_GPU and
its kin, not MULTI_CPU), though torch's FSDP2 shards over gloo on the CPU. This lifts that one check and nothing
else: the processes then run accelerate's own FSDP2 preparation, gradient clipping and state-dict gathering, as on
GPUs. Not for users: FSDP on a CPU saves nothing a CPU run needs.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does on GPUs


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
