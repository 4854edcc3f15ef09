"""Text-to-image sampling with a DDPM noise predictor: the reverse process, guided by a prompt.

This file travels inside every pipeline folder the trainer writes, so downstream code runs it with only
torch, diffusers and transformers installed:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
"""

import inspect
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class TextToImageDDPMPipelineOutput(ImagePipelineOutput):
    """Generated images and, when asked for, the reverse trajectory.

    Args:
        images: PIL images, a numpy array (N, H, W, 3) in [0, 1], or a tensor (N, 3, H, W) in [0, 1].
        trajectory: with `return_trajectory=True`, every x_t from pure noise x_T to the final x_0
            (num_inference_steps + 1 tensors, in the model's space: pixels or latents).
        pred_original_samples: with `return_trajectory=True`, the predicted x_0 at every step.
        timesteps: the timesteps of the reverse loop, in order.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: list[torch.Tensor] | None = None
    pred_original_samples: list[torch.Tensor] | None = None
    timesteps: list[int] | None = None


class TextToImageDDPMPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Generate images from text with a text-conditioned noise predictor.

    Components:
        unet: `UNet2DConditionModel` predicting noise (or v, or x_0) from x_t, t and the text embedding.
        scheduler: any diffusers scheduler; the trained model ships with `DDPMScheduler` (DDPM, Ho et al. 2020),
            and DDIM / DPM-Solver / Euler swap in with `from_config(pipe.scheduler.config)`.
        text_encoder: a transformers text model whose last hidden state conditions the UNet (e.g. `CLIPTextModel`).
        tokenizer: the text encoder's tokenizer.
        vae: optional `AutoencoderKL`; when present the model works in its latent space.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        for model in (unet, text_encoder, vae):
            if isinstance(model, torch.nn.Module):
                own_aligned_storage(model)
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.vae_scale_factor = scale
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale, do_normalize=True)

    # ---- prompts ---------------------------------------------------------------------------------

    def encode_prompt(self, prompt: list[str], device: torch.device) -> torch.Tensor:
        """Tokenise (pad to the tokenizer's max length, as in training) and encode to the last hidden state. A
        textual-inversion token of several vectors (`load_textual_inversion`) is spelt out into all of them."""
        tokens = self.tokenizer(
            self.maybe_convert_prompt(prompt, self.tokenizer), padding="max_length",
            max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(device), return_dict=False)[0]

    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                     num_images_per_prompt, latents, output_type, callback_on_step_end_tensor_inputs):
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        ):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
        batch = 1 if isinstance(prompt, str) else len(prompt)
        if negative_prompt is not None:
            if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch}; give one each"
                )
            if not isinstance(negative_prompt, (str, list)):
                raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}")
        # The UNet halves the size at every level but the last; a VAE divides it by its factor first.
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, value in [("height", height), ("width", width)]:
            if value is not None and (not isinstance(value, int) or value <= 0 or value % multiple):
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {value!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0 (1 disables guidance), got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if latents is not None and latents.shape[0] != batch * num_images_per_prompt:
            raise ValueError(
                f"`latents` has batch size {latents.shape[0]}, expected {batch * num_images_per_prompt}"
                " (prompts x num_images_per_prompt)"
            )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {sorted(unknown)}; allowed: {self._callback_tensor_inputs}"
            )

    # ---- the reverse process ---------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_trajectory: bool = False,
    ) -> TextToImageDDPMPipelineOutput | tuple:
        """Sample images for `prompt`.

        Args:
            prompt: the text (or texts) to draw.
            negative_prompt: what to steer away from under guidance; defaults to the empty caption the model
                was trained with for classifier-free guidance.
            height, width: output size in pixels; defaults to the UNet's `sample_size` (times the VAE factor).
            num_inference_steps: reverse steps; fewer than the training steps skips timesteps.
            guidance_scale: classifier-free guidance weight w in eps = eps_u + w (eps_c - eps_u); 1 (or less)
                disables guidance and runs the UNet once per step.
            num_images_per_prompt: images drawn for each prompt.
            generator: torch generator(s) for the initial noise and every reverse step.
            latents: the initial noise x_T, to reuse across calls.
            output_type: "pil", "np", "pt", or "latent" (the final x_0 in the model's space).
            return_dict: return a `TextToImageDDPMPipelineOutput` instead of a tuple.
            callback_on_step_end: called as `fn(pipe, i, t, tensors)` after each step; may return new `latents`.
            callback_on_step_end_tensor_inputs: which tensors to hand to the callback (default: latents).
            return_trajectory: also return every x_t and predicted x_0 of the reverse process.
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                          num_images_per_prompt, latents, output_type, callback_on_step_end_tensor_inputs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        device = self._execution_device
        do_guidance = guidance_scale > 1.0

        # 1. Encode the prompts (and the unconditional ones for guidance) once.
        prompt_embeds = self.encode_prompt(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        negative_prompt_embeds = None
        if do_guidance:
            negative_prompt_embeds = self.encode_prompt(negatives, device).repeat_interleave(num_images_per_prompt, 0)
        cond = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_guidance else prompt_embeds
        cond = cond.to(self.unet.dtype)

        # 2. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 3. Initial noise x_T.
        scale = self.vae_scale_factor
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (
            len(prompts) * num_images_per_prompt,
            self.unet.config.in_channels,
            (height or size[0] * scale) // scale,
            (width or size[1] * scale) // scale,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
            latents = latents.to(device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        # Only a scheduler whose step draws noise takes the generator (PNDM's and LMS's `step` refuse it).
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        trajectory = [latents] if return_trajectory else None
        pred_original_samples = [] if return_trajectory else None

        # 4. Reverse loop: predict, guide, step.
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
                if do_guidance:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                step = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
                latents = step.prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    tensors = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, tensors) or {}
                    latents = returned.get("latents", latents)
                    if "prompt_embeds" in returned or "negative_prompt_embeds" in returned:
                        prompt_embeds = returned.get("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = returned.get("negative_prompt_embeds", negative_prompt_embeds)
                        cond = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_guidance else prompt_embeds
                        cond = cond.to(self.unet.dtype)
                if return_trajectory:
                    trajectory.append(latents)
                    pred_original_samples.append(getattr(step, "pred_original_sample", None))
                progress_bar.update()

        # 5. Decode to pixels and post-process.
        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                latents = latents / self.vae.config.scaling_factor
                pixels = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            else:
                pixels = latents
            images = self.image_processor.postprocess(pixels.float(), output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return TextToImageDDPMPipelineOutput(
            images=images,
            trajectory=trajectory,
            pred_original_samples=pred_original_samples,
            timesteps=[int(t) for t in timesteps],
        )

    # ---- portable folders ------------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args, **kwargs):
        """When loaded through this class (the project installed), use the installed code for the pipeline and
        its scheduler instead of the copies in the folder, so no `trust_remote_code` is needed."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
            scheduler_entry = config.get("scheduler")
            if isinstance(scheduler_entry, list) and scheduler_entry[0] == _LOCAL_SCHEDULER_MODULE:
                config["scheduler"] = [_installed_scheduler_module(), scheduler_entry[1]]
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save as diffusers does, then make the folder self-contained: this file at the root, a custom
        scheduler's file in `scheduler/`, and `model_index.json` naming them, so that
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without this project."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)

        pipeline_file = sys.modules[type(self).__module__].__file__
        pipeline_module = os.path.splitext(os.path.basename(pipeline_file))[0]
        shutil.copyfile(pipeline_file, os.path.join(save_directory, pipeline_module + ".py"))
        index["_class_name"] = [pipeline_module, type(self).__name__]

        scheduler_module = type(self.scheduler).__module__
        if scheduler_module.split(".")[0] != "diffusers":
            scheduler_file = sys.modules[scheduler_module].__file__
            shutil.copyfile(scheduler_file, os.path.join(save_directory, "scheduler", _LOCAL_SCHEDULER_MODULE + ".py"))
            index["scheduler"] = [_LOCAL_SCHEDULER_MODULE, type(self.scheduler).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


# torch allocates CPU tensors at 64-byte boundaries; its vectorised kernels split a reduction into an unaligned head,
# aligned blocks and a tail, so the same numbers at another alignment can be summed in another order.
_ALIGNMENT = 64


def own_aligned_storage(model: torch.nn.Module) -> None:
    """Give weights that sit at an unaligned address (`from_pretrained` maps them straight out of the safetensors
    file, at offsets that are multiples of 8 bytes) storage of their own. Without it a loaded pipeline computes
    other float32 roundings (up to 1e-6 in images) than the pipeline that was saved, whose weights torch
    allocated; with it both compute the same bits."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
            tensor.data = tensor.data.clone()


# The scheduler file's name inside a saved folder (`scheduler/scheduling_ddpm.py`).
_LOCAL_SCHEDULER_MODULE = "scheduling_ddpm"


def _installed_scheduler_module() -> str:
    """The import path of the installed scheduler module that sits beside this file."""
    package = __name__.rpartition(".")[0]
    name = f"{package}.{_LOCAL_SCHEDULER_MODULE}" if package else _LOCAL_SCHEDULER_MODULE
    __import__(name)
    return name
