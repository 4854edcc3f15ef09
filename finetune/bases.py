"""Where a base (`model.pretrained_model_name_or_path`) is, found before anything loads it: a local pipeline
folder, or a Hub id in the local cache or on the Hub. What is neither is a one-line UserError that says what the
name was taken for and what to do: a local-looking path is never sent to the Hub (that took 23 s of retries and
ended in a `model_index.json` traceback), and a run's output that does not exist yet names the config to train."""

import os
from pathlib import Path

import huggingface_hub
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .cli import UserError

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

INDEX = "model_index.json"
KEY = "model.pretrained_model_name_or_path"
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def locate_base(path: str, revision: str | None = None) -> str:
    """Where a base that can be loaded is: 'local' (a folder), 'cache' (a Hub id downloaded before) or 'hub' (to be
    downloaded); otherwise a UserError naming the cause and the fix."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return _check_folder(path, folder)
    trained_by = config_writing(path)
    if trained_by:
        raise UserError(f"{KEY}={path}: no such folder yet; it is the output of {trained_by}, so train that first: "
                        f"finetune train --config {trained_by} (or the same through accelerate launch)")
    if looks_local(path):
        raise UserError(f"{KEY}={path}: no such folder (a path, so it is not looked up on the Hub); give a pipeline "
                        "folder that exists, or a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    return _check_hub(path, revision)


def looks_local(path: str) -> bool:
    """A name that can only be a path: `./x`, `../x`, `/x`, `~/x`, a Windows path, more than one `/`, or one whose
    first part is a folder here (`outputs/run` while `outputs/` exists)."""
    return (path.startswith((".", "/", "~")) or "\\" in path or path.count("/") != 1
            or Path(path.split("/")[0]).is_dir())


def config_writing(path: str) -> str | None:
    """The config (in ./configs or the project's configs/) whose `train.output_dir` is `path`, if one is."""
    target = os.path.normpath(path)
    for folder in dict.fromkeys([Path("configs"), PROJECT_CONFIGS]):
        for file in sorted(folder.glob("*.y*ml")) if folder.is_dir() else []:
            try:
                output = ((yaml.safe_load(file.read_text()) or {}).get("train") or {}).get("output_dir")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(output, str) and os.path.normpath(output) == target:
                return os.path.relpath(file) if folder == Path("configs") else str(file)
    return None


def _check_folder(path: str, folder: Path) -> str:
    if (folder / INDEX).is_file():
        return "local"
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
    if (folder / "config.yaml").is_file():
        more = (f"; export its newest checkpoint with: python -m finetune.export {checkpoints[-1]}" if checkpoints
                else "")
        raise UserError(f"{KEY}={path}: that run has not written its pipeline yet (no {INDEX}: it is still "
                        f"training, or it stopped early){more}; or finish it with train.resume_from_checkpoint=latest")
    raise UserError(f"{KEY}={path}: the folder holds no pipeline (no {INDEX}); give the folder a pipeline was saved "
                    "to (save_pretrained), or a Hub id")


def _check_hub(repo_id: str, revision: str | None) -> str:
    """'cache' when the base is in the local cache, 'hub' once the Hub answers for it: one request, no retries."""
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, INDEX, revision=revision), str):
        return "cache"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"{KEY}={repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                        f"downloading it; download it where there is a network (hf download {repo_id}), or unset "
                        "HF_HUB_OFFLINE")
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=20)
    except GatedRepoError as error:
        raise UserError(f"{KEY}={repo_id}: the model is gated; accept its terms on {endpoint}/{repo_id} and log in "
                        "(hf auth login)") from error
    except RevisionNotFoundError as error:
        raise UserError(f"{KEY}={repo_id}: the Hub has no revision {revision!r} of it (model.revision)") from error
    except RepositoryNotFoundError as error:
        raise UserError(f"{KEY}={repo_id}: no such model on {endpoint} (or it is private: log in with hf auth "
                        "login); check the id, or give a local pipeline folder") from error
    except HfHubHTTPError as error:
        raise UserError(f"{KEY}={repo_id}: the Hub answered {error}; try again later") from error
    except (TransportError, ConnectionError, OSError) as error:
        raise UserError(f"{KEY}={repo_id}: not in the local cache, and {endpoint} could not be reached "
                        f"({type(error).__name__}: {error}); check the network (and HF_ENDPOINT), or download the "
                        f"base where there is one (hf download {repo_id}) and give its folder") from error
    return "hub"
