"""The trainer: config -> components -> loop -> artifacts."""

import importlib.util
import logging

# Logged while diffusers imports its quantizers, when torchao or bitsandbytes (the `quantization` extra) is
# installed: kernels for other hardware that were not loaded, torchao's enums registered with torch.compile, and
# bitsandbytes' attempt to fetch a CPU kernel from the Hub (refused: not a trusted publisher). None concerns a run,
# and on every command they would bury its output (and a mistake's one-line error) under a screenful.
_IMPORT_CHATTER = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree", "diffusers.quantizers")


def _import_quantizers_quietly() -> None:
    loggers = [logging.getLogger(name) for name in _IMPORT_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import diffusers.quantizers  # noqa: F401 - imports torchao and bitsandbytes, once
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


if importlib.util.find_spec("torchao") or importlib.util.find_spec("bitsandbytes"):
    _import_quantizers_quietly()
