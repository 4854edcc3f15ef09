"""Publish a run's output folder on the Hugging Face Hub: a generated model card (README.md), then the upload.

    python -m finetune.hub OUTPUT_DIR [--hub-model-id ID] [--private] [--revision BRANCH] [--include-checkpoints]
        [--license L]

The token is never handled here: huggingface_hub finds it (`HF_TOKEN`, else the login stored by `hf auth login`),
so it is not printed, logged or written anywhere. Uploaded: the pipeline or the LoRA weights, config.yaml, the sample
grids, README.md, evaluation.json when present, and the tensorboard logs (`logs/`: a few hundred KiB even for long
runs, and the Hub plots them on the model page). Checkpoints (`checkpoint-<step>/`) go only when asked for
(`hub.push_checkpoints`): they hold the optimizer state, several times the size of the weights. A pickle (`*.pkl`,
`*.pickle`, such as accelerate's `random_states_<rank>.pkl`) is never uploaded: loading one runs arbitrary code.
"""

import argparse
import dataclasses
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from .cli import ToolParser
from .config import ConfigError, HubConfig, load_config
from .model_card import LORA_WEIGHTS, LYCORIS_WEIGHTS, model_card
from .output_lock import LOCK_FILE

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

# A checkpoint still being written (checkpointing.py renames it into place when complete) is never uploaded.
IN_PROGRESS = ".tmp-checkpoint-*"
CHECKPOINTS = "checkpoint-*"
EXPORTS = "checkpoint-*/pipeline/*"  # a checkpoint's export (python -m finetune.export): made again from it
PICKLES = ["*.pkl", "*.pickle"]
WEB_PAGE = ["ui-launch.json", "ui-launch.log", "samples/ui/*"]  # what `python -m finetune.ui` keeps in a run folder


class HubPushError(RuntimeError):
    """A push that failed. The message names the repository, the cause and the fix; the output folder is left as it
    was, apart from its regenerated README.md."""


class NotPushable(HubPushError):
    """A push refused before any request, for what the user fixes in the output folder or the command's arguments
    (no result, no repository named): `python -m finetune.hub` exits 2 for it, as every command does for a mistake,
    and 1 when the push fails (refused by the Hub, unreachable, HF_HUB_OFFLINE set)."""


# ---- the push ----------------------------------------------------------------------------------------------------

def push(output_dir: str | os.PathLike, hub: HubConfig, *, num_processes: int | None = None) -> CommitInfo:
    """Upload a finished run's output folder to `hub.hub_model_id` (created when missing, `hub.private`), on branch
    `hub.revision` (created from main when missing), with a model card: once the repository exists (its full
    `namespace/name` goes into the card's code), the card is written to output_dir/README.md and uploaded with the
    rest. Checkpoints go only with `hub.push_checkpoints`. Returns the commit; raises HubPushError."""
    folder = finished_output(output_dir)
    api = HfApi()
    with explained_errors(_repo_id(hub), api.endpoint):
        repo_id = create(api, hub)
    config = load_config(folder / "config.yaml")
    card = model_card(folder, repo_id, revision=hub.revision, license=hub.license, num_processes=num_processes)
    (folder / "README.md").write_text(card)
    what = "LoRA adapters" if config.lora.enabled else "Pipeline"
    with explained_errors(repo_id, api.endpoint):
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=hub.revision,
                                 commit_message=f"{what} after {config.train.max_train_steps} steps",
                                 ignore_patterns=ignore_patterns(hub.push_checkpoints))


def check_credentials(hub: HubConfig) -> str:
    """The user the token belongs to, checked before a run trains for hours; raises HubPushError (no token, an
    invalid or read-only one, a fine-grained one that may write nowhere, no network) with the fix. (Whether the token
    may write to that namespace shows only at the push.)"""
    api = HfApi()
    with explained_errors(_repo_id(hub), api.endpoint):
        try:
            me = api.whoami()
        except LocalTokenNotFoundError as e:
            cause, fix = _HTTP_CAUSES[401]
            raise HubPushError(f"cannot push to {hub.hub_model_id}: {cause}. Fix: {fix}.") from e
    token = (me.get("auth") or {}).get("accessToken") or {}  # /api/whoami-v2: auth.accessToken.role
    if token.get("role") == "read":
        raise HubPushError(f"cannot push to {hub.hub_model_id}: the token is read-only. Fix: set HF_TOKEN to a token "
                           "with write access (huggingface.co/settings/tokens), or run `hf auth login` with one.")
    if token.get("role") == "fineGrained" and not writes_repositories(token):
        raise HubPushError(f"cannot push to {hub.hub_model_id}: the fine-grained token may write to no repository "
                           "(none of its permissions is repo.write). Fix: give it write access to the repositories "
                           "of the namespace you push to (huggingface.co/settings/tokens, edit permissions), or set "
                           "HF_TOKEN to a write token.")
    return me["name"]


def writes_repositories(token: dict) -> bool:
    """Whether a fine-grained token (whoami's `auth.accessToken`) may write to some repository: `repo.write` among its
    permissions on a user, an organization or a repository (`fineGrained.scoped`), or among its global ones. Which
    namespace it may write to shows at the push."""
    grants = token.get("fineGrained") or {}
    scoped = [permission for scope in grants.get("scoped", []) for permission in scope.get("permissions", [])]
    return "repo.write" in [*grants.get("global", []), *scoped]


def push_checkpoint(output_dir: str | os.PathLike, step: int, hub: HubConfig) -> CommitInfo:
    """Upload `output_dir/checkpoint-<step>/` to the same path in the repository (created, with its branch, when
    missing). Returns the commit; raises HubPushError."""
    folder = Path(output_dir) / f"checkpoint-{step}"
    if not folder.is_dir():
        raise HubPushError(f"cannot push {folder} to {_repo_id(hub)}: there is no such folder (a checkpoint is "
                           "renamed into place only once it is complete)")
    api = HfApi()
    with explained_errors(_repo_id(hub), api.endpoint):
        repo_id = create(api, hub)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=folder.name,
                                 revision=hub.revision, commit_message=f"Checkpoint at step {step}",
                                 ignore_patterns=PICKLES)


def finished_output(output_dir: str | os.PathLike) -> Path:
    """The output folder of a run that exported its result, or NotPushable saying what is missing."""
    folder = Path(output_dir)
    if not (folder / "config.yaml").is_file():
        raise NotPushable(f"{folder} is not an output folder of finetune/train.py: it has no config.yaml")
    if (folder / LYCORIS_WEIGHTS).is_file():
        raise NotPushable(f"{folder} holds LoHa / LoKr adapters, which stock diffusers cannot load, so a model card "
                           "with diffusers code would not work; share lora_kohya.safetensors (the LyCORIS file "
                           "ComfyUI, AUTOMATIC1111 and Forge load) with `hf upload`")
    if load_config(folder / "config.yaml").textual_inversion.enabled:
        raise NotPushable(f"{folder} holds textual-inversion embeddings, which the model card does not describe yet "
                           "(its code would load the LoRA or pipeline alone); share them with `hf upload` (each "
                           "<token>.safetensors loads with load_textual_inversion(path, token=...))")
    if not (folder / "model_index.json").is_file() and not (folder / LORA_WEIGHTS).is_file():
        raise NotPushable(f"{folder} holds no result yet (no model_index.json, no {LORA_WEIGHTS}): the run has not "
                           "finished; let it finish (resume it with train.resume_from_checkpoint=latest), or push a "
                           "checkpoint with push_checkpoint")
    return folder


def ignore_patterns(include_checkpoints: bool) -> list[str]:
    """What stays local: pickles, checkpoints being written, and finished ones unless asked for (never their
    exports), the lock of a run writing there, and what the web page kept there (its launch record and log, the
    images sampled on the page)."""
    return [IN_PROGRESS, LOCK_FILE, EXPORTS, *PICKLES, *WEB_PAGE] + ([] if include_checkpoints else [CHECKPOINTS])


def create(api: HfApi, hub: HubConfig) -> str:
    """Create the repository (an existing one is kept as it is) and the branch; return the `namespace/name` id."""
    repo_id = api.create_repo(_repo_id(hub), private=hub.private, exist_ok=True).repo_id
    if hub.revision and hub.revision != "main":
        api.create_branch(repo_id, branch=hub.revision, exist_ok=True)
    return repo_id


def _repo_id(hub: HubConfig) -> str:
    if not hub.hub_model_id:
        raise NotPushable("no repository to push to: set hub.hub_model_id (e.g. your-name/shapes-ddpm)")
    return hub.hub_model_id


# What each HTTP status means for a push, and the fix.
_HTTP_CAUSES = {
    401: ("the Hub did not accept the credentials: no token was found, or it is invalid or expired",
          "set HF_TOKEN to a token with write access, or run `hf auth login`"),
    403: ("the token may not write there",
          "check the repo id (hub.hub_model_id: your user name or an organization you belong to) and that your token "
          "may write to it (a fine-grained token needs write access to this repository or namespace)"),
    404: ("the repository or the branch was not found",
          "check hub.hub_model_id and hub.revision, and that your token can see the repository"),
    409: ("the Hub reported a conflict (another upload to the same branch at the same time, or a repository of another "
          "type with this name)", "try again, or choose another hub.hub_model_id"),
    412: ("the branch moved during the upload (another push at the same time)", "try again"),
}


@contextmanager
def explained_errors(repo_id: str, endpoint: str):
    """Turn what huggingface_hub raises into HubPushError naming the repository, the cause and the fix."""
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        cause, fix = _HTTP_CAUSES.get(status) or (
            ("the Hub had an internal error", "try again later") if status and status >= 500 else
            ("the Hub refused the request", "see the Hub's message"))
        said = f": {e.server_message}" if e.server_message else ""
        raise HubPushError(f"cannot push to {repo_id}: {cause} (HTTP {status}{said}). Fix: {fix}.") from e
    except OfflineModeIsEnabled as e:
        raise HubPushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests. "
                           "Fix: unset it (or set HF_HUB_OFFLINE=0) for the push.") from e
    except (TransportError, ConnectionError) as e:  # httpx's; hf_xet raises ConnectionError
        raise HubPushError(f"cannot push to {repo_id}: could not reach {endpoint}, or the Hub's Xet storage where "
                           f"large files go ({type(e).__name__}: {e}). Fix: check the network connection and proxies "
                           "(and HF_ENDPOINT, if set); if only the Xet storage is out of reach, set "
                           "HF_HUB_DISABLE_XET=1 to upload through LFS instead.") from e
    except ValueError as e:
        if not str(e).startswith("Invalid metadata in README.md"):
            raise
        objections = "; ".join(line.lstrip("- ") for line in str(e).splitlines()[1:])
        raise HubPushError(f"cannot push to {repo_id}: the Hub refused the model card's metadata ({objections}). Fix: "
                           "check hub.license (a Hub license id, e.g. apache-2.0, mit, creativeml-openrail-m).") from e


# ---- the command -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ToolParser(prog="python -m finetune.hub", description=__doc__)
    parser.add_argument("output_dir", help="an output folder of finetune/train.py")
    parser.add_argument("--hub-model-id", help="the repository (`name` or `namespace/name`); default: the run's "
                        "hub.hub_model_id")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, help="create the repository private; "
                        "default: the run's hub.private")
    parser.add_argument("--revision", help="the branch to push to; default: the run's hub.revision, else main")
    parser.add_argument("--include-checkpoints", action=argparse.BooleanOptionalAction,
                        help="also upload checkpoint-<step>/ folders; default: the run's hub.push_checkpoints")
    parser.add_argument("--license", help="the model card's license; default: the run's hub.license")
    return parser.parse_args(argv)


def hub_settings(run: HubConfig, args: argparse.Namespace) -> HubConfig:
    """The run's hub section with the command line's choices on top."""
    chosen = {"hub_model_id": args.hub_model_id, "private": args.private, "revision": args.revision,
              "push_checkpoints": args.include_checkpoints, "license": args.license}
    return dataclasses.replace(run, push_to_hub=True, **{k: v for k, v in chosen.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folder = finished_output(args.output_dir)
        run = load_config(folder / "config.yaml").hub
        if not (args.hub_model_id or run.hub_model_id):
            raise NotPushable(f"no repository to push {folder} to: give --hub-model-id (e.g. your-name/shapes-ddpm) "
                               "or set hub.hub_model_id in the run's config")
        commit = push(folder, hub_settings(run, args))
    except (NotPushable, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HubPushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"pushed {folder} to {commit.repo_url} (commit {commit.oid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
