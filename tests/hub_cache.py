"""A local Hugging Face Hub cache for tests: load `from_pretrained("org/name")` offline from files on disk.

    snapshot = make_hub_cache(tmp_path / "hub", "org/name", saved_model_dir)

Then either pass the cache explicitly (works whatever was imported first, in every huggingface_hub version):

    AutoModel.from_pretrained("org/name", cache_dir=tmp_path / "hub", local_files_only=True)

or make it the default cache for the rest of the test with `use_hub_cache(monkeypatch, tmp_path / "hub")` and
call `AutoModel.from_pretrained("org/name")` with no extra argument.

Why `use_hub_cache` patches module constants: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the
environment once, when it is imported, into `huggingface_hub.constants`; transformers reads those same constants
at call time. Setting the environment variables after the import changes nothing in this process (the lookup goes
to the network); patching the constants does. The environment variables work when set before Python starts
(or before anything imports huggingface_hub), e.g. for a subprocess.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def hub_cache_folder(repo_id: str) -> str:
    """Folder name of a model repo in the Hub cache: `models--{org}--{name}` (or `models--{name}`)."""
    return "models--" + repo_id.replace("/", "--")


def make_hub_cache(cache_dir: Path, repo_id: str, source_dir: Path, revision: str = "0" * 40) -> Path:
    """Lay out `source_dir`'s files as revision `revision` (branch `main`) of model repo `repo_id` in a Hub cache.

    Creates `cache_dir/models--{org}--{name}/refs/main` holding `revision` and copies the files of `source_dir`
    (subfolders included) into `cache_dir/models--{org}--{name}/snapshots/{revision}/`, which it returns. Plain
    copies stand in for the blobs/ symlinks of a real cache; lookups by Hub id only read refs/ and snapshots/.
    """
    source = Path(source_dir)
    if not source.is_dir():
        raise ValueError(f"source_dir {source} is not a directory: save the model there first.")
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id {repo_id!r} must look like 'org/name' or 'name'.")
    if not _COMMIT_HASH.fullmatch(revision):
        raise ValueError(f"revision {revision!r} must be a commit hash: 40 lowercase hexadecimal digits.")
    repo_folder = Path(cache_dir) / hub_cache_folder(repo_id)
    snapshot = repo_folder / "snapshots" / revision
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(revision)
    return snapshot


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Make `cache_dir` the default Hub cache and turn on offline mode until the test ends.

    Patches `huggingface_hub.constants.HF_HUB_CACHE` and `.HF_HUB_OFFLINE` (what this process reads) and sets
    the HF_HUB_CACHE and HF_HUB_OFFLINE environment variables (what subprocesses read).
    """
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
