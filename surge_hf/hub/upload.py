"""Hub uploads of trained surge_hf models.

A training run leaves this layout (see `scripts/`):

    output_dir/
      config.json, model.safetensors, tokenizer / image-processor files, custom-code *.py files
      all_results.json
      README.md                      the model card, written by `surge_hf.hub.model_card.write_model_card`
      train_state/                   train-form model (latent weights, auxiliary branches): never pushed
      checkpoints/step_*/            resumable Accelerate states: never pushed

`push_to_hub` sends exactly `files_to_push(output_dir)` in one commit and only ever reads `output_dir`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

__all__ = ["HubConfig", "check_push_access", "check_repo_id", "files_to_push", "push_to_hub"]

# Files a push needs at the top of output_dir.
_REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")
# Top-level folders of output_dir that hold training state and never go to the Hub: the train-form model,
# checkpoints, and the earlier stages of a run (the full-precision teacher, progressive-precision stages).
_PRIVATE_DIRS = frozenset({"train_state", "checkpoints", "teacher"})
_PRIVATE_DIR_PREFIX = "stage_"
# Suffixes of temporary and partial files (editors, interrupted writes and downloads).
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".incomplete", ".swp", "~")

# Hub repo names: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'; <= 96 chars.
_REPO_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")

# Failures of a Hub call: OSError (file errors, offline mode, and HfHubHTTPError, which subclasses it) and the
# transport errors of the HTTP client that huggingface_hub uses (httpx in 1.x, httpx2 in 2.x), which is the
# other base class of HfHubHTTPError.
_HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, *HfHubHTTPError.__bases__)


def check_repo_id(repo_id: Any) -> None:
    """Raise ValueError unless `repo_id` is a valid Hub model id (`namespace/name` or `name`)."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(
            f"repo_id {repo_id!r} is not a valid Hub model id: use 'namespace/name' or 'name', made of letters, "
            "digits, '-', '_' and '.', at most 96 characters each, not starting or ending with '-' or '.', "
            "without '--' or '..' (e.g. 'my-org/binary-bert-sst2')."
        )


@dataclass(frozen=True)
class HubConfig:
    """Where a training run's outputs go on the Hub, checked when built (before any training).

    push_to_hub: upload the outputs at the end of the run (needs `hub_model_id`).
    hub_model_id: `namespace/name` of the model repository; also the id the model card tells users to load.
    hub_token: a token with write access; None uses the one saved by `hf auth login`.
    hub_private: create the repository private.
    """

    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    hub_private: bool = False

    def __post_init__(self) -> None:
        if self.hub_model_id is not None:
            check_repo_id(self.hub_model_id)
        elif self.push_to_hub:
            raise ValueError("HubConfig.push_to_hub needs HubConfig.hub_model_id, the namespace/name of the "
                             "repository to create or update (--hub_model_id).")


def check_push_access(hub: HubConfig) -> None:
    """Raise, before any training, when `hub` asks for a push that cannot happen: offline mode, or no token. Checked
    without a network call; a token without write access still fails at the push, whose error names the command
    that retries it without training."""
    if not hub.push_to_hub:
        return
    later = "or train without it and push the finished run later with --push_only."
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"HubConfig.push_to_hub (--push_to_hub) needs the Hub, but HF_HUB_OFFLINE is set: unset it, "
                         f"{later}")
    if hub.hub_token is None and get_token() is None:
        raise ValueError("HubConfig.push_to_hub (--push_to_hub) needs a Hugging Face token with write access, and "
                         "none was found: log in with `hf auth login`, set HF_TOKEN or pass HubConfig.hub_token "
                         f"(--hub_token), {later}")


def _is_pushed(relative: Path) -> bool:
    parts = relative.parts
    if parts[0] in _PRIVATE_DIRS or (len(parts) > 1 and parts[0].startswith(_PRIVATE_DIR_PREFIX)):
        return False
    if any(part.startswith(".") or part == "__pycache__" for part in parts):
        return False
    return not relative.name.endswith(_TEMP_SUFFIXES)


def files_to_push(output_dir: str | os.PathLike[str]) -> list[str]:
    """Sorted POSIX paths, relative to `output_dir`, of the files a push sends.

    Everything in `output_dir` except the top-level `train_state/`, `checkpoints/`, `teacher/` and `stage_*/`
    folders, hidden files and folders (names starting with '.'), `__pycache__/`, and temporary files (suffixes
    .tmp, .temp, .part, .partial, .incomplete, .swp, ~).
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise ValueError(f"output_dir {directory} is not a directory: pass the training run's output folder.")
    paths = []
    for root, dirnames, filenames in os.walk(directory):
        relative_root = Path(root).relative_to(directory)
        dirnames[:] = [name for name in dirnames if _is_pushed(relative_root / name)]
        paths.extend(
            (relative_root / name).as_posix() for name in filenames if _is_pushed(relative_root / name)
        )
    return sorted(paths)


def push_to_hub(
    output_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload binary model trained with SURGE (surge_hf)",
    api: HfApi | None = None,
) -> str:
    """Create `repo_id` if needed and upload `files_to_push(output_dir)` in one commit; return the commit URL.

    Inputs are checked before any network call. `output_dir` is only read: a failed push leaves it as it was,
    and the same call can be repeated. Files already in the repo that are not in the push stay there.
    `api` replaces the `HfApi()` client (tests pass a fake).
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise ValueError(
            f"output_dir {directory} does not exist or is not a directory: pass the training run's output folder."
        )
    missing = [name for name in _REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(
            f"output_dir {directory} lacks {', '.join(missing)}: save the packed model with save_pretrained "
            "(config.json, model.safetensors) and write the card with write_model_card (README.md) first."
        )
    check_repo_id(repo_id)
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError("commit_message must be a non-empty string.")

    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(directory / path))
        for path in files_to_push(directory)
    ]
    client = api if api is not None else HfApi()
    try:
        client.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        commit = client.create_commit(
            repo_id, operations, commit_message=commit_message, token=token, repo_type="model"
        )
    except _HUB_ERRORS as error:
        raise RuntimeError(
            f"Pushing {directory} to the Hub repo '{repo_id}' failed: {type(error).__name__}: {error}. "
            f"The output directory {directory} is intact; fix the cause (network, a token with write access "
            "to the namespace, the repo name) and retry the same push_to_hub call (it uploads the folder as it is)."
        ) from error
    return str(commit.commit_url)
