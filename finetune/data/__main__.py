"""Write the built-in shapes dataset as webdataset shards: `python -m finetune.data OUT_DIR [--num-samples N]`."""

from ..cli import ToolParser, run
from .shapes import DEFAULT_COLORS, HUES, write_shards


def main(argv: list[str] | None = None) -> list:
    parser = ToolParser(prog="python -m finetune.data", description=__doc__)
    parser.add_argument("out_dir", help="folder to write 00000.tar, 00001.tar, ... into")
    parser.add_argument("--num-samples", type=int, default=6000, help="how many image-caption pairs to draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawing (the same seed, the same shards)")
    parser.add_argument("--colors", nargs="+", default=list(DEFAULT_COLORS), choices=list(HUES),
                        help="colours to draw (purple is held out by default)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    shards = write_shards(args.out_dir, args.num_samples, seed=args.seed, colors=tuple(args.colors))
    print(f"wrote {args.num_samples} samples in {len(shards)} shards to {args.out_dir}")
    return shards


if __name__ == "__main__":
    run(main)
