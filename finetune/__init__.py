"""The trainer: config -> components -> loop -> artifacts."""

import importlib.util
import logging

# Logged while diffusers imports its quantizers, when torchao or bitsandbytes (the `quantization` extra) is
# installed: kernels for other hardware that were not loaded, torchao's enums registered with torch.compile, and
# bitsandbytes' attempt to fetch a CPU kernel from the Hub. None concerns a run, and on every command they would bury
# its output (and a mistake's one-line error) under a screenful.
_IMPORT_CHATTER = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree", "diffusers.quantizers")


def _import_quantizers_quietly() -> None:
    """Import diffusers' quantizers (and so torchao and bitsandbytes) once, now: with their import-time logging
    silenced, and offline. bitsandbytes >= 0.50 on a CPU with AVX512-BF16 asks the Hub for a compiled CPU kernel at
    import (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`, refused after the connection since
    its publisher is not trusted; one of its requests has no timeout): no command of this project should reach the
    network for that, so the Hub is offline while it imports, and bitsandbytes keeps its own CPU code."""
    import huggingface_hub.constants

    loggers = [logging.getLogger(name) for name in _IMPORT_CHATTER]
    levels, offline = [logger.level for logger in loggers], huggingface_hub.constants.HF_HUB_OFFLINE
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import diffusers.quantizers  # noqa: F401 - imports torchao and bitsandbytes, once
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


if importlib.util.find_spec("torchao") or importlib.util.find_spec("bitsandbytes"):
    _import_quantizers_quietly()
