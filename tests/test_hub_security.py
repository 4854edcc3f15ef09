"""What a push must never do, against the fake Hub of tests/fake_hub.py: tell users to run code the card cannot
vouch for (`trust_remote_code=True`), upload a pickle, or let a token that cannot write start hours of training.

As in tests/test_hub.py, every client runs in a subprocess pointed at the fake Hub, with its own HF_HOME.
"""

import json
import pickle
import subprocess
import sys

import pytest

from .fake_hub import FakeHub, Token
from .test_hub import ROOT, TOKEN, _client_env, _closed_port, _made_output, _push, _python_block

# model_index.json of a stock Stable Diffusion base (stable-diffusion-v1-5's, shortened) and of a base this project
# trained (what TextToImageDDPMPipeline.save_pretrained writes for the tiny test model).
STOCK_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
               "feature_extractor": ["transformers", "CLIPImageProcessor"],
               "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
               "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}
PROJECT_INDEX = {"_class_name": ["pipeline_text2image_ddpm", "TextToImageDDPMPipeline"],
                 "_diffusers_version": "0.42.1", "scheduler": ["scheduling_ddpm", "DDPMScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "TokenizersBackend"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None]}
OTHER_INDEX = {**STOCK_INDEX, "_class_name": ["pipeline_magic", "MagicPipeline"]}  # someone else's pipeline code

READ = "hf_TestAliceRead0123456789abcdef"
FINE_WRITE = "hf_TestAliceFineWrite0123456789ab"
FINE_READ = "hf_TestAliceFineRead0123456789abc"
FINE_ELSEWHERE = "hf_TestAliceFineBob0123456789abcd"


@pytest.fixture(scope="module")
def hub():
    tokens = {TOKEN: "alice", READ: Token("alice", "read"),
              FINE_WRITE: Token("alice", "fineGrained", {"alice": ["repo.content.read", "repo.write"]}),
              FINE_READ: Token("alice", "fineGrained", {"alice": ["repo.content.read"]}),
              FINE_ELSEWHERE: Token("alice", "fineGrained", {"bob/shared": ["repo.content.read", "repo.write"]})}
    with FakeHub(tokens) as server:
        server.add_repo("someone/sd-base", {"model_index.json": json.dumps(STOCK_INDEX).encode()})
        server.add_repo("someone/ddpm-base", {"model_index.json": json.dumps(PROJECT_INDEX).encode()})
        server.add_repo("someone/magic-base", {"model_index.json": json.dumps(OTHER_INDEX).encode(),
                                               "pipeline_magic.py": b"import os  # anything at all\n"})
        yield server


@pytest.fixture(autouse=True)
def no_unknown_routes(hub):
    """Every request the code under test made was one the fake Hub understood (else the fake needs a route)."""
    before = len(hub.unknown)
    yield
    assert hub.unknown[before:] == []


def _run(hub: FakeHub, home, script: str, *args: str, token: str | None = TOKEN, endpoint: str | None = None):
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_client_env(hub, home, token, endpoint))


# ---- the card says trust_remote_code=True only for this project's code -------------------------------------------

CARD = "import sys; from finetune.model_card import model_card; print(model_card(sys.argv[1], 'alice/lora'))"


def _lora_card(hub: FakeHub, tmp_path, base: str, endpoint: str | None = None) -> str:
    """The card of a LoRA trained on `base`, written as at push time (online, pointed at the fake Hub), with the
    HF_HOME `tmp_path/hf-home`."""
    folder = tmp_path / f"lora-on-{base.replace('/', '-')}"
    if not folder.exists():
        _made_output(folder, f"model.pretrained_model_name_or_path={base}", "model.train_text_encoder=false",
                     "lora.enabled=true")
    result = _run(hub, tmp_path / "hf-home", CARD, str(folder), endpoint=endpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_lora_on_a_stock_base_loads_without_remote_code(hub, tmp_path):
    card = _lora_card(hub, tmp_path, "someone/sd-base")
    assert 'pipe = DiffusionPipeline.from_pretrained("someone/sd-base")\n' in _python_block(card)
    assert "trust_remote_code" not in card
    assert "could not be inspected" not in card


def test_a_lora_on_a_base_this_project_trained_says_what_code_it_runs(hub, tmp_path):
    card = _lora_card(hub, tmp_path, "someone/ddpm-base")
    assert 'pipe = DiffusionPipeline.from_pretrained("someone/ddpm-base", trust_remote_code=True)\n' in \
        _python_block(card)
    assert ("`trust_remote_code=True` runs the Python files the base ships, as finetune-ddpm writes them: "
            "`pipeline_text2image_ddpm.py` (the pipeline: it encodes the prompt with the text encoder, runs the "
            "reverse diffusion loop with the UNet, with classifier-free guidance, and decodes the images) and "
            "`scheduler/scheduling_ddpm.py` (the DDPM scheduler: the noise schedule and the reverse step). Read them "
            "in [someone/ddpm-base](/someone/ddpm-base) before you run them.") in card


def test_a_lora_on_a_base_with_code_of_its_own_does_not_trust_it(hub, tmp_path):
    """A base shipping pipeline code that is not this project's: the card cannot vouch for it, so its code leaves out
    trust_remote_code and one sentence tells to read that code first."""
    card = _lora_card(hub, tmp_path, "someone/magic-base")
    assert 'pipe = DiffusionPipeline.from_pretrained("someone/magic-base")\n' in _python_block(card)
    assert ("The base ships pipeline code of its own (`pipeline_magic.py`, not this project's), so the code above "
            "leaves out the `trust_remote_code=True` it needs: read that code in [someone/magic-base]"
            "(/someone/magic-base) before you trust it.") in card
    assert "trust_remote_code=True)" not in card


def test_a_lora_on_a_base_that_cannot_be_inspected_does_not_trust_it(hub, tmp_path):
    """A base whose model_index.json cannot be read (not on the Hub, not in the cache): no trust_remote_code, and one
    sentence telling to read its code, if any, first."""
    card = _lora_card(hub, tmp_path, "someone/gone")
    assert 'pipe = DiffusionPipeline.from_pretrained("someone/gone")\n' in _python_block(card)
    assert "trust_remote_code=True)" not in card  # in no code
    [sentence] = [line for line in card.splitlines() if "could not be inspected" in line]
    assert sentence.startswith("The base could not be inspected when this card was written")
    assert sentence.endswith("read that code in [someone/gone](/someone/gone) before you trust it.")


def test_the_base_is_inspected_from_the_cache_first(hub, tmp_path):
    """The trainer downloaded the base (snapshot_download, as from_pretrained does): the card reads model_index.json
    from that cache, without asking the Hub, and even with the Hub unreachable."""
    home = tmp_path / "hf-home"
    download = "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])"
    assert _run(hub, home, download, "someone/ddpm-base").returncode == 0
    before = len(hub.requests)
    online = _lora_card(hub, tmp_path, "someone/ddpm-base")
    assert not [r for r in hub.requests[before:] if "model_index.json" in r]
    unreachable = _lora_card(hub, tmp_path, "someone/ddpm-base", endpoint=f"http://127.0.0.1:{_closed_port()}")
    for card in (online, unreachable):
        assert 'from_pretrained("someone/ddpm-base", trust_remote_code=True)' in card
        assert "`trust_remote_code=True` runs the Python files the base ships" in card


# ---- no pickle is ever uploaded ----------------------------------------------------------------------------------

def test_no_pickle_is_uploaded(hub, tmp_path):
    """Checkpoints holding accelerate's random_states_<rank>.pkl and other pickles: `push` with checkpoints and
    `push_checkpoint` upload everything else and no pickle."""
    folder = _made_output(tmp_path / "run")
    for name in ("checkpoint-2", "checkpoint-4"):
        (folder / name / "random_states_0.pkl").write_bytes(pickle.dumps({"step": 2}))
        (folder / name / "custom").mkdir()
        (folder / name / "custom" / "state.pickle").write_bytes(pickle.dumps([1, 2]))
    (folder / "stray.pkl").write_bytes(pickle.dumps("stray"))

    assert _push(hub, folder, "--hub-model-id", "alice/no-pickles", "--include-checkpoints").returncode == 0
    script = ("import sys; from finetune.config import HubConfig; from finetune.hub import push_checkpoint\n"
              "push_checkpoint(sys.argv[1], 2, HubConfig(push_to_hub=True, hub_model_id='alice/ckpt-no-pickles'))")
    result = _run(hub, tmp_path / "hf-home", script, str(folder))
    assert result.returncode == 0, result.stderr[-3000:]

    pushed = hub.repos["alice/no-pickles"].files()
    assert pushed["checkpoint-4/model.safetensors"] == (folder / "checkpoint-4" / "model.safetensors").read_bytes()
    assert {"checkpoint-2/manifest.json", "unet/diffusion_pytorch_model.safetensors"} <= pushed.keys()
    assert "checkpoint-2/model.safetensors" in hub.repos["alice/ckpt-no-pickles"].files()
    for repo in ("alice/no-pickles", "alice/ckpt-no-pickles"):
        for commit in hub.repos[repo].commits.values():
            assert not [path for path in commit.files if path.endswith((".pkl", ".pickle"))], repo


# ---- tokens that cannot write are refused before training --------------------------------------------------------

CHECK = ("from finetune.config import HubConfig; from finetune.hub import HubPushError, check_credentials\n"
         "try:\n    print('accepted:', check_credentials(HubConfig(push_to_hub=True, hub_model_id='alice/x')))\n"
         "except HubPushError as e:\n    print('refused:', e)")


@pytest.mark.parametrize("token, expected", [
    (TOKEN, "accepted: alice"),
    (READ, "refused: cannot push to alice/x: the token is read-only. Fix: set HF_TOKEN to a token with write access"),
    (FINE_WRITE, "accepted: alice"),
    (FINE_ELSEWHERE, "accepted: alice"),  # may write to some repository: which ones shows at the push
    (FINE_READ, "refused: cannot push to alice/x: the fine-grained token may write to no repository (none of its "
                "permissions is repo.write). Fix: give it write access"),
])
def test_the_credentials_check_reads_the_hubs_token_fields(hub, tmp_path, token, expected):
    """check_credentials against /api/whoami-v2 in the Hub's shape: `auth.accessToken.role` ("read", "write",
    "fineGrained") and, for a fine-grained token, the permissions in `auth.accessToken.fineGrained.scoped`."""
    result = _run(hub, tmp_path / "hf-home", CHECK, token=token)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(expected), result.stdout
    assert token not in result.stdout + result.stderr


def test_a_fine_grained_token_for_another_namespace_fails_at_the_push(hub, tmp_path):
    """Accepted by the check (it may write to bob/shared), it is refused by the Hub when it writes to alice's
    namespace, with the cause and the fix."""
    result = _push(hub, _made_output(tmp_path / "run"), "--hub-model-id", "alice/fine", token=FINE_ELSEWHERE)
    assert result.returncode == 1
    assert "cannot push to alice/fine: the token may not write there (HTTP 403" in result.stderr
    assert "a fine-grained token needs write access to this repository or namespace" in result.stderr
    assert "alice/fine" not in hub.repos
