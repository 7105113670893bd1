"""End-to-end tests of scripts/vit.py on a tiny ViT (hidden 32, 2 layers, 8x8 images, patch 4) and tiny generated
image datasets in each input form (offline, CPU, `main()` in-process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import surge_hf  # noqa: F401  (registers the SURGE classes with the Auto classes)
from conftest import launch_two_cpu_processes, load_script
from surge_hf import BinaryConv2d, ShortcutLinear, SurgeViTForImageClassification
from surge_hf.data.image import load_image_classification_data
from surge_hf.data.image_processing import ImageCollator
from surge_hf.training import cli
from surge_hf.training.checkpointing import CheckpointError
from surge_hf.training.stages import StageError, content_digest

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["dark", "mid", "light"]
SIZES = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=48,patch_size=4"


vit_script = load_script("vit")



def images(count: int, seed: int, mode: str = "RGB", size: int = 8) -> tuple[list[np.ndarray], list[int]]:
    """uint8 images whose brightness depends on the class (so the task is learnable) and their labels."""
    rng = np.random.default_rng(seed)
    labels = [int(label) for label in rng.integers(0, len(CLASSES), count)]
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return [np.clip(rng.normal(50 + 75 * label, 30, shape), 0, 255).astype(np.uint8) for label in labels], labels


def as_dataset(pixels: list, labels: list, label_feature=None) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(),
                                  "label": label_feature or datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": pixels, "label": labels}, features=features)


@pytest.fixture(scope="module")
def disk_data(tmp_path_factory) -> Path:
    """save_to_disk form: RGB 8x8, train 24 / validation 8."""
    path = tmp_path_factory.mktemp("data") / "disk"
    datasets.DatasetDict({"train": as_dataset(*images(24, 0)), "validation": as_dataset(*images(8, 1))}).save_to_disk(
        str(path))
    return path


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    """imagefolder form: grayscale 8x8 PNGs under train/<class>/ and validation/<class>/."""
    root = tmp_path_factory.mktemp("data") / "folder"
    for split, count, seed in (("train", 12, 2), ("validation", 6, 3)):
        pixels, labels = images(count, seed, mode="L")
        for index, (array, label) in enumerate(zip(pixels, labels)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array, mode="L").save(folder / f"{index}.png")
    return root


def run_args(data: Path | str, output_dir: Path, *extra: str) -> list[str]:
    return ["--dataset", str(data), "--output_dir", str(output_dir), "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--logging_steps", "2", "--seed", "3", *extra]


SURGE_RUN = ("--config", SIZES, "--max_train_steps", "8", "--checkpointing_steps", "3", "--checkpoints_total_limit",
             "3", "--crop_padding", "1",
             "--horizontal_flip", "--mixup_alpha", "0.4", "--binary_patch_embedding")


@pytest.fixture(scope="module")
def surge_run(disk_data, tmp_path_factory) -> tuple[dict, Path]:
    """8 steps (6 per epoch) of SURGE with a binary patch embedding and augmentation, checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("runs") / "surge"
    return vit_script.main(run_args(disk_data, out, *SURGE_RUN)), out


def test_save_to_disk_run_writes_every_output(surge_run):
    results, out = surge_run
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "all_results.json",
                 "training_history.json", "README.md", "train_state/model.safetensors"):
        assert (out / name).is_file(), name
    # Every 3 steps and at the last one.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6", "step_8"]
    assert json.loads((out / "all_results.json").read_text())["eval"] == results["eval"]
    assert list(results["eval"]) == ["validation"] and results["completed_steps"] == 8
    assert results["recipe"]["target_modules"].endswith(r"|(?:.*\.)?patch_embeddings\.projection")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["image_size"], config["num_channels"]) == ("surge_vit", 8, 3)
    assert config["id2label"] == {"0": "dark", "1": "mid", "2": "light"}
    card = (out / "README.md").read_text()
    assert "AutoModelForImageClassification" in card and "image-classification" in card


def test_saved_model_and_processor_reproduce_the_evaluation(surge_run, disk_data):
    results, out = surge_run
    packed = AutoModelForImageClassification.from_pretrained(out)
    assert type(packed) is SurgeViTForImageClassification and packed.is_packed
    assert isinstance(packed.vit.embeddings.patch_embeddings.projection, BinaryConv2d)
    finalized = AutoModelForImageClassification.from_pretrained(out / "train_state").finalize()

    validation = datasets.load_from_disk(str(disk_data))["validation"]
    processor = AutoImageProcessor.from_pretrained(out)
    inputs = processor(images=[row["image"] for row in validation], return_tensors="pt")
    info = load_image_classification_data(str(disk_data)).info
    collated = ImageCollator(info, processor.image_mean, processor.image_std)(list(validation))
    torch.testing.assert_close(inputs["pixel_values"], collated["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = packed(**inputs).logits
        assert torch.equal(logits, finalized(**inputs).logits)
    accuracy = (logits.argmax(-1) == torch.tensor(validation["label"])).float().mean().item()
    assert accuracy == results["eval"]["validation"]["accuracy"]


def test_resumed_run_ends_exactly_like_the_uninterrupted_run(surge_run, disk_data, tmp_path):
    reference, full = surge_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    resumed = vit_script.main(run_args(disk_data, resumed_dir, *SURGE_RUN, "--resume_from_checkpoint",
                                       str(resumed_dir / "checkpoints" / "step_3")))
    assert resumed["eval"] == reference["eval"]
    weights, expected = (load_file(d / "train_state" / "model.safetensors") for d in (resumed_dir, full))
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[key], expected[key]) for key in expected)

    # Identical history, except the sign-flip diagnostic of the first log after resuming (its sign snapshot from the
    # previous log is not checkpointed, so it reads 0.0).
    def comparable(path: Path) -> list[dict]:
        history = json.loads((path / "training_history.json").read_text())
        return [{k: v for k, v in entry.items() if k not in ("layers", "mean_sign_flip_ratio")} for entry in history]

    assert comparable(resumed_dir) == comparable(full)


def test_imagefolder_full_precision_then_binary_student_from_the_checkpoint(folder_data, tmp_path):
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({key: int(value) for key, value in (item.split("=") for item in SIZES.split(","))}))
    teacher_dir = tmp_path / "teacher"
    cache = ("--cache_dir", str(tmp_path / "cache"))
    teacher = vit_script.main(run_args(folder_data, teacher_dir, *cache, "--config", str(sizes), "--binarize", "none",
                                       "--max_train_steps", "2"))
    assert teacher["recipe"] is None and list(teacher["eval"]) == ["validation"]
    model = AutoModelForImageClassification.from_pretrained(teacher_dir)
    assert type(model) is ViTForImageClassification and model.config.num_channels == 1
    assert not (teacher_dir / "train_state").exists()

    student_dir = tmp_path / "student"
    student = vit_script.main(run_args(folder_data, student_dir, *cache, "--model_name_or_path", str(teacher_dir),
                                       "--binarize", "ste", "--teacher_model_name_or_path", str(teacher_dir),
                                       "--distill_temperature", "2", "--max_train_steps", "2"))
    assert student["recipe"]["compensator"] == "ste"
    assert student["distillation"] == {"temperature": 2.0, "label_weight": 0.0, "logits_weight": 1.0,
                                       "hidden_states_weight": 0.0, "hidden_states_loss": "mse",
                                       "hidden_relations_weight": 0.0, "attentions_weight": 0.0,
                                       "embedding_mixup_alpha": 0.0, "mask_padding": False}
    processors = [json.loads((d / "preprocessor_config.json").read_text()) for d in (teacher_dir, student_dir)]
    assert processors[1]["image_mean"] == processors[0]["image_mean"]  # the checkpoint's normalisation is kept
    assert AutoModelForImageClassification.from_pretrained(student_dir).is_packed


def test_checkpoint_with_other_head_and_rgb_input_adapts_the_data(folder_data, tmp_path):
    """A 5-class RGB checkpoint without an image processor, on 3-class grayscale data: the images are converted to
    RGB, the head is replaced, the mean/std come from the data, and the backbone weights are the checkpoint's."""
    checkpoint = tmp_path / "rgb5"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=48, image_size=8, patch_size=4, num_labels=5)
                              ).save_pretrained(checkpoint)
    out = tmp_path / "out"
    results = vit_script.main(run_args(folder_data, out, "--cache_dir", str(tmp_path / "cache"), "--model_name_or_path",
                                       str(checkpoint), "--binarize", "ste", "--max_train_steps", "1",
                                       "--learning_rate", "1e-9"))
    assert results["completed_steps"] == 1
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["do_convert_rgb"] is True and len(processor["image_mean"]) == 3
    config = json.loads((out / "config.json").read_text())
    assert (config["num_channels"], config["id2label"]) == (3, {"0": "dark", "1": "light", "2": "mid"})
    trained = load_file(out / "train_state" / "model.safetensors")
    start = load_file(checkpoint / "model.safetensors")
    key = "vit.embeddings.patch_embeddings.projection.weight"
    torch.testing.assert_close(trained[key], start[key], rtol=0, atol=1e-6)


def test_hub_dataset_name_goes_to_load_dataset(monkeypatch, tmp_path):
    calls = []

    class Reached(Exception):
        pass

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise Reached

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "out"
    with pytest.raises(Reached):
        vit_script.main(run_args("someone/tiny-images", out, "--dataset_config_name", "small", "--config", SIZES))
    assert calls == [(("someone/tiny-images", "small"), {"cache_dir": None})]
    assert not out.exists()


def _bad_dataset(kind: str, path: Path) -> Path:
    pixels, labels = images(8, 4)
    if kind == "mixed_sizes":
        pixels[5] = images(1, 5, size=12)[0][0]
    elif kind == "mixed_modes":
        pixels[5] = images(1, 5, mode="L")[0][0]
    if kind == "string_labels":
        dataset = as_dataset(pixels, [CLASSES[label] for label in labels], datasets.Value("string"))
    else:
        dataset = as_dataset(pixels, labels)
    datasets.DatasetDict({"train": dataset, "validation": dataset}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "extra", "error", "message"),
    [
        ("mixed_sizes", (), ValueError, r"images in column 'image' have mixed sizes \(\(8, 8\) at row 0 of split "
                                        r"'train', \(12, 12\) at row 5 of split 'train'"),
        ("mixed_modes", (), ValueError, r"images in column 'image' have mixed modes \('RGB' at row 0 of split "
                                        r"'train', 'L' at row 5"),
        ("string_labels", (), ValueError, r"label column 'label' has type string; labels must be integers or a "
                                          r"ClassLabel"),
        ("good", ("--image_column", "photo"), ValueError,
         r"image column 'photo' not found; the dataset has columns \['image', 'label'\]"),
        ("missing", (), FileNotFoundError, r"dataset path '.*missing' does not exist"),
        ("good", ("--push_to_hub",), ValueError, r"HubConfig.push_to_hub needs HubConfig.hub_model_id"),
        ("good", ("--binarize", "none", "--binary_patch_embedding"), ValueError,
         r"--binary_patch_embedding needs a binarization recipe"),
        ("good", ("--config", SIZES, "--model_name_or_path", "x"), ValueError, r"Pass exactly one of --config"),
        ("good", ("--config", "hidden_size=32,image_size=16"), ValueError,
         r"--config sets \['image_size'\], which come from the data"),
        ("good", ("--config", "hidden_size=32,hidden_szie=8"), ValueError,
         r"--config has unknown ViTConfig field\(s\) \['hidden_szie'\]"),
        ("good", ("--config", "hidden_size=30,num_attention_heads=4"), ValueError,
         r"hidden_size=30 is not a multiple of num_attention_heads=4"),
        ("good", ("--config", "patch_size=3"), ValueError, r"image size \(8, 8\) is not a multiple of patch_size 3"),
        ("good", ("--train_teacher", "resnet", "--teacher_model_name_or_path", "t"), ValueError,
         r"--train_teacher trains a teacher, --teacher_model_name_or_path names one; pass only one"),
        ("good", ("--recipe", "binary-vit", "--teacher_num_train_epochs", "0"), ValueError,
         r"--teacher_num_train_epochs must be >= 1, got 0"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, kind, extra, error, message):
    data = tmp_path / kind if kind == "missing" else _bad_dataset(kind, tmp_path / kind)
    out = tmp_path / "out"
    config = () if any(flag in extra for flag in ("--config", "--model_name_or_path")) else ("--config", SIZES)
    with pytest.raises(error, match=message):
        vit_script.main(run_args(data, out, *config, *extra))
    assert not out.exists()


def test_teacher_for_other_classes_fails_before_training(disk_data, tmp_path):
    teacher_dir = tmp_path / "teacher"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=48, image_size=8, patch_size=4, num_labels=4)
                              ).save_pretrained(teacher_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"predicts 4 classes .* the data has \{'dark': 0, 'mid': 1, 'light': 2\}"):
        vit_script.main(run_args(disk_data, out, "--config", SIZES, "--teacher_model_name_or_path", str(teacher_dir)))
    assert not out.exists()


def test_teacher_of_another_architecture_size_and_channels_is_adapted(folder_data, tmp_path):
    """A 3-channel 16x16 ResNet teacher for the grayscale 8x8 student: logit distillation through the adapter."""
    teacher_dir = tmp_path / "teacher"
    ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1],
                                              num_labels=3)).save_pretrained(teacher_dir)
    results = vit_script.main(run_args(folder_data, tmp_path / "out", "--config", SIZES, "--max_train_steps", "2",
                                       "--binarize", "ste", "--teacher_model_name_or_path", str(teacher_dir)))
    assert results["distillation"]["logits_weight"] == 1.0 and results["completed_steps"] == 2


def test_binary_vit_recipe_trains_a_resnet_teacher_first(disk_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    sizes = SIZES.replace("intermediate_size=48", "intermediate_size=64")  # shortcuts need integer width ratios
    results = vit_script.main(run_args(disk_data, out, "--config", sizes, "--recipe", "binary-vit",
                                       "--num_train_epochs", "1", "--teacher_num_train_epochs", "2"))
    teacher = json.loads((out / "teacher" / "all_results.json").read_text())
    assert teacher["completed_steps"] == 12 and 0 <= teacher["eval"]["validation"]["accuracy"] <= 1
    assert AutoModelForImageClassification.from_pretrained(out / "teacher").config.model_type == "resnet"
    assert results["recipe"]["shortcuts"] and results["recipe"]["eta"] == 0.5
    assert (results["distillation"]["logits_weight"], results["distillation"]["label_weight"]) == (1.0, 0.0)
    assert results["completed_steps"] == 6
    packed = AutoModelForImageClassification.from_pretrained(out)
    assert packed.is_packed and isinstance(packed.vit.layers[0].mlp.fc1, ShortcutLinear)
    card = (out / "README.md").read_text()
    assert "| recipe preset | binary-vit |" in card and "--recipe binary-vit" in card
    again = vit_script.main(run_args(disk_data, out, "--config", sizes, "--recipe", "binary-vit",
                                     "--max_train_steps", "1", "--teacher_num_train_epochs", "2",
                                     "--overwrite_output_dir"))
    assert json.loads((out / "teacher" / "all_results.json").read_text()) == teacher  # reused, not retrained
    assert again["completed_steps"] == 1
    # A teacher of other settings is never reused: refused before any work, or trained again when overwriting.
    other_teacher = ("--config", sizes, "--recipe", "binary-vit", "--max_train_steps", "1",
                     "--teacher_num_train_epochs", "1")
    shutil.copytree(out / "teacher", tmp_path / "left" / "teacher")
    monkeypatch.setattr(vit_script, "load_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(StageError, match=r"teacher holds a stage made with other settings \(num_train_epochs: "
                                         r"recorded 2, now 1\), so it is not this command's resnet teacher stage"):
        vit_script.main(run_args(disk_data, tmp_path / "left", *other_teacher))
    monkeypatch.undo()
    vit_script.main(run_args(disk_data, out, *other_teacher, "--overwrite_output_dir"))
    assert json.loads((out / "teacher" / "all_results.json").read_text())["completed_steps"] == 6


def test_binary_vit_recipe_sets_defaults_that_flags_override():
    args = vit_script.parse_args(["--dataset", "d", "--output_dir", "o", "--config", SIZES, "--recipe", "binary-vit"])
    assert (args.shortcuts, args.weight_decay, args.lr_scheduler_type, args.train_teacher) == (
        True, 0.0, "cosine", "resnet")
    args = vit_script.parse_args(["--dataset", "d", "--output_dir", "o", "--config", SIZES, "--recipe", "binary-vit",
                                  "--no-shortcuts", "--weight_decay", "0.05", "--teacher_model_name_or_path", "t"])
    assert (args.shortcuts, args.weight_decay, args.train_teacher) == (False, 0.05, "none")
    args = vit_script.parse_args(["--dataset", "d", "--output_dir", "o", "--config", SIZES])
    assert (args.shortcuts, args.weight_decay, args.train_teacher) == (None, 0.01, "none")


def test_binary_vit_recipe_resolves_to_exactly_the_measured_recipe():
    """The preset is what the ladder measured (benchmarks/accuracy.py, vision suite cpu_ladder): a change of a
    library default must not move it."""
    args = vit_script.parse_args(["--dataset", "d", "--output_dir", "o", "--config", SIZES, "--recipe", "binary-vit"])
    assert cli.recipe_from_args(args).to_dict() == {
        "target_modules": None, "exclude_modules": None, "binarize_weights": True, "binarize_activations": True,
        "weight_scale": "channel", "activation_binarizer": "rsign", "activation_bits": 1, "weight_planes": 1,
        "unsigned_activation_modules": None, "learnable_weight_scale": False, "surrogate": "clipped_ste",
        "swish_beta": 5.0, "compensator": "surge", "eta": 0.5, "aux_weight": "separate", "lambda_placement": "fork",
        "scale_aux_grad": False, "aux_loss_weight": 0.0, "eps": 1e-8, "shortcuts": True, "shortcut_gate_init": 1.0,
        "binarize_attention": False, "attention_alpha_init": 0.05, "version": 1,
    }
    training = cli.training_config_from_args(args)
    assert (training.calibrate_activations, training.weight_decay, training.lr_scheduler_type, training.learning_rate,
            args.distill_logits_weight, args.distill_label_weight, args.train_teacher) == (
        False, 0.0, "cosine", 1e-3, 1.0, 0.0, "resnet")


def test_two_cpu_processes_with_accelerate_launch(disk_data, tmp_path):
    """Data-parallel training on two real CPU ranks: 24 images, batch 4 per rank, so 3 steps per epoch."""
    out = tmp_path / "ddp"
    completed = launch_two_cpu_processes("vit", run_args(disk_data, out, "--config", SIZES, "--num_train_epochs", "2"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert (results["num_processes"], results["completed_steps"]) == (2, 6)
    assert AutoModelForImageClassification.from_pretrained(out).is_packed


def test_resume_with_another_augmentation_is_refused(surge_run, disk_data, tmp_path):
    _, full = surge_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    changed = [("0" if value == "1" and flag == "--crop_padding" else value)
               for flag, value in zip(("",) + SURGE_RUN, SURGE_RUN)]
    with pytest.raises(CheckpointError, match=r"augmentation: checkpoint \{.*\"crop_padding\": 1.*\}, now "
                                              r"\{.*\"crop_padding\": 0"):
        vit_script.main(run_args(disk_data, resumed_dir, *changed, "--resume_from_checkpoint", "latest"))


def test_resume_with_other_images_is_refused(surge_run, disk_data, tmp_path):
    _, full = surge_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    copy = tmp_path / "copy"
    shutil.copytree(disk_data, copy)
    other = tmp_path / "other"
    datasets.DatasetDict({"train": as_dataset(*images(24, 5)), "validation": as_dataset(*images(8, 1))}).save_to_disk(
        str(other))
    args = [*SURGE_RUN, "--resume_from_checkpoint", "latest"]
    with pytest.raises(CheckpointError, match=r"data: checkpoint \{\"dataset\": \"sha256:[0-9a-f]{16}\", .*\}, now "
                                              r"\{\"dataset\": \"sha256:[0-9a-f]{16}\""):
        vit_script.main(run_args(other, resumed_dir, *args))
    assert content_digest(copy) == content_digest(disk_data) != content_digest(other)  # content, not path


def test_output_dir_equal_to_the_checkpoint_is_refused(surge_run, disk_data, tmp_path):
    _, full = surge_run
    with pytest.raises(ValueError, match=r"would overwrite --model_name_or_path .*: the run would replace the weights"):
        vit_script.main(run_args(disk_data, full, "--model_name_or_path", str(full), "--overwrite_output_dir"))
