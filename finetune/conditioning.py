"""Is the model using the text? How far the prompt moves the noise prediction, measured at each validation.

On the reverse trajectory that the validation grid was drawn along (so every x_t is one the model meets when
sampling), at three points of the reverse process (its first step, halfway and 90% of the way), the model's
prediction with each image's own prompt is compared with its prediction for the empty prompt and for another
validation prompt (the next one in the list):

    prompt_vs_empty   = mean |eps(x_t, t, c) - eps(x_t, t, "")|     guidance has something to amplify
    between_prompts   = mean |eps(x_t, t, c) - eps(x_t, t, c')|     the model tells the prompts apart

When a model follows its prompts, swapping one prompt for another moves its prediction further than dropping the
prompt does (the empty prompt's prediction is the average over captions): between_prompts / prompt_vs_empty at the
first step, where the layout is decided, was 1.30 for the shapes default and 1.44 for the digits recipe. A model
that draws good images but ignores the text (the digits from scratch with the default weighting: 9% adherence,
chance) still reacts to having a caption, but hardly to which one: 0.62 (benchmarks/conditioning/,
results/validation_gaps.json). Below IGNORED_RATIO the trainer warns. The figures are logged to the trackers
(`conditioning/...`) and printed at each validation.
"""

import logging

import torch

from .config import DataConfig
from .data import caption_texts

logger = logging.getLogger(__name__)

# Where on the reverse process to measure: the fraction of its steps already taken.
BANDS = {"start": 0.0, "middle": 0.5, "end": 0.9}
# between_prompts at the start below this fraction of prompt_vs_empty: the model hardly tells the prompts apart
# (measured: 0.62 for a model at chance, 1.30 and 1.44 for models that follow their prompts).
IGNORED_RATIO = 1.0


@torch.no_grad()
def prompt_gaps(pipeline, prompts: list[str], trajectory: list[torch.Tensor], timesteps: list[int]) -> dict:
    """`conditioning/<gap>_<band>` for the images of `trajectory` (drawn for `prompts`, the same number each, prompt
    by prompt), at the BANDS of the reverse process."""
    unet, device = pipeline.unet, pipeline.unet.device
    per_prompt = len(trajectory[0]) // len(prompts)
    own = pipeline.encode_prompt(list(prompts), device).to(unet.dtype)
    embeddings = {"own": own.repeat_interleave(per_prompt, dim=0),
                  "empty": pipeline.encode_prompt([""], device).to(unet.dtype).expand(len(trajectory[0]), -1, -1),
                  "other": own.roll(-1, dims=0).repeat_interleave(per_prompt, dim=0)}
    gaps = {}
    for band, done in BANDS.items():
        index = min(int(done * len(timesteps)), len(timesteps) - 1)
        t = timesteps[index]
        x = pipeline.scheduler.scale_model_input(trajectory[index].to(device, unet.dtype), t)
        eps = {name: unet(x, t, encoder_hidden_states=cond, return_dict=False)[0].float()
               for name, cond in embeddings.items()}
        gaps[f"conditioning/prompt_vs_empty_{band}"] = (eps["own"] - eps["empty"]).abs().mean().item()
        if len(set(prompts)) > 1:
            gaps[f"conditioning/between_prompts_{band}"] = (eps["own"] - eps["other"]).abs().mean().item()
    return gaps


def describe(gaps: dict) -> str:
    """One line for the progress output: the two gaps at the start of the reverse process, and a warning when the
    prompts are barely told apart."""
    empty = gaps["conditioning/prompt_vs_empty_start"]
    between = gaps.get("conditioning/between_prompts_start")
    line = f"the prompt moves the first reverse step's prediction by {empty:.4f} against the empty prompt"
    if between is None:
        return line
    line += f" and by {between:.4f} against another prompt"
    if between <= IGNORED_RATIO * empty:
        ratio = between / max(empty, 1e-12)
        line += (f"; warning: the model hardly tells the prompts apart (another prompt moves it {ratio:.0%} as far as "
                 "the empty one; models that follow their prompts measure over 100%), so its images will not follow "
                 "them: train longer, or weight the noisy steps more (configs/digits.yaml, benchmarks/conditioning/)")
    return line


def caption_problems(captions: list[str], tokenizer) -> list[str]:
    """What in a sample of the training captions keeps a model from learning to follow prompts: no two captions
    differ, or the tokenizer maps most of their words to its unknown token."""
    problems = []
    distinct = {c.strip().lower() for c in captions if isinstance(c, str) and c.strip()}
    if len(distinct) <= 1:
        said = f"all read {next(iter(distinct))!r}" if distinct else "are all empty"
        problems.append(f"the first {len(captions)} captions {said} ({len(distinct)} distinct): a model cannot learn "
                        "to follow prompts from them (fine for one concept, as in DreamBooth); check "
                        "data.caption_column")
    unknown = tokenizer.unk_token_id
    if distinct and unknown is not None and unknown not in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                            tokenizer.pad_token_id):
        ids = [i for text in list(distinct)[:1000] for i in tokenizer(text, add_special_tokens=False).input_ids]
        share = ids.count(unknown) / max(len(ids), 1)
        if share > 0.5:
            problems.append(f"the tokenizer maps {share:.0%} of the captions' tokens to its unknown token "
                            f"{tokenizer.unk_token!r}: its vocabulary was built from other captions (a from-scratch "
                            "model's word-level tokenizer knows only the words of its own data); train from scratch "
                            "on these captions, or start from a base with a subword tokenizer")
    return problems


def check_captions(data: DataConfig, source, tokenizer, sample: int = 1000) -> None:
    """Warn, at start-up, about what `caption_problems` finds in the first `sample` captions of the data."""
    for problem in caption_problems(caption_texts(data, source, limit=sample)[:sample], tokenizer):
        logger.warning(f"data: {problem}")
