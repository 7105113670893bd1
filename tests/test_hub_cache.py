"""The local Hub cache helper of the tests (`hub_cache.py`): its layout, and loading by Hub id from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import hf_hub_download
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from hub_cache import hub_cache_folder, make_hub_cache, use_hub_cache

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
