"""Model card and push to the Hub, against the fake Hub of tests/fake_hub.py (a thread of this process).

huggingface_hub reads HF_ENDPOINT at import and this process runs offline (conftest), so every client, the push
and the downstream load alike, runs in a subprocess pointed at the fake Hub, with its own HF_HOME (no real cache or
login is touched) and HF_HUB_DISABLE_XET=1: huggingface_hub then uploads large files through LFS, which the fake Hub
speaks, rather than through Xet, which it cannot.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from finetune.config import HubConfig, ModelConfig, config_yaml, load_config
from finetune.data import shapes
from finetune.hub import HubPushError, push
from finetune.model_card import model_card
from finetune.models import build_components

from . import launch
from .conftest import TINY_MODEL, TINY_RUN
from .fake_hub import FakeHub, Token

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "finetune" / "train.py")
TOKEN = "hf_TestAliceWrite0123456789abcdef"  # alice's; looks like a real token so a leak would be found
BOB_TOKEN = "hf_TestBobWrite0123456789abcdef"
PROMPTS = ["a red circle", "a blue square"]
RUN = [*TINY_RUN, f"validation.prompts={json.dumps(PROMPTS)}", "validation.num_images_per_prompt=2"]


READ_TOKEN = "hf_TestAliceRead0123456789abcdef"


@pytest.fixture(scope="module")
def hub():
    with FakeHub({TOKEN: "alice", BOB_TOKEN: "bob", READ_TOKEN: Token("alice", "read")}) as server:
        yield server


@pytest.fixture(autouse=True)
def no_unknown_routes(request):
    """Every request the code under test made was one the fake Hub understood (else the fake needs a route)."""
    server = request.getfixturevalue("hub") if "hub" in request.fixturenames else None
    before = len(server.unknown) if server else 0
    yield
    assert not server or server.unknown[before:] == []


def _client_env(hub: FakeHub, home: Path, token: str | None = TOKEN, endpoint: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_ENDPOINT=endpoint or hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_VERBOSITY="debug", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    if token:
        env["HF_TOKEN"] = token
    return env


def _push(hub: FakeHub, folder: Path, *args: str, token: str | None = TOKEN, endpoint: str | None = None):
    """`python -m finetune.hub folder args...` as a user runs it."""
    return launch.run([sys.executable, "-m", "finetune.hub", str(folder), *args], cwd=ROOT, capture_output=True,
                      text=True, timeout=120, env=_client_env(hub, folder.parent / "hf-home", token, endpoint))


def _train(out: Path, *overrides: str) -> Path:
    env = {**os.environ, "FINETUNE_CACHE": str(out.parent / "cache"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), *RUN,
                         *overrides, f"train.output_dir={out}"], cwd=out.parent, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A real output folder: a tiny pipeline trained from scratch, 4 steps, checkpoints at 2 and 4."""
    return _train(tmp_path_factory.mktemp("runs") / "scratch", "train.max_train_steps=4", "train.checkpointing_steps=2")


@pytest.fixture(scope="module")
def lora_run(pipeline_run, tmp_path_factory):
    """A real LoRA output folder (alpha != rank), on the pipeline above as its base."""
    return _train(tmp_path_factory.mktemp("runs") / "lora", f"model.pretrained_model_name_or_path={pipeline_run}",
                  "model.train_text_encoder=false", "lora.enabled=true", "lora.rank=2", "lora.alpha=6",
                  "train.learning_rate=1e-2", "train.max_train_steps=2", "train.checkpointing_steps=2")


def _png(path: Path, size=(12, 22)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)


def _made_output(folder: Path, *overrides: str) -> Path:
    """An output folder made by hand, laid out as train.py writes one (no training: the push tests need only the
    files): a pipeline, samples, logs, two checkpoints and one still being written."""
    config = load_config(None, [*RUN, "train.max_train_steps=4", *overrides, f"train.output_dir={folder}"])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_yaml(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline_text2image_ddpm",
                                                                         "TextToImageDDPMPipeline"],
                                                         "scheduler": ["scheduling_ddpm", "DDPMScheduler"]}))
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(2048))
    _png(folder / "samples" / "step-4.png")
    (folder / "logs" / "finetune").mkdir(parents=True)
    (folder / "logs" / "finetune" / "events.out.tfevents.1.host").write_bytes(os.urandom(256))
    for name in ("checkpoint-2", "checkpoint-4", ".tmp-checkpoint-6"):
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_bytes(os.urandom(512))
        (folder / name / "manifest.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    return folder


@pytest.fixture
def made_output(tmp_path):
    return _made_output(tmp_path / "run")


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


# ---- the model card ----------------------------------------------------------------------------------------------

def test_the_file_names_the_push_knows_are_the_ones_the_trainer_writes():
    from finetune import kohya, lora, model_card

    assert (model_card.LORA_WEIGHTS, model_card.LYCORIS_WEIGHTS, model_card.KOHYA_WEIGHTS) == (
        lora.WEIGHT_NAME, lora.LYCORIS_WEIGHTS, kohya.WEIGHT_NAME)


def test_model_card_of_a_pipeline_trained_from_scratch(made_output):
    card = model_card(made_output, "alice/tiny-ddpm", license="apache-2.0")
    meta = ModelCard(card).data.to_dict()
    assert meta == {"library_name": "diffusers", "pipeline_tag": "text-to-image", "license": "apache-2.0",
                    "tags": ["text-to-image", "diffusers", "diffusers-training", "ddpm"]}  # no base, no dataset
    assert "trained from scratch" in card
    assert "![sample grid at step 4](samples/step-4.png)" in card
    assert "1. a red circle\n2. a blue square" in card
    assert ('pipe = DiffusionPipeline.from_pretrained("alice/tiny-ddpm", trust_remote_code=True)\n'
            'images = pipe(\n    ["a red circle", "a blue square"],\n    num_images_per_prompt=2,\n'
            '    num_inference_steps=2,\n    guidance_scale=1.0,\n'
            '    generator=torch.Generator().manual_seed(0),\n).images') in _python_block(card)
    compile(_python_block(card), "snippet", "exec")
    assert "With torch, diffusers and transformers (this project is not needed)" in card
    assert ("`trust_remote_code=True` runs the Python files this repository ships, as finetune-ddpm writes them: "
            "`pipeline_text2image_ddpm.py` (the pipeline: ") in card
    assert "and `scheduler/scheduling_ddpm.py` (the DDPM scheduler: " in card
    for row in ("| steps | 4 |", "| effective batch | 4 (4 per process x 1 accumulation x 1 process) |",
                "| resolution | 8 px |", "| learning rate | 0.001 peak, cosine schedule, 0 warm-up steps |",
                "| precision | fp32 |", "| EMA | on (max decay 0.999) |", "| text encoder | trained |",
                "| data | built-in shapes (64 samples) |"):
        assert row in card
    assert "## Evaluation" not in card and "LoRA" not in card


def test_model_card_of_a_lora_on_a_hub_base_with_an_evaluation(tmp_path, monkeypatch):
    """Offline (conftest) and with an empty cache, the base cannot be inspected: no trust_remote_code (tests/
    test_hub_security.py has the bases that can)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    folder = _made_output(tmp_path / "run", "model.pretrained_model_name_or_path=someone/base-ddpm",
                          "model.train_text_encoder=false", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
                          "data.source=hf", "data.path=someone/captions", "data.num_samples=null",
                          "train.gradient_accumulation_steps=2",
                          "train.mixed_precision=bf16")
    for step in (90, 200):  # the last grid is step 200, though "step-90" sorts after "step-200" as text
        _png(folder / "samples" / f"step-{step}.png")
    (folder / "evaluation.json").write_text(json.dumps({"metrics": {"clip_score": 0.3123456, "fid": 12.5,
                                                                    "validation_loss_t50": 0.25},
                                                        "settings": {"num_images_per_prompt": 8}}))
    for name in ("checkpoint-2", "checkpoint-4"):
        (folder / name / "manifest.json").write_text(json.dumps({"step": 2, "world_size": 3}))

    assert "kohya" not in model_card(folder, "alice/tiny-lora")  # (no such file here)
    (folder / "lora_kohya.safetensors").write_bytes(b"")  # (as lora.save_format auto writes on SD bases)
    card = model_card(folder, "alice/tiny-lora", revision="v2")
    assert ("This repository holds the adapters only (`pytorch_lora_weights.safetensors`; the same adapters in the "
            "kohya layout that ComfyUI, AUTOMATIC1111 and Forge load: `lora_kohya.safetensors`); they load onto the "
            "base.") in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"library_name": "diffusers", "pipeline_tag": "text-to-image", "base_model": "someone/base-ddpm",
                    "datasets": ["someone/captions"],
                    "tags": ["text-to-image", "diffusers", "diffusers-training", "lora", "ddpm"]}
    assert "LoRA adapters for [someone/base-ddpm](/someone/base-ddpm): rank 4, alpha 8" in card
    assert "![sample grid at step 200](samples/step-200.png)" in card
    assert ('pipe = DiffusionPipeline.from_pretrained("someone/base-ddpm")\n'
            'pipe.load_lora_weights("alice/tiny-lora", weight_name="pytorch_lora_weights.safetensors", '
            'revision="v2")\n') in _python_block(card)
    assert "With torch, diffusers, transformers and peft (this project is not needed)" in card  # load_lora_weights
    assert "The base could not be inspected when this card was written" in card
    assert "up to rounding (the run sampled under bf16 autocast)" in card
    for row in ("| effective batch | 24 (4 per process x 2 accumulation x 3 processes) |",
                "| LoRA | rank 4, alpha 8, on attn2.to_q, attn2.to_k, attn2.to_v, attn2.to_out.0 |",
                "| precision | bf16 |", "| data | hf `someone/captions` |",
                "| clip_score | 0.3123 |", "| fid | 12.5 |", "Settings: num_images_per_prompt 8."):
        assert row in card
    assert "text encoder |" not in card and "validation_loss_t50" not in card


# ---- round trips: push, then load from the Hub the way the card says ---------------------------------------------

DOWNSTREAM = textwrap.dedent("""
    import importlib.util, re, sys
    sys.path.append({purelib!r})
    assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("finetune") is None
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    # The card's own snippet, from the Hub.
    card = open(hf_hub_download({repo!r}, "README.md", revision={revision!r})).read()
    snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
    scope = {{}}
    exec(snippet, scope)
    np.save("hub.npy", np.stack([np.asarray(image) for image in scope["images"]]))

    # The same sampling call on the local output folder.
    base, local = {base!r}, {local!r}
    pipe = DiffusionPipeline.from_pretrained(base or local, trust_remote_code=True)
    if base:
        pipe.load_lora_weights(local)
    scope = {{"torch": torch, "pipe": pipe}}
    exec(snippet[snippet.index("images = pipe("):], scope)
    np.save("local.npy", np.stack([np.asarray(image) for image in scope["images"]]))
""")


def _load_downstream(hub, tmp_path, repo, revision, local, base=None) -> tuple[np.ndarray, np.ndarray]:
    """In a process that cannot import this project: the card's snippet loading `repo` from the Hub, and the same
    sampling from the local folder."""
    script = DOWNSTREAM.format(purelib=sysconfig.get_paths()["purelib"], repo=repo, revision=revision,
                               base=str(base) if base else None, local=str(local))
    # -S: no site-packages processing, so the editable install of this project is invisible.
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**_client_env(hub, tmp_path / "hf-home", token=None), "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    return np.load(tmp_path / "hub.npy"), np.load(tmp_path / "local.npy")


def _grid_tiles(folder: Path, step: int, columns: int, pad: int = 2) -> np.ndarray:
    """The images of a sample grid (validation.make_grid's layout)."""
    grid = np.asarray(Image.open(folder / "samples" / f"step-{step}.png").convert("RGB"))
    size = (grid.shape[1] - pad) // columns - pad
    rows = (grid.shape[0] - pad) // (size + pad)
    return np.stack([grid[pad + r * (size + pad): pad + r * (size + pad) + size,
                          pad + c * (size + pad): pad + c * (size + pad) + size]
                     for r in range(rows) for c in range(columns)])


@pytest.mark.slow
def test_pipeline_round_trip(hub, pipeline_run, tmp_path):
    """A pipeline trained from scratch, pushed and loaded back with the card's snippet: the same images as the local
    folder and as the run's final grid, in a process without this project."""
    result = _push(hub, pipeline_run, "--hub-model-id", "alice/tiny-ddpm", "--license", "apache-2.0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed" in result.stdout and "alice/tiny-ddpm" in result.stdout
    files = hub.repos["alice/tiny-ddpm"].files("main")
    assert {"model_index.json", "pipeline_text2image_ddpm.py", "scheduler/scheduling_ddpm.py", "README.md",
            "config.yaml", "samples/step-4.png", "unet/diffusion_pytorch_model.safetensors"} <= files.keys()
    assert files["README.md"] == (pipeline_run / "README.md").read_bytes()
    assert not any(path.startswith("checkpoint-") for path in files)

    from_hub, local = _load_downstream(hub, tmp_path, "alice/tiny-ddpm", "main", pipeline_run)
    np.testing.assert_array_equal(from_hub, local)
    np.testing.assert_array_equal(from_hub, _grid_tiles(pipeline_run, 4, columns=2))


@pytest.mark.slow
def test_lora_round_trip_on_a_branch(hub, lora_run, pipeline_run, tmp_path):
    """LoRA adapters pushed to a branch of a repo named without its namespace; the card's snippet (base, then the
    adapters from that branch) draws what the local adapters draw, and the run's final grid."""
    result = _push(hub, lora_run, "--hub-model-id", "tiny-lora", "--revision", "v1")
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos["alice/tiny-lora"]  # the token's user is the namespace
    assert set(repo.files("main")) == {".gitattributes"}
    assert {"pytorch_lora_weights.safetensors", "README.md", "config.yaml", "samples/step-2.png"} <= \
        repo.files("v1").keys()
    card = (lora_run / "README.md").read_text()
    assert f'DiffusionPipeline.from_pretrained("{pipeline_run}", trust_remote_code=True)' in card
    assert "runs the Python files the base ships, as finetune-ddpm writes them: `pipeline_text2image_ddpm.py`" in card
    assert f"Read them in the local pipeline `{pipeline_run}` before you run them." in card
    assert 'pipe.load_lora_weights("alice/tiny-lora", weight_name="pytorch_lora_weights.safetensors", ' \
           'revision="v1")' in card
    assert yaml.safe_load(card.split("---\n")[1])["tags"][3] == "lora"

    from_hub, local = _load_downstream(hub, tmp_path, "alice/tiny-lora", "v1", lora_run, base=pipeline_run)
    np.testing.assert_array_equal(from_hub, local)
    np.testing.assert_array_equal(from_hub, _grid_tiles(lora_run, 2, columns=2))


# ---- what is uploaded, where, for whom ---------------------------------------------------------------------------

def test_the_token_is_never_printed_or_written(hub, made_output):
    """Pushes (with huggingface_hub's debug logging on) and a refused push: the token is in no output, no file of
    the output folder, and nothing uploaded."""
    results = [_push(hub, made_output, "--hub-model-id", "alice/no-leak"),
               _push(hub, made_output, "--hub-model-id", "alice/no-leak", "--include-checkpoints", "--revision", "b"),
               _push(hub, made_output, "--hub-model-id", "bob/not-yours")]
    assert [r.returncode for r in results] == [0, 0, 1]
    for result in results:
        assert TOKEN not in result.stdout + result.stderr
    assert "(authenticated: True)" in results[0].stderr  # the debug log ran, and the token was sent
    for path in made_output.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    for commit in hub.repos["alice/no-leak"].commits.values():
        for path, content in commit.files.items():
            assert TOKEN.encode() not in content, path


def test_checkpoints_stay_local_unless_asked_for(hub, made_output):
    """So do what the web page keeps in a run folder: its launch record and log, the images sampled on it."""
    for name in ("ui-launch.json", "ui-launch.log", "samples/ui/0-a-red-circle.png"):
        (made_output / name).parent.mkdir(parents=True, exist_ok=True)
        (made_output / name).write_text("local")
    assert _push(hub, made_output, "--hub-model-id", "alice/no-checkpoints").returncode == 0
    files = hub.repos["alice/no-checkpoints"].files()
    assert {"config.yaml", "model_index.json", "README.md", "samples/step-4.png",
            "logs/finetune/events.out.tfevents.1.host", "unet/diffusion_pytorch_model.safetensors"} <= files.keys()
    assert not [path for path in files if "checkpoint-" in path or "ui-launch" in path or path.startswith("samples/ui")]

    assert _push(hub, made_output, "--hub-model-id", "alice/no-checkpoints", "--include-checkpoints").returncode == 0
    files = hub.repos["alice/no-checkpoints"].files()
    assert files["checkpoint-4/model.safetensors"] == (made_output / "checkpoint-4" / "model.safetensors").read_bytes()
    assert "checkpoint-2/manifest.json" in files
    assert not [path for path in files if ".tmp-checkpoint" in path]  # one still being written never goes


def test_a_large_file_goes_through_lfs_intact(hub, made_output):
    """A file from the fake Hub's LFS size up (a tensorboard log here, 5 MiB), and the UNet weights (*.safetensors,
    LFS by the repo's .gitattributes), go through the LFS batch API and a PUT of their bytes, not base64 in the commit,
    and arrive byte for byte. (With hf_xet installed, huggingface_hub would send them through Xet, which the fake Hub
    cannot speak: _client_env sets HF_HUB_DISABLE_XET=1.)"""
    large = made_output / "logs" / "finetune" / "events.out.tfevents.2.host"
    large.write_bytes(os.urandom(hub.lfs_threshold + 1024))
    weights = made_output / "unet" / "diffusion_pytorch_model.safetensors"
    before = len(hub.requests)
    result = _push(hub, made_output, "--hub-model-id", "alice/large")
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.repos["alice/large"].files()
    assert files["logs/finetune/events.out.tfevents.2.host"] == large.read_bytes()
    assert files["unet/diffusion_pytorch_model.safetensors"] == weights.read_bytes()
    requests = hub.requests[before:]
    assert "POST /alice/large.git/info/lfs/objects/batch" in requests
    for path in (large, weights):
        assert f"PUT /lfs-upload/{hashlib.sha256(path.read_bytes()).hexdigest()}" in requests, path
    assert files["config.yaml"] == (made_output / "config.yaml").read_bytes()  # small text: a regular blob
    assert len([r for r in requests if r.startswith("PUT ")]) == 2


def test_a_failed_xet_upload_says_why_and_how_to_fix_it(hub, made_output):
    """With hf_xet on, huggingface_hub sends large files to the Hub's Xet storage, which the fake Hub does not serve
    (as when a network lets the Hub through but not its Xet storage): one line with the cause and the fix."""
    env = {**_client_env(hub, made_output.parent / "hf-home"), "HF_HUB_DISABLE_XET": "0"}
    result = launch.run([sys.executable, "-m", "finetune.hub", str(made_output), "--hub-model-id", "alice/xet"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [message] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert message.startswith("error: cannot push to alice/xet: could not reach http://127.0.0.1:"), message
    assert "xet-write-token" in message and "set HF_HUB_DISABLE_XET=1 to upload through LFS" in message
    assert hub.unknown.pop() == "GET /api/models/alice/xet/xet-write-token/main"  # the Xet route the fake lacks


def test_push_checkpoint_uploads_that_folder_only(hub, made_output):
    script = ("import sys; from finetune.config import HubConfig; from finetune.hub import push_checkpoint\n"
              "hub = HubConfig(push_to_hub=True, hub_model_id='ckpt', revision='train', push_checkpoints=True)\n"
              f"print(push_checkpoint({str(made_output)!r}, int(sys.argv[1]), hub).oid)")
    env = _client_env(hub, made_output.parent / "hf-home")
    result = subprocess.run([sys.executable, "-c", script, "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos["alice/ckpt"]
    assert repo.branches["train"] == result.stdout.split()[-1]
    assert repo.files("train") == {".gitattributes": repo.files("main")[".gitattributes"],
                                   **{f"checkpoint-2/{p.name}": p.read_bytes()
                                      for p in (made_output / "checkpoint-2").iterdir()}}
    assert not (made_output / "README.md").exists()

    missing = subprocess.run([sys.executable, "-c", script, "3"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "HubPushError" in missing.stderr and "checkpoint-3" in missing.stderr


def _get(hub: FakeHub, path: str, token: str | None) -> int:
    request = urllib.request.Request(hub.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_private_repo_is_readable_by_its_owner_only(hub, made_output):
    assert _push(hub, made_output, "--hub-model-id", "alice/secret", "--private").returncode == 0
    assert hub.repos["alice/secret"].private
    for path in ("/api/models/alice/secret", "/alice/secret/resolve/main/README.md"):
        assert (_get(hub, path, None), _get(hub, path, BOB_TOKEN), _get(hub, path, TOKEN)) == (401, 404, 200)


def test_defaults_come_from_the_run_config(hub, tmp_path):
    folder = _made_output(tmp_path / "run", "hub.hub_model_id=alice/from-config", "hub.private=true",
                          "hub.license=mit", "hub.revision=exp")
    result = _push(hub, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos["alice/from-config"]
    assert repo.private and "exp" in repo.branches
    assert ModelCard(repo.files("exp")["README.md"].decode()).data.license == "mit"
    assert _push(hub, folder, "--no-private", "--hub-model-id", "alice/public").returncode == 0
    assert not hub.repos["alice/public"].private

    unnamed = _made_output(tmp_path / "unnamed")
    result = _push(hub, unnamed)
    assert result.returncode == 2 and "give --hub-model-id" in result.stderr and "Traceback" not in result.stderr


def test_a_folder_with_nothing_to_push_is_a_mistake_without_a_request(hub, made_output, tmp_path):
    """What the user fixes in the folder exits 2 with one line, as every command's mistakes do (README), and
    asks the Hub nothing; a push the Hub refuses exits 1 (test_a_failed_push_says_why_and_how_to_fix_it)."""
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((made_output / "config.yaml").read_text())
    before = len(hub.requests)
    for folder, says in [(tmp_path / "nowhere", "is not an output folder"), (unfinished, "holds no result yet")]:
        result = _push(hub, folder, "--hub-model-id", "alice/nothing")
        [message] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and says in message and "Traceback" not in result.stderr, result.stderr
    assert len(hub.requests) == before and "alice/nothing" not in hub.repos


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, token, repo, expected", [
    ("no token", None, "alice/fail", ["HTTP 401", "set HF_TOKEN", "hf auth login"]),
    ("unknown token", "hf_NotAToken", "alice/fail", ["HTTP 401", "Invalid credentials", "hf auth login"]),
    ("another user's namespace", BOB_TOKEN, "alice/fail", ["HTTP 403", "check the repo id", "write"]),
    ("Hub unreachable", TOKEN, "alice/fail", ["could not reach http://127.0.0.1:", "Connection refused",
                                               "check the network"]),
    ("license the Hub refuses", TOKEN, "alice/bad-license", ["refused the model card's metadata", "hub.license"]),
])
def test_a_failed_push_says_why_and_how_to_fix_it(hub, made_output, case, token, repo, expected):
    before = _snapshot(made_output)
    args = ["--license", "Apache 2"] if case.startswith("license") else []
    endpoint = f"http://127.0.0.1:{_closed_port()}" if case == "Hub unreachable" else None
    result = _push(hub, made_output, "--hub-model-id", repo, *args, token=token, endpoint=endpoint)
    assert result.returncode == 1
    [message] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # one line
    assert message.startswith(f"error: cannot push to {repo}: "), result.stderr[-3000:]
    for words in expected:
        assert words in message, message
    assert "Traceback" not in result.stderr
    assert token is None or token not in result.stderr + result.stdout
    after = _snapshot(made_output)
    after.pop("README.md", None)
    assert after == before  # nothing changed, nothing removed; at most the card was written
    assert not [commit for name, r in hub.repos.items() if name == repo for commit in r.commits.values()
                if "README.md" in commit.files]  # nothing was uploaded


def test_a_run_without_a_result_or_in_offline_mode_is_refused(made_output, monkeypatch):
    """In this process (no server needed): a folder whose run has not exported, and HF_HUB_OFFLINE."""
    hub = HubConfig(push_to_hub=True, hub_model_id="alice/x")
    (made_output / "model_index.json").unlink()
    with pytest.raises(HubPushError, match=r"holds no result yet .* the run has not finished"):
        push(made_output, hub)
    (made_output / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # whatever the environment says
    with pytest.raises(HubPushError, match=r"cannot push to alice/x: HF_HUB_OFFLINE is set.*Fix: unset it"):
        push(made_output, hub)
    assert not (made_output / "README.md").exists()


# ---- through the trainer ---------------------------------------------------------------------------------------

def _train_and_push(hub: FakeHub, out: Path, token: str | None, *overrides: str):
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**_client_env(hub, out.parent / "hf-home", token), "FINETUNE_CACHE": str(out.parent / "cache")}
    return launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), *RUN,
                       "hub.push_to_hub=true", *overrides, f"train.output_dir={out}"], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_trainer_pushes_its_checkpoints_and_result(hub, tmp_path):
    """hub.push_to_hub with hub.push_checkpoints: each checkpoint as it is written, then the result with its card;
    the summary names the commit."""
    out = tmp_path / "run"
    result = _train_and_push(hub, out, TOKEN, "hub.hub_model_id=trained", "hub.push_checkpoints=true",
                             "train.max_train_steps=4", "train.checkpointing_steps=2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    files = hub.repos["alice/trained"].files()
    assert files["unet/diffusion_pytorch_model.safetensors"] == \
        (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert files["README.md"] == (out / "README.md").read_bytes() and b"alice/trained" in files["README.md"]
    assert {"checkpoint-2/manifest.json", "checkpoint-4/manifest.json", "samples/step-4.png"} <= files.keys()
    assert f"pushed: {hub.url}/alice/trained/commit/" in result.stdout
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("token, expected", [
    (None, "the Hub did not accept the credentials"),
    (READ_TOKEN, "the token is read-only"),
])
def test_a_run_that_cannot_push_stops_before_training(hub, tmp_path, token, expected):
    out = tmp_path / "run"
    result = _train_and_push(hub, out, token, "hub.hub_model_id=alice/never", "train.max_train_steps=4")
    assert result.returncode == 1
    assert f"cannot push to alice/never: {expected}" in result.stderr and "HF_TOKEN" in result.stderr
    assert "alice/never" not in hub.repos and not list(out.glob("checkpoint-*")) and "train:" not in result.stderr


REVISION = textwrap.dedent("""
    import sys, torch
    from huggingface_hub import HfApi
    from safetensors.torch import load_file
    from finetune.config import ModelConfig
    from finetune.models import load_components
    api = HfApi()
    repo = api.create_repo("base", exist_ok=True).repo_id
    api.upload_folder(repo_id=repo, folder_path=sys.argv[1])
    api.create_branch(repo, branch="v2")
    api.upload_folder(repo_id=repo, folder_path=sys.argv[2], revision="v2")
    for revision, folder in ((None, sys.argv[1]), ("v2", sys.argv[2])):
        components = load_components(ModelConfig(pretrained_model_name_or_path=repo, revision=revision))
        for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
            expected = load_file(f"{folder}/{part}/{name}.safetensors")
            state = getattr(components, part).state_dict()
            assert all(torch.equal(state[key], value) for key, value in expected.items()), (revision, part)
    print("revisions ok")
""")


def test_model_revision_loads_that_branch_of_a_hub_base(hub, tiny_pipeline, tmp_path):
    """model.revision reaches every component: a base whose main and v2 branches hold other weights loads each."""
    tiny_pipeline.save_pretrained(tmp_path / "main")
    torch.manual_seed(1)
    build_components(ModelConfig(**TINY_MODEL), 8, shapes.all_captions()).pipeline().save_pretrained(tmp_path / "v2")
    result = subprocess.run([sys.executable, "-c", REVISION, str(tmp_path / "main"), str(tmp_path / "v2")], cwd=ROOT,
                            env=_client_env(hub, tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "revisions ok" in result.stdout, result.stderr[-3000:]
