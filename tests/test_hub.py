"""Model cards, Hub push (against a fake HfApi and an offline real one) and the local Hub cache helper."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants, hf_hub_download, metadata_load
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from hub_cache import hub_cache_folder, make_hub_cache, use_hub_cache
from surge_hf.hub import ModelCardContext, files_to_push, push_to_hub, render_model_card, write_model_card

RECIPE = {"eta": 0.1, "method": "surge", "targets": ["query", "key", "value"], "weight_scale": "channel_mean"}
BIT_ACCOUNT = "\n".join(
    ["layer                 params   bits", "encoder.*.query       147456      1", "classifier              770     32"]
)


def text_context(**changes) -> dict:
    values = dict(
        repo_id="surge/binary-minilm-mrpc",
        dataset_name="GLUE MRPC",
        dataset_type="nyu-mll/glue",
        dataset_config="mrpc",
        dataset_split="validation",
        metrics={"accuracy": 0.7125, "f1": 0.8123456789},
        surge_recipe=RECIPE,
        learning_rate=1e-4,
        num_epochs=4,
        seed=42,
        bit_account=BIT_ACCOUNT,
        packed_bytes=1_000_000,
        float32_bytes=32_000_000,
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        language="en",
        distillation="sentence-transformers/all-MiniLM-L6-v2",
        hyperparameters={"batch size": 32, "max length": 64},
        tags=["glue"],
    )
    values.update(changes)
    return values


def image_context(**changes) -> dict:
    values = dict(
        repo_id="binary-vit-fashion-mnist",
        dataset_name="Fashion-MNIST",
        dataset_type="zalando-datasets/fashion_mnist",
        dataset_split="validation",
        metrics={"accuracy": 0.834},
        surge_recipe=RECIPE,
        learning_rate=1e-3,
        num_epochs=12,
        seed=0,
        bit_account=BIT_ACCOUNT,
        packed_bytes=300_000,
        float32_bytes=3_000_000,
    )
    values.update(changes)
    return values


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, "card does not start with a YAML front matter block"
    return yaml.safe_load(match.group(1))


# ---------------------------------------------------------------------------------------------- model cards


def test_text_card_front_matter_is_exact():
    card = render_model_card("text", text_context())
    assert front_matter(card) == {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "datasets": ["nyu-mll/glue"],
        "language": "en",
        "library_name": "transformers",
        "license": "apache-2.0",
        "metrics": ["accuracy", "f1"],
        "pipeline_tag": "text-classification",
        "tags": ["surge", "binary-neural-network", "1-bit", "glue"],
        "model-index": [
            {
                "name": "binary-minilm-mrpc",
                "results": [
                    {
                        "task": {"type": "text-classification"},
                        "dataset": {
                            "name": "GLUE MRPC",
                            "type": "nyu-mll/glue",
                            "config": "mrpc",
                            "split": "validation",
                        },
                        "metrics": [
                            {"type": "accuracy", "value": 0.7125, "name": "Accuracy"},
                            {"type": "f1", "value": 0.8123456789, "name": "F1"},
                        ],
                    }
                ],
            }
        ],
    }


def test_text_card_parses_as_hub_model_card():
    data = ModelCard(render_model_card("text", text_context())).data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.model_name == "binary-minilm-mrpc"
    assert [(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results] == [
        ("text-classification", "nyu-mll/glue", "mrpc", "validation")
    ] * 2
    assert [(r.metric_type, r.metric_value, r.metric_name) for r in data.eval_results] == [
        ("accuracy", 0.7125, "Accuracy"),
        ("f1", 0.8123456789, "F1"),
    ]


def test_text_card_body():
    card = render_model_card("text", text_context())
    recipe_block = re.search(r"```json\n(.*?)\n```", card, flags=re.DOTALL).group(1)
    assert json.loads(recipe_block) == RECIPE
    assert f"```text\n{BIT_ACCOUNT}\n```" in card
    assert "| learning rate | 0.0001 |\n| epochs | 4 |\n| seed | 42 |" in card
    assert "| distillation | from sentence-transformers/all-MiniLM-L6-v2 |" in card
    assert "| batch size | 32 |\n| max length | 64 |" in card
    assert "| Accuracy | 0.7125 | GLUE MRPC | mrpc | validation |" in card
    assert "| F1 | 0.8123 | GLUE MRPC | mrpc | validation |" in card
    assert "| 1,000,000 (0.95 MiB) |" in card and "| 32,000,000 (30.52 MiB) |" in card
    assert "The packed checkpoint is 32.0x smaller than float32." in card
    assert "fine-tuned from [sentence-transformers/all-MiniLM-L6-v2]" in card
    assert "import surge_hf" in card
    assert 'AutoModelForSequenceClassification.from_pretrained("surge/binary-minilm-mrpc")' in card
    assert 'AutoTokenizer.from_pretrained("surge/binary-minilm-mrpc")' in card
    assert (
        'AutoModelForSequenceClassification.from_pretrained("surge/binary-minilm-mrpc", trust_remote_code=True)'
        in card
    )
    assert "{{" not in card and "{%" not in card


def test_image_card_from_scratch():
    card = render_model_card("image", ModelCardContext(**image_context()))
    meta = front_matter(card)
    assert "base_model" not in meta and "language" not in meta
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["tags"] == ["surge", "binary-neural-network", "1-bit"]
    assert meta["model-index"] == [
        {
            "name": "binary-vit-fashion-mnist",
            "results": [
                {
                    "task": {"type": "image-classification"},
                    "dataset": {
                        "name": "Fashion-MNIST",
                        "type": "zalando-datasets/fashion_mnist",
                        "split": "validation",
                    },
                    "metrics": [{"type": "accuracy", "value": 0.834, "name": "Accuracy"}],
                }
            ],
        }
    ]
    assert "It was trained from scratch on Fashion-MNIST." in card
    assert "| distillation | none |" in card
    assert "| Accuracy | 0.8340 | Fashion-MNIST | - | validation |" in card
    assert "The packed checkpoint is 10.0x smaller than float32." in card
    assert 'AutoModelForImageClassification.from_pretrained("binary-vit-fashion-mnist")' in card
    assert 'AutoImageProcessor.from_pretrained("binary-vit-fashion-mnist")' in card
    assert 'from_pretrained("binary-vit-fashion-mnist", trust_remote_code=True)' in card
    assert "AutoTokenizer" not in card
    assert "Trained with:" not in card


def test_card_shows_the_recipe_preset_and_the_training_command():
    command = "accelerate launch scripts/vit.py --dataset fmnist --recipe binary-vit --output_dir out"
    card = render_model_card("image", ModelCardContext(**image_context(
        command=command, hyperparameters={"recipe preset": "binary-vit"})))
    assert f"Trained with:\n\n```bash\n{command}\n```" in card
    assert "| recipe preset | binary-vit |" in card


@pytest.mark.parametrize(
    ("kind", "context", "message"),
    [
        ("audio", text_context(), r"kind must be one of \['image', 'text'\], got 'audio'"),
        ("text", text_context(language=None), r"text model card needs the language of its data: pass language='en'"),
        ("image", image_context(language="en"), r"language applies to text models only; pass language=None"),
        ("text", {"repo_id": "a/b"}, r"missing required keys \['bit_account', 'dataset_name', "),
        ("text", text_context(epochs=3), r"unknown keys \['epochs'\] \(valid keys: "),
        ("text", text_context(metrics={}), r"metrics must be a non-empty mapping of metric type to value"),
        ("text", text_context(metrics={"f1": float("nan")}), r"metrics\['f1'\] must be a finite number, got nan"),
        ("text", text_context(surge_recipe={"eta": {1, 2}}), r"surge_recipe must be JSON-serialisable"),
        ("text", text_context(learning_rate=0), r"learning_rate must be a positive number, got 0"),
        ("text", text_context(seed=1.5), r"seed must be an int, got 1.5"),
        ("text", text_context(packed_bytes=0), r"packed_bytes must be a positive int \(bytes\), got 0"),
        ("text", text_context(dataset_split=""), r"dataset_split must be a non-empty string, got ''"),
        ("text", text_context(tags="glue"), r"tags must be a list of non-empty strings, got 'glue'"),
        ("text", text_context(repo_id="org/a/b"), r"repo_id 'org/a/b' is not a valid Hub model id: use 'namespace/"),
    ],
)
def test_render_rejects_bad_input(kind, context, message):
    with pytest.raises(ValueError, match=message):
        render_model_card(kind, context)


def test_write_model_card_replaces_readme_atomically(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    path = write_model_card(tmp_path, "text", text_context())
    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == render_model_card("text", text_context())
    assert metadata_load(path) == front_matter(path.read_text(encoding="utf-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_write_model_card_keeps_old_readme_on_bad_context(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    with pytest.raises(ValueError, match="text model card needs the language"):
        write_model_card(tmp_path, "text", text_context(language=None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    assert (tmp_path / "README.md").read_text() == "old card"


def test_write_model_card_needs_existing_dir(tmp_path):
    with pytest.raises(ValueError, match=r"is not a directory: save the model there first"):
        write_model_card(tmp_path / "missing", "text", text_context())


# ---------------------------------------------------------------------------------------------- push

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


# ---------------------------------------------------------------------------------------------- hub cache

REPO = "org/tiny-bert"


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def test_make_hub_cache_layout(tmp_path, tiny_bert_dir):
    snapshot_dir = make_hub_cache(tmp_path, REPO, tiny_bert_dir, revision="ab" * 20)
    assert snapshot_dir == tmp_path / "models--org--tiny-bert" / "snapshots" / ("ab" * 20)
    assert (tmp_path / "models--org--tiny-bert" / "refs" / "main").read_text() == "ab" * 20
    assert sorted(p.name for p in snapshot_dir.iterdir()) == sorted(p.name for p in tiny_bert_dir.iterdir())
    assert hub_cache_folder("tiny") == "models--tiny"


def test_make_hub_cache_rejects_bad_input(tmp_path, tiny_bert_dir):
    with pytest.raises(ValueError, match=r"revision 'main' must be a commit hash: 40 lowercase hexadecimal digits"):
        make_hub_cache(tmp_path, REPO, tiny_bert_dir, revision="main")
    with pytest.raises(ValueError, match=r"is not a directory: save the model there first"):
        make_hub_cache(tmp_path, REPO, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"repo_id 'a/b/c' must look like 'org/name' or 'name'"):
        make_hub_cache(tmp_path, "a/b/c", tiny_bert_dir)


def test_explicit_cache_dir_resolves_by_hub_id(tmp_path, tiny_bert_dir):
    snapshot_dir = make_hub_cache(tmp_path / "hub", REPO, tiny_bert_dir)
    cache = tmp_path / "hub"
    path = hf_hub_download(REPO, "config.json", cache_dir=cache, local_files_only=True)
    assert Path(path) == snapshot_dir / "config.json"
    config = AutoConfig.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    assert (type(config), config.hidden_size) == (BertConfig, 32)
    make_hub_cache(cache, "tiny", tiny_bert_dir)
    assert AutoConfig.from_pretrained("tiny", cache_dir=cache, local_files_only=True).intermediate_size == 37


def test_default_cache_resolves_model_by_hub_id(tmp_path, tiny_bert_dir, monkeypatch):
    make_hub_cache(tmp_path / "hub", REPO, tiny_bert_dir)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    assert AutoConfig.from_pretrained(REPO).hidden_size == 32
    loaded = AutoModelForSequenceClassification.from_pretrained(REPO)
    expected = BertForSequenceClassification.from_pretrained(tiny_bert_dir).state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in expected.items())


def test_environment_variables_work_when_set_before_import(tmp_path, tiny_bert_dir):
    make_hub_cache(tmp_path / "hub", REPO, tiny_bert_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = f"from transformers import AutoConfig; print(AutoConfig.from_pretrained({REPO!r}).hidden_size)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["32"]
