"""Run under `accelerate launch` with 2 processes: `check_in_sync` on two small models, first identical on every
process, then with two elements of one trained tensor swapped on process 1; prints what the second check said.

    accelerate launch --multi_gpu --num_processes 2 ... tests/sync_check.py
"""

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from finetune.distributed import check_in_sync, finish  # noqa: E402

logging.basicConfig(level=logging.INFO)
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
models = [torch.nn.Linear(4, 3), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 2, bias=False))]
models[0].bias.requires_grad_(False)  # frozen: not compared
check_in_sync(accelerator, models)
if accelerator.process_index == 1:
    weight = models[1][1].weight.data
    weight[0, 0], weight[0, 1] = weight[0, 1].clone(), weight[0, 0].clone()
try:
    check_in_sync(accelerator, models)
except RuntimeError as error:
    print(f"process {accelerator.process_index}: {error}", flush=True)
finish(accelerator)
