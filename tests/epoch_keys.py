"""Run under `accelerate launch`: read one epoch of the configured data the way the trainer does (its
`build_data`, so each process takes its own part) and write the sample keys this process saw to
`OUT/keys_<rank>.json`, with the distributed type.

    accelerate launch ... tests/epoch_keys.py OUT [section.key=value ...]
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from finetune.config import load_config  # noqa: E402
from finetune.data import build_source, caption_texts  # noqa: E402
from finetune.models import build_tokenizer  # noqa: E402
from finetune.train import build_data  # noqa: E402

out, overrides = Path(sys.argv[1]), sys.argv[2:]
config = load_config(None, overrides)
accelerator = Accelerator(cpu=True)
with accelerator.main_process_first():
    source = build_source(config.data, config.train.seed)
tokenizer = build_tokenizer(caption_texts(config.data, source), config.model.max_caption_tokens)
dataset, loader = build_data(config, SimpleNamespace(tokenizers=[tokenizer]), source, accelerator)
dataset.set_epoch(0)
keys = [key for batch in loader for key in batch["key"]]
out.mkdir(parents=True, exist_ok=True)
(out / f"keys_{accelerator.process_index}.json").write_text(json.dumps(
    {"keys": keys, "distributed_type": accelerator.distributed_type.value, "counts": dict(dataset.counts)}))
