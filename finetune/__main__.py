"""One front door to the tools: `finetune <command> [arguments]` (or `python -m finetune <command>`).

  train       train or fine-tune (one process; for several: accelerate launch -q finetune/train.py ...)
  sample      draw images from a result, a LoRA output or a checkpoint
  evaluate    measure a result: prompt adherence, held-out loss, CLIP score, FID
  visualize   the forward and reverse process of a result, as images
  export      turn a checkpoint-N folder into a pipeline (or LoRA) folder
  hub         push a finished run to the Hugging Face Hub
  data        write the built-in shapes dataset as webdataset shards
  reference   print the config reference (every key, its default and meaning)
  ui          a local web page to start, watch and sample runs (needs the ui extra)

`finetune <command> --help` lists each command's options.
"""

import difflib
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from .cli import run

COMMANDS = {name: f"finetune.{name}" for name in
            ("train", "sample", "evaluate", "visualize", "export", "hub", "data", "reference", "ui")}


def package_version() -> str:
    try:
        return version("finetune-ddpm")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None):
    """Run `finetune.<command>.main` with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "--version":
        print(f"finetune-ddpm {package_version()}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"error: {argv[0]!r} is not a command; the commands are {', '.join(COMMANDS)}"
              + (f" (did you mean {close[0]}?)" if close else ""), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]] if argv[0] != "data" else "finetune.data.__main__")
    if argv[0] == "train":  # as finetune/train.py: a run of several processes leaves without teardown (gloo)
        from . import distributed

        distributed.run_and_leave(lambda: run(module.main, argv[1:]))
        return 0
    result = run(module.main, argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
