"""A Python with a program's imports already done, which forks a process for each launch of that program by a test.

A trainer process the tests launch spends about 5.5 s of CPU importing torch, diffusers, transformers, peft and
accelerate before its first step, and the tiny runs take about a second after that: 152 launches held about 14 of the
suite's 28 minutes (benchmarks/results/suite-timing-2026-12-06.txt). This server imports the program's module once
(so nothing that a real run of the program would not import); each request (`tests/launch.py` sends it) forks a
child that becomes the program: its argv, environment (and what the imports set in it), working folder,
stdin/stdout/stderr (passed over the socket), what the imports printed, fresh random seeds, and the program itself
(`finetune/train.py`, or `-m finetune.<tool>`) run by runpy as `__main__`, the module imported by name dropped
first, as `python` would run it. The child exits as that program would (its status, a traceback on an uncaught
exception, atexit handlers, finalisation); the server waits for it and sends the status. Left different: a
traceback has five more frames at its top (this file's and runpy's), and `sys.orig_argv` is the server's.

    python tests/zygote.py ADDRESS MODULE    # imports MODULE, binds the abstract unix socket ADDRESS, prints
                                             # "ready"; exits when its parent does

The server runs no torch work itself, so it forks with no OpenMP pool that a child could inherit half-made, and
it serves one request at a time (the tests launch one program at a time). Environment variables that libraries
read at import are the server's own: `tests/launch.py` starts servers per environment and program, and only where
CUDA cannot be in play (a forked child cannot use CUDA once its parent asked torch about it, as bitsandbytes does
at import).
"""

import importlib.util
import json
import os
import random
import runpy
import signal
import socket
import sys
import tempfile


def serve(address: str, preload: str) -> tuple[dict, list[int], bytes, dict]:
    """Import `preload` (the module the launches run, or the package of a package's `__main__`), then fork a child
    per request. Returns, in the child only: the request, its three fds, what the imports wrote to stderr, and the
    environment variables the imports set."""
    sys.stderr.flush()
    saved_stderr, noise = os.dup(2), tempfile.TemporaryFile()
    os.dup2(noise.fileno(), 2)  # what the imports print, every child prints too (a real process would)
    environ = dict(os.environ)
    importlib.import_module(preload)  # (what it imports, the program imports: no module a real run would lack)
    set_by_imports = {key: value for key, value in os.environ.items() if environ.get(key) != value}
    sys.stderr.flush()
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)
    noise.seek(0)
    import_output = noise.read()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("\0" + address)  # (an abstract address: no file to leave behind)
    listener.listen()
    listener.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test session is gone
                sys.exit(0)
            continue
        connection.settimeout(None)
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        pid = os.fork()
        if pid == 0:
            listener.close()
            connection.close()
            return json.loads(message), fds, import_output, set_by_imports
        for fd in fds:
            os.close(fd)
        try:
            connection.send(json.dumps({"pid": pid}).encode())
        except OSError:
            pass
        _, status = os.waitpid(pid, 0)
        try:
            connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
        except OSError:  # the client gave up (a timeout) and closed its end
            pass
        connection.close()


def become(request: dict, fds: list[int], import_output: bytes, set_by_imports: dict, preload: str) -> None:
    """Turn this child into the process `python <argv>` would have started, up to the imports already done."""
    for fd, standard in zip(fds, (0, 1, 2)):
        os.dup2(fd, standard)
        os.close(fd)
    os.write(2, import_output)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in set_by_imports.items():
        os.environ.setdefault(key, value)
    if "multiprocessing.process" in sys.modules:  # (it notes the folder a process started in)
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.getcwd()
    if importlib.util.find_spec(preload).submodule_search_locations is None:
        sys.modules.pop(preload, None)  # the program runs as __main__, before anything imports it by name
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy
    import torch

    random.seed()  # a new process draws new seeds (the trainer seeds its own generators from the config)
    numpy.random.seed()
    torch.seed()
    sys.argv = list(request["argv"])


def run(request: dict) -> None:
    if "script" in request:
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))  # as `python script.py` sets it
        runpy.run_path(request["script"], run_name="__main__")
    else:
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    request, fds, import_output, set_by_imports = serve(sys.argv[1], sys.argv[2])
    become(request, fds, import_output, set_by_imports, sys.argv[2])
    run(request)
