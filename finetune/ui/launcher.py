"""Start, stop and resume training runs from the page, without a shell and without free text reaching the
launcher: the config is one of the files in the configs folder, chosen by name; each override must look like
`section.key=value` and the whole config is validated by the trainer's own loader before anything starts; the
output folder must lie under the output root and be free (no live run holds its lock).

The trainer runs as `python -m finetune.train --config FILE OVERRIDE...` (one process, as `finetune train` runs
it), in its own session so that stopping the server does not stop it; its output goes to `<output_dir>/
ui-launch.log`, and `<output_dir>/ui-launch.json` records its pid and, once it ends, its exit code, so a run that
dies before training shows why instead of "starting" for ever. Stop sends SIGTERM to the process holding the
run's lock (the trainer then writes a checkpoint and exits: `finetune/preemption.py`), also for runs started
from the command line.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..config import ConfigError, load_config
from . import runs

# section.key=value (nested keys allowed: data.filters.max_pwatermark=0.5); the loader then checks the key exists.
OVERRIDE = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+=.*", re.DOTALL)
RESUME = "train.resume_from_checkpoint=latest"
# Keys the page does not set: they would let a request run commands (webdataset runs `pipe:` URLs in a shell). A
# config file on this machine may still set them.
NOT_FROM_THE_PAGE = {"data.allow_pipe_urls": "it lets data.path run a shell command (pipe:)"}
PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent


class Refused(Exception):
    """A start, stop or resume that cannot happen; the message says why and what to do (shown on the page)."""


def config_files(configs: Path) -> list[str]:
    """The configs a run may start from: the YAML files directly in the configs folder, by name."""
    if not configs.is_dir():
        return []
    return sorted(p.name for p in configs.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def check_overrides(overrides: list) -> list[str]:
    """The overrides, each a `section.key=value` string (no newline), or Refused naming the first that is not."""
    if not isinstance(overrides, list):
        raise Refused("overrides: expected a list of section.key=value strings")
    for item in overrides:
        if not isinstance(item, str) or "\n" in item or not OVERRIDE.fullmatch(item):
            raise Refused(f"override {item!r}: expected section.key=value, e.g. train.max_train_steps=100")
        key = item.partition("=")[0]
        if key in NOT_FROM_THE_PAGE:
            raise Refused(f"override {key}: not from the page, since {NOT_FROM_THE_PAGE[key]}; set it in the config "
                          "file instead")
    return overrides


def pipe_urls_allowed(config) -> bool:
    """Whether any of the config's data (the data section, a data.sources entry, the held-out data) may open
    `pipe:` URLs."""
    data = config.data
    return bool(data.allow_pipe_urls or any(entry.get("allow_pipe_urls") for entry in data.sources)
                or config.validation.loss_data.get("allow_pipe_urls"))


def output_folder(config_path: Path, overrides: list[str], root: Path) -> Path:
    """Validate the config with the trainer's loader (a ConfigError names the key) and return its output folder,
    which must lie under `root`."""
    try:
        config = load_config(config_path, overrides)
        if pipe_urls_allowed(config) and not pipe_urls_allowed(load_config(config_path)):
            raise Refused(f"overrides: they would allow `pipe:` shard URLs ({NOT_FROM_THE_PAGE['data.allow_pipe_urls']}"
                          "), in a data.sources entry or validation.loss_data; not from the page: set it in the "
                          "config file instead")
    except ConfigError as error:
        raise Refused(str(error)) from error
    output_dir = config.train.output_dir
    folder, root = Path(output_dir).resolve(), root.resolve()  # symlinks followed, `..` collapsed
    if not folder.is_relative_to(root) or folder == root:
        raise Refused(f"train.output_dir={output_dir} is not inside the output root {root}; the page starts runs in "
                      f"folders under it only: set train.output_dir={root}/<name>")
    return folder


class Launcher:
    """The runs this server launched, each with a thread that waits for it and records its exit code."""

    def __init__(self, root: Path, configs: Path, env: dict | None = None):
        self.root, self.configs, self.env = root, configs, env
        self.processes: dict[Path, subprocess.Popen] = {}
        self.guard = threading.Lock()  # one start at a time: check the folder is free, then launch

    def start(self, config_name: str, overrides: list) -> Path:
        """Launch a run of `config_name` (a file of the configs folder) with `overrides`; return its folder."""
        if config_name not in config_files(self.configs):
            raise Refused(f"config {config_name!r} is not one of the configs in {self.configs}: "
                          f"{', '.join(config_files(self.configs)) or 'none'}")
        return self._launch(self.configs / config_name, check_overrides(overrides))

    def resume(self, folder: Path) -> Path:
        """Continue the run in `folder` from its newest checkpoint, with the config it saved there. The folder is
        named as train.output_dir (the saved one may be relative to another working directory); the trainer does
        not count that as a changed setting."""
        if not list(folder.glob("checkpoint-*")):
            raise Refused(f"{folder.name} has no checkpoint to resume from; start it again instead")
        return self._launch(folder / "config.yaml", [f"train.output_dir={folder.resolve()}", RESUME])

    def _launch(self, config_path: Path, overrides: list[str]) -> Path:
        folder = output_folder(config_path, overrides, self.root)
        with self.guard:
            state = runs.status(folder)["state"] if folder.is_dir() else "idle"
            if state in ("running", "starting"):
                raise Refused(f"train.output_dir={folder.relative_to(self.root.resolve())} is in use by another run "
                              f"({state}); wait for it to finish or stop it, or set another train.output_dir")
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "finetune.train", "--config", str(config_path), *overrides]
            # the trainer is the code this server runs, installed or not
            path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
            with open(folder / runs.LAUNCH_LOG, "wb") as log:
                started = time.time()
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, env={**os.environ, **(self.env or {}),
                                                                        "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})
            self.processes[folder] = process
            record = {"pid": process.pid, "host": socket.gethostname(), "started": started, "command": command,
                      "returncode": None}
            _write_json(folder / runs.LAUNCH_FILE, record)
        threading.Thread(target=self._wait, args=(folder, process, record), daemon=True).start()
        return folder

    def _wait(self, folder: Path, process: subprocess.Popen, record: dict) -> None:
        """Record the process's exit code beside its output, then reap it (also when the record cannot be written:
        a full disk must not leave it showing as starting)."""
        record["returncode"] = exit_code(process)
        try:
            if runs.read_launch(folder).get("pid") == process.pid:  # not a later launch's record
                _write_json(folder / runs.LAUNCH_FILE, record)
        finally:
            process.wait()
            if self.processes.get(folder) is process:
                del self.processes[folder]

    def stop(self, folder: Path) -> str:
        """SIGTERM to the run in `folder`: to the process holding its lock (any run on this machine), else to a
        process this server launched that has not taken the lock yet. Returns what was signalled."""
        lock, holder = runs.lock_state(folder)
        pid = holder.get("pid")
        if lock == "held":
            if holder.get("host") != socket.gethostname():
                raise Refused(f"the run in {folder.name} runs on {holder.get('host')}, not on this machine; stop it "
                              "there")
            if not runs.alive(pid) or pid in (1, os.getpid()):
                raise Refused(f"the lock of {folder.name} names pid {pid}, which is no run this page can stop")
            try:
                os.kill(pid, signal.SIGTERM)
            except PermissionError:
                raise Refused(f"the run in {folder.name} (pid {pid}) belongs to another user; stop it as that user "
                              f"(kill -TERM {pid})") from None
            return f"asked pid {pid} to stop: it writes a checkpoint and exits"
        process = self.processes.get(folder)
        if process is not None and _running(process):
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:  # it ended (and was reaped) just now
                raise Refused(f"{folder.name} is not running") from None
            return f"stopped pid {process.pid} before it began training"
        raise Refused(f"{folder.name} is not running")

    def close(self) -> None:
        """Nothing to do: launched runs go on without the server (stop them from the page or with SIGTERM)."""


# os.waitid: Linux; macOS from Python 3.13; not Windows. Without it a status read between the reaping and the writing
# of the code shows a crash without its code until the next read.
READ_BEFORE_REAPING = hasattr(os, "waitid")


def exit_code(process: subprocess.Popen) -> int:
    """Wait for `process` to end and return its exit code as Popen gives it (minus the signal's number when a signal
    ended it), leaving it unreaped where the platform allows (READ_BEFORE_REAPING): a status read while its code is
    being written finds the process still there (runs.status), never gone without a code."""
    if not READ_BEFORE_REAPING:
        return process.wait()
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped already, elsewhere
        return process.wait()
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _running(process: subprocess.Popen) -> bool:
    """Whether `process` has not ended, without reaping it where its waiter reads its code first (Popen.poll would
    reap it before the code was written)."""
    if READ_BEFORE_REAPING:
        return process.returncode is None and runs.alive(process.pid)
    return process.poll() is None


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` whole (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)
