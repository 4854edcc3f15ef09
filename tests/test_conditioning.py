"""Whether the model uses the text, measured at validation: how far the prompt moves the noise prediction."""

import pytest
import torch

from finetune import conditioning
from finetune.config import ValidationConfig
from finetune.validation import sample_grid

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _gaps(pipe) -> dict:
    gaps = {}
    sample_grid(pipe, ValidationConfig(prompts=PROMPTS, num_inference_steps=4, num_images_per_prompt=2), gaps)
    return gaps


def test_a_model_that_reads_the_text_moves_its_prediction(tiny_pipeline):
    gaps = _gaps(tiny_pipeline)
    assert set(gaps) == {f"conditioning/{gap}_{band}" for gap in ("prompt_vs_empty", "between_prompts")
                         for band in conditioning.BANDS}
    assert all(value > 0 for value in gaps.values()), gaps


@pytest.mark.parametrize(("between", "warned"), [(0.0008, True), (0.3532, False), (0.0061, False)])
def test_the_warning_parts_models_that_ignore_the_text_from_those_that_follow_it(between, warned):
    """The first-step gaps measured on finished runs (benchmarks/conditioning/results/validation_gaps.json): the
    digits from scratch with the default weighting (9% adherence, chance), the digits recipe (96%), the shapes
    default (colour 100%)."""
    empty = {0.0008: 0.0014, 0.3532: 0.2445, 0.0061: 0.0047}[between]
    line = conditioning.describe({"conditioning/prompt_vs_empty_start": empty,
                                  "conditioning/between_prompts_start": between})
    assert ("warning: the model hardly tells the prompts apart" in line) == warned, line


def test_the_gaps_are_the_predictions_differences(tiny_pipeline):
    """At the first reverse step, recomputed by hand: the same noise, each image's own prompt against the empty
    one and against the next prompt."""
    gaps = _gaps(tiny_pipeline)
    pipe = tiny_pipeline
    x = torch.randn((6, pipe.unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[0]
    own = pipe.encode_prompt(PROMPTS, "cpu").repeat_interleave(2, 0)
    empty = pipe.encode_prompt([""], "cpu").expand(6, -1, -1)
    other = pipe.encode_prompt(PROMPTS[1:] + PROMPTS[:1], "cpu").repeat_interleave(2, 0)
    with torch.no_grad():
        eps = {name: pipe.unet(x, t, encoder_hidden_states=cond).sample for name, cond in
               (("own", own), ("empty", empty), ("other", other))}
    assert torch.isclose(torch.tensor(gaps["conditioning/prompt_vs_empty_start"]),
                         (eps["own"] - eps["empty"]).abs().mean(), rtol=1e-5)
    assert torch.isclose(torch.tensor(gaps["conditioning/between_prompts_start"]),
                         (eps["own"] - eps["other"]).abs().mean(), rtol=1e-5)


def test_a_model_that_ignores_the_text_is_warned_about(tiny_pipeline, monkeypatch):
    """Every prompt encoded alike (as by a text encoder that learnt nothing): no gap, and the warning."""
    encode = type(tiny_pipeline).encode_prompt
    monkeypatch.setattr(type(tiny_pipeline), "encode_prompt", lambda self, prompt, device: encode(
        self, [""] * len(prompt), device))
    gaps = _gaps(tiny_pipeline)
    # (against the empty prompt, only the rounding of a batch of 1 against a batch of 6 remains)
    assert all(value == 0 if "between" in name else value < 1e-6 for name, value in gaps.items()), gaps
    assert "warning: the model hardly tells the prompts apart" in conditioning.describe(gaps)


def test_captions_that_cannot_teach_the_text_are_named(tiny_components):
    """All alike, all empty, or mostly words the tokenizer does not know (a from-scratch model's word-level
    tokenizer, built from the shapes captions, meeting digit captions)."""
    tokenizer = tiny_components.tokenizer
    assert conditioning.caption_problems(PROMPTS * 10, tokenizer) == []
    alike = conditioning.caption_problems(["a photo of sks dog"] * 20, tokenizer)
    assert len(alike) == 1 and "the first 20 captions all read 'a photo of sks dog' (1 distinct)" in alike[0]
    assert "are all empty (0 distinct)" in conditioning.caption_problems(["", " "], tokenizer)[0]
    digits = conditioning.caption_problems(["the handwritten digit seven", "number eight, written by hand"],
                                           tokenizer)
    assert len(digits) == 1 and "the tokenizer maps 90% of the captions' tokens to its unknown token '<unk>'" \
        in digits[0], digits
