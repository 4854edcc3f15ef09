"""Test-only fault injection for the training processes that tests launch. Tests put this folder on PYTHONPATH, so
Python imports this file at start-up; the shipped trainer reads no such setting.

    FINETUNE_TEST_KILL_AT_CHECKPOINT=STEP   SIGKILL the process once accelerate has written checkpoint-STEP's state
                                            into its temporary folder, before the manifest that completes it
    FINETUNE_TEST_NAN_LOSS=STEP:RANK        process RANK sees a NaN loss at optimizer step STEP (once)
    FINETUNE_TEST_FSDP_ON_CPU=1             accelerate's FSDP on the CPU: accelerate keeps FSDP for accelerator
                                            devices (MULTI_GPU and its kin, not MULTI_CPU), though torch's FSDP2
                                            shards over gloo; this lifts that one check, and accelerate's own FSDP2
                                            preparation, clipping and state-dict gathering then run as on GPUs
"""

import importlib.abc
import importlib.util
import math
import os
import signal
import sys

KILL_AT_CHECKPOINT = "FINETUNE_TEST_KILL_AT_CHECKPOINT"
NAN_LOSS = "FINETUNE_TEST_NAN_LOSS"
FSDP_ON_CPU = "FINETUNE_TEST_FSDP_ON_CPU"


def _kill_at_checkpoint(module, step: str) -> None:
    save_state = module.Accelerator.save_state

    def save_then_die(self, output_dir=None, *args, **kwargs):
        result = save_state(self, output_dir, *args, **kwargs)
        if os.path.basename(str(output_dir)) == f".tmp-checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    module.Accelerator.save_state = save_then_die


def _nan_loss(module, where: str) -> None:
    fault = [tuple(int(v) for v in where.split(":"))]
    skip_step = module.NonFiniteGuard.skip_step

    def with_nan(self, accelerator, loss, grad_norm, step, keys):
        if fault and fault[0] == (step, accelerator.process_index):
            fault.clear()  # once
            loss = loss.detach() * math.nan
        return skip_step(self, accelerator, loss, grad_norm, step, keys)

    module.NonFiniteGuard.skip_step = with_nan


def _fsdp_on_cpu(module) -> None:
    init = module.AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == module.DistributedType.MULTI_CPU:
            self.distributed_type = module.DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            module.PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does

    module.AcceleratorState.__init__ = init_with_fsdp_on_cpu


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module right after it is first imported."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_patches = {}
if os.environ.get(KILL_AT_CHECKPOINT):
    _patches["accelerate.accelerator"] = lambda m: _kill_at_checkpoint(m, os.environ[KILL_AT_CHECKPOINT])
if os.environ.get(NAN_LOSS):
    _patches["finetune.nonfinite"] = lambda m: _nan_loss(m, os.environ[NAN_LOSS])
if os.environ.get(FSDP_ON_CPU):
    _patches["accelerate.state"] = _fsdp_on_cpu
if _patches:
    sys.meta_path.insert(0, _PatchOnImport(_patches))
