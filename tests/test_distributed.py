"""The end-of-run check that every process holds the same trained weights: every trained tensor of every model,
hashed, the first that differs named; with a stand-in for a second process, and once through `accelerate launch`."""

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from finetune import checkpointing, distributed, lora
from finetune.config import LoraConfig
from finetune.distributed import check_in_sync, weight_digests

from .conftest import TINY_RUN
from .test_train import ROOT, _env, _two_process_launcher


class TwoProcesses:
    """An accelerator of 2 processes whose process 1 holds `others` (the same models, maybe changed): `gather` puts
    the digests process 1 would send after this process's own."""

    num_processes, device, distributed_type = 2, torch.device("cpu"), DistributedType.MULTI_CPU

    def __init__(self, others: list[torch.nn.Module]):
        self.others = others

    def unwrap_model(self, model, keep_torch_compile=True):
        return model

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, weight_digests(self.others)[1]])


def _old_checksum(model) -> float:
    """What the check summed before: all UNet parameters into one double."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()


def _models(components):
    return [components.unet, components.text_encoder]


def test_identical_weights_pass(tiny_components, caplog):
    PartialState()  # accelerate's logger needs it
    models = _models(tiny_components)
    count = sum(1 for model in models for _ in model.parameters())
    with caplog.at_level(logging.INFO, logger="finetune"):
        check_in_sync(TwoProcesses(copy.deepcopy(models)), models)
    assert f"weights identical on all 2 processes ({count} trained tensors" in caplog.text


def test_two_swapped_elements_in_the_unet_are_named(tiny_components):
    models = _models(tiny_components)
    others = copy.deepcopy(models)
    weight = others[0].conv_in.weight.data
    weight[0, 0, 0, 0], weight[0, 0, 0, 1] = weight[0, 0, 0, 1].clone(), weight[0, 0, 0, 0].clone()
    assert not torch.equal(weight, models[0].conv_in.weight)
    assert _old_checksum(others[0]) == _old_checksum(models[0])  # the old sum could not see a swap
    with pytest.raises(RuntimeError, match=r"UNet2DConditionModel\.conv_in\.weight on process\(es\) \[1\] differs"):
        check_in_sync(TwoProcesses(others), models)


def test_one_element_of_the_text_encoder_is_named(tiny_components):
    """One bit of one weight of the text encoder (which the old check never looked at), late in the order."""
    models = _models(tiny_components)
    others = copy.deepcopy(models)
    name, weight = list(others[1].named_parameters())[-1]
    weight.data.view(-1)[3] = torch.nextafter(weight.data.view(-1)[3], torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=rf"CLIPTextModel\.{name} on process\(es\) \[1\] differs"):
        check_in_sync(TwoProcesses(others), models)


def test_lora_adapters_are_compared_and_the_frozen_base_is_not(tiny_components):
    """With LoRA the trained tensors are the adapters (UNet and text encoder): one of them differing is named; the
    frozen base is not trained, so it is not hashed."""
    trained = lora.attach(tiny_components, LoraConfig(enabled=True, train_text_encoder=True))
    names = weight_digests(trained)[0]
    assert names and all(".lora_" in name for name in names)
    assert any(name.startswith("UNet2DConditionModel.") for name in names)
    assert any(name.startswith("CLIPTextModel.") for name in names)
    others = copy.deepcopy(trained)
    name, adapter = next((n, p) for n, p in others[1].named_parameters() if "lora_B" in n)
    adapter.data[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match=rf"CLIPTextModel\.{name} on process\(es\) \[1\] differs"):
        check_in_sync(TwoProcesses(others), trained)


LEAVE = """
import atexit, sys
from finetune import distributed

class Ended:  # what finish needs of a multi-process Accelerator
    num_processes = int(sys.argv[1])
    def wait_for_everyone(self): print("barrier", end=" ")
    def end_training(self): print("ended", end=" ")

def main():
    distributed.finish(Ended())
    print("summary", end="")  # no newline: still in the buffer
    if sys.argv[2] == "push failed":
        sys.exit(1)
    if sys.argv[2] == "a bug":
        raise RuntimeError("a bug in the summary")

atexit.register(lambda: print(" teardown"))
distributed.run_and_leave(main)
print(" and then the end of the script")
"""


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("ending", ["returned", "push failed", "a bug"])
def test_a_multi_process_run_leaves_without_teardown_and_loses_no_output(tmp_path, processes, ending):
    """train.py's last line, `run_and_leave`: after `finish` of several processes the trainer exits at once with
    main's status (freeing DDP's hold on gloo's process group can deadlock, so no teardown runs), its output flushed;
    one process ends as usual."""
    result = subprocess.run([sys.executable, "-c", LEAVE, str(processes), ending], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == (0 if ending == "returned" else 1), result.stderr
    after = {1: {"returned": " and then the end of the script\n teardown\n"}.get(ending, " teardown\n"), 2: ""}
    assert result.stdout.endswith("barrier ended summary" + after[processes]), result.stdout
    assert ("RuntimeError: a bug in the summary" in result.stderr) == (ending == "a bug")


HELD = """
import atexit, gc, sys
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from finetune import distributed

logs = ProjectConfiguration(project_dir=sys.argv[2])
accelerator = Accelerator(cpu=True, log_with="tensorboard", project_config=logs)
accelerator.init_trackers("held")
leave = distributed._leave

def main():
    model = torch.nn.Linear(4, 2)
    model, optimizer = distributed.prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.ones(3, 4)).sum().backward()
    accelerator.log({"loss": 1.5}, step=1)
    if sys.argv[1] == "raised":
        raise FloatingPointError("a non-finite loss at step 1")
    distributed.finish(accelerator)

def counted_leave(status):  # main's frame is freed by now
    gc.collect()
    alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    print(f"process {accelerator.process_index}: {alive} DDP wrapper(s) alive", flush=True)
    leave(status)

atexit.register(lambda: print("teardown", flush=True))  # (never: the run leaves without Python's teardown)
distributed._leave = counted_leave
distributed.run_and_leave(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["finished", "raised"])
def test_the_ddp_wrappers_outlive_main_until_the_run_leaves(tmp_path, ending):
    """Two gloo processes: the DDP wrapper that `distributed.prepare` returned (accelerate's own list keeps only the
    module inside it) is still alive when `run_and_leave` exits, after main's frame, which held it, was freed (freeing
    it frees DDP's reducer and gloo's process group, which hung about 1 exit in 6: the slurm test below, in CI), and
    the process exits without Python's teardown; also when main raises before `finish` (status 1, the traceback
    printed), whose tracker still gets its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / "held.py"
    script.write_text(HELD)
    result = subprocess.run([*_two_process_launcher(), str(script), ending, str(tmp_path / "logs")], cwd=tmp_path,
                            env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == (0 if ending == "finished" else 1), result.stdout[-2000:] + result.stderr[-4000:]
    for process in (0, 1):
        assert f"process {process}: 1 DDP wrapper(s) alive" in result.stdout, result.stdout
    assert "teardown" not in result.stdout
    assert ("FloatingPointError: a non-finite loss at step 1" in result.stderr) == (ending == "raised")
    (events,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    assert [(e.step, e.value) for e in EventAccumulator(str(events)).Reload().Scalars("loss")] == [(1, 1.5)]


def test_finetune_train_leaves_as_train_py_does(monkeypatch):
    """`python -m finetune train` goes through `run_and_leave` as `finetune/train.py` does (a multi-process run
    started that way would otherwise free gloo's process group at exit: the hang above)."""
    import finetune.__main__ as front
    import finetune.train

    calls = []
    monkeypatch.setattr(finetune.train, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(distributed, "run_and_leave", lambda run: calls.append(("left", run())))
    assert front.main(["train", "--config", "x.yaml"]) == 0
    assert calls == [["--config", "x.yaml"], ("left", None)]


@pytest.mark.parametrize("local", [None, "2"])
def test_cpu_threads_are_the_cores_over_this_machines_processes(monkeypatch, local):
    """On a CPU torch's threads are the cores this process may use over the processes on this machine (torch
    elastic's LOCAL_WORLD_SIZE), not over every machine's: a run of one process on each of two machines keeps every
    core of each."""
    from finetune.config import load_config
    from finetune.distributed import make_accelerator

    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    before = torch.get_num_threads()
    try:
        make_accelerator(load_config(None, ["train.mixed_precision=no"]))
        cores = len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == max(1, cores // int(local or 1))
    finally:
        torch.set_num_threads(before)


IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM", flush=True))
print("ready", flush=True)
time.sleep(60)
"""


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask in /proc)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


@pytest.mark.slow
def test_a_one_process_accelerate_launch_kills_the_trainer_5_s_after_sigterm(tmp_path):
    """What the README warns of under Preemption: `accelerate launch` with one process passes SIGTERM on and kills
    its child about 5 s later, whatever the child is still writing (here a child that ignores the signal)."""
    script = tmp_path / "slow.py"
    script.write_text(IGNORES_SIGTERM)
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no", str(script)], cwd=tmp_path,
                                env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1"}), stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 30  # accelerate installs its handler just after starting the child
    while not _catches(launcher.pid, signal.SIGTERM):
        assert time.monotonic() < deadline, "accelerate launch never caught SIGTERM"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    start = time.monotonic()
    out, _ = launcher.communicate(timeout=60)
    waited = time.monotonic() - start
    assert "got SIGTERM" in out and 4 <= waited <= 15, (out, waited)


@pytest.mark.slow
def test_two_real_processes(tmp_path):
    """Two gloo processes under `accelerate launch` (tests/sync_check.py): identical weights pass; two elements
    swapped on process 1 are named on both processes."""
    result = subprocess.run([*_two_process_launcher(), str(ROOT / "tests" / "sync_check.py")], cwd=tmp_path,
                            env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1"}), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "weights identical on all 2 processes (2 trained tensors" in result.stderr
    for rank in (0, 1):
        assert f"process {rank}: the 2 processes ended with different weights: Sequential.1.weight on process(es) " \
               "[1] differs" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _machine(rank: int, port: int) -> list[str]:
    """`accelerate launch` as machine `rank` of two, one process each, the main one at 127.0.0.1."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
            str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.slow
def test_two_machines_read_disjoint_data(tmp_path):
    """Two launches with --num_machines 2 and machine ranks 0 and 1 on 127.0.0.1 (gloo) make one run of two
    processes whose epochs split the built-in set's shards: together they read every sample once."""
    port, out = _free_port(), tmp_path / "keys"
    overrides = ["data.num_samples=2000", "data.resolution=8", "train.train_batch_size=50", "data.caption_dropout=0"]
    machines = [subprocess.Popen([*_machine(rank, port), str(ROOT / "tests" / "epoch_keys.py"), str(out), *overrides],
                                 cwd=tmp_path, env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1"}),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for machine in machines:
        _, err = machine.communicate(timeout=300)
        assert machine.returncode == 0, err[-3000:]
    seen = [json.loads((out / f"keys_{rank}.json").read_text()) for rank in (0, 1)]
    assert {s["distributed_type"] for s in seen} == {"MULTI_CPU"}
    assert seen[0]["keys"] and seen[1]["keys"] and not set(seen[0]["keys"]) & set(seen[1]["keys"])
    assert len(seen[0]["keys"]) + len(seen[1]["keys"]) == 2000


SRUN = """#!/bin/bash
# srun's stand-in: the command once per node of the job, here, each with its own SLURM_NODEID
shift  # --kill-on-bad-exit=1
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_the_slurm_script_trains_on_two_nodes_and_a_requeue_resumes(tmp_path, engine):
    """scripts/slurm/train.sbatch as SLURM would run it on 2 nodes of 1 "GPU" (srun and scontrol stood in for, both
    nodes here, gloo on the CPU): one run of 2 processes, DDP (identical weights at the end) or, with
    ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml, FSDP2 (FINETUNE_TEST_FSDP_ON_CPU lets accelerate shard on the
    CPU); run again with more steps, as a requeued job is, it resumes from its latest checkpoint."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(SRUN)
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = _env(tmp_path, {"ACCELERATE_USE_CPU": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]",
                          "GPUS_PER_NODE": "1",
                          "PATH": f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                          **({"ACCELERATE_CONFIG": str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
                              "FINETUNE_TEST_FSDP_ON_CPU": "1"} if engine == "fsdp" else {})})
    out = tmp_path / "run"
    for steps in (4, 6):
        env["MAIN_PROCESS_PORT"] = str(_free_port())  # a new job's port: the last one may still be in TIME_WAIT
        result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), "--config",
                                 str(ROOT / "configs" / "shapes.yaml"), *TINY_RUN, "data.num_samples=2000",
                                 "model.train_text_encoder=false", f"train.max_train_steps={steps}",
                                 "train.checkpointing_steps=2", f"train.output_dir={out}"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert "2 processes" in result.stdout
        if engine == "fsdp":
            assert "(FSDP)" in result.stdout and "weights sharded (FSDP)" in result.stderr
        else:
            assert "(MULTI_CPU)" in result.stdout and "weights identical on all 2 processes" in result.stderr
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in result.stderr
    manifest = checkpointing.read_manifest(out / "checkpoint-6", world_size=2, sharded=engine == "fsdp")
    assert manifest["step"] == 6
