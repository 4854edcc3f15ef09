"""Write the built-in shapes dataset: `python -m finetune.data OUT_DIR [--num-samples N] [--seed S]`."""

import argparse

from .shapes import DEFAULT_COLORS, HUES, write_shards

parser = argparse.ArgumentParser(prog="python -m finetune.data", description=__doc__)
parser.add_argument("out_dir", help="folder to write 00000.tar, 00001.tar, ... into")
parser.add_argument("--num-samples", type=int, default=6000)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--colors", nargs="+", default=list(DEFAULT_COLORS), choices=list(HUES),
                    help="colours to draw (purple is held out by default)")
args = parser.parse_args()
shards = write_shards(args.out_dir, args.num_samples, seed=args.seed, colors=tuple(args.colors))
print(f"wrote {args.num_samples} samples in {len(shards)} shards to {args.out_dir}")
