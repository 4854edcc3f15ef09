"""tests/launch.py: a program it forks from a pre-imported Python behaves as the new interpreter it replaces."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from . import launch
from .conftest import TINY_RUN
from .test_train import ROOT, TRAIN, _env

forks = pytest.mark.skipif(os.environ.get(launch.SWITCH) == "0", reason=f"{launch.SWITCH}=0: nothing is forked")

PROBE = """
import json, os, random, sys
import numpy, torch
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "hash": hash("finetune"), "random": random.random(), "numpy": float(numpy.random.random()),
                  "torch": torch.initial_seed(), "env": os.environ.get("PROBE"), "ppid": os.getppid()}))
sys.stderr.write("to stderr\\r\\n")
sys.exit(int(sys.argv[1]))
"""


@forks
def test_a_forked_program_gets_its_argv_folder_environment_seeds_and_status(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "work").mkdir()
    env = {**os.environ, "PROBE": "yes"}
    real = subprocess.run([sys.executable, str(script), "3"], cwd=tmp_path / "work", env=env, capture_output=True)
    servers = [launch._Server(env, "finetune"), launch._Server(env, "finetune")]
    try:
        assert all([server.wait_ready() for server in servers])
        runs = []
        for server in (servers[0], servers[0], servers[1]):
            request = {"script": str(script), "argv": [str(script), "3"], "env": env, "cwd": str(tmp_path / "work"),
                       "preload": "finetune"}
            runs.append(launch._fork(server, request, 60, True, ["probe"]))
    finally:
        for server in servers:
            server.stop()
    expected = json.loads(real.stdout)
    seen = [json.loads(stdout) for _, stdout, _ in runs]
    for (returncode, _, stderr), probe, server in zip(runs, seen, (servers[0], servers[0], servers[1])):
        assert returncode == real.returncode == 3
        assert stderr == real.stderr == b"to stderr\r\n"
        assert launch._text(stderr) == "to stderr\n"  # as subprocess.run(text=True) gives it
        for key in ("argv", "cwd", "path0", "name", "env"):
            assert probe[key] == expected[key], key
        assert probe["ppid"] == server.process.pid
    # A new process draws new seeds; two children of one server share its string hashes, the two servers do not
    # (unless PYTHONHASHSEED fixes them for every process).
    for key in ("random", "numpy", "torch"):
        assert len({probe[key] for probe in seen}) == 3, key
    assert seen[0]["hash"] == seen[1]["hash"]
    assert (seen[1]["hash"] == seen[2]["hash"]) == bool(os.environ.get("PYTHONHASHSEED"))


@forks
def test_the_trainer_forked_trains_and_fails_as_a_new_process_does(tmp_path):
    env = _env(tmp_path, {"FINETUNE_TEST_LAUNCH": str(tmp_path)})  # an environment of its own: new servers
    launch._stop_all()  # (room for them, whatever the tests before kept: the kinds stopped start again when used)
    results, before = [], launch.forked["fork"]
    for name in ("a", "b", "c", "d"):  # the first two launches with an environment are new processes
        results.append(launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"),
                                   *TINY_RUN, "train.max_train_steps=2", "validation.validation_steps=0",
                                   f"train.output_dir={tmp_path / name}"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300))
    assert launch.forked["fork"] - before == 2
    assert [result.returncode for result in results] == [0] * 4
    weights = [load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors") for name in "abcd"]
    for other in weights[1:]:
        assert all((weights[0][key] == other[key]).all() for key in weights[0])
    lines = [[line for line in result.stdout.splitlines() if "images/s" not in line and str(tmp_path) not in line]
             for result in results]
    assert lines[0] == lines[2] == lines[3]

    # A user's mistake: one line and status 2, forked as in a new process.
    bad = [launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), "train.nope=1"],
                      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert launch.forked["fork"] - before == 4
    real = subprocess.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), "train.nope=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert real.returncode == 2 and "train.nope" in real.stderr
    for result in bad:
        assert (result.returncode, result.stdout, result.stderr) == (real.returncode, real.stdout, real.stderr)
    with pytest.raises(subprocess.CalledProcessError):
        launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), "train.nope=1"],
                   cwd=tmp_path, env=env, capture_output=True, check=True, timeout=300)

    # A run past its time-out is killed, as subprocess.run kills it.
    with pytest.raises(subprocess.TimeoutExpired):
        launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), *TINY_RUN,
                    f"train.output_dir={tmp_path / 'slow'}", "train.max_train_steps=100000"], cwd=tmp_path, env=env,
                   capture_output=True, text=True, timeout=3)
    assert launch.forked["fork"] - before == 6

    # A server that died: the launch goes to a new interpreter, and that kind is not forked again.
    for server in launch._servers[next(kind for kind in launch._servers if kind[0] == _kind(env))]:
        server.process.kill()
    before = dict(launch.forked)
    for _ in range(2):
        result = launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"),
                             "train.nope=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert (result.returncode, result.stderr) == (real.returncode, real.stderr)
    assert (launch.forked["fork"], launch.forked["process"]) == (before["fork"], before["process"] + 2)


def _kind(env: dict) -> frozenset:
    return frozenset((k, v) for k, v in env.items() if k not in launch.LATE_ENV and not k.startswith("PYTEST_"))


def test_what_is_not_the_projects_program_runs_as_before(tmp_path, monkeypatch):
    assert launch._target([sys.executable, "-c", "pass"], tmp_path) is None
    assert launch._target([sys.executable, "-S", TRAIN], tmp_path) is None
    assert launch._target([sys.executable, str(ROOT / "tests" / "sync_check.py")], tmp_path) is None
    assert launch._target(["python3", TRAIN], tmp_path) is None
    assert launch._target([sys.executable, TRAIN, "--x"], tmp_path) == {
        "script": TRAIN, "argv": [TRAIN, "--x"], "preload": "finetune.train"}
    assert launch._target([sys.executable, "-m", "finetune.sample", "out"], tmp_path) == {
        "module": "finetune.sample", "argv": ["-m", "out"], "preload": "finetune.sample"}
    monkeypatch.setenv(launch.SWITCH, "0")
    before = launch.forked["process"]
    for _ in range(3):
        result = launch.run([sys.executable, "-m", "finetune.data", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage" in result.stdout
    assert launch.forked["process"] - before == 3
