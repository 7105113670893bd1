"""Hub push, against a fake HfApi and an offline real one."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from surge_hf.hub.upload import files_to_push, push_to_hub

PUSHED = [
    "README.md",
    "all_results.json",
    "config.json",
    "configuration_surge_bert.py",
    "extra/notes.md",
    "model.safetensors",
    "modeling_surge_bert.py",
    "tokenizer.json",
    "vocab.txt",
]
NOT_PUSHED = [
    ".gitattributes",
    ".cache/huggingface/upload/model.safetensors.lock",
    ".README.md.x1y2.tmp",
    "__pycache__/modeling_surge_bert.cpython-310.pyc",
    "checkpoints/step_100/optimizer.bin",
    "checkpoints/step_100/model.safetensors",
    "extra/.hidden",
    "model.safetensors.part",
    "notes.txt~",
    "scratch.tmp",
    "train_state/config.json",
    "train_state/model.safetensors",
]


@pytest.fixture
def output_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    for index, name in enumerate(PUSHED + NOT_PUSHED):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name}:{index}".encode() * 3)
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root (hidden ones included) with its bytes and modification time."""
    return {
        path.relative_to(root).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, optionally fails in one of them."""

    def __init__(self, fail_in: str | None = None, error: BaseException | None = None):
        self.fail_in, self.error, self.calls = fail_in, error, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_in == "create_repo":
            raise self.error
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        sent = [(op.path_in_repo, op.path_or_fileobj) for op in operations]
        self.calls.append(("create_commit", repo_id, sent, kwargs))
        if self.fail_in == "create_commit":
            raise self.error
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'a' * 40}")


def http_error(status: int, message: str) -> HfHubHTTPError:
    """A real HfHubHTTPError, built with the HTTP client that this huggingface_hub uses (httpx or httpx2)."""
    http = importlib.import_module(HfHubHTTPError.__bases__[0].__module__.split(".")[0])
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(message, response=http.Response(status, request=request))


def test_files_to_push_is_exact(output_dir):
    assert files_to_push(output_dir) == PUSHED


def test_files_to_push_needs_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"is not a directory: pass the training run's output folder"):
        files_to_push(tmp_path / "missing")


def test_push_sends_exactly_the_pushed_files(output_dir):
    api = FakeHfApi()
    url = push_to_hub(output_dir, "org/binary-bert", token="hf_x", private=True, commit_message="v1", api=api)
    assert url == f"https://huggingface.co/org/binary-bert/commit/{'a' * 40}"
    assert api.calls == [
        ("create_repo", "org/binary-bert", {"token": "hf_x", "private": True, "repo_type": "model", "exist_ok": True}),
        (
            "create_commit",
            "org/binary-bert",
            [(name, str(output_dir / name)) for name in PUSHED],
            {"commit_message": "v1", "token": "hf_x", "repo_type": "model"},
        ),
    ]


@pytest.mark.parametrize(
    ("fail_in", "error", "reason"),
    [
        ("create_repo", "http", r"HfHubHTTPError: 403 Forbidden: no write access to 'org'"),
        ("create_commit", OSError("[Errno 28] No space left on device"), r"OSError: \[Errno 28\] No space left"),
    ],
)
def test_failed_push_leaves_output_dir_intact(output_dir, fail_in, error, reason):
    if error == "http":
        error = http_error(403, "403 Forbidden: no write access to 'org'")
    before = snapshot(output_dir)
    api = FakeHfApi(fail_in=fail_in, error=error)
    with pytest.raises(RuntimeError, match=rf"to the Hub repo 'org/binary-bert' failed: {reason}") as caught:
        push_to_hub(output_dir, "org/binary-bert", api=api)
    assert "is intact" in str(caught.value) and "retry the same push_to_hub call" in str(caught.value)
    assert caught.value.__cause__ is error
    assert snapshot(output_dir) == before


def test_push_with_real_client_offline_fails_cleanly(output_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = snapshot(output_dir)
    with pytest.raises(RuntimeError, match=r"Hub repo 'org/binary-bert' failed: OfflineModeIsEnabled: .* is intact"):
        push_to_hub(output_dir, "org/binary-bert", token="hf_dummy")
    assert snapshot(output_dir) == before


@pytest.mark.parametrize(
    "repo_id",
    ["", "org/", "/name", "org/a/b", "org/-name", "org/name.", "org/na--me", "org/na..me", "org/n me", "a" * 97],
)
def test_push_rejects_bad_repo_id(output_dir, repo_id):
    api = FakeHfApi()
    with pytest.raises(ValueError, match=r"is not a valid Hub model id: use 'namespace/name' or 'name'"):
        push_to_hub(output_dir, repo_id, api=api)
    assert api.calls == []


@pytest.mark.parametrize("repo_id", ["name", "org/name", "Org-1/binary_bert.v2", "a" * 96])
def test_push_accepts_valid_repo_ids(output_dir, repo_id):
    api = FakeHfApi()
    push_to_hub(output_dir, repo_id, api=api)
    assert [call[1] for call in api.calls] == [repo_id, repo_id]


def test_push_rejects_missing_files_before_network(output_dir):
    (output_dir / "model.safetensors").unlink()
    (output_dir / "README.md").unlink()
    api = FakeHfApi()
    with pytest.raises(ValueError, match=r"lacks model.safetensors, README.md: save the packed model with save_pretr"):
        push_to_hub(output_dir, "org/name", api=api)
    with pytest.raises(ValueError, match=r"does not exist or is not a directory: pass the training run's output"):
        push_to_hub(output_dir / "nope", "org/name", api=api)
    assert api.calls == []


def test_push_rejects_empty_commit_message(output_dir):
    api = FakeHfApi()
    with pytest.raises(ValueError, match=r"commit_message must be a non-empty string"):
        push_to_hub(output_dir, "org/name", commit_message=" ", api=api)
    assert api.calls == []
