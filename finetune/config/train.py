"""The train and prior sections: the optimisation, and DreamBooth's prior preservation."""

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import _check


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, optimizer, precision, EMA, logging and checkpoints."""

    output_dir: str = "outputs/shapes"
    """Where the pipeline, checkpoints, samples, logs and the resolved config go."""
    seed: int = 0
    """Seeds weights, data order, noise and timesteps."""
    max_train_steps: int = 1200
    """Optimizer steps to train for."""
    train_batch_size: int = 32
    """Samples per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes accumulated into one optimizer step."""
    learning_rate: float = 1e-3
    """Peak learning rate (Prodigy: 1.0, a multiplier of the step size it finds itself)."""
    optimizer: Literal["adamw", "adamw_8bit", "prodigy", "adafactor", "adamw_schedulefree", "sgd"] = "adamw"
    """`adamw` (PyTorch's fused AdamW), `adamw_8bit` (bitsandbytes: CUDA, or CPU from bitsandbytes 0.50),
    `prodigy` (prodigyopt: finds its own step size; learning_rate 1.0), `adafactor` (PyTorch's: factored second
    moments, less memory), `adamw_schedulefree` (schedulefree: no LR schedule, an average of the weights is what is
    sampled and saved) or `sgd`. prodigy and adamw_schedulefree need `pip install 'finetune-ddpm[optimizers]'`."""
    optimizer_cpu_offload: bool = False
    """Keep AdamW's moments and the update on the CPU (torchao's `CPUOffloadOptimizer`): less GPU memory for a
    full fine-tune, at some speed; CUDA only, with train.optimizer: adamw (`pip install 'finetune-ddpm[quantization]'`
    brings torchao)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for the optimizer, e.g. `{momentum: 0.9}` for sgd or `{d_coef: 2, safeguard_warmup:
    true}` for prodigy; the adam_* fields below give betas, epsilon and weight decay to those that take them."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "cosine"
    """Learning-rate schedule (diffusers' get_scheduler)."""
    lr_warmup_steps: int = 100
    """Linear warm-up steps of the learning rate."""
    adam_beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean."""
    adam_beta2: float = 0.999
    """AdamW's decay rate of the squared gradient's running mean."""
    adam_weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon, added to the denominator."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's choice); null weights every timestep
    equally."""
    noise_offset: float = 0.0
    """Add this much per-channel constant noise to the training noise (Guttenberg 2023), so the model can learn
    much darker or brighter images than the mean; 0.05-0.1 is typical, 0 disables."""
    unmasked_weight: float = 0.0
    """With data.masks: the loss weight of the pixels outside the mask (0 ignores them, 1 ignores the mask)."""
    normalize_mask_area: bool = True
    """With data.masks: divide each sample's per-pixel weights by their mean, so the loss keeps its scale however
    small the masked area (false: a small mask also makes a small loss)."""
    input_perturbation: float = 0.0
    """Perturb the noise that makes x_t (not the target) by this factor (Ning et al. 2023), against exposure bias;
    0.1 is the paper's value, 0 disables."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables clipping)."""
    on_nonfinite: Literal["error", "skip"] = "error"
    """A NaN/Inf loss or gradient norm on any process: stop with an error naming the step and batch (`error`),
    or skip that optimizer step on every process (`skip`)."""
    max_nonfinite_steps: int = 10
    """With on_nonfinite=skip, stop after this many non-finite steps in a row."""
    cpu_threads: int | None = None
    """Torch threads per process when training on CPU; null uses the machine's cores divided by the processes
    on it (`accelerate launch` otherwise leaves each process one thread)."""
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    """Autocast precision: `no` (fp32), `bf16` (recent GPUs; CPUs with AMX), `fp16` (GPUs only), `auto` (bf16 on
    GPUs that support it and on CPUs with AMX tiles, else fp32: CPUs with only AVX-512 BF16 run bf16 matmuls at
    half the fp32 speed, benchmarks/README.md)."""
    allow_tf32: bool = False
    """Let fp32 matmuls use TF32 tensor cores (Ampere and later GPUs; no effect on a CPU). cuDNN convolutions use
    TF32 either way, PyTorch's default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, slower steps."""
    enable_xformers_memory_efficient_attention: bool = False
    """xformers attention in the UNet (CUDA GPUs with xformers installed); PyTorch's SDPA is the default."""
    compile: bool = False
    """`torch.compile` the UNet (in place): faster steps after a compilation of a minute or more."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (CUDA GPUs, or the CPU with bitsandbytes >= 0.50): a quarter of the optimizer
    memory; the same as `optimizer: adamw_8bit` (diffusers' name)."""
    use_ema: bool = True
    """Keep an exponential moving average of the trained weights and export it."""
    ema_max_decay: float = 0.999
    """Upper bound of the EMA decay (with warm-up, diffusers' EMAModel)."""
    logging_steps: int = 10
    """Log loss, learning rate, gradient norm and images/s to the trackers every this many steps."""
    report_to: str = "tensorboard"
    """Trackers for the logs and sample grids, through accelerate: `tensorboard` (in output_dir/logs), `wandb`,
    `mlflow`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab`, `trackio`, several joined by commas, `all`
    (every one installed) or `none`."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every this many steps (0 disables)."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed after a new one is complete)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or `latest` for the newest in output_dir."""
    export_single_file: bool = False
    """A full fine-tune of an SD-1.x or SDXL base also writes its pipeline as one `.safetensors` file in the original
    layout (`<output_dir>/<output folder name>.safetensors`), as ComfyUI, AUTOMATIC1111 and Forge load checkpoints."""
    single_file_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    """The precision of that file's weights (fp16: half the size, as checkpoints are shared)."""

    def __post_init__(self):
        problems = []
        unknown = [t for t in self.report_to.split(",") if t.strip() not in TRACKERS]
        if unknown:
            problems.append(f"train.report_to: got {self.report_to!r}; use {', '.join(TRACKERS)}, several joined by "
                            "commas")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name}: got {getattr(self, name)}; must be >= 1")
        if self.learning_rate <= 0:
            problems.append(f"train.learning_rate: got {self.learning_rate}; must be > 0")
        if self.lr_warmup_steps < 0 or self.checkpointing_steps < 0 or self.max_grad_norm < 0:
            problems.append("train.lr_warmup_steps, train.checkpointing_steps and train.max_grad_norm must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"train.{name}: got {getattr(self, name)}; must be in [0, 1)")
        if self.adam_epsilon <= 0 or self.adam_weight_decay < 0:
            problems.append("train.adam_epsilon must be > 0 and train.adam_weight_decay >= 0")
        if not 0 <= self.unmasked_weight <= 1:
            problems.append(f"train.unmasked_weight: got {self.unmasked_weight}; must be in [0, 1]")
        if self.noise_offset < 0 or self.input_perturbation < 0:
            problems.append("train.noise_offset and train.input_perturbation must be >= 0")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"train.snr_gamma: got {self.snr_gamma}; must be > 0 or null")
        if not 0 < self.ema_max_decay < 1:
            problems.append(f"train.ema_max_decay: got {self.ema_max_decay}; must be in (0, 1)")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            problems.append(f"train.cpu_threads: got {self.cpu_threads}; must be >= 1 or null")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append(f"train.checkpoints_total_limit: got {self.checkpoints_total_limit}; must be >= 1 or null")
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw_8bit"):
            problems.append(f"train.use_8bit_adam: true asks for adamw_8bit but train.optimizer is {self.optimizer}; "
                            "keep one of them")
        if self.optimizer_cpu_offload and (self.max_grad_norm > 0 or self.mixed_precision == "fp16"):
            problems.append("train.optimizer_cpu_offload: its optimizer copies each gradient to the CPU during the "
                            "backward pass, before gradient clipping or fp16's unscaling could reach it; set "
                            "train.max_grad_norm: 0 (and bf16 rather than fp16), or optimizer_cpu_offload: false")
        if self.optimizer_cpu_offload and (self.optimizer != "adamw" or self.use_8bit_adam):
            problems.append(f"train.optimizer_cpu_offload: offloads train.optimizer: adamw only (got "
                            f"{'adamw_8bit' if self.use_8bit_adam else self.optimizer}); use adamw, or set it to false")
        if self.optimizer == "adamw_schedulefree":
            if self.lr_scheduler != "constant":
                problems.append(f"train.lr_scheduler: {self.lr_scheduler} would fight adamw_schedulefree, which "
                                "replaces the schedule (its warm-up is train.lr_warmup_steps); set train.lr_scheduler: "
                                "constant")
            if self.use_ema:
                problems.append("train.use_ema: adamw_schedulefree already averages the weights (that average is "
                                "what is sampled and saved); set train.use_ema: false")
        _check(problems)


@dataclass
class PriorConfig:
    """DreamBooth's prior preservation: while a few images teach a subject, keep what the model draws for its class
    (the names are diffusers' train_dreambooth options)."""

    mode: Literal["none", "class_images", "base_prediction"] = "none"
    """`class_images`: the base draws num_class_images images of class_prompt before the first step (cached: a
    rerun draws none) and they train beside the data as regularisation images; `base_prediction`: each batch also
    trains under class_prompt with the frozen base's own prediction as the target (LoRA runs; no images)."""
    class_prompt: str = ""
    """The class the subject belongs to, e.g. "a photo of a dog" (the instance captions then name the subject with
    a rare token: data.caption_prefix: "sks")."""
    prior_loss_weight: float = 1.0
    """How much the class images' (or the base's predictions') loss weighs against the instance images'."""
    num_class_images: int = 100
    """class_images: how many the base draws."""
    class_data_dir: str | None = None
    """class_images: where they are kept, in a folder named by a hash of the base's weights and the settings that
    shape them (null: the finetune cache, ~/.cache/finetune/class-images)."""
    negative_prompt: str = ""
    """class_images: the negative prompt they are drawn with."""
    num_inference_steps: int = 25
    """class_images: the sampler's steps for each."""
    guidance_scale: float = 7.5
    """class_images: the guidance they are drawn with."""
    seed: int = 0
    """class_images: image i is drawn from a generator seeded seed + i (the same images however many processes)."""
    sample_batch_size: int = 4
    """class_images: images drawn at once per process."""

    def __post_init__(self):
        problems = []
        if self.mode != "none" and not self.class_prompt.strip():
            problems.append(f"prior.class_prompt: needed with prior.mode: {self.mode}; name the subject's class, e.g. "
                            "\"a photo of a dog\"")
        if not self.prior_loss_weight >= 0:
            problems.append(f"prior.prior_loss_weight: got {self.prior_loss_weight}; must be >= 0")
        if min(self.num_class_images, self.num_inference_steps, self.sample_batch_size) < 1 or self.guidance_scale < 0:
            problems.append("prior.num_class_images, num_inference_steps and sample_batch_size must be >= 1, "
                            "prior.guidance_scale >= 0")
        _check(problems)


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all",
            "none")
