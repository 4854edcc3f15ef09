"""The web UI's server without a browser (Starlette's TestClient, and raw requests where a client would tidy the
path): runs listed and their state read from their folders alone, files outside the root never served, foreign
Host headers and token-less POSTs refused, starts validated by the config loader, a second start refused, stop by
SIGTERM, sampling. The page itself, in Chromium: tests/test_ui_browser.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette", reason="the web UI's extra: pip install -e '.[ui]'")
from starlette.testclient import TestClient  # noqa: E402

from finetune.cli import UserError  # noqa: E402
from finetune.config import ModelConfig, config_yaml, load_config  # noqa: E402
from finetune.data import shapes  # noqa: E402
from finetune.models import build_components  # noqa: E402
from finetune.output_lock import LOCK_FILE  # noqa: E402
from finetune.ui import check_exposure, launcher, server  # noqa: E402
from finetune.ui import runs as ui_runs  # noqa: E402
from finetune.ui.security import TOKEN_HEADER, inside  # noqa: E402
from finetune.ui.server import create_app  # noqa: E402
from finetune.ui.watch import FolderChanges  # noqa: E402

from .conftest import TINY_MODEL, wait_for_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"
PORT = 7860


def _client(root: Path, **kwargs) -> TestClient:
    app = create_app(root, ROOT / "configs", token=TOKEN, port=PORT,
                     env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, **kwargs)
    return TestClient(app, base_url=f"http://127.0.0.1:{PORT}")


def _post(client: TestClient, path: str, body: dict, token: str | None = TOKEN):
    headers = {TOKEN_HEADER: token} if token else {}
    return client.post(path, json=body, headers=headers)


def _run(root: Path, name: str, **files: str) -> Path:
    """A run folder with config.yaml and the given files (names with / for subfolders; `__` for a dot)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("train:\n  max_train_steps: 10\n")
    for file, text in files.items():
        path = folder / file.replace("__", ".")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


LOCK_HOLDER = """
import signal, sys, time
from finetune.output_lock import OutputLock
lock = OutputLock(sys.argv[1])
def stop(signum, frame):
    lock.release()
    print("stopped by SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    """Start a process that takes a folder's run lock (as the trainer does) and releases it on SIGTERM."""
    started = []

    def start(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], stdout=subprocess.PIPE,
                                   text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert process.stdout.readline().strip() == "held"
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


# ---- the runs view reads the run folders ------------------------------------------------------------------------


def test_runs_are_listed_with_their_state(tmp_path):
    _run(tmp_path, "a", **{"checkpoint-5/config.yaml": ""})  # checkpoints hold configs, but are no runs
    _run(tmp_path, "group/c")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_FILE).write_text("")
    (tmp_path / "d").mkdir()  # launched from the page a moment ago: no config.yaml yet
    (tmp_path / "d" / ui_runs.LAUNCH_FILE).write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
    (tmp_path / "not-a-run" / "logs").mkdir(parents=True)
    data = _client(tmp_path).get("/api/runs").json()
    assert [run["name"] for run in data["runs"]] == ["a", "b", "d", "group/c"]
    assert [run["state"] for run in data["runs"]] == ["stopped", "idle", "starting", "idle"]
    assert "shapes.yaml" in data["configs"]


def test_a_held_lock_is_running_and_a_killed_holder_is_crashed(tmp_path, holder):
    folder = _run(tmp_path, "run")
    process = holder(folder)
    status = ui_runs.status(folder)
    assert status["state"] == "running" and f"pid {process.pid}" in status["detail"]
    process.kill()
    process.wait()
    # The lock file still names the holder, but nothing holds the lock: killed or crashed, whichever server asks.
    status = ui_runs.status(folder)
    assert status["state"] == "crashed" and "killed or crashed" in status["detail"]
    assert _client(tmp_path).get("/api/runs").json()["runs"][0]["state"] == "crashed"


def test_a_lock_naming_a_process_that_is_gone_is_crashed(tmp_path):
    """After a reboot or a server restart: the file names a holder whose pid no longer exists."""
    folder = _run(tmp_path, "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert ui_runs.status(folder)["state"] == "crashed"


def test_only_a_positive_pid_can_be_alive(tmp_path):
    """os.kill(0 or -1, 0) would ask about process groups; a launch record without a time is no record."""
    assert ui_runs.alive(os.getpid()) and not any(ui_runs.alive(pid) for pid in (0, -1, None, "1", True))
    folder = _run(tmp_path, "run")
    (folder / ui_runs.LAUNCH_FILE).write_text(json.dumps({"pid": -1, "started": "yesterday"}))
    assert ui_runs.read_launch(folder) == {} and ui_runs.status(folder)["state"] == "idle"


def test_finished_and_stopped_runs(tmp_path):
    start = json.dumps({"event": "start", "step": 0, "max_steps": 10, "time": 1.0})
    end = json.dumps({"event": "end", "step": 10, "time": 2.0})
    finished = _run(tmp_path, "finished", **{"metrics__jsonl": f"{start}\n{end}\n", "__finetune-lock": ""})
    stopped = _run(tmp_path, "stopped", **{"metrics__jsonl": f"{start}\n{end}\n{start}\n", "__finetune-lock": ""})
    exported = _run(tmp_path, "old", **{"model_index__json": "{}", "__finetune-lock": ""})  # no metrics.jsonl
    assert ui_runs.status(finished)["state"] == "finished"
    assert ui_runs.status(stopped)["state"] == "stopped"  # resumed after the end, then stopped
    assert ui_runs.status(exported)["state"] == "finished"


def test_a_launch_that_died_before_training_shows_its_error(tmp_path):
    folder = _run(tmp_path, "run", **{"ui-launch__log": "loading\nerror: data.path: no such folder /nowhere\n"})
    (folder / ui_runs.LAUNCH_FILE).write_text(json.dumps({"pid": 1, "started": time.time(), "returncode": 2}))
    status = ui_runs.status(folder)
    assert status["state"] == "crashed" and "exit code 2" in status["detail"]
    assert "no such folder /nowhere" in status["log"]


def test_a_launch_reaped_between_the_reads_still_shows_its_exit_code(tmp_path, monkeypatch):
    """status reads the record (no code yet), then finds the process gone: the launcher wrote the code and reaped
    it in between, so the record is read again rather than showing a crash without its code."""
    folder = _run(tmp_path, "run")
    record = {"pid": 2**22 + 1, "started": time.time(), "returncode": None}
    (folder / ui_runs.LAUNCH_FILE).write_text(json.dumps(record))

    def written_and_reaped(pid):
        (folder / ui_runs.LAUNCH_FILE).write_text(json.dumps({**record, "returncode": 2}))
        return False

    monkeypatch.setattr(ui_runs, "exists", written_and_reaped)
    status = ui_runs.status(folder)
    assert status["state"] == "crashed" and "exit code 2" in status["detail"], status


READS_BEFORE_REAPING = pytest.mark.skipif(not launcher.READ_BEFORE_REAPING or not Path("/proc").is_dir(),
                                          reason="needs os.waitid (to read a code unreaped) and /proc (to see zombies)")


@READS_BEFORE_REAPING
def test_the_code_is_written_before_the_reaping_and_stop_does_not_reap(tmp_path, monkeypatch):
    """While the launcher writes an ended launch's code (held here), the process is still there: the run shows as
    starting, not as a crash without its code; Stop refuses it as ended without reaping it; once written, the code
    shows and the process is reaped."""
    folder = _run(tmp_path, "run")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    record = {"pid": process.pid, "started": time.time(), "returncode": None}
    (folder / ui_runs.LAUNCH_FILE).write_text(json.dumps(record))
    runs_launcher = launcher.Launcher(tmp_path, ROOT / "configs")
    runs_launcher.processes[folder] = process
    writing, written = threading.Event(), threading.Event()
    write_json = launcher._write_json

    def held_write_json(path, data):
        writing.set()
        assert written.wait(30)
        write_json(path, data)

    monkeypatch.setattr(launcher, "_write_json", held_write_json)
    waiter = threading.Thread(target=runs_launcher._wait, args=(folder, process, record))
    waiter.start()
    try:
        assert writing.wait(30)
        assert ui_runs.status(folder)["state"] == "starting"
        with pytest.raises(launcher.Refused, match="run is not running"):
            runs_launcher.stop(folder)
        assert ui_runs.exists(process.pid)  # (not reaped by the stop)
    finally:
        written.set()
        waiter.join(30)
    status = ui_runs.status(folder)
    assert status["state"] == "crashed" and "exit code 3" in status["detail"], status
    assert not ui_runs.exists(process.pid) and folder not in runs_launcher.processes


def test_a_code_that_cannot_be_written_still_ends_the_launch(tmp_path, monkeypatch):
    """A full disk (the write of the code fails) must not leave the ended launch unreaped, showing as starting
    and blocking its folder: it shows as a crash."""
    folder = _run(tmp_path, "run")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    record = {"pid": process.pid, "started": time.time(), "returncode": None}
    (folder / ui_runs.LAUNCH_FILE).write_text(json.dumps(record))

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(launcher, "_write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        launcher.Launcher(tmp_path, ROOT / "configs")._wait(folder, process, record)
    assert process.returncode == 3 and ui_runs.status(folder)["state"] == "crashed"


@READS_BEFORE_REAPING
@pytest.mark.parametrize("code, expected", [("raise SystemExit(3)", 3),
                                            ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -15)])
def test_a_launched_process_has_its_exit_code_read_before_it_is_reaped(code, expected):
    """The launcher learns the code (as Popen gives it: minus the signal that ended it) while the process is still
    there to be seen; reaping it afterwards gives the same code."""
    process = subprocess.Popen([sys.executable, "-c", code])
    assert launcher.exit_code(process) == expected
    assert ui_runs.exists(process.pid) and not ui_runs.alive(process.pid)  # exited, not reaped
    assert process.wait() == expected and not ui_runs.exists(process.pid)


def test_a_fine_tunes_base_grid_is_sent_beside_the_newest_grid(tmp_path):
    folder = _run(tmp_path, "run", **{"samples/base.png": "x", "samples/step-2.png": "x"})
    pictures = dict(ui_runs.RunWatcher(tmp_path, folder).poll())["pictures"]
    assert pictures["base"]["path"] == "run/samples/base.png" and pictures["grid"]["path"] == "run/samples/step-2.png"


def test_whether_a_run_samples_is_read_again_only_when_its_folder_changes(tmp_path, monkeypatch):
    """The runs list asks every few seconds whether a run can be sampled: a textual-inversion run's config is read
    through the loader once, and again when a file appears (its embedding) or the config changes; not while the
    folder changed within the last 2 s (a file's time stamp ticks)."""
    import finetune.results

    config = load_config(None, ["model.pretrained_model_name_or_path=some/base", "model.train_text_encoder=false",
                                "train.use_ema=false", "textual_inversion.placeholder_tokens=[<sks>]",
                                "textual_inversion.initializer_tokens=[dog]"])
    folder = _run(tmp_path, "ti", config__yaml=config_yaml(config))
    reads, real = [], finetune.results.on_a_base
    monkeypatch.setattr(finetune.results, "on_a_base", lambda path: reads.append(path) or real(path))

    def age(*paths):  # as if written three seconds ago
        for path in paths:
            os.utime(path, ns=(time.time_ns() - 3_000_000_000,) * 2)

    assert not ui_runs.samplable(folder) and not ui_runs.samplable(folder) and len(reads) == 2  # just written
    age(folder, folder / "config.yaml")
    assert not ui_runs.samplable(folder) and not ui_runs.samplable(folder) and len(reads) == 3
    (folder / "sks.safetensors").write_bytes(b"embedding")
    assert ui_runs.samplable(folder) and len(reads) == 4
    age(folder)
    assert ui_runs.samplable(folder) and ui_runs.samplable(folder) and len(reads) == 5
    (folder / "config.yaml").write_text(config_yaml(load_config(None, ["model.pretrained_model_name_or_path=b"])))
    assert not ui_runs.samplable(folder) and len(reads) == 6


def test_the_event_stream_sends_what_the_folder_holds(tmp_path):
    lines = [{"event": "start", "step": 0, "max_steps": 4}, {"step": 2, "max_steps": 4, "loss": 0.5, "lr": 1e-3},
             {"step": 2, "data": {"used": 8, "skipped: corrupt image": 1}}]
    folder = _run(tmp_path, "run", **{"metrics__jsonl": "".join(json.dumps(line) + "\n" for line in lines),
                                      "samples/step-2.png": "x", "samples/step-10.png": "x",
                                      "samples/process/forward.png": "x", "evaluation__json": '{"metrics": {}}'})
    watcher = ui_runs.RunWatcher(tmp_path, folder)
    events = dict(watcher.poll())
    assert events["metrics"] == {"reset": True, "records": lines}
    assert events["pictures"]["grid"]["path"] == "run/samples/step-10.png"  # the newest by step, not by name
    assert events["pictures"]["forward"]["path"] == "run/samples/process/forward.png"
    assert events["pictures"]["reverse"] is None and events["pictures"]["base"] is None  # from scratch: no base
    assert events["settings"]["max_train_steps"] == 10 and events["status"]["state"] == "stopped"
    assert watcher.poll() == []  # nothing changed
    with open(folder / "metrics.jsonl", "a") as file:
        file.write('{"step": 4, "loss": NaN}\n{"step": 5, "lo')  # a NaN, and half a line still being written
    assert watcher.poll() == [("metrics", {"reset": False, "records": [{"step": 4, "loss": None}]})]

    # Between full polls only metrics.jsonl is read: a new grid waits for the next full poll, or for new lines.
    (folder / "samples" / "step-12.png").write_text("x")
    assert watcher.poll(full=False) == []
    assert dict(watcher.poll())["pictures"]["grid"]["path"] == "run/samples/step-12.png"
    (folder / "samples" / "step-14.png").write_text("x")
    with open(folder / "metrics.jsonl", "a") as file:
        file.write('ss": 0.1}\n')
    events = dict(watcher.poll(full=False))
    assert events["metrics"]["records"] == [{"step": 5, "loss": 0.1}]
    assert events["pictures"]["grid"]["path"] == "run/samples/step-14.png"


def test_the_stream_over_http(tmp_path, monkeypatch):
    """The first events of /api/events through the ASGI app (the stream itself never ends: read, then close); then a
    line the trainer appends arrives at once, woken by the folder's change (Linux's inotify), not by a timer."""
    folder = _run(tmp_path, "run", **{"metrics__jsonl": '{"step": 1, "loss": 0.25}\n'})
    monkeypatch.setattr(server, "LIVE_SECONDS", 60.0)
    if sys.platform.startswith("linux"):  # (inotify; elsewhere the stream polls every POLL_SECONDS)
        monkeypatch.setattr(server, "POLL_SECONDS", 60.0)
    received, appended = [], []

    async def receive():
        await _forever()

    async def send(message):
        received.append(message)
        body = b"".join(m.get("body", b"") for m in received)
        if b"event: settings" in body and not appended:
            with open(folder / "metrics.jsonl", "a") as file:
                file.write('{"step": 2, "loss": 0.125}\n')
            appended.append(time.monotonic())
        if b'"step":2' in body:
            raise _Done

    app = create_app(tmp_path, ROOT / "configs", token=TOKEN, port=PORT)
    import anyio

    with pytest.raises(_Done):
        anyio.run(app, _scope("/api/events", query=b"run=run"), receive, send)
    assert time.monotonic() - appended[0] < 5  # (the timer alone: 60 s)
    body = b"".join(m.get("body", b"") for m in received).decode()
    assert received[0]["status"] == 200
    assert dict(received[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert 'event: metrics\ndata: {"reset":true,"records":[{"step":1,"loss":0.25}]}' in body
    assert 'event: metrics\ndata: {"reset":false,"records":[{"step":2,"loss":0.125}]}' in body


def test_a_run_logging_many_lines_a_second_is_read_at_most_every_quarter_second(tmp_path, monkeypatch):
    """Each line wakes the stream, but the folder is read no more often than every GAP_SECONDS: a run logging at
    every step (here 200 lines a second) costs the server no more than the polling of before. (Each read is timed
    where the stream arms its watch, on the event loop, just before it hands the read to a thread: a thread that
    starts late would shift the times the test sees, not the stream's spacing.)"""
    import anyio

    folder = _run(tmp_path, "run", metrics__jsonl="")
    watcher, polls, sent = ui_runs.RunWatcher(tmp_path, folder), [], []

    class TimedChanges(server.FolderChanges):
        def arm(self):
            polls.append(time.monotonic())
            super().arm()

    monkeypatch.setattr(server, "FolderChanges", TimedChanges)

    async def follow():
        async with anyio.create_task_group() as group:
            async def log():
                for step in range(300):
                    with open(folder / "metrics.jsonl", "a") as file:
                        file.write(json.dumps({"step": step, "loss": 0.1}) + "\n")
                    await anyio.sleep(0.005)
                await anyio.sleep(2 * server.GAP_SECONDS)
                group.cancel_scope.cancel()

            group.start_soon(log)
            async for event in server.stream(watcher):
                sent.append(event)

    anyio.run(follow)
    gaps = [later - earlier for earlier, later in zip(polls, polls[1:])]
    early = time.get_clock_info("monotonic").resolution + 1e-9  # (asyncio runs a timer up to that early)
    assert len(polls) >= 4 and min(gaps) >= server.GAP_SECONDS - early, gaps
    steps = [record["step"] for event in sent if event.startswith("event: metrics")
             for record in json.loads(event.split("data: ", 1)[1])["records"]]
    assert steps == list(range(300))  # (every line, in order, in fewer messages)


def test_folder_changes_wake_the_stream_and_the_launch_log_does_not(tmp_path):
    """What wakes a stream: a metrics line, a picture (also in a samples folder made after the stream began), a
    lock released; not the output of a run the page launched, nor writes to a file kept open (a launched run's
    progress bar writes ten times a second)."""
    import anyio

    folder = _run(tmp_path, "run", **{"metrics__jsonl": ""})
    changes = FolderChanges(folder, ignore={ui_runs.LAUNCH_LOG})
    assert changes.live == sys.platform.startswith("linux")  # (Linux's inotify)

    async def waits(change) -> float:
        changes.arm()
        change()
        start = time.monotonic()
        await changes.wait(3.0)  # (long beside a wake-up, even on a loaded machine)
        return time.monotonic() - start

    def append(name, text="x"):
        def write():
            with open(folder / name, "a") as file:
                file.write(text)
        return write

    kept_open = open(folder / "kept-open.log", "a")  # noqa: SIM115 - written to while open, as a run's output is
    try:
        woken = {"launch log": anyio.run(waits, append(ui_runs.LAUNCH_LOG)),
                 "a file kept open": anyio.run(waits, lambda: (kept_open.write("x"), kept_open.flush())),
                 "metrics": anyio.run(waits, append("metrics.jsonl", "{}\n")),
                 "samples folder": anyio.run(waits, lambda: (folder / "samples").mkdir()),
                 "grid": anyio.run(waits, append("samples/step-2.png")),
                 "lock": anyio.run(waits, append(LOCK_FILE))}
    finally:
        changes.close()
        kept_open.close()
    if not sys.platform.startswith("linux"):  # (no inotify: every wait is its timeout, the polling of before)
        assert min(woken.values()) >= 2.9
        return
    assert woken.pop("launch log") >= 2.9 and woken.pop("a file kept open") >= 2.9, woken
    assert max(woken.values()) < 1.5, woken


class _Done(Exception):
    pass


async def _forever():
    import anyio

    await anyio.sleep(3600)


def _scope(path: str, query: bytes = b"", host: bytes = b"127.0.0.1:7860", method: str = "GET") -> dict:
    """An HTTP request as a server hands it to the app: `path` decoded, as uvicorn does, and not tidied."""
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
            "headers": [(b"host", host)], "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", PORT),
            "client": ("127.0.0.1", 50000), "root_path": "", "asgi": {"version": "3.0"}}


def _raw_get(root: Path, path: str, host: bytes = b"127.0.0.1:7860") -> tuple[int, bytes]:
    import anyio

    app = create_app(root, ROOT / "configs", token=TOKEN, port=PORT)
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    anyio.run(app, _scope(path, host=host), receive, send)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])


# ---- files: nothing outside the root, only pictures / JSON / text ----------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A root with a run (a grid, a log, a config, the lock) beside a secret file outside it."""
    root = tmp_path / "outputs"
    _run(root, "run", **{"samples/step-1.png": "PNG", "ui-launch__log": "log", "__finetune-lock": "{}"})
    (tmp_path / "secret.txt").write_text("SECRET")
    return root


def test_files_under_the_root_are_served_with_their_type(served):
    client = _client(served)
    response = client.get("/files/run/samples/step-1.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/files/run/ui-launch.log").headers["content-type"].startswith("text/plain")
    for refused in ("run/config.yaml", "run/.finetune-lock", "run", "run/samples", "run/missing.png"):
        assert client.get(f"/files/{refused}").status_code == 404, refused


@pytest.mark.parametrize("path", ["/files/../secret.txt", "/files/run/../../secret.txt", "/files/%2e%2e/secret.txt",
                                  "/files//etc/passwd", "/files/run/%2e%2e/%2e%2e/secret.txt",
                                  "/files/..%2fsecret.txt", "/files/run/..\\..\\secret.txt"])
def test_paths_leading_out_of_the_root_are_refused(served, path):
    """As the client sends them (httpx tidies some) and as the server sees them (decoded, not tidied)."""
    response = _client(served).get(path)
    assert response.status_code in (403, 404) and b"SECRET" not in response.content and b"root:" not in response.content
    from urllib.parse import unquote

    status, body = _raw_get(served, unquote(path))
    assert status in (403, 404) and b"SECRET" not in body and b"root:" not in body


def test_a_symlink_leading_out_of_the_root_is_refused(served, tmp_path):
    (served / "run" / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (served / "run" / "samples" / "out").symlink_to(tmp_path)
    client = _client(served)
    assert client.get("/files/run/escape.txt").status_code == 404
    assert client.get("/files/run/samples/out/secret.txt").status_code == 404


def test_inside_resolves_first_then_compares():
    root = Path("/srv/outputs")
    assert inside(root, "/etc/passwd") is None  # root / "/etc/passwd" is "/etc/passwd"
    assert inside(root, "run/../../x") is None and inside(root, "") is None and inside(root, "a\0b") is None
    assert inside(root, "run/../run/a.png") == root.resolve() / "run" / "a.png"


def test_paths_out_of_the_root_over_a_real_socket(served):
    """Through uvicorn itself, with the request line written by hand (no client to tidy `..` or `%2e%2e`)."""
    import uvicorn

    port = _free_port()
    app = create_app(served, ROOT / "configs", token=TOKEN, port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        for target in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/run/%2E%2E/%2E%2E/secret.txt",
                       "/files/%2e%2e%2fsecret.txt", "/files/run/samples/step-1.png"):
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                                   .encode())
                reply = b""
                while chunk := connection.recv(65536):
                    reply += chunk
            assert b"SECRET" not in reply, target
            expected = b"200 OK" if target.endswith(".png") else b"404"
            assert expected in reply.split(b"\r\n")[0], (target, reply[:200])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Host header and token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, allowed", [("127.0.0.1:7860", True), ("localhost:7860", True), ("localhost", True),
                                           ("[::1]:7860", True), ("evil.example", False),
                                           ("evil.example:7860", False), ("127.0.0.1:8080", False),
                                           ("127.0.0.1.evil.example:7860", False)])
def test_a_host_header_not_naming_this_server_is_refused(tmp_path, host, allowed):
    """A page from another site whose name was made to resolve here (DNS rebinding) sends its own name."""
    response = _client(tmp_path).get("/api/runs", headers={"Host": host})
    assert (response.status_code == 200) == allowed
    if not allowed:
        assert "is not this server's name" in response.json()["error"]


def test_allowed_host_names_another_name_the_page_answers_to(tmp_path, monkeypatch):
    """`--allowed-host` reaches the Host check: that name is served, any other still refused."""
    import finetune.ui

    served = []

    class Recorded:  # (uvicorn's server, not started: the app it was given is kept)
        started = True

        def __init__(self, config):
            served.append(config.app)

        def run(self):
            pass

    monkeypatch.setattr(server, "QuietServer", Recorded)
    finetune.ui.serve(["--root", str(tmp_path), "--port", str(PORT), "--allowed-host", "Box.Lan"])
    [app] = served
    assert TestClient(app, base_url=f"http://box.lan:{PORT}").get("/").status_code == 200
    assert TestClient(app, base_url=f"http://127.0.0.1:{PORT}").get("/").status_code == 200
    refused = TestClient(app, base_url=f"http://other.lan:{PORT}").get("/")
    assert refused.status_code != 200 and "is not this server's name" in refused.text


def test_posts_need_the_token_and_json(tmp_path):
    client = _client(tmp_path)
    body = {"config": "shapes.yaml", "overrides": ["train.max_train_step=1"]}
    for token in (None, "wrong", TOKEN[:-1]):
        response = _post(client, "/api/start", body, token=token)
        assert response.status_code == 403 and TOKEN_HEADER in response.json()["error"]
    form = client.post("/api/start", data={"config": "shapes.yaml"}, headers={TOKEN_HEADER: TOKEN})
    assert form.status_code == 403 and "application/json" in form.json()["error"]
    assert _post(client, "/api/start", body).status_code == 400  # through the guard: the config is checked
    page = client.get("/")
    assert TOKEN in page.text  # the page carries it
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == policy["script-src"] == policy["connect-src"] == "'self'"  # (no inline script)
    assert "<script>" not in page.text  # (its script is a file the policy allows)


def test_a_remote_server_needs_the_token_for_every_request(tmp_path):
    client = _client(tmp_path, remote=True)
    assert client.get("/").status_code == 403 and client.get("/api/runs").status_code == 403
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "finetune_ui_token" in page.headers["set-cookie"]
    assert "httponly" in page.headers["set-cookie"].lower() and "samesite=strict" in page.headers["set-cookie"].lower()
    assert client.get("/api/runs").status_code == 200  # the cookie


def test_listening_beyond_this_machine_needs_the_flag_and_a_token():
    check_exposure("127.0.0.1", False, None)
    with pytest.raises(UserError, match="--allow-remote and --token"):
        check_exposure("0.0.0.0", False, "x" * 32)
    with pytest.raises(UserError, match="needs --token"):
        check_exposure("0.0.0.0", True, None)
    with pytest.raises(UserError, match="at least 16"):
        check_exposure("192.168.1.5", True, "short")
    check_exposure("0.0.0.0", True, "x" * 32)


def test_the_server_looks_for_a_stop_once_a_second(monkeypatch):
    """uvicorn's own loop wakes ten times a second; the page's server once (each wake-up costs a run on a busy
    machine more than its CPU time), with uvicorn's header refresh at every look."""
    import asyncio

    import uvicorn

    quiet = server.QuietServer(uvicorn.Config(create_app(ROOT, ROOT / "configs", token=TOKEN, port=PORT)))
    ticks = []

    async def on_tick(counter):
        ticks.append((counter, time.monotonic()))
        return len(ticks) == 3

    monkeypatch.setattr(quiet, "on_tick", on_tick)
    asyncio.run(quiet.main_loop())
    assert [counter % 10 for counter, _ in ticks] == [0, 0, 0]
    assert all(0.95 < later - earlier < 1.9 for (_, earlier), (_, later) in zip(ticks, ticks[1:]))


def test_a_taken_port_is_an_error_and_sigterm_stops_the_server(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "finetune.ui", "--root", str(tmp_path), "--port", str(port)],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and f"error: could not listen on 127.0.0.1:{port}" in result.stderr
    serving = subprocess.Popen([sys.executable, "-m", "finetune.ui", "--root", str(tmp_path), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, serving)
        serving.terminate()
        start = time.monotonic()
        serving.wait(timeout=10)
        assert time.monotonic() - start < 6  # (it looks for a stop once a second)
    finally:
        serving.kill()


def test_a_missing_starlette_is_one_line(tmp_path):
    code = "import sys; sys.modules['uvicorn'] = None; from finetune.ui import main; main(['--port', '1'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert 'pip install -e ".[ui]"' in result.stderr


# ---- start, stop, resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ({"config": "shapes.yaml", "overrides": ["train.max_train_step=10"]}, "did you mean train.max_train_steps"),
    ({"config": "shapes.yaml", "overrides": ["train.learning_rate=fast"]}, "train.learning_rate"),
    ({"config": "shapes.yaml", "overrides": ["--dry-run"]}, "expected section.key=value"),
    ({"config": "shapes.yaml", "overrides": ["train.seed=1\nmodel.x=2"]}, "expected section.key=value"),
    ({"config": "shapes.yaml", "overrides": "train.seed=1"}, "a list of"),
    ({"config": "shapes.yaml", "overrides": ["data.allow_pipe_urls=true"]}, "not from the page"),
    ({"config": "shapes.yaml", "overrides": ["data.num_samples=null", "data.sources=[{source: webdataset, path: "
                                             "'pipe:touch x', allow_pipe_urls: true}]"]}, "not from the page"),
    ({"config": "shapes.yaml", "overrides": ["validation.loss_data={source: webdataset, path: 'pipe:touch x', "
                                             "allow_pipe_urls: true}"]}, "not from the page"),
    ({"config": "../pyproject.toml"}, "is not one of the configs"),
    ({"config": "/etc/passwd"}, "is not one of the configs"),
    ({"config": "shapes.yaml", "overrides": ["train.output_dir=/tmp/elsewhere"]}, "not inside the output root"),
    ({"config": "shapes.yaml", "overrides": ["train.output_dir=../outside"]}, "not inside the output root"),
])
def test_a_start_is_checked_by_the_config_loader_before_anything_runs(tmp_path, body, message):
    root = tmp_path / "outputs"
    root.mkdir()
    response = _post(_client(root), "/api/start", body)
    assert response.status_code == 400 and message in response.json()["error"], response.json()
    assert list(root.iterdir()) == []  # nothing written, nothing launched


def test_a_second_start_on_a_held_folder_is_refused(tmp_path, holder):
    root = tmp_path / "outputs"
    process = holder(_run(root, "run"))
    response = _post(_client(root), "/api/start", {"config": "shapes.yaml",
                                                   "overrides": [f"train.output_dir={root / 'run'}"]})
    assert response.status_code == 409 and "is in use by another run" in response.json()["error"]
    assert process.poll() is None and not (root / "run" / ui_runs.LAUNCH_LOG).exists()


def test_stop_sends_sigterm_to_the_lock_holder(tmp_path, holder):
    """Also for a run started elsewhere (here: not by the page): the lock names the process to signal."""
    folder = _run(tmp_path, "run")
    process = holder(folder)
    response = _post(_client(tmp_path), "/api/stop", {"run": "run"})
    assert response.status_code == 200 and f"pid {process.pid}" in response.json()["message"]
    assert process.wait(timeout=30) == 0 and "stopped by SIGTERM" in process.stdout.read()
    assert ui_runs.status(folder)["state"] != "running"
    response = _post(_client(tmp_path), "/api/stop", {"run": "run"})
    assert response.status_code == 409 and "is not running" in response.json()["error"]


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX signal's exit code")
def test_stop_ends_a_launch_still_starting_and_its_exit_code_shows(tmp_path):
    """Before the trainer takes the lock the page signals the process it launched; the crash shows the signal's
    exit code."""
    root = tmp_path / "outputs"
    client = _client(root)
    assert _post(client, "/api/start", {"config": "shapes.yaml",
                                        "overrides": [f"train.output_dir={root / 'run'}"]}).status_code == 200
    pid = ui_runs.read_launch(root / "run")["pid"]
    assert os.getsid(pid) == pid  # its own session: stopping the page does not stop it
    again = _post(client, "/api/start", {"config": "shapes.yaml", "overrides": [f"train.output_dir={root / 'run'}"]})
    assert again.status_code == 409 and "is in use by another run (starting)" in again.json()["error"], again.json()
    response = _post(client, "/api/stop", {"run": "run"})
    assert response.status_code == 200 and "before it began training" in response.json()["message"], response.json()
    deadline = time.monotonic() + 60
    while (status := ui_runs.status(root / "run"))["state"] == "starting" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["state"] == "crashed" and f"exit code {-signal.SIGTERM}" in status["detail"], status


def test_stop_refuses_a_run_it_may_not_signal(tmp_path, holder, monkeypatch):
    """Another user's run (os.kill says so), a lock naming another host, or one naming pid 1: refused, named, not
    signalled and no server error."""
    folder = _run(tmp_path, "run")
    process = holder(folder)
    kill = os.kill

    def not_yours(pid, signum):
        if signum == signal.SIGTERM:
            raise PermissionError(1, "Operation not permitted")
        return kill(pid, signum)

    monkeypatch.setattr(os, "kill", not_yours)
    response = _post(_client(tmp_path), "/api/stop", {"run": "run"})
    assert response.status_code == 409 and f"(pid {process.pid}) belongs to another user" in response.json()["error"]
    monkeypatch.setattr(os, "kill", kill)
    assert process.poll() is None
    for pid, host, says in [(process.pid, "elsewhere.example", "runs on elsewhere.example, not on this machine"),
                            (1, socket.gethostname(), "names pid 1, which is no run this page can stop")]:
        monkeypatch.setattr(ui_runs, "lock_state", lambda folder, pid=pid, host=host: ("held", {"pid": pid,
                                                                                               "host": host}))
        response = _post(_client(tmp_path), "/api/stop", {"run": "run"})
        assert response.status_code == 409 and says in response.json()["error"], response.json()
    assert process.poll() is None


def test_resume_starts_the_run_again_from_its_saved_config_at_its_latest_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    folder = _run(root, "run")
    (folder / "checkpoint-4").mkdir()
    commands, popen = [], subprocess.Popen

    def recorded(command, **kwargs):  # (the trainer's command recorded; a process that ends at once runs instead)
        commands.append(command)
        return popen([sys.executable, "-c", "pass"], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recorded)
    response = _post(_client(root), "/api/resume", {"run": "run"})
    assert response.status_code == 200 and response.json()["run"] == "run", response.json()
    [command] = commands
    assert command[1:4] == ["-m", "finetune.train", "--config"] and Path(command[4]).resolve() == (
        folder / "config.yaml").resolve()
    assert command[5:] == [f"train.output_dir={folder.resolve()}", "train.resume_from_checkpoint=latest"]


def test_stop_and_resume_name_a_run_under_the_root(tmp_path):
    client = _client(tmp_path / "outputs")
    for path in ("/api/stop", "/api/resume"):
        for run in ("../x", "/etc", "", None, ["a"]):
            response = _post(client, path, {"run": run})
            assert response.status_code == 404 and "no run" in response.json()["error"]
    _run(tmp_path / "outputs", "fresh")
    response = _post(client, "/api/resume", {"run": "fresh"})
    assert response.status_code == 409 and "no checkpoint" in response.json()["error"]


@pytest.mark.slow
def test_a_run_that_fails_at_start_shows_why_instead_of_starting(tmp_path, monkeypatch):
    """A launched run that ends before training (here: its resume target does not exist) is crashed, with the
    trainer's own error from ui-launch.log, and its exit code: also when the status is read while the code is being
    written (slowed here; CI once read it in that moment and got a crash without its code)."""
    write_json = launcher._write_json

    def slow_write_json(path, data):
        if data.get("returncode") is not None:
            time.sleep(1.0)
        write_json(path, data)

    monkeypatch.setattr(launcher, "_write_json", slow_write_json)
    root = tmp_path / "outputs"
    client = _client(root)
    response = _post(client, "/api/start", {"config": "shapes.yaml", "overrides": [
        f"train.output_dir={root / 'run'}", "train.resume_from_checkpoint=checkpoint-99"]})
    assert response.status_code == 200, response.json()
    assert response.json()["run"] == "run"
    deadline = time.monotonic() + 120
    while (status := ui_runs.status(root / "run"))["state"] == "starting" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["state"] == "crashed" and "exit code 2" in status["detail"], status
    assert "checkpoint-99" in status["log"]


# ---- sampling ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """An output root with one finished run: a tiny pipeline folder as a full run exports it."""
    root = tmp_path_factory.mktemp("ui") / "outputs"
    torch.manual_seed(0)
    pipeline = build_components(ModelConfig(**TINY_MODEL), 8, shapes.all_captions()).pipeline()
    pipeline.save_pretrained(root / "tiny")
    (root / "tiny" / "config.yaml").write_text("validation:\n  guidance_scale: 2.0\n")
    return root


def test_sampling_draws_images_into_the_run_folder_with_progress(trained_root):
    client = _client(trained_root)
    assert client.get("/api/runs").json()["runs"][0]["samplable"] is True
    request = {"run": "tiny", "prompt": "a red circle", "num_inference_steps": 3, "guidance_scale": 2.0,
               "seed": 5, "scheduler": "ddim", "num_images_per_prompt": 2}
    assert _post(client, "/api/sample", request).status_code == 200
    deadline = time.monotonic() + 60
    while (job := client.get("/api/sample").json())["state"] in ("loading", "sampling") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job["state"] == "done" and job["step"] == job["total"] == 3, job
    assert job["images"] == ["tiny/samples/ui/00-a-red-circle-00-seed5.png",
                             "tiny/samples/ui/00-a-red-circle-01-seed6.png"]
    image = client.get(f"/files/{job['grid']}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    settings = json.loads((trained_root / "tiny" / "samples" / "ui" / "settings.json").read_text())
    assert settings["scheduler"] == "DDIMScheduler" and settings["seed"] == 5


def test_a_second_sampling_job_waits_for_the_first(trained_root, monkeypatch):
    from finetune.ui import sampling

    drawing, done = threading.Event(), threading.Event()

    def held(self, job, folder, request):
        drawing.set()
        assert done.wait(30)
        return {}

    monkeypatch.setattr(sampling.Sampler, "_draw", held)
    client = _client(trained_root)
    request = {"run": "tiny", "prompt": "a red circle", "num_inference_steps": 3}
    try:
        assert _post(client, "/api/sample", request).status_code == 200 and drawing.wait(30)
        second = _post(client, "/api/sample", request)
        assert second.status_code == 409 and "a sampling job is running" in second.json()["error"], second.json()
    finally:
        done.set()


@pytest.mark.parametrize("change, message", [({"prompt": ""}, "prompt"), ({"num_inference_steps": 0}, "num_inference"),
                                             ({"seed": -1}, "seed"), ({"scheduler": "plms"}, "scheduler"),
                                             ({"num_images_per_prompt": 100}, "num_images_per_prompt"),
                                             ({"guidance_scale": "2"}, "guidance_scale"), ({"path": "/x"}, "unknown")])
def test_sampling_settings_out_of_range_are_named(trained_root, change, message):
    request = {"run": "tiny", "prompt": "a red circle", **change}
    response = _post(_client(trained_root), "/api/sample", request)
    assert response.status_code == 400 and message in response.json()["error"]


def test_the_names_the_ui_reads_are_the_trainers():
    from finetune import evaluate, lora, progress, sample
    from finetune.ui import sampling

    assert ui_runs.METRICS_FILE == progress.METRICS_FILE and ui_runs.EVALUATION_FILE == evaluate.EVALUATION_FILE
    assert ui_runs.LORA_WEIGHTS == lora.WEIGHT_NAME and sampling.SCHEDULER_NAMES == tuple(sample.SCHEDULERS)
