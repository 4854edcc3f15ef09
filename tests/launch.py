"""`run`: `subprocess.run` for the project's programs that tests launch, forked from a pre-imported Python.

`run([sys.executable, "finetune/train.py", ...], ...)` and `run([sys.executable, "-m", "finetune.<tool>", ...], ...)`
take about 5 s less each than a new interpreter (`tests/zygote.py` says how, and why it stays the same program).
Everything else, and every launch while `FINETUNE_TEST_FORK=0` is set, goes to `subprocess.run` unchanged.

What a fork shares with its server, and how that is kept from hiding a bug:
- The imports: a server imports the one program it serves (so no module a real run of it would not have).
- Environment variables read at import (HF_ENDPOINT, HF_HOME, the fault injection's switches in tests/faults, ...):
  a server serves only launches whose environment equals its own but for `LATE_ENV` (read when the program runs,
  not when it imports) and pytest's own. Servers start at an environment's third launch of a program (its first two
  are new interpreters: starting two servers costs about one launch), and at most `MAX_SERVED` kinds are kept: a
  new one replaces the one launched least, if it has been launched more.
- CUDA: a fork of a process that asked torch about CUDA (bitsandbytes does at import) cannot use it, so only a
  CPU-only torch, or an environment with `CUDA_VISIBLE_DEVICES=""`, is forked.
- Python's hash seed (string hashes, so the order of a set of strings): two servers per kind, used in turn, so a
  run and the run resuming it hash differently, as two processes do.
- Random seeds: each child draws new ones, as a new process does.
"""

import atexit
import json
import locale
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ZYGOTE = ROOT / "tests" / "zygote.py"
SWITCH = "FINETUNE_TEST_FORK"
LATE_ENV = {"FINETUNE_CACHE", "FINETUNE_DEBUG"}  # read when the program runs
MAX_SERVED = 3  # kinds of launch (environment, program) whose servers are kept: two each, about 0.5 GB each

_servers: dict[tuple, list["_Server"]] = {}
_launches: Counter = Counter()
_broken: set = set()
forked = Counter()  # launches by how they ran ("fork" / "process"), for the tests of this module


class _Server:
    def __init__(self, env: dict, preload: str):
        self.address = f"finetune-zygote-{os.getpid()}-{id(self)}"
        self.process = subprocess.Popen([sys.executable, str(ZYGOTE), self.address, preload], env=env, cwd=ROOT,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)

    def wait_ready(self) -> bool:
        return self.process.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def run(args, *, cwd=None, env=None, timeout=None, check=False, capture_output=False, text=False, **kwargs):
    """`subprocess.run(args, ...)` with the same result (returncode, stdout, stderr, `check`, `timeout`)."""
    target = _target(args, cwd)
    env = dict(os.environ if env is None else env)
    forks = (target is not None and not kwargs and os.environ.get(SWITCH) != "0"
             and (torch.version.cuda is None or env.get("CUDA_VISIBLE_DEVICES") == ""))
    if forks:
        kind = (frozenset((k, v) for k, v in env.items() if k not in LATE_ENV and not k.startswith("PYTEST_")),
                target["preload"])
        server = _server(kind, env)
        request = {**target, "env": env, "cwd": str(cwd or os.getcwd())}
        result = _fork(server, request, timeout, capture_output, args) if server else None
        if result is not None:
            returncode, stdout, stderr = result
            if text and capture_output:
                stdout, stderr = _text(stdout), _text(stderr)
            if check and returncode:
                raise subprocess.CalledProcessError(returncode, args, stdout, stderr)
            return subprocess.CompletedProcess(args, returncode, stdout, stderr)
    forked["process"] += 1
    return subprocess.run(args, cwd=cwd, env=env, timeout=timeout, check=check, capture_output=capture_output,
                          text=text, **kwargs)


def _target(args, cwd) -> dict | None:
    """What `python <args>` runs, with its sys.argv and the module a server imports for it, when it is one of the
    project's programs, given plainly (no interpreter options)."""
    args = [str(a) for a in args]
    if len(args) < 2 or args[0] != sys.executable:
        return None
    if args[1] == "-m" and len(args) > 2 and args[2].split(".")[0] == "finetune":
        # (runpy puts the module's file in argv[0])
        return {"module": args[2], "argv": ["-m", *args[3:]], "preload": args[2]}
    script = Path(cwd or os.getcwd()) / args[1]
    if script.suffix == ".py" and script.resolve().parent == ROOT / "finetune":
        return {"script": args[1], "argv": args[1:], "preload": f"finetune.{script.stem}"}
    return None


def _server(kind: tuple, env: dict) -> "_Server | None":
    _launches[kind] += 1
    if kind in _broken or _launches[kind] <= 2:
        return None  # two servers cost about one launch: a kind launched once or twice does not pay for them
    if kind not in _servers:
        if len(_servers) >= MAX_SERVED:
            least = min(_servers, key=_launches.__getitem__)
            if _launches[least] >= _launches[kind]:
                return None
            _stop(least)
        servers = [_Server(env, kind[1]), _Server(env, kind[1])]  # (started together: each import uses one core)
        _servers[kind] = servers
        if not all([server.wait_ready() for server in servers]):
            _broken.add(kind)
            _stop(kind)
            return None
    return _servers[kind][_launches[kind] % 2]


def _stop(kind: tuple) -> None:
    """Stop a kind's servers."""
    for server in _servers.pop(kind, []):
        server.stop()


def _fork(server: _Server, request: dict, timeout, capture: bool, args):
    """(returncode, stdout, stderr) of the program forked by `server`, or None when the server is gone (it is
    stopped, and the launch goes to a new interpreter)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    devnull = os.open(os.devnull, os.O_RDONLY)
    pipes = [os.pipe(), os.pipe()] if capture else []
    fds = [devnull, *(w for _, w in pipes)] if capture else [devnull, 1, 2]
    output: dict[int, list[bytes]] = {r: [] for r, _ in pipes}
    readers = [threading.Thread(target=_drain, args=(r, output[r]), daemon=True) for r, _ in pipes]
    pid = None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        try:
            try:
                connection.connect("\0" + server.address)
                socket.send_fds(connection, [json.dumps(request).encode()], fds)
                pid = json.loads(connection.recv(4096))["pid"]
                forked["fork"] += 1
            except (OSError, ValueError):  # (a server that died: ValueError is an empty reply)
                for kind, servers in list(_servers.items()):
                    if server in servers:
                        _broken.add(kind)
                        _stop(kind)
                for r, _ in pipes:
                    os.close(r)
                return None
            finally:
                for fd in fds[:1] + [w for _, w in pipes]:
                    os.close(fd)
            for reader in readers:
                reader.start()
            connection.settimeout(_left(deadline))
            returncode = json.loads(connection.recv(4096))["returncode"]
            for reader in readers:
                reader.join(_left(deadline))
            if any(reader.is_alive() for reader in readers):  # (something the program started holds its output)
                raise TimeoutError
        except TimeoutError:
            _kill(pid)
            for reader in readers:
                reader.join(1)
            raise subprocess.TimeoutExpired(args, timeout, *(b"".join(output[r]) for r, _ in pipes)) from None
        except BaseException:  # as subprocess.run: whatever interrupts it kills the program
            _kill(pid)
            raise
    if not capture:
        return returncode, None, None
    return returncode, *(b"".join(output[r]) for r, _ in pipes)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def _kill(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _drain(fd: int, chunks: list[bytes]) -> None:
    with open(fd, "rb", buffering=0) as stream:
        while chunk := stream.read(1 << 16):
            chunks.append(chunk)


def _text(data: bytes) -> str:
    """As `subprocess.run(text=True)` decodes: the locale's encoding, universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


@atexit.register
def _stop_all() -> None:
    for kind in list(_servers):
        _stop(kind)
