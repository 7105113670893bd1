"""What the training scripts check before any work, and what their model cards say: a push that could not happen
(offline, no token), a packed checkpoint to train from, and the story of a staged run (the Hub base model through
the teacher stage, local folders relative to the output folder)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_glue_script
from huggingface_hub import constants
from test_glue_script import glue_script, run_args
from test_modeling_vit import vit_config
from transformers import AutoTokenizer

from conftest import load_script
from hub_cache import make_hub_cache, use_hub_cache
from model_card_contexts import text_context
from surge_hf import SurgeBertForSequenceClassification, SurgeViTConfig, SurgeViTForImageClassification
from surge_hf.hub.model_card import render_model_card
from surge_hf.training.export import card_model_reference, portable_command

tiny_bert, data_files = test_glue_script.tiny_bert, test_glue_script.data_files  # the glue tests' fixtures
vit_script = load_script("vit")
LATER = "or train without it and push the finished run later with --push_only."


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def no_training(*args, **kwargs):
    pytest.fail("training started")


# -------------------------------------------------------------------------- 17. a push that could not happen
@pytest.mark.parametrize(("offline", "message"), [
    (True, f"HubConfig.push_to_hub (--push_to_hub) needs the Hub, but HF_HUB_OFFLINE is set: unset it, {LATER}"),
    (False, "HubConfig.push_to_hub (--push_to_hub) needs a Hugging Face token with write access, and none was found: "
            f"log in with `hf auth login`, set HF_TOKEN or pass HubConfig.hub_token (--hub_token), {LATER}"),
])
def test_push_to_hub_fails_before_training_offline_or_without_a_token(tiny_bert, data_files, tmp_path, monkeypatch,
                                                                      offline, message):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(glue_script, "train", no_training)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=exact(message)):
        glue_script.main(run_args(tiny_bert, data_files, out, "--push_to_hub", "--hub_model_id", "org/tiny"))
    with pytest.raises(ValueError, match=exact(message)):
        glue_script.main(["--push_only", "--output_dir", str(out), "--hub_model_id", "org/tiny"])
    assert not out.exists()
    if not offline:  # a token passed on the command line is enough
        glue_script.parse_args(run_args(tiny_bert, data_files, out, "--push_to_hub", "--hub_model_id", "org/tiny",
                                        "--hub_token", "hf_given"))


# ---------------------------------------------------------------------- 18. a packed checkpoint to train from
def packed_message(path: Path, instead: str, model_class: str) -> str:
    return (f"--model_name_or_path {path} is a packed (inference) SURGE checkpoint: its sign bits have no latent "
            f"weights to train. Start from {instead}, or write a trainable copy in Python: "
            f"surge_hf.{model_class}.from_pretrained(path).unfinalize().save_pretrained(new_path).")


def test_glue_refuses_a_packed_checkpoint_before_training(tiny_bert, data_files, tmp_path, monkeypatch):
    packed = tmp_path / "packed"
    SurgeBertForSequenceClassification.from_pretrained(tiny_bert).save_pretrained(packed, packed=True)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(packed)
    monkeypatch.setattr(glue_script, "train", no_training)
    with pytest.raises(ValueError, match=exact(packed_message(
            packed, "the train-form model of the run that made it (its train_state/ folder)",
            "SurgeBertForSequenceClassification"))):
        glue_script.main(run_args(packed, data_files, tmp_path / "run"))
    SurgeBertForSequenceClassification.from_pretrained(tiny_bert).save_pretrained(packed / "train_state")
    with pytest.raises(ValueError, match=exact(packed_message(
            packed, f"--model_name_or_path {packed / 'train_state'} (the train-form model of that run)",
            "SurgeBertForSequenceClassification"))):
        glue_script.main(run_args(packed, data_files, tmp_path / "run2", "--teacher_model_name_or_path", "none"))


def test_vit_refuses_a_packed_checkpoint_before_loading_data(tmp_path):
    packed = tmp_path / "packed-vit"
    SurgeViTForImageClassification(SurgeViTConfig.from_vit_config(vit_config())).save_pretrained(packed, packed=True)
    with pytest.raises(ValueError, match=exact(packed_message(
            packed, "the train-form model of the run that made it (its train_state/ folder)",
            "SurgeViTForImageClassification"))):
        vit_script.checkpoint_config(SimpleNamespace(model_name_or_path=str(packed), image_size=None))


# ------------------------------------------------------------------------------------------ 20. the model card
def test_the_card_of_a_staged_run_names_the_hub_base_model_and_no_local_path(tiny_bert, data_files, tmp_path,
                                                                           monkeypatch):
    make_hub_cache(tmp_path / "hub", "org/tiny-bert", tiny_bert)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    out = tmp_path / "run"
    arguments = run_args(tiny_bert, data_files, out)
    arguments[arguments.index("--model_name_or_path") + 1] = "org/tiny-bert"
    glue_script.main(arguments)  # the default run: a teacher stage, then the student from it
    for card in ((out / "README.md").read_text(), (out / "teacher" / "README.md").read_text()):
        assert "base_model: org/tiny-bert" in card
        assert "It was fine-tuned from [org/tiny-bert](https://huggingface.co/org/tiny-bert) on" in card
        assert str(tmp_path) not in card
    assert "| distillation | from teacher/ |" in (out / "README.md").read_text()


def test_card_references_are_hub_ids_or_folders_relative_to_the_output_folder(tmp_path, monkeypatch):
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    (tmp_path / "models" / "bert").mkdir(parents=True)
    run = tmp_path / "run"
    assert card_model_reference(str(run / "teacher"), run) == "teacher/"
    assert card_model_reference(str(tmp_path / "models" / "bert"), run) == "../models/bert/"
    assert card_model_reference("org/tiny-bert", run) == "org/tiny-bert"
    monkeypatch.chdir(tmp_path)
    assert portable_command(f"accelerate launch scripts/vit.py --train_dir {tmp_path}/data "
                            f"--output_dir={tmp_path}/run --seed 1") == (
        "accelerate launch scripts/vit.py --train_dir data --output_dir=run --seed 1")


def test_a_card_names_a_local_base_model_by_its_relative_folder():
    card = render_model_card("text", text_context(base_model=None, local_base_model="../models/bert/"))
    assert "It was fine-tuned from the local model `../models/bert/` on GLUE MRPC (`mrpc`)." in card
    assert "base_model:" not in card
