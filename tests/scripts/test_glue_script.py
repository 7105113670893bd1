"""End-to-end tests of scripts/glue.py on a tiny random BERT and tiny local csv files (offline, CPU)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import accelerate.utils.other
import datasets
import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    pipeline,
)

import surge_hf
from conftest import launch_two_cpu_processes, load_script
from surge_hf.hub import upload
from surge_hf.saving import DiskFullError
from surge_hf.training import checkpointing, cli
from surge_hf.training.output_dir import OutputDirInUseError
from surge_hf.training.stages import StageAction, StageError, record_digest

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["good", "great", "fine", "fun", "bad", "awful", "dull", "poor", "movie", "plot", "the", "a", "very"]


glue_script = load_script("glue")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT with a word-level vocabulary, saved like a pretrained checkpoint."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def write_csv(path: Path, rows: list[tuple], header=("sentence", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sentiment_rows(count: int, seed: int) -> list[tuple[str, int]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        label = int(torch.randint(0, 2, (1,), generator=generator))
        pool = WORDS[:4] if label else WORDS[4:8]
        words = [pool[int(i)] for i in torch.randint(0, 4, (3,), generator=generator)]
        rows.append((f"the movie was {' '.join(words)}", label))
    return rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    return (write_csv(folder / "train.csv", sentiment_rows(48, 0)),
            write_csv(folder / "validation.csv", sentiment_rows(16, 1)))


def run_args(model: Path, files: tuple[Path, Path], output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(files[0]), "--validation_file", str(files[1]),
            "--output_dir", str(output_dir), "--max_length", "16", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--max_train_steps", "4", "--logging_steps", "2", "--seed", "3",
            "--teacher_max_train_steps", "2", *extra]


def test_run_writes_packed_and_train_form_outputs_that_reload_exactly(tiny_bert, data_files, tmp_path):
    out = tmp_path / "run"
    results = glue_script.main(run_args(tiny_bert, data_files, out))

    for name in ("config.json", "model.safetensors", "tokenizer.json", "all_results.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "train_state" / "model.safetensors").is_file()
    assert not (out / ".export.tmp").exists()
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval"] == results["eval"]
    assert saved["completed_steps"] == 4
    assert saved["recipe"]["compensator"] == "surge"

    packed = AutoModelForSequenceClassification.from_pretrained(out)
    trainable = AutoModelForSequenceClassification.from_pretrained(out / "train_state")
    assert packed.is_packed and not trainable.is_packed
    batch = BertTokenizerFast.from_pretrained(out)(["the movie was good fun", "a very dull plot"],
                                                    return_tensors="pt", padding=True)
    trainable.finalize()
    with torch.no_grad():
        assert torch.equal(packed(**batch).logits, trainable(**batch).logits)
    # The packed file is much smaller than the train form, which stores latent and auxiliary weights.
    assert (out / "model.safetensors").stat().st_size < (out / "train_state" / "model.safetensors").stat().st_size
    card = (out / "README.md").read_text()
    assert "surge" in card and "binary-neural-network" in card


def test_resumed_run_ends_exactly_like_the_uninterrupted_run(tiny_bert, data_files, tmp_path):
    full = tmp_path / "full"
    reference = glue_script.main(run_args(tiny_bert, data_files, full, "--checkpointing_steps", "2",
                                          "--checkpoints_total_limit", "3"))
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_2", "step_4"]

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_2", resumed_dir / "checkpoints" / "step_2")
    resumed = glue_script.main(run_args(tiny_bert, data_files, resumed_dir, "--checkpointing_steps", "2",
                                        "--resume_from_checkpoint", "latest"))
    assert resumed["eval"] == reference["eval"]
    assert (resumed_dir / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


def test_full_precision_teacher_then_distilled_student(tiny_bert, data_files, tmp_path):
    teacher_dir = tmp_path / "teacher"
    teacher = glue_script.main(run_args(tiny_bert, data_files, teacher_dir, "--binarize", "none"))
    assert teacher["recipe"] is None
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(teacher_dir), BertForSequenceClassification)

    student = glue_script.main(run_args(
        tiny_bert, data_files, tmp_path / "student", "--teacher_model_name_or_path", str(teacher_dir),
        "--distill_hidden_states_weight", "0.5", "--distill_attentions_weight", "0.5", "--distill_temperature", "2",
        "--distill_hidden_states_loss", "normalized", "--distill_hidden_relations_weight", "0.25"))
    assert student["distillation"] == {"temperature": 2.0, "label_weight": 0.0, "logits_weight": 1.0,
                                       "hidden_states_weight": 0.5, "hidden_states_loss": "normalized",
                                       "hidden_relations_weight": 0.25, "attentions_weight": 0.5,
                                       "embedding_mixup_alpha": 0.0, "mask_padding": False}


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("good movie", 0), ("bad movie", 1)], ("sentence", "target"), r"label"),
        ([], ("sentence", "label"), r"empty"),
    ],
)
def test_bad_data_fails_before_training(tiny_bert, data_files, tmp_path, rows, header, message):
    bad = write_csv(tmp_path / "bad.csv", rows, header)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        glue_script.main(run_args(tiny_bert, (bad, data_files[1]), out))
    assert not out.exists()


def test_validation_labels_outside_the_training_labels_fail_before_training(tiny_bert, data_files, tmp_path):
    bad = write_csv(tmp_path / "validation.csv", [("good movie", 0), ("bad movie", 7)])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="7"):
        glue_script.main(run_args(tiny_bert, (data_files[0], bad), out))
    assert not out.exists()


def test_teacher_with_another_label_set_fails_before_training(tiny_bert, data_files, tmp_path):
    teacher_dir = tmp_path / "teacher3"
    teacher = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, ignore_mismatched_sizes=True)
    teacher.save_pretrained(teacher_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="num_labels=3"):
        glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", str(teacher_dir)))
    assert not out.exists()


def test_flag_errors(tiny_bert, data_files, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"HubConfig.push_to_hub needs HubConfig.hub_model_id"):
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "o", "--push_to_hub"))
    with pytest.raises(SystemExit):
        glue_script.main(["--task_name", "sst3", "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err.replace("'", "")
    assert "invalid choice: sst3 (choose from cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)" in error
    with pytest.raises(ValueError, match=r"SurgeConfig.eta=-1.0 must be >= 0"):
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "o", "--eta", "-1"))
    with pytest.raises(ValueError, match=r"exactly one of --task_name"):
        glue_script.main(["--model_name_or_path", str(tiny_bert), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi` at the network boundary."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail:
            raise OSError("503 Service Unavailable")

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id,
                                             "paths": sorted(op.path_in_repo for op in operations)}))
        return SimpleNamespace(commit_url="https://huggingface.co/org/tiny/commit/abc")


def test_push_sends_exactly_the_deployable_files_and_a_failed_push_keeps_outputs(tiny_bert, data_files, tmp_path,
                                                                                   monkeypatch, hub_login):
    api = RecordingApi()
    monkeypatch.setattr(upload, "HfApi", lambda token=None: api)
    out = tmp_path / "pushed"
    glue_script.main(run_args(tiny_bert, data_files, out, "--checkpointing_steps", "4", "--push_to_hub",
                              "--hub_model_id", "org/tiny"))
    sent = dict(api.calls)["create_commit"]["paths"]
    assert sent == upload.files_to_push(out)
    assert "model.safetensors" in sent and "README.md" in sent and "all_results.json" in sent
    assert not any(path.startswith(("train_state/", "checkpoints/")) for path in sent)


    monkeypatch.setattr(upload, "HfApi", lambda token=None: RecordingApi(fail=True))
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match=r"org/tiny[\s\S]*intact"):
        glue_script.main(run_args(tiny_bert, data_files, failed, "--push_to_hub", "--hub_model_id", "org/tiny"))
    assert sorted(upload.files_to_push(failed)) == sorted(sent)
    assert AutoModelForSequenceClassification.from_pretrained(failed).is_packed


def test_two_cpu_processes_with_accelerate_launch(tiny_bert, data_files, tmp_path):
    out = tmp_path / "ddp"
    completed = launch_two_cpu_processes("glue", run_args(tiny_bert, data_files, out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["completed_steps"] == 4
    assert surge_hf.SurgeConfig.from_dict(results["recipe"]).compensator == "surge"


def test_default_run_fine_tunes_a_teacher_then_starts_from_it_and_distils(tiny_bert, data_files, tmp_path, capsys):
    out = tmp_path / "staged"
    results = glue_script.main(run_args(tiny_bert, data_files, out))
    teacher = json.loads((out / "teacher" / "all_results.json").read_text())
    assert teacher["recipe"] is None and teacher["completed_steps"] == 2 and teacher["learning_rate"] == 5e-5
    assert results["distillation"]["logits_weight"] == 1.0 and results["distillation"]["hidden_states_weight"] == 1.0
    # the default recipe: elastic activations and learned weight scales, calibrated, at lr 5e-4
    assert results["recipe"]["activation_binarizer"] == "elastic" and results["recipe"]["learnable_weight_scale"]
    assert results["calibrate_activations"]
    defaults = glue_script.parse_args(["--model_name_or_path", str(tiny_bert), "--train_file", str(data_files[0]),
                                       "--validation_file", str(data_files[1]), "--output_dir", str(tmp_path / "d")])
    assert defaults.learning_rate == 5e-4 and defaults.teacher_model_name_or_path == "auto"
    assert "teacher" not in upload.files_to_push(out)[0] and not any(p.startswith("teacher/") for p in
                                                                   upload.files_to_push(out))
    # the student's embeddings (never binarized, frozen by nothing) started from the teacher's, not the raw model's
    student = AutoModelForSequenceClassification.from_pretrained(out / "train_state")
    raw = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    tuned = AutoModelForSequenceClassification.from_pretrained(out / "teacher")
    assert not torch.equal(raw.classifier.weight, tuned.classifier.weight)
    printed = capsys.readouterr().out
    assert (f"Stage 1 of 2: training the full-precision teacher in {out / 'teacher'}: 2 steps at learning rate 5e-05. "
            "It is a stage of its own, not bounded by --max_train_steps or --num_train_epochs: bound it with "
            "--teacher_max_train_steps N (or --teacher_num_train_epochs N), or skip it with "
            "--teacher_model_name_or_path none (no teacher) or PATH (a model already fine-tuned on the task).\n"
            ) in printed
    assert (f"Training into {out / 'teacher'}: 2 optimizer steps (1 epoch(s) of 6 steps) at learning rate 5e-05."
            in printed)
    assert f"Stage 2 of 2: the final model into {out}, initialised from {out / 'teacher'} and distilled" in printed
    card = (out / "README.md").read_text()
    assert "earlier stages" in card and "full-precision teacher, fine-tuned on the task (`teacher/`): 2 steps" in card
    # a second run over the same folder (which it may overwrite) reuses the finished teacher stage
    glue_script.main(run_args(tiny_bert, data_files, out, "--overwrite_output_dir"))
    assert (f"Stage 1 of 2: reusing the full-precision teacher in {out / 'teacher'} (made by this command: same "
            "model, data and settings)." in capsys.readouterr().out)
    assert student.config.model_type == "surge_bert"


def test_teacher_none_trains_without_distillation(tiny_bert, data_files, tmp_path):
    out = tmp_path / "alone"
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none"))
    assert results["distillation"] is None and not (out / "teacher").exists()


def test_progressive_activation_bits(tiny_bert, data_files, tmp_path):
    out = tmp_path / "progressive"
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none",
                                        "--activation_binarizer", "elastic", "--activation_bits_schedule", "4,2,1"))
    assert results["recipe"]["activation_bits"] == 1
    for bits in (4, 2):
        stage = json.loads((out / f"stage_a{bits}" / "all_results.json").read_text())
        assert stage["recipe"]["activation_bits"] == bits and stage["completed_steps"] == 4
    assert not any(path.startswith("stage_") for path in upload.files_to_push(out))
    packed = AutoModelForSequenceClassification.from_pretrained(out)
    assert "W1A1" in repr(packed.bert.encoder.layer[0].attention.self.query)


@pytest.mark.parametrize("schedule", ["1,2", "3,1", "8,x", "", "4,4,1", "4,1,1"])
def test_bad_activation_bits_schedule(tiny_bert, data_files, tmp_path, schedule, capsys):
    with pytest.raises(SystemExit):
        glue_script.parse_args(run_args(tiny_bert, data_files, tmp_path / "x", "--activation_bits_schedule",
                                        schedule))
    assert (f"{schedule!r} is not a schedule of activation bits: give comma-separated values from 1, 2, 4, 8, each "
            "lower than the one before (no repeats; train longer with --num_train_epochs instead), e.g. 4,2,1."
            ) in capsys.readouterr().err


def test_student_hidden_act_changes_the_student_only(tiny_bert, data_files, tmp_path):
    out = tmp_path / "relu"
    glue_script.main(run_args(tiny_bert, data_files, out, "--student_hidden_act", "relu",
                              "--unsigned_activation_modules", r".*layer\.\d+\.output\.dense"))
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "relu"
    assert json.loads((out / "teacher" / "config.json").read_text())["hidden_act"] == "gelu"
    packed = AutoModelForSequenceClassification.from_pretrained(out)
    assert not packed.bert.encoder.layer[0].output.dense.activation_spec.signed
    assert packed.bert.encoder.layer[0].intermediate.dense.activation_spec.signed


# ---------------------------------------------------------------------------------------------------------------
# Output folders, resume, early errors
# ---------------------------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_max_seq_length_is_an_alias_of_the_anchor_flag_max_length(tiny_bert, data_files, tmp_path):
    args = run_args(tiny_bert, data_files, tmp_path / "o")
    assert glue_script.parse_args(args).max_length == 16
    alias = [("--max_seq_length" if a == "--max_length" else a) for a in args]
    assert glue_script.parse_args(alias).max_length == 16


def test_with_tracking_reports_to_every_tracker_unless_report_to_names_one(tiny_bert, data_files, tmp_path):
    args = run_args(tiny_bert, data_files, tmp_path / "o")
    report_to = [cli.training_config_from_args(glue_script.parse_args([*args, *extra])).report_to
                 for extra in ((), ("--with_tracking",), ("--with_tracking", "--report_to", "tensorboard"))]
    assert report_to == ["none", "all", "tensorboard"]


def test_outputs_get_the_usual_permissions(tiny_bert, data_files, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        glue_script.main(run_args(tiny_bert, data_files, out))
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode)
             for name in ("model.safetensors", "README.md", "config.json", "all_results.json",
                          "training_history.json", "tokenizer.json", "train_state/model.safetensors")}
    assert modes == dict.fromkeys(modes, 0o644)


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--teacher_model_name_or_path"])
def test_output_dir_equal_to_an_input_model_is_refused(tiny_bert, data_files, tmp_path, flag):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    before = folder_bytes(model)
    args = run_args(model, data_files, model, "--overwrite_output_dir")
    if flag == "--teacher_model_name_or_path":
        args = run_args(tiny_bert, data_files, model, "--overwrite_output_dir", flag, str(model))
    with pytest.raises(ValueError, match=rf"--output_dir .*model would overwrite {flag} .*: the run would replace"):
        glue_script.main(args)
    assert folder_bytes(model) == before


def test_non_empty_output_dir_is_refused_unless_overwritten(tiny_bert, data_files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"is not empty \(README.md\)"):
        glue_script.main(run_args(tiny_bert, data_files, out))
    assert (out / "README.md").read_text() == "my notes"
    glue_script.main(run_args(tiny_bert, data_files, out, "--overwrite_output_dir"))
    assert "surge" in (out / "README.md").read_text()


def test_uncreatable_output_dir_fails_before_any_work(tiny_bert, data_files, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(NotADirectoryError, match=r"cannot be created: .*file is a file"):
        glue_script.main(run_args(tiny_bert, data_files, blocker / "out"))


def test_a_run_prunes_only_its_own_checkpoints_and_latest_resumes_it(tiny_bert, data_files, tmp_path):
    other = tmp_path / "other"
    glue_script.main(run_args(tiny_bert, data_files, other, "--checkpointing_steps", "1", "--checkpoints_total_limit",
                              "9", "--max_train_steps", "6"))
    out = tmp_path / "out"
    shutil.copytree(other / "checkpoints", out / "checkpoints")
    glue_script.main(run_args(tiny_bert, data_files, out, "--checkpointing_steps", "1", "--checkpoints_total_limit",
                              "1", "--overwrite_output_dir", "--learning_rate", "2e-3"))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # Ours replaced the other run's steps 1-4 (--overwrite_output_dir) and kept its newest; the other's 5, 6 stay.
    assert names == ["step_4", "step_5", "step_6"]
    assert checkpointing.latest_checkpoint(out).name == "step_4"
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["settings"]["learning_rate"] == 2e-3


def test_a_finished_run_resumed_from_latest_takes_no_step_and_rewrites_identical_outputs(tiny_bert, data_files,
                                                                                          tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_bert, data_files, out, "--checkpointing_steps", "2")  # 4 steps: checkpoints 2 and 4
    first = glue_script.main(args)
    before = {name: data for name, data in folder_bytes(out).items() if not name.startswith("checkpoints/")}
    again = glue_script.main([*args, "--resume_from_checkpoint", "latest"])
    assert again["completed_steps"] == first["completed_steps"] == 4
    after = {name: data for name, data in folder_bytes(out).items() if not name.startswith("checkpoints/")}
    assert after == before


@pytest.mark.parametrize(("change", "message"), [
    (("--learning_rate", "2e-3"), r"learning_rate: checkpoint 0.001, now 0.002"),
    (("--seed", "4"), r"seed: checkpoint 3, now 4"),
    (("--max_length", "12"), r"max_length: checkpoint 16, now 12"),
    (("--eta", "0.3"), r"recipe: checkpoint \{.*\"eta\": 0.1.*\}, now \{.*\"eta\": 0.3"),
])
def test_resume_with_other_settings_is_refused_before_any_work(tiny_bert, data_files, tmp_path, monkeypatch, change,
                                                                message):
    out = tmp_path / "run"  # without a teacher stage, whose record would refuse a new seed or length first
    args = run_args(tiny_bert, data_files, out, "--checkpointing_steps", "2", "--teacher_model_name_or_path", "none")
    glue_script.main(args)
    monkeypatch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(checkpointing.CheckpointError, match=message):
        glue_script.main([*args, "--resume_from_checkpoint", "latest", *change])


def test_corrupt_or_foreign_checkpoint_gives_a_clear_error(tiny_bert, data_files, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_bert, data_files, out, "--checkpointing_steps", "2")
    glue_script.main(args)
    checkpoint = out / "checkpoints" / "step_2"
    # Written with another recipe by a version that stored no settings: Accelerate's own loading fails.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "settings"}))
    with pytest.raises(checkpointing.CheckpointError, match=r"step_2 does not fit this run's model [\s\S]* another "
                                                       r"model, recipe or script"):
        glue_script.main([*args, "--resume_from_checkpoint", str(checkpoint), "--binarize", "ste"])
    optimizer = checkpoint / "optimizer.bin"
    saved_optimizer = optimizer.read_bytes()
    optimizer.write_bytes(saved_optimizer[:200])
    with pytest.raises(checkpointing.CheckpointError, match=r"step_2 does not fit [\s\S]* a file in it is damaged"):
        glue_script.main([*args, "--resume_from_checkpoint", str(checkpoint)])
    optimizer.write_bytes(saved_optimizer)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(checkpointing.CheckpointError, match=rf"corrupt: {weights} does not load"):
        glue_script.main([*args, "--resume_from_checkpoint", str(checkpoint)])


def test_max_length_above_the_position_embeddings_fails_before_any_work(tiny_bert, data_files, tmp_path):
    with pytest.raises(ValueError, match=r"--max_length 40 is above the 32 positions of --model_name_or_path"):
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "o", "--max_length", "40"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("changes", "flag", "message"), [
    ({"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}, "--distill_hidden_states_weight",
     r"student's hidden_size: the student has 32, .* has 16"),
    ({"num_hidden_layers": 1}, "--distill_attentions_weight", r"student's num_hidden_layers: the student has 2, "),
])
def test_teacher_of_another_shape_fails_before_training(tiny_bert, data_files, tmp_path, changes, flag, message):
    teacher = tmp_path / "teacher"
    config = BertConfig.from_pretrained(tiny_bert)
    for key, value in changes.items():
        setattr(config, key, value)
    BertForSequenceClassification(config).save_pretrained(teacher)
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=message):
        glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", str(teacher), flag, "1"))
    assert not out.exists()


def test_invalid_hub_model_id_fails_before_any_work(tiny_bert, data_files, tmp_path):
    with pytest.raises(ValueError, match=r"repo_id 'org/bad--name' is not a valid Hub model id"):
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "o", "--hub_model_id", "org/bad--name"))
    assert not (tmp_path / "o").exists()


def test_a_label_head_of_another_size_needs_ignore_mismatched_sizes(tiny_bert, tmp_path):
    three = [(text, index % 3) for index, (text, _) in enumerate(sentiment_rows(24, 5))]
    files = (write_csv(tmp_path / "train.csv", three), write_csv(tmp_path / "validation.csv", three[:6]))
    with pytest.raises(ValueError, match=r"head of another size than the data's 3 label\(s\): pass "
                                         r"--ignore_mismatched_sizes"):
        glue_script.main(run_args(tiny_bert, files, tmp_path / "o"))
    results = glue_script.main(run_args(tiny_bert, files, tmp_path / "o2", "--ignore_mismatched_sizes"))
    assert results["completed_steps"] == 4
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "o2").config.num_labels == 3


def test_a_failed_push_names_the_push_only_command_which_pushes_without_training(tiny_bert, data_files, tmp_path,
                                                                                  monkeypatch, hub_login):
    out = tmp_path / "run"
    monkeypatch.setattr(upload, "HfApi", lambda token=None: RecordingApi(fail=True))
    with pytest.raises(RuntimeError, match=rf"--push_only --output_dir {out} --hub_model_id org/tiny"):
        glue_script.main(run_args(tiny_bert, data_files, out, "--push_to_hub", "--hub_model_id", "org/tiny"))
    before = folder_bytes(out)

    api = RecordingApi()
    monkeypatch.setattr(upload, "HfApi", lambda token=None: api)
    monkeypatch.setattr(glue_script, "train", lambda *args, **kwargs: pytest.fail("trained again"))
    results = glue_script.main(["--push_only", "--output_dir", str(out), "--hub_model_id", "org/tiny"])
    assert dict(api.calls)["create_commit"]["paths"] == upload.files_to_push(out)
    assert results == json.loads((out / "all_results.json").read_text())
    assert folder_bytes(out) == before
    with pytest.raises(FileNotFoundError, match=r"--push_only: .*all_results.json does not exist"):
        glue_script.main(["--push_only", "--output_dir", str(tmp_path / "none"), "--hub_model_id", "org/tiny"])


def test_a_teacher_folder_of_another_run_is_refused_or_overwritten(tiny_bert, data_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    glue_script.main(run_args(tiny_bert, data_files, out / "teacher", "--binarize", "none"))  # a run of its own
    before = folder_bytes(out / "teacher")
    monkeypatch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(StageError, match=rf"{out / 'teacher'} holds files but no stage.json \(another run's outputs, "
                                         r"or a stage written before stages were recorded\), so it is not this "
                                         r"command's full-precision teacher stage. Pass another --output_dir, delete "
                                         r".*teacher or pass --overwrite_output_dir to train the stage again"):
        glue_script.main(run_args(tiny_bert, data_files, out))
    assert folder_bytes(out / "teacher") == before
    monkeypatch.undo()
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--overwrite_output_dir"))
    teacher = json.loads((out / "teacher" / "all_results.json").read_text())
    assert (teacher["completed_steps"], teacher["learning_rate"], results["completed_steps"]) == (2, 5e-5, 4)
    assert (out / "teacher" / "stage.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Stages, the output-folder lock and a full disk
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged_run(tiny_bert, data_files, tmp_path_factory) -> tuple[Path, dict]:
    """A finished default run (teacher stage, then the student) with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("staged") / "run"
    return out, glue_script.main(run_args(tiny_bert, data_files, out, "--checkpointing_steps", "1"))


def killed_copy(stage: Path, target: Path, keep_checkpoints: tuple[str, ...]) -> Path:
    """`target` holding a copy of the finished `stage` as a kill inside it leaves it: its record and the checkpoints
    `keep_checkpoints`, and no outputs."""
    shutil.copytree(stage, target)
    for entry in target.iterdir():
        if entry.name not in ("stage.json", "checkpoints"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for checkpoint in (target / "checkpoints").iterdir():
        if checkpoint.name not in keep_checkpoints:
            shutil.rmtree(checkpoint)
    return target


@pytest.mark.parametrize("change", ["seed", "teacher_learning_rate", "base_model", "train_file"])
def test_a_finished_stage_of_another_command_is_refused_before_any_work(staged_run, tiny_bert, data_files, tmp_path,
                                                                        monkeypatch, change):
    out = tmp_path / "out"
    shutil.copytree(staged_run[0] / "teacher", out / "teacher")
    model, files, flags = tiny_bert, data_files, ()
    if change == "base_model":
        model = Path(shutil.copytree(tiny_bert, tmp_path / "other-bert"))
    elif change == "train_file":
        files = (write_csv(tmp_path / "train.csv", sentiment_rows(48, 7)), data_files[1])
    else:
        flags = (f"--{change}", {"seed": "4", "teacher_learning_rate": "1e-4"}[change])
    difference = {
        "seed": r"seed: recorded 3, now 4",
        "teacher_learning_rate": r"learning_rate: recorded 5e-05, now 0.0001",
        "base_model": rf"base_model: recorded \"{re.escape(str(tiny_bert.resolve()))}\", now "
                      rf"\"{re.escape(str(model.resolve()))}\"",
        "train_file": r"data.train_file: recorded \"sha256:[0-9a-f]{16}\", now \"sha256:[0-9a-f]{16}\"",
    }[change]
    monkeypatch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(StageError, match=rf"^{re.escape(str(out / 'teacher'))} holds a stage made with other settings "
                                         rf"\({difference}\), so it is not this command's full-precision teacher "
                                         r"stage. Pass another --output_dir, delete .*teacher or pass "
                                         r"--overwrite_output_dir to train the stage again, or run the command that "
                                         r"made it \(its settings are in .*teacher/stage.json\).$"):
        glue_script.main(run_args(model, files, out, *flags))


def test_a_run_killed_in_the_teacher_stage_continues_it_when_run_again(staged_run, tiny_bert, data_files, tmp_path,
                                                                       capsys):
    full, reference = staged_run
    out = tmp_path / "killed"
    teacher = killed_copy(full / "teacher", out / "teacher", keep_checkpoints=("step_1",))  # killed in step 2
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--checkpointing_steps", "1"))
    printed = capsys.readouterr().out
    assert f"Stage 1 of 2: continuing the interrupted full-precision teacher in {teacher}: 2 steps" in printed
    assert f"Resumed from {teacher / 'checkpoints' / 'step_1'} at step 1." in printed
    assert results["eval"] == reference["eval"]
    for name in ("teacher/model.safetensors", "model.safetensors", "train_state/model.safetensors"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name


def test_a_run_killed_in_the_teacher_stage_before_its_first_checkpoint_trains_it_again(staged_run, tiny_bert,
                                                                                        data_files, tmp_path, capsys):
    full, reference = staged_run
    out = tmp_path / "killed"
    teacher = killed_copy(full / "teacher", out / "teacher", keep_checkpoints=())
    (teacher / "model.safetensors").write_bytes(b"half written")
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--checkpointing_steps", "1"))
    assert f"Stage 1 of 2: training the full-precision teacher in {teacher}: 2 steps" in capsys.readouterr().out
    assert results["eval"] == reference["eval"]
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


def test_resume_latest_after_a_kill_in_a_precision_stage_continues_it_then_trains_the_final_stage(
        tiny_bert, data_files, tmp_path, monkeypatch, capsys):
    flags = ("--teacher_model_name_or_path", "none", "--activation_bits_schedule", "4,1", "--checkpointing_steps", "1")
    full = tmp_path / "full"
    reference = glue_script.main(run_args(tiny_bert, data_files, full, *flags))
    out = tmp_path / "killed"
    stage = killed_copy(full / "stage_a4", out / "stage_a4", keep_checkpoints=("step_3",))  # killed in step 4
    with monkeypatch.context() as patch:  # a stage of another seed, or distilled from a teacher, is not this run's
        patch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
        with pytest.raises(StageError, match=r"\(seed: recorded 3, now 4\), so it is not this command's W1A4 "
                                             r"student stage"):
            glue_script.main(run_args(tiny_bert, data_files, out, *flags, "--seed", "4"))
        teacher = re.escape(str(tiny_bert.resolve()))
        with pytest.raises(StageError, match=rf"\(teacher: recorded null, now \"{teacher}\"; distillation: recorded "
                                             r"null, now \{.*\), so it is not"):
            glue_script.main(run_args(tiny_bert, data_files, out, *flags, "--teacher_model_name_or_path",
                                      str(tiny_bert)))
    capsys.readouterr()
    results = glue_script.main(run_args(tiny_bert, data_files, out, *flags, "--resume_from_checkpoint", "latest"))
    printed = capsys.readouterr().out
    assert (f"--resume_from_checkpoint latest: the run stopped before the final stage; the W1A4 student stage in "
            f"{stage} runs first, then the final stage starts from the beginning.") in printed
    assert f"Stage 1 of 2: continuing the interrupted W1A4 student in {stage}: 4 steps at learning rate 0.001." in (
        printed)
    assert f"Resumed from {stage / 'checkpoints' / 'step_3'} at step 3." in printed
    assert results["eval"] == reference["eval"]
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


def test_resume_with_other_training_data_is_refused_before_any_work(tiny_bert, data_files, tmp_path, monkeypatch):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(48, 0))
    out = tmp_path / "run"
    flags = ("--checkpointing_steps", "2", "--teacher_model_name_or_path", "none")
    glue_script.main(run_args(tiny_bert, (train, data_files[1]), out, *flags))
    monkeypatch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
    changed = (r"data: checkpoint \{\"train_file\": \"sha256:[0-9a-f]{16}\", \"validation_file\": "
               r"\"sha256:[0-9a-f]{16}\"\}, now \{\"train_file\": \"sha256:[0-9a-f]{16}\"")
    other = write_csv(tmp_path / "other.csv", sentiment_rows(48, 9))
    with pytest.raises(checkpointing.CheckpointError, match=changed):  # another file
        glue_script.main(run_args(tiny_bert, (other, data_files[1]), out, *flags, "--resume_from_checkpoint", "latest"))
    write_csv(train, sentiment_rows(48, 9))  # the same file, with new content
    with pytest.raises(checkpointing.CheckpointError, match=changed):
        glue_script.main(run_args(tiny_bert, (train, data_files[1]), out, *flags, "--resume_from_checkpoint", "latest"))


LOCK_HOLDER = """
import sys, time
from surge_hf.training.output_dir import locked_output_dir
with locked_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_run_into_the_same_folder_is_refused_at_once_naming_the_first(tiny_bert, data_files, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline() == "locked\n"
        with monkeypatch.context() as patch:
            patch.setattr(glue_script, "load_text_data", lambda *args: pytest.fail("data loaded"))
            with pytest.raises(OutputDirInUseError, match=(
                    rf"^--output_dir {re.escape(str(out))} is in use by another run \(pid {holder.pid} on "
                    rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\): two "
                    r"runs writing one folder overwrite each other's checkpoints and outputs. Wait until that run "
                    r"ends \(or stop it\), or pass another --output_dir.$")):
                glue_script.main(run_args(tiny_bert, data_files, out))
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".surge_hf.lock").is_file()  # left by the killed run: it blocks nobody
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none"))
    assert results["completed_steps"] == 4 and not (out / ".surge_hf.lock").exists()


NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def test_a_full_disk_at_a_checkpoint_names_it_and_the_space_needed_and_leaves_no_partial_folder(
        tiny_bert, data_files, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise SafetensorError(NO_SPACE)

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full_disk)
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    with pytest.raises(DiskFullError, match=(
            rf"^No space left on device while writing checkpoint {re.escape(str(checkpoints / 'step_2'))} \(in "
            rf"{re.escape(str(checkpoints / '.step_2.tmp'))}, now removed\): it needs about \d[\d,]*\.\d MiB free, and "
            r"\d[\d,]*\.\d MiB are free there. Free some space or write to a larger disk. Then resume with "
            r"--resume_from_checkpoint latest \(the last complete checkpoint is intact\).$")) as caught:
        glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none",
                                  "--checkpointing_steps", "2"))
    assert caught.value.errno == errno.ENOSPC
    assert list(checkpoints.iterdir()) == []


def test_a_full_disk_at_export_names_the_folder_and_keeps_the_previous_outputs(tiny_bert, data_files, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "run"
    args = run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none")
    glue_script.main(args)
    before = folder_bytes(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(DiskFullError, match=(
            rf"^No space left on device while writing the outputs of {re.escape(str(out))} \(in "
            rf"{re.escape(str(out / '.export.tmp'))}, now removed\): it needs about \d[\d,]*\.\d MiB free, .* The "
            r"previous outputs of the folder are intact; with --checkpointing_steps, --resume_from_checkpoint latest "
            r"exports again without training.$")):
        glue_script.main([*args, "--overwrite_output_dir"])
    assert folder_bytes(out) == before  # no staging folder left, nothing replaced


def test_augmented_run_trains_on_the_new_sentences_and_resumes_exactly(tiny_bert, data_files, tmp_path, capsys):
    flags = ("--teacher_model_name_or_path", str(tiny_bert), "--augment", "2", "--checkpointing_steps", "2",
             "--checkpoints_total_limit", "3", "--max_train_steps", "8", "--embedding_mixup_alpha", "0.4")
    full = tmp_path / "full"
    reference = glue_script.main(run_args(tiny_bert, data_files, full, *flags))
    assert "Training on 144 sentences (2 new per example)." in capsys.readouterr().out
    assert reference["completed_steps"] == 8

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_4", resumed_dir / "checkpoints" / "step_4")
    resumed = glue_script.main(run_args(tiny_bert, data_files, resumed_dir, *flags,
                                        "--resume_from_checkpoint", "latest"))
    assert resumed["eval"] == reference["eval"]
    assert (resumed_dir / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    # Other new sentences are another run: resuming with another --augment is refused.
    with pytest.raises(checkpointing.CheckpointError, match="augmentation"):
        glue_script.main(run_args(tiny_bert, data_files, resumed_dir, *flags[:3], "3", *flags[4:],
                                  "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize(("extra", "message"), [
    (("--augment", "-1"), r"--augment must be >= 0"),
    (("--augment", "2", "--teacher_model_name_or_path", "none"), r"--augment needs a teacher"),
    (("--augment", "2", "--augment_drop_probability", "1"), r"drop_probability=1.0 would drop every word"),
    (("--embedding_mixup_alpha", "0.4", "--distill_label_weight", "1"), r"mixes two inputs.*set label_weight=0"),
    (("--embedding_mixup_alpha", "-1"), r"embedding_mixup_alpha=-1.0 must be a finite number >= 0"),
])
def test_bad_augment_flags_fail_before_any_work(tiny_bert, data_files, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "o", *extra))
    assert not (tmp_path / "o").exists()


def test_teacher_cache_is_built_once_and_gives_the_same_run_again(tiny_bert, data_files, tmp_path, capsys):
    flags = ("--teacher_model_name_or_path", str(tiny_bert), "--distill_mask_padding", "--teacher_cache_dir",
             str(tmp_path / "cache"))
    first = glue_script.main(run_args(tiny_bert, data_files, tmp_path / "a", *flags))
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "hidden_states.npy").is_file()
    second = glue_script.main(run_args(tiny_bert, data_files, tmp_path / "b", *flags))
    assert list((tmp_path / "cache").iterdir()) == entries
    assert second["eval"] == first["eval"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert f"Teacher outputs from the cache {entries[0]}." in capsys.readouterr().out
    with pytest.raises(ValueError, match="add --distill_mask_padding"):
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "c", *flags[:2], *flags[3:]))


def test_weight_planes_schedule_trains_a_two_plane_stage_then_the_packed_one_bit_model(tiny_bert, data_files,
                                                                                        tmp_path):
    out = tmp_path / "planes"
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none",
                                        "--weight_planes_schedule", "2,1"))
    stage = json.loads((out / "stage_w2" / "all_results.json").read_text())
    assert stage["recipe"]["weight_planes"] == 2 and stage["completed_steps"] == 4
    assert results["recipe"]["weight_planes"] == 1 and results["completed_steps"] == 4
    # the stage has no 1-bit form: its top-level model is the train form, which reloads as it trained
    two_plane = AutoModelForSequenceClassification.from_pretrained(out / "stage_w2")
    assert "W2A1" in repr(two_plane.bert.encoder.layer[0].attention.self.query) and not two_plane.is_packed
    # the final model starts from the stage's latent weights (signs it did not move keep their stage values)
    def ffn_output_weight(folder: Path) -> torch.Tensor:
        return AutoModelForSequenceClassification.from_pretrained(folder).bert.encoder.layer[0].output.dense.weight

    stage_weight, final_weight = ffn_output_weight(out / "stage_w2"), ffn_output_weight(out / "train_state")
    base_weight = ffn_output_weight(tiny_bert)
    assert (final_weight - stage_weight).abs().max() < (final_weight - base_weight).abs().max()
    packed = AutoModelForSequenceClassification.from_pretrained(out)
    assert packed.is_packed and "W1A1" in repr(packed.bert.encoder.layer[0].attention.self.query)
    assert not any(path.startswith("stage_") for path in upload.files_to_push(out))


def test_stage_teacher_previous_distils_the_final_stage_from_the_two_plane_stage(tiny_bert, data_files, tmp_path,
                                                                                  capsys):
    out = tmp_path / "nearer"
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", str(tiny_bert),
                                        "--weight_planes_schedule", "2,1", "--stage_teacher", "previous"))
    printed = capsys.readouterr().out
    two_plane = out / "stage_w2" / "train_state"
    assert (f"Stage 2 of 2: the final model into {out}, initialised from {two_plane} and distilled from "
            f"{two_plane}.") in printed
    assert json.loads((out / "stage_w2" / "stage.json").read_text())["teacher"] == str(tiny_bert.resolve())
    assert results["distillation"]["hidden_states_weight"] == 1.0 and results["completed_steps"] == 4
    assert AutoModelForSequenceClassification.from_pretrained(out).is_packed


def test_stage_teacher_previous_needs_a_schedule(tiny_bert, data_files, tmp_path):
    with pytest.raises(ValueError, match=r"--stage_teacher previous distils each student stage from the stage before "
                                         r"it: pass --weight_planes_schedule or --activation_bits_schedule"):
        glue_script.parse_args(run_args(tiny_bert, data_files, tmp_path / "x", "--stage_teacher", "previous"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, message", [
    (("--weight_planes_schedule", "1,2"), "is not a schedule of weight planes"),
    (("--weight_planes_schedule", "2"), "ends at 2 weight planes"),
    (("--weight_planes_schedule", "3,1"), "is not a schedule of weight planes"),
])
def test_bad_weight_planes_schedule_is_refused_by_the_parser(tiny_bert, data_files, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit):
        glue_script.parse_args(run_args(tiny_bert, data_files, tmp_path / "x", *extra))
    assert message in capsys.readouterr().err


def test_two_schedules_at_once_are_refused_before_any_work(tiny_bert, data_files, tmp_path):
    with pytest.raises(ValueError, match="pass one of them"):
        glue_script.parse_args(run_args(tiny_bert, data_files, tmp_path / "x", "--weight_planes_schedule", "2,1",
                                        "--activation_bits_schedule", "2,1"))
    assert not (tmp_path / "x").exists()


def test_label_names_name_the_classes_of_the_config_the_card_and_the_pipeline(tiny_bert, data_files, tmp_path):
    out = tmp_path / "named"
    glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none",
                              "--label_names", "negative, positive"))
    for folder in (out, out / "train_state"):
        config = json.loads((folder / "config.json").read_text())
        assert (config["id2label"], config["label2id"]) == ({"0": "negative", "1": "positive"},
                                                            {"negative": 0, "positive": 1})
    assert "It predicts 2 classes (`model.config.id2label`): 0 `negative`, 1 `positive`." in (
        out / "README.md").read_text()
    classifier = pipeline("text-classification", model=str(out))
    model, tokenizer = classifier.model, classifier.tokenizer
    with torch.no_grad():
        logits = model(**tokenizer(["the movie was good fun", "a very dull plot"], return_tensors="pt",
                                   padding=True)).logits
    expected = [model.config.id2label[index] for index in logits.argmax(-1).tolist()]
    assert [prediction["label"] for prediction in classifier(["the movie was good fun", "a very dull plot"])] == (
        expected)


def test_class_names_of_a_class_label_column_reach_the_config(tiny_bert, tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["dull", "fun"])})
    files = []
    for split, seed in (("train", 0), ("validation", 1)):
        rows = sentiment_rows(16, seed)
        datasets.Dataset.from_dict({"sentence": [text for text, _ in rows], "label": [label for _, label in rows]},
                                   features=features).to_parquet(tmp_path / f"{split}.parquet")
        files.append(tmp_path / f"{split}.parquet")
    out = tmp_path / "class_label"
    glue_script.main(run_args(tiny_bert, tuple(files), out, "--teacher_model_name_or_path", "none",
                              "--max_train_steps", "1"))
    config = json.loads((out / "config.json").read_text())
    assert (config["id2label"], config["label2id"]) == ({"0": "dull", "1": "fun"}, {"dull": 0, "fun": 1})


def test_label_names_of_another_count_fail_before_any_work(tiny_bert, data_files, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=re.escape(
            "3 label names ['negative', 'neutral', 'positive'] for the data's 2 classes [0, 1]: give one name per "
            "class, in class-id order")):
        glue_script.main(run_args(tiny_bert, data_files, out, "--label_names", "negative,neutral,positive"))
    assert not out.exists()


@pytest.mark.parametrize(("names", "message"), [
    ("bad,bad", "'bad,bad': label names ['bad', 'bad'] repeat ['bad']: give each class its own name, e.g. "
                "negative,positive."),
    ("negative,", "'negative,': label names ['negative', ''] must be non-empty strings without surrounding "
                  "spaces, e.g. negative,positive."),
])
def test_bad_label_names_are_refused_by_the_parser(tiny_bert, data_files, tmp_path, names, message, capsys):
    with pytest.raises(SystemExit):
        glue_script.parse_args(run_args(tiny_bert, data_files, tmp_path / "x", "--label_names", names))
    assert f"argument --label_names: {message}" in capsys.readouterr().err


def test_the_plan_types_every_stage_once_and_leaves_the_flags_alone(tiny_bert, data_files, tmp_path,
                                                                      hub_login):
    """The command is planned once, before any work: one typed run per stage (teacher, two-plane student, final),
    each started from the stage before, distilled as `--stage_teacher` says, with its own configs; the parsed flags
    are never cloned or changed."""
    out = tmp_path / "plan"
    args = glue_script.parse_args(run_args(tiny_bert, data_files, out, "--weight_planes_schedule", "2,1",
                                           "--stage_teacher", "previous", "--augment", "1", "--push_to_hub",
                                           "--hub_model_id", "org/tiny", "--resume_from_checkpoint", "latest",
                                           "--plane_anneal_steps", "2"))
    flags = copy.deepcopy(vars(args))
    plan = glue_script.plan_earlier_stages(args, glue_script.plan_run(args))
    assert vars(args) == flags and not out.exists()
    (teacher_stage, teacher), (planes_stage, planes) = plan.stages
    final = plan.final
    assert plan.own_folders == ("teacher", "stage_w2")
    assert [planned.action for planned, _ in plan.stages] == [StageAction.START, StageAction.START]
    assert teacher.setup.model_name_or_path == str(tiny_bert)
    assert teacher.setup.teacher is None and teacher.setup.surge_config is None
    assert teacher.setup.training.learning_rate == 5e-5 and teacher.setup.training.max_train_steps == 2
    assert not teacher.setup.training.calibrate_activations and teacher.augmentation is None
    assert planes.setup.model_name_or_path == planes.setup.teacher == str(out / "teacher")
    assert planes.setup.surge_config.weight_planes == 2 and planes.augmentation.copies == 1
    two_plane = str(out / "stage_w2" / "train_state")
    assert final.setup.model_name_or_path == final.setup.teacher == two_plane
    assert final.setup.surge_config.weight_planes == 1 and final.setup.training.learning_rate == 1e-3
    # the step down from two planes belongs to the final run
    assert [run.setup.training.plane_anneal_steps for run in (teacher, planes, final)] == [None, None, 2]
    # only the final run pushes; it does not resume, since the command stopped (here: never ran) before it
    assert [run.setup.hub.push_to_hub for run in (teacher, planes, final)] == [False, False, True]
    assert final.setup.training.resume_from_checkpoint is None and args.resume_from_checkpoint == "latest"
    assert final.setup.settings["earlier_stages"] == record_digest(planes_stage.stage.record)
    assert planes_stage.stage.record["previous"] == teacher_stage.stage.record
    # every stage is checked against the models the user gave
    assert {run.setup.inputs["--model_name_or_path"] for run in (teacher, planes, final)} == {str(tiny_bert)}


def test_weight_axis_recipe_resolves_to_exactly_the_measured_recipe(tiny_bert, data_files, tmp_path):
    """`--recipe weight-axis` is what benchmarks/accuracy.py measured (text suite augment, arm
    surge_frozen_aug4_w2_to_w1_2500_anneal: 1,250 steps per stage, 625 annealed = ratio 0.5; the recipe below is
    that run's all_results.json): a change of a library default must not move it."""
    args = glue_script.parse_args(["--model_name_or_path", str(tiny_bert), "--train_file", str(data_files[0]),
                                   "--validation_file", str(data_files[1]), "--output_dir", str(tmp_path / "o"),
                                   "--recipe", "weight-axis"])
    plan = glue_script.plan_run(args)
    (_, teacher), (_, planes) = plan.stages
    final = plan.final.setup
    measured = {
        "target_modules": None, "exclude_modules": None, "binarize_weights": True, "binarize_activations": True,
        "weight_scale": "channel", "activation_binarizer": "elastic", "activation_bits": 1, "weight_planes": 1,
        "unsigned_activation_modules": None, "learnable_weight_scale": True, "surrogate": "clipped_ste",
        "swish_beta": 5.0, "compensator": "surge", "eta": 0.1, "aux_weight": "frozen", "lambda_placement": "fork",
        "scale_aux_grad": False, "aux_loss_weight": 0.0, "eps": 1e-08, "shortcuts": False, "shortcut_gate_init": 1.0,
        "binarize_attention": False, "attention_alpha_init": 0.05, "version": 1}
    assert final.surge_config.to_dict() == measured
    assert planes.setup.surge_config.to_dict() == {**measured, "weight_planes": 2}
    assert dataclasses.asdict(final.distillation) == {
        "temperature": 1.0, "label_weight": 0.0, "logits_weight": 1.0, "hidden_states_weight": 1.0,
        "hidden_states_loss": "mse", "hidden_relations_weight": 0.0, "attentions_weight": 0.0,
        "embedding_mixup_alpha": 0.0, "mask_padding": False}
    assert (final.training.learning_rate, final.training.calibrate_activations, final.training.plane_anneal_ratio,
            planes.setup.training.plane_anneal_ratio, planes.augmentation.copies) == (5e-4, True, 0.5, None, 4)
    assert (teacher.setup.training.learning_rate, teacher.setup.training.num_train_epochs) == (5e-5, 3)
    overridden = glue_script.parse_args(["--model_name_or_path", str(tiny_bert), "--train_file", str(data_files[0]),
                                         "--validation_file", str(data_files[1]), "--output_dir", str(tmp_path / "o"),
                                         "--recipe", "weight-axis", "--augment", "0", "--aux_weight", "separate"])
    assert (overridden.augment, overridden.aux_weight, overridden.weight_planes_schedule) == (0, "separate", [2, 1])


def test_surge_runs_freeze_the_auxiliary_weight_unless_told(tiny_bert, data_files, tmp_path):
    """The script's default is the cheaper SURGE step (a frozen W_a); what trains W_a asks for a separate one."""
    base = ["--model_name_or_path", str(tiny_bert), "--train_file", str(data_files[0]), "--validation_file",
            str(data_files[1]), "--output_dir", str(tmp_path / "o")]
    assert cli.recipe_from_args(glue_script.parse_args(base)).aux_weight == "frozen"
    with pytest.raises(ValueError, match=re.escape("SurgeConfig.aux_weight='frozen' never trains W_a, but "
                                                   "aux_loss_weight > 0 / scale_aux_grad=True act on W_a's training; "
                                                   "set aux_weight='separate'")):
        glue_script.parse_args([*base, "--aux_loss_weight", "0.1"])
    recipe = cli.recipe_from_args(glue_script.parse_args([*base, "--aux_weight", "separate", "--aux_loss_weight",
                                                          "0.1"]))
    assert (recipe.aux_weight, recipe.aux_loss_weight) == ("separate", 0.1)


def test_plane_anneal_ratio_belongs_to_the_final_run(tiny_bert, data_files, tmp_path):
    args = glue_script.parse_args(run_args(tiny_bert, data_files, tmp_path / "ratio", "--weight_planes_schedule",
                                           "2,1", "--plane_anneal_ratio", "0.5"))
    plan = glue_script.plan_run(args)
    runs = [run for _, run in plan.stages] + [plan.final]
    assert [(run.setup.training.plane_anneal_steps, run.setup.training.plane_anneal_ratio) for run in runs] == [
        (None, None), (None, None), (None, 0.5)]


def test_plane_anneal_steps_the_final_model_down_from_the_two_plane_stage(tiny_bert, data_files, tmp_path):
    """`--plane_anneal_steps 2` after a two-plane stage: the final run starts with the stage's function (its second
    plane weighted 1) and ends 1-bit, packed; it is a setting of the final run's checkpoints, not of the stage."""
    out = tmp_path / "anneal"
    results = glue_script.main(run_args(tiny_bert, data_files, out, "--teacher_model_name_or_path", "none",
                                        "--weight_planes_schedule", "2,1", "--plane_anneal_steps", "2"))
    assert results["completed_steps"] == 4
    assert json.loads((out / "stage_w2" / "stage.json").read_text())["settings"]["plane_anneal_steps"] is None
    packed = AutoModelForSequenceClassification.from_pretrained(out)
    assert packed.is_packed and "W1A1" in repr(packed.bert.encoder.layer[0].attention.self.query)
    with pytest.raises(ValueError, match=re.escape("TrainingConfig.plane_anneal_steps=5 is more than "
                                                   "max_train_steps=4")):  # refused before any work
        glue_script.main(run_args(tiny_bert, data_files, tmp_path / "long", "--teacher_model_name_or_path", "none",
                                  "--plane_anneal_steps", "5"))
    assert not (tmp_path / "long").exists()
