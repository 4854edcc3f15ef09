"""A newcomer's first hour: each plausible mistake answered in one line that names the problem and the fix, the
habits of diffusers' training scripts understood, a dry run that checks what a run would find out later, one front
door with --help for every option."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from PIL import Image

from finetune import arguments, bases, checkpointing
from finetune.cli import ToolParser, UserError
from finetune.config import ConfigError, load_config
from finetune.output_lock import LOCK_FILE, OutputLock, held_by

from . import launch
from .conftest import TINY_RUN
from .fake_hub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
          str(ROOT / "accelerate_config.yaml"), str(ROOT / "finetune" / "train.py")]


# ---- diffusers habits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "answer"), [
    (["--learning_rate", "1e-4"], "--learning_rate 1e-4: settings are section.key=value here; write "
                                  "train.learning_rate=1e-4"),
    (["--learning-rate=1e-4"], "write train.learning_rate=1e-4"),
    (["--train_batch_size", "8", "--config", "c.yaml"], "write train.train_batch_size=8"),
    (["--seed", "3"], "write train.seed=3"),
    (["--resolution", "512"], "write data.resolution=512"),
    (["--validation_prompt", "a red circle"], """write 'validation.prompts=["a red circle"]'"""),
    (["--dataset_name", "lambdalabs/pokemon"], "write data.source=hf and data.path=lambdalabs/pokemon"),
    (["--num_train_epochs", "3"], "runs are measured in steps here; write train.max_train_steps=N"),
    (["--hub_token", "hf_x"], "log in once with `hf auth login`"),
    (["--lerning_rate", "1"], "not an option of the trainer; did you mean train.learning_rate=...?"),
    (["configs/shapes.yaml"], "configs/shapes.yaml: a config file is given with --config: --config "
                              "configs/shapes.yaml"),
])
def test_diffusers_style_arguments_are_answered_with_what_to_write(argv, answer):
    with pytest.raises(UserError) as error:
        arguments.parse_args(argv)
    assert answer in str(error.value) and "\n" not in str(error.value)


def test_the_trainers_own_flags_and_overrides_still_parse():
    args = arguments.parse_args(["train.max_train_steps=3", "--config", "c.yaml", "--dry_run", "--print-config"])
    assert (args.config, args.dry_run, args.print_config, args.overrides) == ("c.yaml", True, True,
                                                                             ["train.max_train_steps=3"])


def test_a_misspelt_key_gets_the_closest_one_and_not_the_whole_list():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.max_train_step=10"])
    assert str(error.value) == "invalid config: train.max_train_step: unknown key; did you mean train.max_train_steps?"


def test_resume_from_checkpoint_n_is_looked_up_in_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoint-1000").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-1000" / "manifest.json").write_text("{}")
    assert checkpointing.resolve_checkpoint("checkpoint-1000", "run") == Path("run/checkpoint-1000")
    with pytest.raises(UserError, match=r"'checkpoint-5': no such folder, nor in train.output_dir='run' \(it has "
                                        r"checkpoint-1000; or use `latest`\)"):
        checkpointing.resolve_checkpoint("checkpoint-5", "run")


# ---- the base ----------------------------------------------------------------------------------------------------

def test_a_local_looking_base_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for path in ("./run", "../run", "/no/such/run", "outputs/run", "a/b/c", "run"):
        with pytest.raises(UserError, match="no such folder \\(a path, so it is not looked up on the Hub\\)"):
            bases.locate_base(path)


def test_a_runs_missing_output_names_the_config_to_train_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"outputs/shapes: no such folder yet; it is the output of "
                                        r".*configs/shapes.yaml, so train that first: finetune train "
                                        r"--config "):
        bases.locate_base("outputs/shapes")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("train:\n  output_dir: ./my/run\n")
    with pytest.raises(UserError, match=r"it is the output of configs/mine.yaml"):
        bases.locate_base("my/run")


def test_an_unfinished_run_as_base_says_so(tmp_path):
    (tmp_path / "config.yaml").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(UserError, match=r"that run has not written its pipeline yet .*python -m finetune.export "):
        bases.locate_base(str(tmp_path))


def test_a_hub_base_while_offline_is_one_line_without_a_request(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"someone/model: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                                        r"forbids downloading it; download it where there is a network"):
        bases.locate_base("someone/model")


def test_a_hub_base_that_is_not_there_or_not_reachable(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # (the suite runs offline)
    with FakeHub({}) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        with pytest.raises(UserError, match=rf"someone/model: no such model on {hub.url} \(or it is private"):
            bases.locate_base("someone/model")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match=r"someone/model: not in the local cache, and http://127.0.0.1:9 could not be "
                                        r"reached \(ConnectError"):
        bases.locate_base("someone/model")


# ---- the output folder -------------------------------------------------------------------------------------------

def test_one_run_per_output_folder(tmp_path):
    lock = OutputLock(tmp_path)
    assert held_by(tmp_path).startswith(f"pid {os.getpid()} on ")
    # A second holder is refused naming the first (flock: another open file is another holder, even here).
    with pytest.raises(UserError, match=rf"train.output_dir={tmp_path} is in use by another run \(pid {os.getpid()}"):
        OutputLock(tmp_path)
    lock.release()
    assert held_by(tmp_path) is None and (tmp_path / LOCK_FILE).is_file()
    OutputLock(tmp_path).release()  # free again


def test_a_run_that_never_released_its_folder_is_reported(tmp_path, caplog):
    crashed = OutputLock(tmp_path)
    crashed.file.close()  # the lock goes with the process, as when it is killed; the file still names it
    with caplog.at_level("WARNING"):
        OutputLock(tmp_path).release()
    assert f"the run that wrote here before (pid {os.getpid()} on " in caplog.text
    assert "ended without finishing (killed or crashed)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        OutputLock(tmp_path).release()  # released cleanly last time: nothing to report
    assert caplog.text == ""


@pytest.mark.slow
def test_processes_that_accelerate_set_up_alone_refuse_to_train(tmp_path):
    """An FSDP config with use_cpu: accelerate starts two processes that each come up as a one-process run, which
    would both train into one folder: each refuses, naming the setting (the first says so)."""
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n"
                      "fsdp_config:\n  fsdp_version: 2\nmain_training_function: main\nrdzv_backend: static\n"
                      "same_network: true\n")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(config),
                             str(ROOT / "finetune" / "train.py"), "--dry-run", f"train.output_dir={tmp_path / 'o'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("error: the launcher started 2 processes (WORLD_SIZE) but accelerate set this one up "
                               "as 1 (NO): check the accelerate config's distributed_type") == 1, result.stderr
    assert not (tmp_path / "o").exists()


# ---- one front door, every option explained ----------------------------------------------------------------------

class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(module: str, argv: list[str], monkeypatch) -> ToolParser:
    """The ToolParser a tool builds, caught as it starts parsing."""
    def caught(self, *args, **kwargs):
        raise _Parsed(self)
    monkeypatch.setattr(ToolParser, "parse_known_args", caught)
    monkeypatch.setattr(ToolParser, "parse_known_intermixed_args", caught)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(module).main(argv)
    return parsed.value.parser


@pytest.mark.parametrize("module", ["finetune.train", "finetune.sample", "finetune.evaluate", "finetune.visualize",
                                    "finetune.hub", "finetune.reference", "finetune.data.__main__", "finetune.export"])
def test_every_option_of_every_tool_has_a_help_text(module, monkeypatch):
    parser = _parser_of(module, ["x"], monkeypatch)
    missing = [a.dest for a in parser._actions if not a.help]
    assert not missing, f"{module}: no help for {missing}"


def test_flags_take_underscores_as_diffusers_scripts_write_them():
    parser = ToolParser(prog="t")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="steps")
    assert parser.parse_args(["--num_inference_steps", "7"]).num_inference_steps == 7
    assert parser.parse_args(["--num_inference_steps=8"]).num_inference_steps == 8
    assert "steps (default: 50)" in " ".join(parser.format_help().split())


def test_the_front_door(tmp_path):
    def front(*argv):
        return launch.run([sys.executable, "-m", "finetune", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    version = front("--version")
    assert version.returncode == 0 and version.stdout.startswith("finetune-ddpm ")
    typo = front("trian")
    assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0 and "did you mean train?" in typo.stderr
    printed = front("train", "--config", "configs/shapes.yaml", "--print-config", "train.max_train_steps=7")
    assert printed.returncode == 0 and "max_train_steps: 7" in printed.stdout
    assert load_config(None, []).train.max_train_steps != 7  # (the override, not the default)
    data = front("data", str(tmp_path / "d"), "--num_samples", "8")
    assert data.returncode == 0 and "wrote 8 samples" in data.stdout
    bad = front("data", str(tmp_path / "d"), "--num-samples", "0")
    assert bad.returncode == 2 and bad.stderr == "error: --num-samples must be >= 1, got 0 (see python -m " \
                                                 "finetune.data --help)\n"


# ---- every mistake through the real launch command ---------------------------------------------------------------

MISTAKES = [  # (what, arguments, environment, what the one line must name)
    ("a wrong config path", ["--config", "configs/shape.yaml"], {},
     ["configs/shape.yaml: no such file", "shapes.yaml"]),
    ("a misspelt key", ["--config", "configs/shapes.yaml", "train.max_train_step=10"], {},
     ["train.max_train_step: unknown key", "did you mean train.max_train_steps?"]),
    ("a diffusers-style flag", ["--config", "configs/shapes.yaml", "--learning_rate", "1e-4"], {},
     ["--learning_rate 1e-4", "write train.learning_rate=1e-4"]),
    ("a config without --config", ["configs/shapes.yaml"], {}, ["--config configs/shapes.yaml"]),
    ("the LoRA config before its base", ["--config", "configs/shapes-lora.yaml", "train.output_dir={tmp}/lora"], {},
     ["outputs/shapes: no such folder yet", "train that first", "--config configs/shapes.yaml"]),
    ("a checkpoint that is not there", ["train.resume_from_checkpoint=checkpoint-1000", "train.output_dir={tmp}/run"],
     {}, ["'checkpoint-1000': no such folder, nor in train.output_dir=", "use `latest`"]),
    ("a Hub id while offline", ["model.pretrained_model_name_or_path=someone/some-model", "train.output_dir={tmp}/o"],
     {"HF_HUB_OFFLINE": "1"}, ["someone/some-model: not in the local Hugging Face cache", "unset HF_HUB_OFFLINE"]),
    ("no as a precision (YAML's false)", ["train.mixed_precision=yes", "train.output_dir={tmp}/p"], {},
     ["train.mixed_precision: got 'yes'; allowed: 'no', 'bf16', 'fp16', 'auto'"]),
    ("a run into a folder in use", ["--dry-run", "train.output_dir={tmp}/held"], {},
     ["train.output_dir=", "is in use by another run (pid"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("what", "argv", "env", "named"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_one_line_through_accelerate_launch(what, argv, env, named, tmp_path):
    """The README's launch line (`accelerate launch -q --config_file accelerate_config.yaml`) with the mistake:
    one line, no traceback, the key and the fix named; the trainer exits 2, `-q` passes on 1."""
    home = tmp_path / "home"
    environ = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", **env}
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # the checkout's, without its outputs/ (if any)
    held = tmp_path / "held"
    held.mkdir()
    lock = OutputLock(held)  # held by this process for the folder-in-use case
    try:
        result = subprocess.run([*LAUNCH, *(a.replace("{tmp}", str(tmp_path)) for a in argv)], cwd=tmp_path,
                                env=environ, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    output = (result.stdout + result.stderr).strip()
    print(f"{what}: {len(output.splitlines())} line(s): {output}")
    assert result.returncode == 1, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("error: ") and all(text in output for text in named), output


def test_a_mistake_with_debug_shows_the_traceback(tmp_path):
    result = launch.run([sys.executable, str(ROOT / "finetune" / "train.py"), "--debug", "train.nope=1"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr


# ---- the dry run -------------------------------------------------------------------------------------------------

def _dry_run(tmp_path, *overrides, env=None):
    return launch.run([sys.executable, str(ROOT / "finetune" / "train.py"), "--dry-run", *TINY_RUN, *overrides],
                      cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_the_dry_run_opens_the_resume_target(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "manifest.json").write_text(json.dumps({"step": 2, "world_size": 1,
                                                                    "files": ["model.safetensors"]}))
    result = _dry_run(tmp_path, f"train.output_dir={out}", "train.resume_from_checkpoint=latest")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {out / 'checkpoint-2'} is incomplete: missing "
                                                  "model.safetensors; resume from another checkpoint"]


def test_the_dry_run_refuses_data_it_cannot_read(tmp_path):
    result = _dry_run(tmp_path, f"train.output_dir={tmp_path / 'run'}", "data.source=webdataset",
                      "data.num_samples=null", f"data.path={tmp_path}/shards/{{000..009}}.tar")
    assert result.returncode == 2 and "none of its 10 shard(s) exists" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_data_folder_the_source_cannot_use_is_one_line(tmp_path):
    """Pointing the LAION recipe's caption column at an image folder (its metadata says `text`), or data.path at a
    folder without images or at no folder: one line naming the problem and the fix, status 2, no traceback (they
    were tracebacks)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "0.png")
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a black square"}) + "\n")
    (tmp_path / "empty").mkdir()
    cases = [(["data.source=imagefolder", f"data.path={images}", "data.caption_column=caption"],
              [f"data.path='{images}': column(s) ['caption'] not found", "set data.caption_column"]),
             (["data.source=imagefolder", f"data.path={tmp_path / 'empty'}"],
              [f"data.path='{tmp_path / 'empty'}': no images (.png, .jpg, .jpeg, .webp) there"]),
             (["data.source=hf", f"data.path={tmp_path / 'nowhere'}"],
              [f"data.path='{tmp_path / 'nowhere'}': no such folder", "Dataset.save_to_disk"])]
    for overrides, named in cases:
        result = _dry_run(tmp_path, f"train.output_dir={tmp_path / 'run'}", "data.num_samples=null", *overrides)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
        assert all(text in lines[0] for text in named), lines[0]


def test_too_few_shards_for_the_readers_is_one_line_before_any_worker_starts(tmp_path):
    """One shard, three dataloader workers: said at start-up in one line (from a worker it was a traceback)."""
    for extra in ([], ["--dry-run"]):
        result = launch.run([sys.executable, str(ROOT / "finetune" / "train.py"), *extra, *TINY_RUN,
                             "data.num_workers=3", "train.max_train_steps=2", f"train.output_dir={tmp_path / 'run'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache")})
        errors = [line for line in result.stderr.splitlines() if "Warning" not in line and "rationality" not in line]
        assert result.returncode == 2 and errors == [
            "error: 1 shard(s) cannot be split over 3 readers (processes x data.num_workers); every reader needs at "
            "least one shard: use more shards or fewer workers, or set data.resampled: true"], result.stderr[-2000:]
