"""Textual inversion (`textual_inversion:`): new tokens whose embedding rows train, in every text encoder of the
base (SDXL's two), alone or beside a LoRA (pivotal tuning).

Each placeholder gets `num_vectors` tokens, named as diffusers' `load_textual_inversion` names a multi-vector
embedding (`<sks>`, `<sks>_1`, ...), so a prompt's `<sks>` is spelt out into all of them the way diffusers' pipelines
do it (`TextualInversionLoaderMixin.maybe_convert_prompt`), in training (`families.tokenize`) as downstream. Only
the new rows train: the whole embedding matrix is the trained parameter (as in diffusers' textual_inversion.py), and
after every optimizer step the other rows are put back (an optimizer step hook), so no optimizer, weight decay or
momentum can move them.

The result is one file per placeholder, `<name>.safetensors` in the output folder: `{"emb_params": (vectors, width)}`
for one text encoder (SD-1.x/2.x), `{"clip_l": ..., "clip_g": ...}` for SDXL's two: the layouts AUTOMATIC1111 /
Forge (`modules/textual_inversion/textual_inversion.py`: a single tensor, or clip_l/clip_g), ComfyUI
(`comfy/sd1_clip.py load_embed`: `emb_params`, or `clip_l`/`clip_g`) and diffusers (`load_textual_inversion`: a
single key, with `token=`; SDXL's parts passed one by one with their encoder) load.
"""

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .cli import UserError
from .config import TextualInversionConfig

KOHYA_LORA, BUNDLED_LORA = "lora_kohya.safetensors", "lora_kohya_bundled.safetensors"
KEEP = "_finetune_kept_rows"  # on a trained embedding matrix: (first new row, last new row + 1, the rows to keep)


def token_names(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of one placeholder's vectors, as diffusers' loader names them."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_tokens(components, config: TextualInversionConfig) -> None:
    """Add every placeholder's tokens to each tokenizer and rows for them to its text encoder, each row the mean
    embedding of its initializer word's tokens (no placeholders: nothing)."""
    if not config.enabled:
        return
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        names = [name for p in config.placeholder_tokens for name in token_names(p, config.num_vectors)]
        vocabulary = tokenizer.get_vocab()
        taken = [name for name in names if name in vocabulary or f"{name}</w>" in vocabulary]
        if taken:
            raise UserError(f"textual_inversion.placeholder_tokens: {taken[0]!r} is already a word of the base's "
                            "tokenizer; choose one it does not know, e.g. <sks>")
        rows = encoder.get_input_embeddings().num_embeddings
        tokenizer.add_tokens(names)
        unread = [name for name in names if tokenizer.tokenize(name) != [name]]
        if unread:  # (CLIP's tokenizer lowercases the text first: <Sks> would never be read as <Sks>)
            raise UserError(f"textual_inversion.placeholder_tokens: the tokenizer does not read {unread[0]!r} back as "
                            "one token (CLIP's lowercases); use lowercase, e.g. <sks>")
        ids = tokenizer.convert_tokens_to_ids(names)
        encoder.resize_token_embeddings(max(rows, max(ids) + 1), mean_resizing=False)  # (overwritten below)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for placeholder, word in zip(config.placeholder_tokens, config.initializer_tokens):
                start = tokenizer(word, add_special_tokens=False).input_ids
                if not start:
                    raise UserError(f"textual_inversion.initializer_tokens: {word!r} gives no token")
                for name in token_names(placeholder, config.num_vectors):
                    weight[tokenizer.convert_tokens_to_ids(name)] = weight[start].mean(dim=0)


def train_rows(components, config: TextualInversionConfig, trained: list, alone: bool) -> list:
    """Make the new rows train: each text encoder's embedding matrix becomes its one trainable weight (the rest of it
    frozen), and the encoders join the trained models (`alone`: nothing else trains, the UNet included). No
    placeholders: `trained` as it is."""
    if not config.enabled:
        return trained
    if alone:
        for model in (components.unet, *components.text_encoders):
            model.requires_grad_(False)
        trained = []
    names = [name for p in config.placeholder_tokens for name in token_names(p, config.num_vectors)]
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        weight = encoder.get_input_embeddings().weight  # (the encoder is frozen already, its LoRA adapters not)
        new = sorted(tokenizer.convert_tokens_to_ids(names))
        assert new == list(range(new[0], new[0] + len(new))), new  # (added in one call: consecutive ids)
        weight.requires_grad_(True)
        setattr(weight, KEEP, (new[0], new[-1] + 1, weight.detach().clone()))
        weight.register_hook(_only_rows(new[0], new[-1] + 1))
        encoder.get_input_embeddings().register_forward_hook(_in_dtype_of(encoder, weight))
        if all(model is not encoder for model in trained):
            trained.append(encoder)
    return trained


def _only_rows(first: int, end: int):
    """A gradient hook keeping the new rows' gradient only: the others would be thrown away after the step anyway, and
    would count in the clipped gradient norm and in optimizers' statistics (the padding token's row alone dominated
    it)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros_like(grad)
        kept[first:end] = grad[first:end]
        return kept
    return hook


def _in_dtype_of(encoder, weight):
    """A forward hook handing the (float32, trained) embeddings on in the dtype of the encoder's frozen weights:
    under CPU autocast a bf16 layer norm refuses a float32 input (the cast is differentiable: the rows still learn)."""
    def hook(module, args, output):
        frozen = next((p for p in encoder.parameters() if p is not weight), None)
        return output if frozen is None or output.dtype == frozen.dtype else output.to(frozen.dtype)
    return hook


def keep_rows(optimizer: torch.optim.Optimizer, params: list, until: int | None = None) -> None:
    """After each optimizer step, put every row but the new ones back as they were; with `until` (pivotal tuning's
    train_fraction), after that many steps the new rows too: they are kept as they were before step `until` + 1 (so a
    run resumed past it keeps its checkpoint's). The step count is the optimizer's own (its state's `step`, which
    checkpoints hold), so a resumed run stops the embeddings at the same step."""
    kept = [(p, *getattr(p, KEEP)) for p in params if hasattr(p, KEEP)]
    if not kept:
        return
    on_device, frozen = {}, {}  # the kept rows where the weight is (made once: no host copy a step); the new rows

    def steps_done(weight) -> int:
        state = optimizer.state.get(weight, {})
        if "step" not in state:
            raise UserError("textual_inversion.train_fraction below 1 counts the optimizer's steps, and "
                            f"{type(optimizer).__name__} keeps no count; use train.optimizer: adamw (or prodigy)")
        return int(state["step"])

    def before(*_):
        for weight, first, end, _ in kept:
            if until is not None and id(weight) not in frozen and weight in optimizer.state \
                    and steps_done(weight) >= until:
                frozen[id(weight)] = weight.detach()[first:end].clone()

    def restore(*_):
        with torch.no_grad():
            for weight, first, end, original in kept:
                key = (id(weight), weight.device, weight.dtype)
                if key not in on_device:
                    on_device[key] = original.to(weight.device, weight.dtype)
                weight[:first] = on_device[key][:first]
                weight[end:] = on_device[key][end:]
                if id(weight) in frozen:
                    weight[first:end] = frozen[id(weight)]

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(restore)
    restore()  # (once now: the casts to the training precision rounded the rows; the base's are these)


def file_name(placeholder: str) -> str:
    """`<sks>` -> `sks.safetensors`: the name AUTOMATIC1111 and ComfyUI call the embedding by."""
    return (re.sub(r"[^\w.-]+", "", placeholder) or "embedding") + ".safetensors"


def save(out: str | Path, components, config: TextualInversionConfig) -> list[Path]:
    """One file per placeholder in `out` (see the module's docstring); float32. Beside a kohya LoRA file
    (`lora_kohya.safetensors`, pivotal tuning), also `lora_kohya_bundled.safetensors`: the same LoRA with the
    embeddings inside, as `bundle_emb.<name>.string_to_param.*` (one text encoder) or `bundle_emb.<name>.clip_l` /
    `.clip_g` (SDXL), `<name>` being the file's name without `.safetensors` (what the prompt says in AUTOMATIC1111
    / Forge, whose LoRA loader reads bundled embeddings; ComfyUI's `load_embed` reads them with those suffixes). A
    file of its own, since diffusers' kohya converter refuses keys it does not rename."""
    paths, bundle = [], {}
    for placeholder in config.placeholder_tokens:
        parts = []
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
            ids = tokenizer.convert_tokens_to_ids(token_names(placeholder, config.num_vectors))
            parts.append(encoder.get_input_embeddings().weight.detach()[ids].float().cpu().contiguous())
        tensors = {"emb_params": parts[0]} if len(parts) == 1 else {"clip_l": parts[0], "clip_g": parts[1]}
        path = Path(out) / file_name(placeholder)
        save_file(tensors, path, metadata={"placeholder": placeholder, "vectors": str(config.num_vectors)})
        paths.append(path)
        name = path.name.removesuffix(".safetensors")
        bundle.update({f"bundle_emb.{name}.string_to_param.*": parts[0]} if len(parts) == 1 else
                      {f"bundle_emb.{name}.clip_l": parts[0], f"bundle_emb.{name}.clip_g": parts[1]})
    kohya = Path(out) / KOHYA_LORA
    if bundle and kohya.is_file():
        with safe_open(kohya, "pt") as lora:
            tensors, metadata = {key: lora.get_tensor(key) for key in lora.keys()}, lora.metadata()
        save_file({**tensors, **bundle}, Path(out) / BUNDLED_LORA, metadata=metadata)
    return paths


def load(pipeline, folder: str | Path, config: TextualInversionConfig) -> None:
    """Put a run's embedding files (`save`) into a pipeline of its base with diffusers' `load_textual_inversion`:
    SDXL's parts one by one into their encoders, as diffusers' docs show."""
    for placeholder in config.placeholder_tokens:
        state = load_file(Path(folder) / file_name(placeholder))
        if "clip_g" in state:
            pipeline.load_textual_inversion(state["clip_l"], token=placeholder, text_encoder=pipeline.text_encoder,
                                            tokenizer=pipeline.tokenizer)
            pipeline.load_textual_inversion(state["clip_g"], token=placeholder, text_encoder=pipeline.text_encoder_2,
                                            tokenizer=pipeline.tokenizer_2)
        else:
            pipeline.load_textual_inversion(state["emb_params"], token=placeholder)


def expand(tokenizer, captions: list[str]) -> list[str]:
    """Each multi-vector placeholder spelt out into its tokens, as diffusers' pipelines spell out a prompt
    (`TextualInversionLoaderMixin._maybe_convert_prompt`); captions without one are returned as they are."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if not any(f"{token}_1" in added for token in added):
        return captions
    from diffusers.loaders import TextualInversionLoaderMixin

    return [TextualInversionLoaderMixin._maybe_convert_prompt(None, caption, tokenizer) for caption in captions]
