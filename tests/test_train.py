"""The training recipe end to end: through `accelerate launch`, resume, dry run, precision checks, budget."""

import ast
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpointing
from finetune.cli import UserError
from finetune.data import shapes
from pipelines import TextToImageDDPMPipeline

from . import launch
from .conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "finetune" / "train.py")


def _env(tmp_path, extra=None):
    # CPU only, so the checks below (threads, fp16 refusal, bit-exact resume) mean the same on a GPU machine.
    # tests/faults on the path: its sitecustomize injects the faults that `extra` asks for (none by default).
    path = os.pathsep.join(filter(None, [str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path, **(extra or {})}


def _command(launcher, overrides):
    return [*launcher, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), *TINY_RUN, *overrides]


def _train(tmp_path, *overrides, launcher=(sys.executable,), check=True, env=None):
    result = launch.run(_command(launcher, overrides), cwd=tmp_path, env=_env(tmp_path, env),
                        capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_five_steps_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"))
    result = _train(tmp_path, "train.max_train_steps=5", "train.checkpointing_steps=5", f"train.output_dir={out}",
                    launcher=launch)
    # accelerate launch sets OMP_NUM_THREADS=1; the trainer must still use every core it may use.
    assert f"{len(os.sched_getaffinity(0))} threads" in result.stdout
    for name in ("model_index.json", "config.yaml", "samples/step-5.png", "checkpoint-5/manifest.json",
                 "unet/diffusion_pytorch_model.safetensors", "pipeline_text2image_ddpm.py"):
        assert (out / name).is_file(), name
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for event_file in events:
        tags = EventAccumulator(str(event_file)).Reload().Tags()
        scalars, images = scalars | set(tags["scalars"]), images | set(tags["images"])
    assert {"loss", "lr", "grad_norm", "images_per_s", "step_time", "conditioning/prompt_vs_empty_start",
            "conditioning/between_prompts_middle"} <= scalars, scalars
    assert "step 5: the prompt moves the first reverse step's prediction by " in result.stderr
    assert {"validation", "process/reverse", "process/forward"} <= images, images
    assert (out / "samples" / "process" / "forward.png").is_file()
    assert not (out / "samples" / "base.png").exists()  # from scratch: no base to compare with
    assert (out / "samples" / "process" / "reverse-step-5.png").is_file()
    assert "trained 5 steps in " in result.stdout and "images/s" in result.stdout
    assert f"python -m finetune.sample {out}" in result.stdout and f"python -m finetune.hub {out}" in result.stdout
    pipe = TextToImageDDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


def _two_process_launcher():
    with socket.socket() as sock:  # a free port for this run's process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port))


@pytest.mark.slow
def test_two_processes_on_cpu_train_together_and_resume_exactly(tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` really runs two cooperating
    processes (gloo): each reads its own shard, they end with identical weights, and a run resumed from a
    2-process checkpoint ends bit-identical to the uninterrupted one."""
    common = ["data.num_samples=2000", "train.max_train_steps=12", "train.checkpointing_steps=6"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    env = {"ACCELERATE_USE_CPU": "1"}
    result = _train(tmp_path, *common, f"train.output_dir={full}", launcher=_two_process_launcher(), env=env)
    assert "(MULTI_CPU)" in result.stdout and "2 processes" in result.stdout
    assert "weights identical on all 2 processes" in result.stderr
    states = [checkpointing.read_data_state(full / "checkpoint-6", rank) for rank in (0, 1)]
    assert states == [{"epoch": 0, "batches_in_epoch": 6}] * 2

    _resume_two_processes(tmp_path, common, full / "checkpoint-6", resumed)
    _assert_same_models(full / "checkpoint-12", resumed / "checkpoint-12")


def _resume_two_processes(tmp_path, common: list[str], checkpoint: Path, resumed: Path) -> None:
    """A two-process run into `resumed`, from `checkpoint` (linked into it)."""
    resumed.mkdir()
    os.symlink(checkpoint, resumed / checkpoint.name)
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest",
           launcher=_two_process_launcher(), env={"ACCELERATE_USE_CPU": "1"})


def _assert_same_models(a: Path, b: Path, names=("model.safetensors", "model_1.safetensors")) -> None:
    """The two checkpoints' trained models are bit-identical."""
    for name in names:
        first, second = load_file(a / name), load_file(b / name)
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_two_processes_in_different_epochs_resume_exactly(tmp_path):
    """Shards of unequal size give the processes epochs of unequal length: with 16 and 8 samples at batch 4, one
    process starts its next epoch while the other is still in this one. Each writes where it is in its own stream
    (`data_state_<rank>.json`), and a run resumed from a checkpoint taken when they are in different epochs ends
    bit-identical to the uninterrupted one."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, count in (("a", 16), ("b", 8)):
        shapes.write_shards(tmp_path / name, count)
        (tmp_path / name / "00000.tar").rename(shards / f"{name}.tar")
    common = ["data.source=webdataset", f"data.path={shards}/{{a,b}}.tar", "data.num_samples=null",
              "data.shuffle_buffer=4", "train.max_train_steps=12", "train.checkpointing_steps=3",
              "train.checkpoints_total_limit=null"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    env = {"ACCELERATE_USE_CPU": "1"}
    _train(tmp_path, *common, f"train.output_dir={full}", launcher=_two_process_launcher(), env=env)
    states = [checkpointing.read_data_state(full / "checkpoint-3", rank) for rank in (0, 1)]
    assert states[0]["epoch"] != states[1]["epoch"], states

    _resume_two_processes(tmp_path, common, full / "checkpoint-3", resumed)
    _assert_same_models(full / "checkpoint-12", resumed / "checkpoint-12")
    for rank in (0, 1):  # and each process is where the uninterrupted one was in its stream
        assert (checkpointing.read_data_state(resumed / "checkpoint-12", rank)
                == checkpointing.read_data_state(full / "checkpoint-12", rank))


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_resume_continues_exactly(tmp_path):
    """A run resumed from a checkpoint ends with the same weights as the run that was never stopped,
    across an epoch boundary (64 samples / batch 4 = 16 steps per epoch)."""
    common = ["train.max_train_steps=20", "train.checkpointing_steps=10", "train.use_ema=true"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    manifest = checkpointing.read_manifest(full / "checkpoint-10")
    assert manifest["step"] == 10 and manifest["world_size"] == 1
    assert checkpointing.read_data_state(full / "checkpoint-10", 0) == {"epoch": 0, "batches_in_epoch": 10}

    # The second run starts from the first one's step-10 checkpoint.
    resumed.mkdir()
    os.symlink(full / "checkpoint-10", resumed / "checkpoint-10")
    result = _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    assert "resumed from" in result.stderr
    a, b = _weights(full / "checkpoint-20"), _weights(resumed / "checkpoint-20")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    exported = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    for key in exported:
        torch.testing.assert_close(exported[key], again[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("persistent", ["false", "true"])
def test_resume_with_dataloader_workers_continues_exactly(tmp_path, persistent):
    """Mid-epoch, with two dataloader workers (each reading one of the 2 shards; the loader takes their batches
    in turn): the resumed run skips the same batches and ends with the uninterrupted run's weights."""
    common = ["data.num_samples=2000", "data.num_workers=2", f"data.persistent_workers={persistent}",
              "train.max_train_steps=12", "train.checkpointing_steps=5"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    assert checkpointing.read_data_state(full / "checkpoint-5", 0) == {"epoch": 0, "batches_in_epoch": 5}
    resumed.mkdir()
    os.symlink(full / "checkpoint-5", resumed / "checkpoint-5")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    _assert_same_models(full / "checkpoint-10", resumed / "checkpoint-10", names=["model.safetensors"])


def test_the_export_holds_an_ema_that_follows_the_trained_weights(tmp_path):
    """With a decay capped at 0.001 the EMA is the last step's training weights up to ~1e-7, so the exported UNet
    matches the last checkpoint's training weights; an EMA that stopped following the weights would export the
    initial ones, which the 6 steps move by up to 3.5e-3 (the cosine schedule's six learning rates add up to about
    that). With the default decay the export lags behind the training weights, so it is the EMA that is exported."""
    lags = {}
    for cap in ("0.001", "0.999"):
        out = tmp_path / cap
        _train(tmp_path, "train.max_train_steps=6", "train.checkpointing_steps=6", "train.use_ema=true",
               f"train.ema_max_decay={cap}", f"train.output_dir={out}")
        trained = _weights(out / "checkpoint-6")
        exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        assert trained.keys() == exported.keys()
        lags[cap] = max((exported[key] - trained[key]).abs().max().item() for key in trained)
    assert lags["0.001"] < 1e-5 < 1e-4 < lags["0.999"], lags


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["5", "10", "between checkpoints"])
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, kill):
    """SIGKILL (no handler can run) in the middle of writing the first or the second checkpoint, or at whatever
    step the run has reached after checkpoint-5: a half-written folder is never resumed from (with none complete,
    `latest` starts afresh), and continuing ends with byte-identical weights, checkpoint and exported pipeline to
    the run that was never killed. With gradient accumulation, so the resumed loader skips micro-batches."""
    common = ["train.max_train_steps=20", "train.checkpointing_steps=5", "train.gradient_accumulation_steps=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    if kill.isdigit():
        result = _train(tmp_path, *common, f"train.output_dir={killed}", check=False,
                        env={"FINETUNE_TEST_KILL_AT_CHECKPOINT": kill})
        assert result.returncode == -9
        step = kill
        assert (killed / f".tmp-checkpoint-{step}").is_dir() and not (killed / f"checkpoint-{step}").exists()
    else:
        process = subprocess.Popen(_command([sys.executable], [*common, f"train.output_dir={killed}"]), cwd=tmp_path,
                                   env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (killed / "checkpoint-5").is_dir() and process.poll() is None:
            time.sleep(0.01)
        process.kill()
        assert process.wait(timeout=60) == -9
    assert not (killed / "model_index.json").exists()
    result = _train(tmp_path, *common, f"train.output_dir={killed}", "train.resume_from_checkpoint=latest")
    assert ("no checkpoint yet" if kill == "5" else "resumed from") in result.stderr
    assert "settings changed" not in result.stderr
    for name in ("checkpoint-20/model.safetensors", "checkpoint-20/ema_0.safetensors",
                 "checkpoint-20/rng_state_0.safetensors",
                 "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (full / name).read_bytes() == (killed / name).read_bytes(), name


def test_resume_names_the_settings_that_changed(tmp_path):
    out = tmp_path / "run"
    _train(tmp_path, "train.max_train_steps=2", "train.checkpointing_steps=2", f"train.output_dir={out}")
    manifest = checkpointing.read_manifest(out / "checkpoint-2")
    assert manifest["config_sha256"] == hashlib.sha256((out / "checkpoint-2" / "config.yaml").read_bytes()).hexdigest()
    result = _train(tmp_path, "train.max_train_steps=3", "train.checkpointing_steps=2", "train.learning_rate=5e-4",
                    f"train.output_dir={out}", "train.resume_from_checkpoint=latest")
    assert "settings changed since checkpoint-2: train.learning_rate: 0.001 -> 0.0005; train.max_train_steps: 2 -> 3" \
        in result.stderr


def test_resume_names_a_precision_that_auto_resolved_differently(tmp_path):
    """A checkpoint records the precision in effect; one written where `auto` meant bf16 and resumed where it means
    fp32 is named (the config text alone, `auto`, would not show it)."""
    out = tmp_path / "run"
    run = ["train.mixed_precision=auto", "train.checkpointing_steps=2", f"train.output_dir={out}"]
    _train(tmp_path, "train.max_train_steps=2", *run)
    manifest_path = out / "checkpoint-2" / checkpointing.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    here = manifest["mixed_precision"]
    assert here in ("no", "bf16")
    manifest["mixed_precision"] = "bf16" if here == "no" else "no"  # as written on another machine
    manifest_path.write_text(json.dumps(manifest))
    result = _train(tmp_path, "train.max_train_steps=3", *run, "train.resume_from_checkpoint=latest")
    assert f"precision in effect: {manifest['mixed_precision']} -> {here}" in result.stderr


def test_resume_refuses_an_incomplete_or_mismatched_checkpoint(tmp_path):
    out = tmp_path / "run"
    _train(tmp_path, "train.max_train_steps=2", "train.checkpointing_steps=2", f"train.output_dir={out}")
    checkpoint = out / "checkpoint-2"
    with pytest.raises(ValueError, match="written by 1 processes but this run has 2"):
        checkpointing.read_manifest(checkpoint, world_size=2)
    rng = checkpoint / "rng_state_0.safetensors"
    rng_bytes = rng.read_bytes()
    rng.unlink()
    with pytest.raises(UserError, match="missing rng_state_0.safetensors"):
        checkpointing.read_manifest(checkpoint, world_size=1)
    result = _train(tmp_path, "train.max_train_steps=4", f"train.output_dir={out}",
                    f"train.resume_from_checkpoint={checkpoint}", check=False)
    assert result.returncode != 0 and "missing rng_state_0.safetensors" in result.stderr
    rng.write_bytes(rng_bytes)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors is \d+ bytes but was written with \d+"):
        checkpointing.read_manifest(checkpoint)


def test_checkpoints_hold_no_pickle_and_refuse_one(tmp_path):
    """The EMA and the random states are safetensors; what is in torch's format (optimizer, LR scheduler) loads
    with weights_only=True, as accelerate reads it; a pickle the trainer does not write stops the resume."""
    out = tmp_path / "run"
    _train(tmp_path, "train.max_train_steps=2", "train.checkpointing_steps=2", f"train.output_dir={out}")
    checkpoint = out / "checkpoint-2"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [n for n in names if n.endswith(".pkl")], names
    assert {"ema_0.safetensors", "ema_1.safetensors", "rng_state_0.safetensors"} <= set(names), names
    assert [n for n in names if n.endswith(".bin")] == ["optimizer.bin", "scheduler.bin"]
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(checkpoint / name, weights_only=True)  # tensors and plain values only
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04N.")  # what an earlier version wrote
    result = _train(tmp_path, "train.max_train_steps=4", f"train.output_dir={out}",
                    f"train.resume_from_checkpoint={checkpoint}", check=False)
    assert result.returncode != 0 and "holds custom_checkpoint_0.pkl: pickle files" in result.stderr


def test_checkpoint_rotation_and_missing_manifest(tmp_path):
    out = tmp_path / "run"
    _train(tmp_path, "train.max_train_steps=6", "train.checkpointing_steps=2", "train.checkpoints_total_limit=2",
           f"train.output_dir={out}")
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".tmp-*"))
    (out / "checkpoint-6" / "manifest.json").unlink()
    assert checkpointing.resolve_checkpoint("latest", out).name == "checkpoint-4"
    with pytest.raises(UserError, match="manifest.json"):
        checkpointing.resolve_checkpoint(str(out / "checkpoint-6"), out)


def test_dry_run_builds_everything_and_exits(tmp_path):
    out = tmp_path / "run"
    result = _train(tmp_path, "--dry-run", f"train.output_dir={out}")
    assert "unet" in result.stdout and "params" in result.stdout and "64 samples" in result.stdout
    assert f"output: {out} (would be created in {tmp_path}), writable" in result.stdout
    assert "data: read a sample through decoding, filters, transforms and the tokenizer" in result.stdout
    assert not out.exists()  # a dry run writes nothing there


def test_bad_config_fails_before_anything_is_built(tmp_path):
    out = tmp_path / "run"
    result = _train(tmp_path, "train.learning_rat=1", "data.resolution=7", f"train.output_dir={out}", check=False)
    assert result.returncode != 0
    assert "train.learning_rat: unknown key" in result.stderr and "data.resolution: got 7" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("launcher", ["python", "accelerate launch -q"])
def test_a_config_error_is_one_message_without_a_traceback(tmp_path, launcher):
    """The trainer prints the problems once, no traceback, and exits with 2; `accelerate launch -q` passes that on
    as its own exit status 1 without a traceback of its own (without -q it raises CalledProcessError)."""
    command = (sys.executable,) if launcher == "python" else (sys.executable, "-m", "accelerate.commands.launch",
                                                               "-q", "--cpu", "--num_processes", "1")
    result = _train(tmp_path, "train.mixed_precision=yes", launcher=command, check=False)
    assert result.returncode == (2 if launcher == "python" else 1)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert output.count("train.mixed_precision: got 'yes'; allowed: 'no', 'bf16', 'fp16', 'auto'") == 1, output


def test_fp16_on_cpu_is_an_error(tmp_path):
    result = _train(tmp_path, "train.mixed_precision=fp16", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0 and "fp16 needs a GPU" in result.stderr


def test_train_py_stays_readable():
    """STYLE.md: the recipe reads top to bottom in about 350 lines, main() under 100."""
    source = Path(TRAIN).read_text()
    assert len(source.splitlines()) <= 350
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 100


def test_data_that_yields_no_batch_is_an_error(tmp_path):
    result = _train(tmp_path, "data.filters.min_width=1000", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    assert "gave no full batch" in result.stderr and "dropped by min_width" in result.stderr


def _wait_for_logged_steps(out: Path, count: int, timeout: float = 180) -> None:
    """Wait until the run in `out` has logged `count` losses: it is training, past its start-up (the signal
    handler is installed just before the loop; a signal sent on an earlier sign, as the tracker's file, could
    meet a trainer that had none yet on a slow machine)."""
    deadline, metrics = time.monotonic() + timeout, out / "metrics.jsonl"
    while not metrics.is_file() or metrics.read_text().count('"loss"') < count:
        assert time.monotonic() < deadline, f"{out} logged fewer than {count} losses in {timeout} s"
        time.sleep(0.2)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """A SIGTERM mid-run stops at the next step boundary with a checkpoint there, exits 0 well within the 30 s
    that torch elastic allows, and the run continues from that checkpoint."""
    import signal

    out = tmp_path / "run"
    command = _command([sys.executable], ["train.max_train_steps=100000", "train.checkpointing_steps=0",
                                          f"train.output_dir={out}"])
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_logged_steps(out, 5)  # some steps into training: the handler is in place
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert process.returncode == 0, stderr[-3000:]
    checkpoints = checkpointing.list_checkpoints(out)
    assert len(checkpoints) == 1 and "stopped by signal" in stderr and "resume_from_checkpoint=latest" in stderr
    step = checkpointing.read_manifest(checkpoints[0])["step"]
    assert 0 < step < 100000 and not (out / "model_index.json").exists()

    result = _train(tmp_path, f"train.max_train_steps={step + 2}", f"train.output_dir={out}",
                    "train.resume_from_checkpoint=latest")
    assert f"resumed from {checkpoints[0]} at step {step}" in result.stderr
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_stops_a_run_with_workers_at_a_checkpoint(tmp_path, signum):
    """SLURM signals every process of a job step and a terminal's Ctrl-C its whole foreground group, dataloader
    workers included: the run still stops at a step boundary with a checkpoint and exits 0 (an unshielded worker
    died of the SIGTERM, and the trainer with it, mid-step and without a checkpoint). The signal goes out once
    steps are being logged, with the worker alive (500-step epochs: no epoch ends meanwhile)."""
    import signal

    out = tmp_path / "run"
    command = _command([sys.executable], ["data.num_samples=2000", "train.max_train_steps=100000",
                                          "train.checkpointing_steps=0", "data.num_workers=1",
                                          f"train.output_dir={out}"])
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # (its own group)
    _wait_for_logged_steps(out, 5)
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(workers) == 1, workers  # (the dataloader's worker, serving)
    os.killpg(process.pid, getattr(signal, signum))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert f"stopped by signal {getattr(signal, signum).value}" in stderr and "killed by signal" not in stderr
    [checkpoint] = checkpointing.list_checkpoints(out)
    assert 5 <= checkpointing.read_manifest(checkpoint)["step"] < 500


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch(tmp_path):
    """SIGTERM to `accelerate launch` (torch elastic forwards it to both workers): both stop at the same step,
    one checkpoint with both processes' state is written well within 30 s, and the run continued from it ends
    byte-identical to a 2-process run that was never stopped (a constant LR, so the total step count does not
    shape the schedule)."""
    import signal

    out = tmp_path / "run"
    common = ["data.num_samples=2000", "train.checkpointing_steps=0", "train.lr_scheduler=constant"]
    command = _command(_two_process_launcher(), [*common, "train.max_train_steps=100000", f"train.output_dir={out}"])
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1"}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_logged_steps(out, 5)  # a logged step went through both processes: both handlers are in place
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert "stopped by signal 15" in stderr, stderr[-3000:]
    [checkpoint] = checkpointing.list_checkpoints(out)
    manifest = checkpointing.read_manifest(checkpoint, world_size=2)
    assert {"data_state_0.json", "data_state_1.json", "rng_state_1.safetensors"} <= set(manifest["files"])

    total = f"train.max_train_steps={manifest['step'] + 2}"
    _train(tmp_path, *common, total, f"train.output_dir={out}", "train.resume_from_checkpoint=latest",
           launcher=_two_process_launcher(), env={"ACCELERATE_USE_CPU": "1"})
    _train(tmp_path, *common, total, f"train.output_dir={tmp_path / 'never-stopped'}",
           launcher=_two_process_launcher(), env={"ACCELERATE_USE_CPU": "1"})
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (out / name).read_bytes() == (tmp_path / "never-stopped" / name).read_bytes()


def test_nonfinite_loss_stops_at_that_step_without_a_bad_checkpoint(tmp_path):
    """A learning rate of 1e30 sends the weights to ~1e30 in one step, so step 2's loss is not finite."""
    out = tmp_path / "run"
    result = _train(tmp_path, "train.learning_rate=1e30", "train.max_grad_norm=0", "train.use_ema=false",
                    "train.max_train_steps=5", "train.checkpointing_steps=1", f"train.output_dir={out}", check=False)
    assert result.returncode != 0
    assert "non-finite loss or gradient norm at step 2" in result.stderr and "batch keys ['" in result.stderr
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-1"]
    result = _train(tmp_path, "train.learning_rate=1e30", "train.max_grad_norm=0", "train.on_nonfinite=skip",
                    "train.max_nonfinite_steps=2", "train.max_train_steps=5", f"train.output_dir={tmp_path / 's'}",
                    check=False)
    assert result.returncode != 0 and "3 in a row, more than train.max_nonfinite_steps=2" in result.stderr


def test_nonfinite_checks_between_log_steps_name_the_first_bad_step(tmp_path):
    """Error mode reads the losses at log steps (no host sync per step): a NaN at step 3 with logging every 4
    steps stops the run at the step-4 check, naming step 3 (and its batch), and nothing is exported."""
    out = tmp_path / "run"
    result = _train(tmp_path, "train.logging_steps=4", "train.max_train_steps=8", "train.checkpointing_steps=0",
                    f"train.output_dir={out}", env={"FINETUNE_TEST_NAN_LOSS": "3:0"}, check=False)
    assert result.returncode != 0 and "non-finite loss or gradient norm at step 3" in result.stderr
    assert "loss nan" in result.stderr and "batch keys ['" in result.stderr
    assert not (out / "model_index.json").exists()


def test_skip_mode_skips_one_bad_step(tmp_path):
    out = tmp_path / "run"
    result = _train(tmp_path, "train.on_nonfinite=skip", "train.max_train_steps=4", f"train.output_dir={out}",
                    env={"FINETUNE_TEST_NAN_LOSS": "3:0"})
    assert "at step 3 on some process" in result.stderr and "skipping this optimizer step" in result.stderr
    assert (out / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_nonfinite_on_one_of_two_processes(tmp_path, mode):
    """A NaN on process 1 only: both processes stop (error) or both skip that step and stay in sync (skip)."""
    out = tmp_path / "run"
    result = _train(tmp_path, "data.num_samples=2000", f"train.on_nonfinite={mode}", "train.max_train_steps=5",
                    f"train.output_dir={out}", launcher=_two_process_launcher(), check=False,
                    env={"ACCELERATE_USE_CPU": "1", "FINETUNE_TEST_NAN_LOSS": "3:1"})
    assert "process 1: loss nan" in result.stderr and "process 0: loss" in result.stderr  # both saw it
    if mode == "error":
        assert result.returncode != 0 and not (out / "model_index.json").exists()
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "weights identical on all 2 processes" in result.stderr


@pytest.mark.slow
def test_epoch_log_counts_what_the_workers_read(tmp_path):
    """With 2 dataloader workers (2 shards of the built-in set) the epoch's log line counts every sample the
    workers read: used + dropped = the whole set."""
    result = _train(tmp_path, "data.num_samples=2000", "data.num_workers=2", "train.train_batch_size=16",
                    "train.max_train_steps=130",
                    "train.checkpointing_steps=0", f"train.output_dir={tmp_path / 'run'}")
    line = next(line for line in result.stderr.splitlines() if "epoch 1 data (all epochs so far)" in line)
    counts = ast.literal_eval(line.split("so far): ", 1)[1])
    assert counts["used"] > 1800 and sum(counts.values()) == 2000, counts


@pytest.mark.slow
def test_resampled_epochs_are_num_samples_long(tmp_path):
    """Resampled shards with 2 dataloader workers: the epoch ends after data.num_samples training examples
    and training goes on into the next epoch."""
    result = _train(tmp_path, "data.resampled=true", "data.num_samples=64", "data.num_workers=2",
                    "train.max_train_steps=20", "train.checkpointing_steps=0", f"train.output_dir={tmp_path / 'run'}")
    line = next(line for line in result.stderr.splitlines() if "epoch 1 data (all epochs so far)" in line)
    assert ast.literal_eval(line.split("so far): ", 1)[1])["used"] == 64
    assert "epoch 2 data" not in result.stderr


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    from finetune import progress
    from finetune.progress import tracker_names

    monkeypatch.setattr(progress, "get_available_trackers", lambda: ["tensorboard"])
    assert tracker_names("none") == [] and tracker_names("tensorboard") == ["tensorboard"]
    with pytest.raises(ValueError, match="train.report_to: wandb is not installed; `pip install wandb`"):
        tracker_names("tensorboard,wandb")
