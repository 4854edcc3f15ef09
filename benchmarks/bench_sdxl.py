"""A tiny SDXL-shaped LoRA job on the CPU: the trainer against the way diffusers' SDXL LoRA example trains.

The base has SDXL base 1.0's own block and layer counts (2 ResNets per level, 1/2/10 transformer blocks, a 12- and a
32-layer text encoder) with every width shrunk (tests/conftest.py, `build_tiny_sdxl_pipeline(real_depths=True)`);
64 images of 16 px, batch 8, LoRA rank 4 on to_q, to_k, to_v, to_out.0, fp32.

- ours: `finetune/train.py` with `data.cache` (each image's latent distribution and each caption's embeddings from
  both encoders kept after their first pass), step times as the trainer logs them;
- reference: the job as diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py runs each step (written
  out below from that script: the VAE encode of the batch, both text encoders' penultimate states and the pooled
  embedding, the time ids built per sample, UNet, MSE, backward, clipping at 1.0, AdamW, `loss.item()`).

Reported: median step times and samples/s of each, after warm-up, and their ratio (the issue's target: >= 1.5x).
The reference is timed before and after ours (both in this process) and the faster of the two counts.
With `--compile` both compile their UNet: ours with `train.compile`, the reference as `accelerate launch
--dynamo_backend inductor` would for the example (the UNet it prepares; the VAE and the frozen encoders stay eager).

    python benchmarks/bench_sdxl.py [--steps 30] [--compile] [--json benchmarks/results/sdxl-cpu.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_step import timed, trainer_step_times  # noqa: E402
from tests.conftest import build_tiny_sdxl_pipeline  # noqa: E402

BATCH, RANK, TARGETS, WARMUP = 8, 4, ["to_q", "to_k", "to_v", "to_out.0"], 5
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]


def write_images(folder: Path, count: int = 64) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} square number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


class ReferenceLoop:
    """train_text_to_image_lora_sdxl.py's step on this base and data (fp32, no text-encoder training)."""

    def __init__(self, base: Path, images: Path, compile_unet: bool = False):
        self.tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=f) for f in ("tokenizer", "tokenizer_2")]
        self.encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
                         CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")]
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        for model in (self.unet, self.vae, *self.encoders):
            model.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.unet.train()  # (the example's, at every epoch)
        if compile_unet:
            self.unet = torch.compile(self.unet)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
        self.examples = [self._example(images / row["file_name"], row["text"]) for row in rows]
        loader = torch.utils.data.DataLoader(self.examples, batch_size=BATCH, shuffle=True,
                                             collate_fn=self._collate)
        self.loader, self.batches, self.train_loss = loader, self._endless(loader), 0.0

    def _example(self, path: Path, caption: str) -> dict:
        image = Image.open(path).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1
        ids = [t(caption, padding="max_length", max_length=t.model_max_length, truncation=True,
                 return_tensors="pt").input_ids[0] for t in self.tokenizers]
        return {"pixel_values": pixels, "input_ids_one": ids[0], "input_ids_two": ids[1],
                "original_sizes": (image.height, image.width), "crop_top_lefts": (0, 0)}

    @staticmethod
    def _collate(examples: list[dict]) -> dict:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "input_ids_one": torch.stack([e["input_ids_one"] for e in examples]),
                "input_ids_two": torch.stack([e["input_ids_two"] for e in examples]),
                "original_sizes": [e["original_sizes"] for e in examples],
                "crop_top_lefts": [e["crop_top_lefts"] for e in examples]}

    @staticmethod
    def _endless(loader):
        while True:
            yield from loader

    def step(self) -> None:
        batch = next(self.batches)
        model_input = self.vae.encode(batch["pixel_values"]).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
        noisy = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        target_size = tuple(batch["pixel_values"].shape[-2:])
        add_time_ids = torch.cat([torch.tensor([list(s + c + target_size)])
                                  for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
        embeds = []
        for encoder, ids in zip(self.encoders, (batch["input_ids_one"], batch["input_ids_two"])):
            output = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled, hidden = output[0], output[-1][-2]
            embeds.append(hidden)
        model_pred = self.unet(noisy, timesteps, torch.concat(embeds, dim=-1),
                               added_cond_kwargs={"time_ids": add_time_ids.float(), "text_embeds": pooled},
                               return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.train_loss += loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="both compile their UNet (see above)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_sdxl_pipeline(Path(tmp) / "base", real_depths=True)
        images = write_images(Path(tmp) / "images")
        overrides = [f"model.pretrained_model_name_or_path={base}", "model.train_text_encoder=false",
                     "lora.enabled=true", f"lora.rank={RANK}", f"lora.alpha={RANK}",
                     f"lora.target_modules=[{', '.join(TARGETS)}]", "data.source=imagefolder",
                     f"data.path={images}", "data.resolution=16", "data.cache=true", "data.caption_dropout=0.0",
                     f"train.train_batch_size={BATCH}", "train.use_ema=false", "train.snr_gamma=null",
                     "train.mixed_precision=no", f"train.cpu_threads={torch.get_num_threads()}",
                     f"train.compile={str(args.compile).lower()}"]
        reference = ReferenceLoop(base, images, compile_unet=args.compile)
        theirs_before = timed(reference.step, torch.device("cpu"), args.steps, WARMUP)
        ours = trainer_step_times(None, overrides, args.steps, str(Path(tmp) / "run"))
        theirs_after = timed(reference.step, torch.device("cpu"), args.steps, WARMUP)
    # The reference is timed before and after the trainer (which runs in this process) and its faster median
    # counts: whatever the order does to a step, the comparison does not favour ours.
    ours_s = statistics.median(ours)
    theirs_s = min(statistics.median(theirs_before), statistics.median(theirs_after))
    result = {"steps_timed": args.steps, "batch": BATCH, "threads": torch.get_num_threads(), "compile": args.compile,
              "ours_step_s": round(ours_s, 4), "reference_step_s": round(theirs_s, 4),
              "reference_step_s_before_and_after_ours": [round(statistics.median(theirs_before), 4),
                                                         round(statistics.median(theirs_after), 4)],
              "ours_samples_per_s": round(BATCH / ours_s, 1), "reference_samples_per_s": round(BATCH / theirs_s, 1),
              "ratio": round(theirs_s / ours_s, 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
