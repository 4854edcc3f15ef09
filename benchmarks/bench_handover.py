"""What a batch from a dataloader worker costs the training process to receive, by torch's sharing strategy.

A worker builds each batch in shared memory and sends the training process a handle per tensor; under torch's
default on Linux (`file_descriptor`) each handle is a file descriptor fetched over a socket from the worker,
under `file_system` a shared-memory file name. On a GPU that outruns its host, this is host time in the training
process at every step. The batches here are shaped as the trainer's (`ImageTextStream` examples, batch 8: uint8
pixels, 77 token ids, the flip, original size and crop; and the keys) but made of zeros, so that the worker is
always ahead and only the receiving is timed: `next(loader)` in the training process, median of 200 batches,
the worker given time to refill the queue every 4 batches. `packed` sends the four small tensors as one.

    python benchmarks/bench_handover.py [--json OUT]
"""

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

BATCH, BATCHES = 8, 200


class Examples(IterableDataset):
    def __init__(self, resolution: int, packed: bool):
        self.resolution, self.packed = resolution, packed

    def __iter__(self):
        for i in range(10**9):
            small = {"input_ids": torch.zeros(77, dtype=torch.long), "flipped": torch.tensor(False),
                     "original_size": torch.tensor([512, 512]), "crop_top_left": torch.tensor([0, 0])}
            if self.packed:
                small = {"small": torch.cat([v.reshape(-1).long() for v in small.values()])}
            yield {"pixel_values": torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), **small,
                   "key": f"{i:09d}"}


def receive_ms(resolution: int, packed: bool, strategy: str) -> float:
    torch.multiprocessing.set_sharing_strategy(strategy)
    loader = DataLoader(Examples(resolution, packed), batch_size=BATCH, num_workers=1, prefetch_factor=4)
    batches = iter(loader)
    next(batches)
    time.sleep(1.0)
    times = []
    for n in range(BATCHES):
        if n % 4 == 0:
            time.sleep(0.05)  # (the worker refills the queue: only receiving is timed)
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    del batches
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    default = torch.multiprocessing.get_sharing_strategy()
    rows = []
    print("| strategy | batch | tensors | receive, ms |\n|---|---|---|---|")
    for strategy in ("file_descriptor", "file_system"):
        for packed in (False, True):
            for resolution in (64, 512):
                ms = receive_ms(resolution, packed, strategy)
                tensors = 2 if packed else 5
                rows.append({"strategy": strategy, "resolution": resolution, "tensors": tensors, "ms": round(ms, 3)})
                print(f"| {strategy} | {BATCH} x {resolution} px | {tensors} | {ms:.2f} |")
    torch.multiprocessing.set_sharing_strategy(default)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": BATCH, "batches": BATCHES, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
