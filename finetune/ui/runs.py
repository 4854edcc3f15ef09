"""A run as the web page shows it, read from its folder alone: whether it is running, its metrics, its newest
pictures and its evaluation. Nothing here is held in the server's memory, so a run started from the command line
shows as well as one started from the page, and a server restarted while a run was killed never shows it running.

- running: a live process holds the run's lock (`.finetune-lock`, `finetune/output_lock.py`);
- starting: the page launched a process (`ui-launch.json`) that is alive but holds no lock yet;
- crashed: the lock file still names a holder but no process holds it (killed or crashed), or a launched process
  ended before it took the lock (its `ui-launch.log` says why);
- finished: the lock was released and metrics.jsonl ends with the run's end, or the pipeline was exported;
- stopped: the lock was released without an end (stopped by a signal, after writing a checkpoint).
"""

import json
import os
import socket
import time
from pathlib import Path

import yaml

from ..output_lock import LOCK_FILE, held_by

# Names the trainer writes (not imported from their modules, which pull in torch; tests/test_ui.py checks them).
METRICS_FILE = "metrics.jsonl"  # finetune.progress
EVALUATION_FILE = "evaluation.json"  # finetune.evaluate
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # finetune.lora
# What the page writes beside a run it launched: the process and its exit code, and the process's output.
LAUNCH_FILE, LAUNCH_LOG = "ui-launch.json", "ui-launch.log"
NOT_RUNS = ("logs", "samples")  # folders inside a run; checkpoint-N folders hold a config.yaml but are no runs


def is_run(folder: Path) -> bool:
    """A run folder: one the trainer wrote its config or lock into, or the page launched a run into."""
    return any((folder / name).is_file() for name in ("config.yaml", LOCK_FILE, LAUNCH_FILE))


def list_runs(root: Path, depth: int = 3) -> list[str]:
    """The run folders under `root` (`depth` levels down at most), as paths relative to it, sorted. Symlinked
    folders are not followed, and nothing inside a run is listed (its checkpoints hold configs too)."""
    found = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if not child.is_dir() or child.is_symlink() or child.name.startswith("."):
            continue
        if is_run(child):
            found.append(child.name)
        elif depth > 1 and child.name not in NOT_RUNS:
            found += [f"{child.name}/{name}" for name in list_runs(child, depth - 1)]
    return found


def exists(pid) -> bool:
    """Whether process `pid` exists on this machine: running, or exited and not reaped yet. Anything but a positive
    whole number is no process (`os.kill` would take 0 and -1 as groups)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def alive(pid) -> bool:
    """Whether process `pid` exists on this machine and has not exited (a zombie waiting to be reaped has)."""
    if not exists(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): os.kill said enough
        return True


def lock_state(folder: Path) -> tuple[str, dict]:
    """`("held" | "abandoned" | "released" | "none", holder)`: the lock's state and the holder its file names.
    The file is only read when it names nobody or a dead process on this host; the lock itself is tried (never
    kept) only when it names a live one, so this never stands in the way of a run taking it."""
    path = folder / LOCK_FILE
    try:
        text = path.read_text().strip()
    except OSError:
        return "none", {}
    if not text:
        return "released", {}
    try:
        holder = json.loads(text)
        pid, host = int(holder["pid"]), str(holder["host"])
    except (ValueError, KeyError, TypeError):
        holder, pid, host = {}, None, None
    if pid is not None and host == socket.gethostname() and not alive(pid):
        return "abandoned", holder
    return ("held" if held_by(folder) else "abandoned"), holder


def read_launch(folder: Path) -> dict:
    """What `ui-launch.json` says of the process the page launched here: its `pid`, `started` (a time) and, once
    it ended, `returncode` ({} when there is none, or it is not such a record)."""
    try:
        launch = json.loads((folder / LAUNCH_FILE).read_text())
    except (OSError, ValueError):
        return {}
    valid = isinstance(launch, dict) and isinstance(launch.get("started"), (int, float))
    return launch if valid else {}


def log_tail(folder: Path, lines: int = 25) -> str:
    """The last `lines` lines of the launched process's output (the error of a run that died)."""
    try:
        with open(folder / LAUNCH_LOG, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 16384))
            return "\n".join(file.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_event(folder: Path) -> str | None:
    """The `event` of metrics.jsonl's last start or end line: "end" once a run finished, "start" while a run
    that started after it has not (read from the file's end only)."""
    try:
        with open(folder / METRICS_FILE, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 8192))
            tail = file.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        if '"event"' in line:
            try:
                return json.loads(line)["event"]
            except (ValueError, KeyError, TypeError):
                continue
    return None


def status(folder: Path) -> dict:
    """`{"state", "detail"}` of the run in `folder` (module docstring), with `log` (the tail of ui-launch.log)
    when the page launched it and it is starting or crashed."""
    lock, holder = lock_state(folder)
    launch = read_launch(folder)
    since = holder.get("since", "?")
    if lock == "held":
        return {"state": "running",
                "detail": f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}"}
    launched_after_lock = bool(launch) and launch["started"] > _mtime(folder / LOCK_FILE)
    # the launching server writes the exit code before it reaps the process (launcher.exit_code, where the platform
    # allows): one that has exited but is not reaped yet is about to have its code written, and shows as starting
    if launched_after_lock and launch.get("returncode") is None and exists(launch.get("pid")):
        return {"state": "starting", "detail": "launched; loading the data and models", "log": log_tail(folder)}
    if launched_after_lock:  # it ended before it took the lock
        code = launch.get("returncode")
        if code is None:  # gone, with no code when read above: the code is written before the reaping, so it is
            again = read_launch(folder)  # on disk by now (unless the launching server is gone and nobody wrote one)
            code = again.get("returncode") if again.get("pid") == launch.get("pid") else None
        return {"state": "crashed", "detail": "ended before training began"
                                              + (f" (exit code {code})" if code is not None else ""),
                "log": log_tail(folder)}
    if lock == "abandoned":
        return {"state": "crashed", "detail": f"the run (pid {holder.get('pid', '?')}, since {since}) ended without "
                                              "finishing: killed or crashed; Resume continues from its last checkpoint",
                "log": log_tail(folder) if launch else ""}
    event = last_event(folder)
    if event == "end" or (event is None and _exported(folder)):
        return {"state": "finished", "detail": "trained and exported"}
    if event == "start" or any(folder.glob("checkpoint-*")):
        return {"state": "stopped", "detail": "stopped after writing a checkpoint; Resume continues it"}
    return {"state": "idle", "detail": "not trained yet"}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _exported(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / LORA_WEIGHTS).is_file()


def samplable(folder: Path) -> bool:
    """Whether images can be drawn from the folder: an exported pipeline, or LoRA weights or textual-inversion
    embeddings with the run's config."""
    return (folder / "model_index.json").is_file() or ((folder / LORA_WEIGHTS).is_file()
                                                       and (folder / "config.yaml").is_file()) or _on_a_base(folder)


_ON_A_BASE: dict[Path, tuple[tuple[float, float], bool]] = {}


def _on_a_base(folder: Path) -> bool:
    """`results.on_a_base`, remembered until a file appears in or leaves the folder or its config.yaml changes (the
    runs list asks every few seconds, and reading a config through the loader takes about 6 ms). Not remembered
    while either changed in the last 2 s: a file system's time stamps tick (every few milliseconds, every 2 s on
    FAT), and a second change within one tick would leave the stamp as it was."""
    version = (_mtime(folder), _mtime(folder / "config.yaml"))
    if _ON_A_BASE.get(folder, (None,))[0] == version:
        return _ON_A_BASE[folder][1]
    from ..results import on_a_base  # (here: it loads torch and diffusers, which listing runs does not need)

    answer = on_a_base(folder)
    if time.time() - max(version) > 2.0:
        _ON_A_BASE[folder] = (version, answer)
    return answer


def _newest(folder: Path, prefix: str) -> Path | None:
    """The `<prefix><N>.png` in `folder` with the largest N."""
    steps = []
    for path in folder.glob(f"{prefix}*.png"):
        number = path.stem[len(prefix):]
        if number.isdigit():
            steps.append((int(number), path))
    return max(steps)[1] if steps else None


def pictures(root: Path, folder: Path) -> dict:
    """The newest sample grid, a fine-tune's base grid (drawn before the first step, to compare with), the newest
    reverse-process strip and the forward-process strip, each as `{"path": relative to root, "version": mtime}` (the
    version tells the page that a file changed), or None."""
    samples = folder / "samples"
    found = {"grid": _newest(samples, "step-"), "base": samples / "base.png",
             "reverse": _newest(samples / "process", "reverse-step-"), "forward": samples / "process" / "forward.png"}
    result = {}
    for name, path in found.items():
        mtime = _mtime(path) if path else 0.0
        result[name] = {"path": path.relative_to(root).as_posix(), "version": mtime} if mtime else None
    return result


def loads(text: str | bytes):
    """JSON with NaN and infinities read as null: the page's JSON.parse takes no others."""
    return json.loads(text, parse_constant=lambda name: None)


def evaluation(folder: Path) -> dict | None:
    """The run's evaluation.json (`{"metrics", "settings"}`, from `python -m finetune.evaluate`), or None."""
    try:
        data = loads((folder / EVALUATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class MetricsReader:
    """Follows a run's metrics.jsonl: each `read()` returns the lines appended since the last one. A line without
    its newline yet is left for the next read; a line that is no JSON object is skipped; a file that shrank
    (replaced) is read again from the start, and `reset` says so."""

    def __init__(self, path: Path):
        self.path, self.offset, self.reset = path, 0, False

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                self.reset = size < self.offset
                if self.reset:
                    self.offset = 0
                file.seek(self.offset)
                data = file.read(size - self.offset)
        except OSError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                record = loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def thin(records: list[dict], most: int) -> list[dict]:
    """At most about `most` of the step lines (evenly spaced, the last kept) and every other line: a long run's
    whole history is sent once, and a curve needs no more points than the page is wide."""
    steps = [i for i, record in enumerate(records) if "loss" in record]
    if len(steps) <= most:
        return records
    every = len(steps) / most
    keep = {steps[int(k * every)] for k in range(most)} | {steps[-1]}
    return [record for i, record in enumerate(records) if i in keep or "loss" not in record]


def settings(folder: Path) -> dict:
    """What the page needs from the run's saved config.yaml (read as plain YAML: an older run's config need not
    pass today's checks): total steps, validation prompts and sampling settings."""
    try:
        raw = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        train, validation = raw.get("train") or {}, raw.get("validation") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    prompts = [p.get("prompt") if isinstance(p, dict) else p for p in validation.get("prompts") or []]
    return {"max_train_steps": train.get("max_train_steps"), "prompts": prompts,
            "guidance_scale": validation.get("guidance_scale"),
            "num_inference_steps": validation.get("num_inference_steps")}


class RunWatcher:
    """What changed in a run folder since the last `poll()`, as the page's events: `metrics` (the new lines of
    metrics.jsonl; the whole file, thinned, on the first poll or after it was replaced), `status`, `pictures`,
    `evaluation` and `settings` (each sent when it differs from what was sent last). `poll(full=False)` looks at
    metrics.jsonl alone, and at the rest only when new lines came (a run that logs may also have drawn)."""

    def __init__(self, root: Path, folder: Path, most_points: int = 4000):
        self.root, self.folder, self.most_points = root.resolve(), folder, most_points
        self.metrics = MetricsReader(folder / METRICS_FILE)
        self.sent: dict = {}
        self.files: dict = {}  # name: (mtime, what was read)

    def poll(self, full: bool = True) -> list[tuple[str, object]]:
        events = []
        first = not self.sent
        records = self.metrics.read()
        if first or self.metrics.reset:
            events.append(("metrics", {"reset": True, "records": thin(records, self.most_points)}))
        elif records:
            events.append(("metrics", {"reset": False, "records": records}))
        if not (full or first or events):
            return events
        current = {"status": status(self.folder), "pictures": pictures(self.root, self.folder),
                   "evaluation": self._unless_unchanged(EVALUATION_FILE, evaluation),
                   "settings": self._unless_unchanged("config.yaml", settings)}
        for name, value in current.items():
            if first or self.sent.get(name) != value:
                events.append((name, value))
                self.sent[name] = value
        return events

    def _unless_unchanged(self, name: str, read):
        """`read(folder)`, read again only when the file `name` changed."""
        version = _mtime(self.folder / name)
        if self.files.get(name, (None,))[0] != version:
            self.files[name] = (version, read(self.folder))
        return self.files[name][1]
