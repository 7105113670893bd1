"""The training loop's building blocks: weight-decay groups, config checks, output-folder rules and checkpoints."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

import surge_hf
from surge_hf.binarize import surge_layers
from surge_hf.training import output_dir
from surge_hf.training.checkpointing import (
    STATE_FILE,
    CheckpointError,
    check_checkpoint,
    latest_checkpoint,
    save_checkpoint,
)
from surge_hf.training.loop import (
    TrainingConfig,
    build_accelerator,
    decay_parameter_names,
    parameter_groups,
    train,
)
from surge_hf.training.output_dir import check_output_dir


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=16, image_size=8, patch_size=4, num_labels=3))


def test_weight_decay_skips_vit_layernorms_biases_and_binarizer_parameters():
    model = surge_hf.binarize(tiny_vit(), surge_hf.SurgeConfig(activation_binarizer="elastic",
                                                               learnable_weight_scale=True))
    names = dict(model.named_parameters())
    decayed = decay_parameter_names(model)
    # Decayed: matrices and convolution kernels (latent, auxiliary), the class token and the position embeddings.
    expected = {name for name, param in names.items()
                if param.dim() > 1 and "layernorm" not in name} | {"vit.embeddings.cls_token",
                                                                   "vit.embeddings.position_embeddings"}
    assert decayed == expected
    assert "vit.layers.0.layernorm_before.weight" in names and "vit.layers.0.layernorm_after.weight" in names
    assert {"vit.layers.0.attention.q_proj.input_scale", "vit.layers.0.attention.q_proj.weight_scale"} < set(names)
    groups = parameter_groups(model, 0.05)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {id(names[name]) for name in expected}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)


def test_binary_weight_decay_gives_latent_weights_their_own_decay():
    model = surge_hf.binarize(tiny_vit(), surge_hf.SurgeConfig(activation_binarizer="elastic",
                                                               learnable_weight_scale=True))
    latent = {id(layer.weight) for _, layer in surge_hf.surge_layers(model)}
    decayed_ids = {id(param) for name, param in model.named_parameters() if name in decay_parameter_names(model)}
    groups = parameter_groups(model, 0.05, binary_weight_decay=0.0)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0, 0.0]
    assert "lr" not in groups[2] and {id(p) for p in groups[2]["params"]} == latent
    assert {id(p) for p in groups[0]["params"]} == decayed_ids - latent
    # with their own learning rate: still the decay asked for; the quantizers get a group without decay
    groups = parameter_groups(model, 0.05, latent_weight_learning_rate=1e-3, quantizer_learning_rate=2e-3,
                              binary_weight_decay=0.2)
    assert [(group["weight_decay"], group.get("lr")) for group in groups] == [(0.05, None), (0.0, None),
                                                                             (0.2, 1e-3), (0.0, 2e-3)]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


def test_weight_decay_skips_resnet_batchnorms():
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      layer_type="basic", num_labels=3))
    names = [name for name, _ in model.named_parameters()]
    assert "resnet.embedder.embedder.normalization.weight" in names
    assert decay_parameter_names(model) == {name for name in names
                                            if name.endswith("convolution.weight") or name == "classifier.1.weight"}


def test_weight_decay_skips_model_specific_norm_classes():
    class ScaleNorm(torch.nn.Module):  # a model's own norm class, not an nn.LayerNorm
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(4))

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ScaleNorm())
    assert decay_parameter_names(model) == {"0.weight"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"learning_rate": 0.0}, r"TrainingConfig.learning_rate must be > 0, got 0.0"),
    ({"per_device_train_batch_size": 0}, r"TrainingConfig.per_device_train_batch_size must be > 0, got 0"),
    ({"max_grad_norm": -1.0}, r"TrainingConfig.max_grad_norm must be > 0, got -1.0"),
    ({"weight_decay": -0.1}, r"TrainingConfig.weight_decay must be >= 0, got -0.1"),
    ({"binary_weight_decay": -0.1}, r"TrainingConfig.binary_weight_decay must be >= 0, got -0.1"),
])
def test_training_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(output_dir="out", **changes)


def test_run_settings_leave_out_bookkeeping():
    settings = TrainingConfig(output_dir="a", logging_steps=3, checkpointing_steps=2, learning_rate=0.5).run_settings()
    assert settings["learning_rate"] == 0.5 and settings["seed"] == 42
    assert not {"output_dir", "logging_steps", "checkpointing_steps", "resume_from_checkpoint"} & set(settings)


# ---------------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------------


def test_output_dir_may_not_be_or_rewrite_a_model_the_run_reads(tmp_path):
    for model in (tmp_path / "model", tmp_path / "train_state", tmp_path / "checkpoints" / "step_2"):
        model.mkdir(parents=True)
        output_dir = model if model.name == "model" else tmp_path
        with pytest.raises(ValueError, match=r"would overwrite --teacher_model_name_or_path .*: the run would "
                                             r"replace the weights it starts from"):
            check_output_dir(output_dir, inputs={"--teacher_model_name_or_path": str(model)}, overwrite=True)
    # An earlier stage's model in another subfolder, a Hub id, a new folder: fine.
    check_output_dir(tmp_path, inputs={"--model_name_or_path": str(tmp_path / "model"), "--x": "org/id"},
                     overwrite=True)
    check_output_dir(tmp_path / "new", inputs={"--model_name_or_path": str(tmp_path / "model")})


def test_non_empty_output_dir_needs_overwrite_or_resume(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"is not empty \(README.md\).*--overwrite_output_dir"):
        check_output_dir(tmp_path)
    check_output_dir(tmp_path, overwrite=True)
    check_output_dir(tmp_path, resume=True)
    check_output_dir(tmp_path / "fresh")  # nothing is created
    assert not (tmp_path / "fresh").exists()
    stage = tmp_path / "stages"
    (stage / "teacher").mkdir(parents=True)
    check_output_dir(stage, own_folders=("teacher",))  # the run's own earlier stage does not count


def test_output_dir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"cannot be created: .*file is a file"):
        check_output_dir(blocker / "out")
    with pytest.raises(NotADirectoryError, match=r"exists and is not a folder"):
        check_output_dir(blocker)


def test_output_dir_without_write_permission_is_refused(tmp_path, monkeypatch):
    """As seen by a user without write access (root would pass the permission bits, hence the stand-in)."""
    monkeypatch.setattr(output_dir.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=rf"--output_dir {tmp_path} is not writable"):
        check_output_dir(tmp_path)
    with pytest.raises(PermissionError, match=rf"cannot be created: {tmp_path} is not writable"):
        check_output_dir(tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"is not writable"):
            check_output_dir(folder)
        with pytest.raises(PermissionError, match=r"cannot be created: .*ro is not writable"):
            check_output_dir(folder / "out")
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def accelerator() -> Accelerator:
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    return accelerator


def state(step: int, run_id: str, **settings) -> dict:
    return {"completed_steps": step, "history": [], "run_id": run_id, "settings": settings}


def test_a_run_prunes_only_its_own_checkpoints_and_latest_is_the_newest_written(accelerator, tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(accelerator, tmp_path, step, state(step, "other"), keep=None)
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, state(step, "mine"), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_15", "step_2", "step_3",
                                                                      "step_5"]
    assert latest_checkpoint(tmp_path).name == "step_3"


def test_resume_with_other_settings_is_refused(accelerator, tmp_path):
    path = save_checkpoint(accelerator, tmp_path, 2, state(2, "a", script="glue", learning_rate=1e-3, seed=3), None)
    assert check_checkpoint(path, {"script": "glue", "learning_rate": 1e-3, "seed": 3})["completed_steps"] == 2
    with pytest.raises(CheckpointError, match=r"other settings \(script: checkpoint \"glue\", now \"vit\"; "
                                              r"learning_rate: checkpoint 0.001, now 0.002\)"):
        check_checkpoint(path, {"script": "vit", "learning_rate": 2e-3, "seed": 3})


def test_corrupt_checkpoint_names_the_file(accelerator, tmp_path):
    path = save_checkpoint(accelerator, tmp_path, 2, state(2, "a"), keep=None)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=rf"Checkpoint .*step_2 is corrupt: {weights} does not load"):
        check_checkpoint(path, {})
    (path / STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"corrupt: {path / STATE_FILE} cannot be read"):
        check_checkpoint(path, {})
    (path / STATE_FILE).write_text(json.dumps({"history": []}))
    with pytest.raises(CheckpointError, match=r"has no completed_steps"):
        check_checkpoint(Path(path), {})


# Stepping down from two weight planes (TrainingConfig.plane_anneal_steps)
# ---------------------------------------------------------------------------------------------------------------


def anneal_run(folder: Path, model: torch.nn.Module, **changes) -> tuple[list[float], TrainingConfig]:
    """Train a tiny binary ViT for 6 steps with plane_anneal_steps=4; returns the second-plane weight that each
    training forward of one layer saw."""
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 8, 8, generator=generator), "labels": i % 3} for i in range(16)]
    config = TrainingConfig(**{"output_dir": str(folder), "max_train_steps": 6, "plane_anneal_steps": 4,
                               "learning_rate": 1e-3, "per_device_train_batch_size": 4, **changes})
    seen: list[float] = []
    for _, layer in list(surge_layers(model))[:1]:
        layer.register_forward_pre_hook(lambda module, _: seen.append(module.second_plane_weight) if module.training
                                        else None)
    train(build_accelerator(config), model, DataLoader(data, batch_size=4, shuffle=True),
          {"validation": DataLoader(data[:4], batch_size=4)}, config,
          lambda predictions, labels: {"accuracy": float((predictions == labels).mean())})
    return seen, config


def binary_vit() -> torch.nn.Module:
    return surge_hf.binarize(tiny_vit(), surge_hf.SurgeConfig(compensator="ste", binarize_activations=False))


def test_plane_anneal_weights_the_second_plane_down_to_zero_and_resumes_exactly(tmp_path):
    model = binary_vit()
    seen, _ = anneal_run(tmp_path / "full", model, checkpointing_steps=2, checkpoints_total_limit=None)
    assert seen == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert all(layer.second_plane_weight == 0.0 for _, layer in surge_layers(model))
    surge_hf.finalize(model)  # 1-bit at the end: it packs
    resumed_model = binary_vit()
    resumed, _ = anneal_run(tmp_path / "full", resumed_model, checkpointing_steps=2, checkpoints_total_limit=None,
                            resume_from_checkpoint=str(tmp_path / "full" / "checkpoints" / "step_2"))
    assert resumed == [0.5, 0.25, 0.0, 0.0]
    surge_hf.finalize(resumed_model)
    reference = binary_vit()
    anneal_run(tmp_path / "again", reference)
    assert all(torch.equal(a, b) for a, b in zip(surge_hf.finalize(reference).state_dict().values(),
                                                 resumed_model.state_dict().values(), strict=True))


def test_plane_anneal_is_refused_past_the_run_and_without_one_plane_layers(tmp_path):
    # a run of epochs (4 steps) learns its length from the data, before its first step
    with pytest.raises(ValueError, match=re.escape("TrainingConfig.plane_anneal_steps=7 is more than the run's 4 "
                                                   "steps: the model would end with its second weight plane still "
                                                   "weighted in, not 1-bit. Pass at most 4.")):
        anneal_run(tmp_path / "a", binary_vit(), plane_anneal_steps=7, max_train_steps=None, num_train_epochs=1)
    with pytest.raises(ValueError, match=re.escape("TrainingConfig.plane_anneal_steps=7 is more than "
                                                   "max_train_steps=6")):
        TrainingConfig(output_dir="o", plane_anneal_steps=7, max_train_steps=6)
    with pytest.raises(ValueError, match=re.escape("this model has no SURGE layer with binary weights and "
                                                   "weight_planes=1; drop plane_anneal_steps (or "
                                                   "plane_anneal_ratio).")):
        anneal_run(tmp_path / "b", tiny_vit())
    with pytest.raises(ValueError, match=re.escape("TrainingConfig.plane_anneal_steps must be > 0, got 0")):
        TrainingConfig(output_dir="o", plane_anneal_steps=0)


def test_plane_anneal_ratio_follows_the_run_length(tmp_path):
    """ceil(ratio x steps): 0.5 of a 6-step run anneals over 3 steps; 0.6 of a 4-step run of epochs over
    ceil(2.4) = 3."""
    seen, _ = anneal_run(tmp_path / "steps", binary_vit(), plane_anneal_steps=None, plane_anneal_ratio=0.5)
    assert seen == [1.0, 1 - 1 / 3, 1 - 2 / 3, 0.0, 0.0, 0.0]
    seen, _ = anneal_run(tmp_path / "epochs", binary_vit(), plane_anneal_steps=None, plane_anneal_ratio=0.6,
                         max_train_steps=None, num_train_epochs=1)
    assert seen == [1.0, 1 - 1 / 3, 1 - 2 / 3, 0.0]
    config = TrainingConfig(output_dir="o", plane_anneal_ratio=1.0)
    assert [config.plane_anneal_length(n) for n in (1, 7, 1250)] == [1, 7, 1250]
    assert TrainingConfig(output_dir="o", plane_anneal_steps=625).plane_anneal_length(1250) == 625
    assert TrainingConfig(output_dir="o").plane_anneal_length(1250) is None


@pytest.mark.parametrize("changes, message", [
    ({"plane_anneal_ratio": 0.0}, "TrainingConfig.plane_anneal_ratio must be in (0, 1] (a fraction of the run's "
                                  "steps), got 0.0."),
    ({"plane_anneal_ratio": 1.5}, "TrainingConfig.plane_anneal_ratio must be in (0, 1] (a fraction of the run's "
                                  "steps), got 1.5."),
    ({"plane_anneal_ratio": 0.5, "plane_anneal_steps": 4}, "TrainingConfig.plane_anneal_steps and "
                                                           "plane_anneal_ratio both set the anneal's length: pass one "
                                                           "of them."),
])
def test_plane_anneal_ratio_is_checked(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainingConfig(output_dir="o", **changes)
