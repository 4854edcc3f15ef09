"""Draw images from a run's result for the page: one job at a time, in a thread, with its progress counted per
reverse step. It reuses `finetune.sample` (the same loading, scheduler swap, seeds and files as
`python -m finetune.sample`): image j starts from seed + j, and the images, `grid.png` and `settings.json` go to
`<run>/samples/ui/`, replacing the previous job's, where the page reads them.

torch and diffusers are imported by the first job, not by the server: the page loads and follows runs without them.
"""

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .runs import samplable

OUTPUT = Path("samples") / "ui"
MAX_PROMPT_CHARS, MAX_STEPS, MAX_IMAGES = 500, 1000, 8


class Busy(Exception):
    """A sampling job is already running."""


@dataclass
class SampleRequest:
    """What the page asks for; `check()` refuses values out of range, naming the field."""

    prompt: str
    num_inference_steps: int = 50
    guidance_scale: float = 1.0
    seed: int = 0
    scheduler: str = ""  # "" keeps the pipeline's own; else a name of finetune.sample.SCHEDULERS
    num_images_per_prompt: int = 4

    @classmethod
    def from_json(cls, data: dict) -> "SampleRequest":
        fields = set(cls.__dataclass_fields__)
        unknown = set(data) - fields - {"run"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(fields)}")
        try:
            request = cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError as error:
            raise ValueError(str(error)) from error
        request.check()
        return request

    def check(self) -> None:
        checks = [
            ("prompt", isinstance(self.prompt, str) and 0 < len(self.prompt.strip()) <= MAX_PROMPT_CHARS,
             f"text of 1 to {MAX_PROMPT_CHARS} characters"),
            ("num_inference_steps", _int_in(self.num_inference_steps, 1, MAX_STEPS), f"a whole number 1-{MAX_STEPS}"),
            ("guidance_scale", isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale <= 50,
             "a number from 0 to 50 (1: off)"),
            ("seed", _int_in(self.seed, 0, 2**32 - 1), "a whole number from 0 to 2^32 - 1"),
            ("scheduler", self.scheduler in ("", *SCHEDULER_NAMES), f"one of {', '.join(SCHEDULER_NAMES)} or empty"),
            ("num_images_per_prompt", _int_in(self.num_images_per_prompt, 1, MAX_IMAGES),
             f"a whole number 1-{MAX_IMAGES}"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {allowed}")


SCHEDULER_NAMES = ("ddpm", "ddim", "dpm-solver", "euler")  # finetune.sample.SCHEDULERS (tests/test_ui.py checks)


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class Sampler:
    """Runs one sampling job at a time and keeps the last loaded pipeline (reloaded when its files change)."""

    def __init__(self, root: Path):
        self.root = root
        self.guard = threading.Lock()
        self.job: dict = {"state": "none"}
        self.loaded: tuple | None = None  # (folder, version, pipeline, its own scheduler)

    def start(self, folder: Path, request: SampleRequest) -> dict:
        """Start drawing `request` from the result in `folder` (a run folder under the root) in a thread."""
        if not samplable(folder):
            raise ValueError(f"{folder.relative_to(self.root.resolve())} has no exported pipeline or LoRA weights "
                             "yet: sample from a finished run")
        with self.guard:
            if self.job["state"] in ("loading", "sampling"):
                raise Busy("a sampling job is running; wait for it to finish")
            self.job = {"id": int(time.time() * 1000), "run": folder.relative_to(self.root.resolve()).as_posix(),
                        "state": "loading", "step": 0, "total": request.num_inference_steps, "error": None,
                        "request": asdict(request)}
            job = self.job
        threading.Thread(target=self._run, args=(job, folder, request), daemon=True).start()
        return dict(job)

    def state(self) -> dict:
        return dict(self.job)

    def _run(self, job: dict, folder: Path, request: SampleRequest) -> None:
        try:
            job.update(self._draw(job, folder, request), state="done")
        except Exception as error:  # noqa: BLE001 - shown on the page; the server goes on
            job.update(state="failed", error=f"{type(error).__name__}: {error}")

    def _draw(self, job: dict, folder: Path, request: SampleRequest) -> dict:
        import torch

        from .. import sample

        pipeline = self._pipeline(folder)
        if request.scheduler:
            sample.swap_scheduler(pipeline, request.scheduler)
        trained = pipeline.scheduler.config.num_train_timesteps
        if request.num_inference_steps > trained:
            raise ValueError(f"num_inference_steps={request.num_inference_steps}: at most the {trained} timesteps "
                             "the model was trained with")
        job["state"] = "sampling"

        def count(pipe, i, t, tensors):
            job["step"] = i + 1
            return {}

        n = request.num_images_per_prompt
        generators = [torch.Generator().manual_seed(request.seed + j) for j in range(n)]
        images = pipeline(request.prompt, num_inference_steps=request.num_inference_steps,
                          guidance_scale=request.guidance_scale, num_images_per_prompt=n, generator=generators,
                          output_type="pil", callback_on_step_end=count).images
        out = folder / OUTPUT
        settings = {"folder": str(folder), "prompts": [request.prompt], **asdict(request),
                    "scheduler": type(pipeline.scheduler).__name__}
        written = sample.save_samples([images], [request.prompt], request.seed, out, settings)
        relative = out.relative_to(self.root.resolve()).as_posix()
        return {"grid": f"{relative}/{written['grid']}", "images": [f"{relative}/{name}" for name in written["images"]],
                "version": time.time()}

    def _pipeline(self, folder: Path):
        """The pipeline of `folder` with its own scheduler, loaded as `python -m finetune.sample` loads it
        (safetensors only; a LoRA output on its base), kept while its files stay the same."""
        import torch

        from ..results import hide_library_progress, load_result

        version = [p.stat().st_mtime for p in sorted(folder.glob("*")) if p.suffix in (".json", ".safetensors")]
        version += [p.stat().st_mtime for p in sorted(folder.glob("*/*.safetensors"))]
        if self.loaded and self.loaded[:2] == (folder, version):
            pipeline, scheduler = self.loaded[2:]
            pipeline.scheduler = scheduler
            return pipeline
        hide_library_progress()
        self.loaded = None
        pipeline = load_result(str(folder))
        pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
        pipeline.set_progress_bar_config(disable=True)
        self.loaded = (folder, version, pipeline, pipeline.scheduler)
        return pipeline
