"""The validation and hub sections: what a run samples and measures as it trains, and where it publishes the result."""

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import _check


@dataclass
class ValidationPrompt:
    """A validation prompt with sampling settings of its own; a setting left out (null) is the section's."""

    prompt: str = ""
    """The prompt."""
    negative_prompt: str | None = None
    """What guidance steers away from (with guidance_scale > 1), in place of the empty prompt."""
    seed: int | None = None
    """The seed of this prompt's row."""
    guidance_scale: float | None = None
    """Classifier-free guidance weight of this prompt's row."""

    def __post_init__(self):
        problems = []  # (an empty prompt: ValidationConfig names it)
        if self.guidance_scale is not None and self.guidance_scale < 0:
            problems.append(f"validation.prompts: {self.prompt!r} has guidance_scale {self.guidance_scale}; must be "
                            ">= 0")
        _check(problems)


@dataclass
class ValidationConfig:
    """Sample grids drawn during training, saved under output_dir/samples/ and logged to tensorboard."""

    prompts: list[str | ValidationPrompt] = field(
        default_factory=lambda: ["a red circle", "a green square", "a blue triangle"])
    """Prompts to sample, one grid row each: a text, or `{prompt: ..., negative_prompt: ..., seed: ...,
    guidance_scale: ...}` for a row with settings of its own (those left out are this section's)."""
    validation_steps: int = 300
    """Sample every this many steps (0: only after the last step)."""
    num_images_per_prompt: int = 4
    """Images per prompt (grid columns)."""
    num_inference_steps: int = 50
    """Reverse steps per sample."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight (1 disables guidance)."""
    seed: int = 0
    """Seed of the sampling noise, the same at every validation so grids are comparable."""
    loss_samples: int = 0
    """Held-out image-text pairs to measure the validation loss on at each validation and at the end (0: none): the
    objective at 10 fixed timesteps with fixed noise, as `python -m finetune.evaluate` measures it (logged as
    validation_loss and validation_loss_t<t>). The built-in set's held-out pairs are new renderings; other data
    name theirs in loss_data."""
    loss_data: dict[str, Any] = field(default_factory=dict)
    """The held-out data, as data-section keys in place of the run's (e.g. {path: "val/{000000..000001}.tar"});
    read in order, centre-cropped, unflipped."""
    compare_with_base: bool = True
    """A fine-tune of a base draws the base's own grid once, before the first step (samples/base.png), and logs
    every later grid beside it (validation/vs_base)."""
    process_strips: bool = True
    """Also draw the diffusion process at each validation: the reverse process for the first prompt (x_t and the
    predicted x_0 at 6 steps) and, once, the forward process on a training image (samples/process/)."""

    def __post_init__(self):
        problems = []
        if not self.prompts or not all(text.strip() for text in self.texts):
            problems.append(f"validation.prompts: got {self.texts!r}; give at least one non-empty prompt (a row with "
                            "settings of its own: `{prompt: <text>, seed: ...}`)")
        if self.validation_steps < 0:
            problems.append(f"validation.validation_steps: got {self.validation_steps}; must be >= 0")
        if self.num_images_per_prompt < 1 or self.num_inference_steps < 1:
            problems.append("validation.num_images_per_prompt and validation.num_inference_steps must be >= 1")
        if self.guidance_scale < 0:
            problems.append(f"validation.guidance_scale: got {self.guidance_scale}; must be >= 0")
        if self.loss_samples < 0:
            problems.append(f"validation.loss_samples: got {self.loss_samples}; must be >= 0 (0: no validation loss)")
        _check(problems)

    @property
    def texts(self) -> list[str]:
        """The prompts' texts, one per grid row."""
        return [p if isinstance(p, str) else p.prompt for p in self.prompts]

    @property
    def per_prompt(self) -> bool:
        """Whether any row has settings of its own (each row is then sampled on its own)."""
        return any(isinstance(p, ValidationPrompt) for p in self.prompts)

    def rows(self) -> list[ValidationPrompt]:
        """Every row with its settings resolved: its own, else this section's."""
        rows = [p if isinstance(p, ValidationPrompt) else ValidationPrompt(p) for p in self.prompts]
        return [ValidationPrompt(r.prompt, r.negative_prompt, self.seed if r.seed is None else r.seed,
                                 self.guidance_scale if r.guidance_scale is None else r.guidance_scale) for r in rows]


@dataclass
class HubConfig:
    """Publishing the result to the Hugging Face Hub. The token comes from `HF_TOKEN` or `hf auth login`, never
    from the config, so it is never written to the output folder."""

    push_to_hub: bool = False
    """Upload output_dir (with a generated model card) at the end of training."""
    hub_model_id: str | None = None
    """The repository to push to (`user/name`, or `name` under the token's account); needed to push."""
    private: bool = False
    """Create the repository as private (an existing repository keeps its visibility)."""
    revision: str | None = None
    """The branch to push to, created from main when missing; null: main."""
    push_checkpoints: bool = False
    """Also upload each checkpoint (`checkpoint-<step>/`) as it is written; the final push includes them."""
    license: str | None = None
    """The model card's `license` (e.g. apache-2.0, or the base's, such as creativeml-openrail-m); null: none."""

    def __post_init__(self):
        problems = []
        if self.push_to_hub and not self.hub_model_id:
            problems.append("hub.hub_model_id: needed with hub.push_to_hub: true; give the repository, e.g. "
                            "your-name/shapes-ddpm")
        if self.push_checkpoints and not self.push_to_hub:
            problems.append("hub.push_checkpoints: only works with hub.push_to_hub: true")
        if self.hub_model_id is not None and not _REPO_ID.fullmatch(self.hub_model_id):
            problems.append(f"hub.hub_model_id: got {self.hub_model_id!r}; expected `user/name` or `name` (letters, "
                            "digits, '-', '_', '.'; at most 96 characters per part)")
        _check(problems)


_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
