"""One run per output folder: the main process holds an advisory lock on `<output_dir>/.finetune-lock` for the
whole run, so a second run (or a dry run) pointed at the same folder is told which run has it, instead of both
writing checkpoints over each other. The operating system releases the lock when the process ends, however it
ends, so a crashed run never leaves the folder locked; the lock file names its holder while held and is emptied on
a clean release, so a run that finds it unlocked but still naming a holder reports that the run before it was
killed or crashed. (Where `fcntl` is missing, on Windows, nothing is locked.)"""

import json
import logging
import os
import socket
import time
from pathlib import Path

from .cli import UserError

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".finetune-lock"


class OutputLock:
    """The lock of `output_dir`, taken at once or refused with a UserError naming the run that holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for the run: the lock lives with the file
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self.file.close()
            raise in_use(output_dir, holder(self.path)) from error
        self.file.seek(0)
        if self.file.read().strip():  # a holder that never released it: killed, or crashed
            logger.warning(f"train.output_dir={output_dir}: the run that wrote here before ({holder(self.path)}) "
                           "ended without finishing (killed or crashed); its newest checkpoint continues it with "
                           "train.resume_from_checkpoint=latest")
        self.file.seek(0)
        self.file.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
                  self.file)
        self.file.flush()

    def release(self) -> None:
        """Empty the file (a clean end) and close it, which releases the lock."""
        self.file.seek(0)
        self.file.truncate()
        self.file.close()


def in_use(output_dir: str | os.PathLike, who: str) -> UserError:
    """The refusal of a second run on a held output folder."""
    return UserError(f"train.output_dir={output_dir} is in use by another run ({who}); wait for it to finish, or give "
                     "this run another train.output_dir")


def held_by(output_dir: str | os.PathLike) -> str | None:
    """Who holds `output_dir`'s lock (without taking it), or None when no run does."""
    path = Path(output_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return holder(path)
    return None


def holder(path: Path) -> str:
    """The holder a lock file names: `pid 123 on host, since ...`."""
    try:
        who = json.loads(path.read_text())
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
