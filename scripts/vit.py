"""Train a binary (SURGE) ViT image classifier with Accelerate, from scratch or from a full-precision ViT.

    accelerate launch scripts/vit.py --dataset data/fashion_mnist_hf \\
        --config hidden_size=192,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,patch_size=4 \\
        --binarize surge --eta 0.5 --crop_padding 2 --horizontal_flip --output_dir out/fmnist-surge
    accelerate launch scripts/vit.py --dataset user/dataset --model_name_or_path google/vit-base-patch16-224 \\
        --binarize surge --output_dir out/vit-surge

`--dataset` is a Hub dataset name, an `imagefolder` directory (class_name/image.png) or a folder written by
`save_to_disk`. From scratch (`--config`), image size and channels come from the data; from a checkpoint, the images
are resized (and converted to RGB) to what the checkpoint expects. Augmentation (random crop with zero padding,
flip, mixup / cutmix) runs on tensors in plain torch. The image processor saved with the model reproduces the eval
transform, so `AutoImageProcessor` + `AutoModelForImageClassification` (after `import surge_hf`) predict as
evaluated. The recipe, distillation (logits), Accelerate and Hub flags are shared with `scripts/glue.py`
(`surge_hf.training.cli`). Every flag, file, image and label is checked before training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import surge_hf
from surge_hf.configuration_surge import DEFAULT_TARGET_MODULES
from surge_hf.data.image import (
    ImageClassificationData,
    ImageDataInfo,
    detect_dataset_source,
    load_image_classification_data,
)
from surge_hf.data.image_processing import ImageCollator, build_image_processor, compute_mean_std
from surge_hf.data.image_transforms import AugmentConfig
from surge_hf.data.metrics import compute_metrics
from surge_hf.modeling_surge_vit import SurgeViTForImageClassification
from surge_hf.training import cli
from surge_hf.training.compatibility import check_image_teacher, check_trainable_checkpoint
from surge_hf.training.export import export_run, push_run
from surge_hf.training.image_teachers import load_image_teacher, small_resnet_config
from surge_hf.training.loop import NO_PLANE_ANNEAL, TrainingConfig, build_accelerator, train
from surge_hf.training.output_dir import locked_output_dir
from surge_hf.training.stages import (
    PlannedStage,
    Stage,
    StageAction,
    content_digest,
    plan_stages,
    run_stages,
    stage_record,
)

# ViTConfig fields that the data decides (and that --config must not set).
DATA_FIELDS = ("image_size", "num_channels", "num_labels", "id2label", "label2id", "problem_type")
# The module name suffix of ViT's patch embedding convolution.
PATCH_EMBEDDING = "patch_embeddings.projection"
VIT_MODEL_TYPES = ("vit", "surge_vit")


def build_parser() -> argparse.ArgumentParser:
    """The script's flags, with their defaults (a `--recipe` preset's are set when parsed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="A Hub dataset name, an imagefolder directory, or a folder written by save_to_disk.")
    data.add_argument("--dataset_config_name", help="Configuration of a Hub dataset.")
    data.add_argument("--dataset_hub_id",
                      help="For the model card: the Hub id of the dataset a local --dataset is a copy of.")
    data.add_argument("--image_column", help="Default: image, img or pixel_values, else the first Image column.")
    data.add_argument("--label_column", help="Default: label or labels (integers or a ClassLabel).")
    data.add_argument("--train_split", default="train")
    data.add_argument("--eval_split", help="Default: validation/valid/val, else --validation_fraction of train.")
    data.add_argument("--validation_fraction", type=float, default=0.1)
    data.add_argument("--image_size", type=int, nargs="+", metavar="SIDE",
                      help="Resize every image to SIDE x SIDE (or HEIGHT WIDTH). Default: the data's (from "
                           "scratch) or the checkpoint's size.")
    data.add_argument("--convert_rgb", action="store_true", help="Convert grayscale images to RGB.")
    data.add_argument("--max_train_samples", type=int, help="Use only the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, help="Use only the first N evaluation examples.")
    data.add_argument("--mean_std_images", type=int, default=10_000,
                      help="Training images sampled to compute the normalisation mean/std (when the checkpoint "
                           "has no image processor to take them from).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--cache_dir", help="datasets cache folder (Hub and imagefolder loading).")
    augment = parser.add_argument_group("augmentation (training batches only)")
    augment.add_argument("--crop_padding", type=int, default=0, help="Random crop with this zero padding (0: off).")
    augment.add_argument("--horizontal_flip", action="store_true", help="Mirror each image with probability 0.5.")
    augment.add_argument("--mixup_alpha", type=float, default=0.0, help="Mixup Beta(alpha, alpha) (0: off).")
    augment.add_argument("--cutmix_alpha", type=float, default=0.0,
                         help="CutMix Beta(alpha, alpha) (0: off); with mixup, each batch takes one of the two.")
    model = parser.add_argument_group("model")
    model.add_argument("--config", help="Train from scratch: a JSON file or inline key=value,... of ViTConfig "
                                        "fields (hidden_size, num_hidden_layers, num_attention_heads, "
                                        "intermediate_size, patch_size, ...).")
    model.add_argument("--model_name_or_path", help="Start from this ViT checkpoint (Hub id or folder).")
    model.add_argument("--binary_patch_embedding", action="store_true",
                       help="Binarize the patch embedding convolution too (with the recipe's activation "
                            "binarizer, the input pixels are binarized as well).")
    cli.add_shared_arguments(parser, learning_rate=1e-3, batch_size=128, epochs=10, intermediate_distillation=False)
    add_binary_vit_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags of one command, under the defaults of its `--recipe` preset (flags given still win)."""
    args = cli.parse_with_recipe_preset(build_parser(), argv, RECIPE_PRESETS)
    if not args.push_only:
        validate_args(args)
    args.command = shlex.join(["accelerate", "launch", "scripts/vit.py", *(sys.argv[1:] if argv is None else argv)])
    return args


# -- binary-ViT recipe preset and teacher training -------------------------------------------------------------------
# `--recipe binary-vit`: the recipe the binary-ViT ladder in benchmarks/README.md measured (flags given explicitly
# still win), pinned whole (rsign activations, no calibration) so that a later change of a library default cannot
# move it. It leaves the compensator to --binarize (default surge). Without --teacher_model_name_or_path it also
# trains a small ResNet teacher first.
RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    "binary-vit": {"eta": 0.5, "shortcuts": True, "activation_binarizer": "rsign", "calibrate_activations": False,
                   "weight_decay": 0.0, "lr_scheduler_type": "cosine", "distill_logits_weight": 1.0,
                   "distill_label_weight": 0.0},
}
TEACHER_ARCHITECTURES = ("resnet", "none")
TEACHER_DIR = "teacher"
TEACHER_NOTE = (" Bound it with --teacher_num_train_epochs N, or skip it with --train_teacher none (no teacher) or "
                "--teacher_model_name_or_path PATH.")
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def add_binary_vit_arguments(parser: argparse.ArgumentParser) -> None:
    """`--recipe` and the flags that train a distillation teacher before the student."""
    group = parser.add_argument_group("binary-ViT recipe and teacher training")
    group.add_argument("--recipe", choices=list(RECIPE_PRESETS),
                       help="binary-vit: shortcuts around every binary Linear (with the --binarize compensator; "
                            "SURGE at eta 0.5 unless set), logit-only "
                            "distillation (from a small ResNet trained first unless --teacher_model_name_or_path is "
                            "given), weight decay 0, cosine decay, no dropout. Explicit flags override it.")
    group.add_argument("--train_teacher", choices=TEACHER_ARCHITECTURES,
                       help="resnet: first train a small full-precision ResNet on the same data (saved to "
                            "OUTPUT_DIR/teacher) and distil from it; none: no teacher. Default: resnet with "
                            "--recipe binary-vit and no --teacher_model_name_or_path, else none.")
    group.add_argument("--teacher_num_train_epochs", type=int,
                       help="Epochs of teacher training (default: --num_train_epochs).")
    group.add_argument("--teacher_learning_rate", type=float, default=1e-3)


def validate_teacher_args(args: argparse.Namespace) -> None:
    if args.train_teacher is None:
        wants_teacher = args.recipe == "binary-vit" and args.teacher_model_name_or_path is None
        args.train_teacher = "resnet" if wants_teacher else "none"
    if args.train_teacher != "none" and args.teacher_model_name_or_path is not None:
        raise ValueError("--train_teacher trains a teacher, --teacher_model_name_or_path names one; pass only one.")
    if args.teacher_num_train_epochs is not None and args.teacher_num_train_epochs < 1:
        raise ValueError(f"--teacher_num_train_epochs must be >= 1, got {args.teacher_num_train_epochs}.")


def teacher_training_config(args: argparse.Namespace, config: TrainingConfig) -> TrainingConfig:
    """The teacher's training: the student's, into OUTPUT_DIR/teacher, at the teacher's learning rate and epochs,
    without checkpoints (an interrupted teacher is trained again) or calibration."""
    return dataclasses.replace(
        config, output_dir=str(Path(args.output_dir) / TEACHER_DIR), learning_rate=args.teacher_learning_rate,
        max_train_steps=None, num_train_epochs=args.teacher_num_train_epochs or config.num_train_epochs,
        checkpointing_steps=None, resume_from_checkpoint=None, calibrate_activations=False,
        **NO_PLANE_ANNEAL)


def teacher_stage(args: argparse.Namespace, config: TrainingConfig) -> PlannedStage:
    """The `--train_teacher` stage, planned before any work (reuse a finished teacher that this command made, train it
    otherwise; `surge_hf.training.stages`). What trains it is set once the data is loaded (`train_teacher`)."""
    teacher_config = teacher_training_config(args, config)
    settings = teacher_config.run_settings({"script": "vit", "teacher": args.train_teacher, **data_settings(args)})
    stage = Stage(Path(teacher_config.output_dir), f"{args.train_teacher} teacher", stage_record(None, settings, None))
    planned = PlannedStage(stage, None, f"{teacher_config.num_train_epochs} epoch(s) at learning rate "
                                        f"{teacher_config.learning_rate:g}", f"{args.train_teacher} teacher",
                           TEACHER_NOTE)
    plan_stages([planned], overwrite=args.overwrite_output_dir)
    return planned


def train_teacher(args: argparse.Namespace, accelerator, config: TrainingConfig, info: ImageDataInfo,
                  loaders: dict[str, DataLoader], on_epoch_start, processor, stage: Stage,
                  action: StageAction) -> None:
    """Train the `--train_teacher` model on the student's data and inputs (an interrupted teacher, which writes no
    checkpoint, is trained again); save it, with the student's image `processor` and its metrics in
    all_results.json, to the folder of `stage`."""
    accelerator.wait_for_everyone()
    teacher = ResNetForImageClassification(small_resnet_config(info))
    result = train(accelerator, teacher, loaders["train"], {"validation": loaders["eval"]},
                   teacher_training_config(args, config), functools.partial(compute_metrics, "classification"),
                   on_epoch_start=on_epoch_start)
    if accelerator.is_main_process:
        accelerator.unwrap_model(teacher).save_pretrained(stage.folder)
        processor.save_pretrained(stage.folder)
        (stage.folder / "all_results.json").write_text(json.dumps(
            {"eval": result.metrics, "completed_steps": result.completed_steps}, indent=2))
    accelerator.wait_for_everyone()


# -- end of the binary-ViT block ---------------------------------------------------------------------------------------


def validate_args(args: argparse.Namespace) -> None:
    """Flag checks that need neither model nor data."""
    if args.output_dir is None:
        raise ValueError("--output_dir is required.")
    if (args.config is None) == (args.model_name_or_path is None):
        raise ValueError("Pass exactly one of --config (train from scratch) or --model_name_or_path (start from a "
                         "ViT checkpoint).")
    if args.binary_patch_embedding and args.binarize == "none":
        raise ValueError("--binary_patch_embedding needs a binarization recipe; drop it or pick --binarize surge, "
                         "fixed or ste.")
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise ValueError(f"--image_size takes SIDE or HEIGHT WIDTH, got {len(args.image_size)} values.")
    for name in ("max_train_samples", "max_eval_samples", "mean_std_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    cli.validate_common_args(args)
    validate_teacher_args(args)
    augment_config(args)  # validates the augmentation flags
    args.vit_fields = None if args.config is None else parse_vit_config(args.config)


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    return AugmentConfig(crop_padding=args.crop_padding, horizontal_flip=args.horizontal_flip,
                         mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha)


def _parse_value(text: str) -> Any:
    """A JSON scalar (`192`, `0.1`, `true`) or, failing that, the plain string (`gelu`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_vit_config(spec: str) -> dict[str, Any]:
    """The ViTConfig fields of `--config`: inline `key=value,key=value`, else a JSON file; checked against ViTConfig."""
    if "=" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--config {spec}: no such JSON file (or pass inline key=value,... fields).")
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"--config {spec} must hold a JSON object of ViTConfig fields.")
    else:
        fields = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--config entry {item!r} is not key=value; e.g. --config hidden_size=192,"
                                 "num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,patch_size=4")
            fields[key.strip()] = _parse_value(value.strip())
    from_data = sorted(set(fields) & set(DATA_FIELDS))
    if from_data:
        raise ValueError(f"--config sets {from_data}, which come from the data; drop them (use --image_size to "
                         "resize, --convert_rgb for 3 channels).")
    known = set(ViTConfig().to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--config has unknown ViTConfig field(s) {unknown}; size fields are hidden_size, "
                         "num_hidden_layers, num_attention_heads, intermediate_size, patch_size.")
    config = ViTConfig(**fields)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"--config: hidden_size={config.hidden_size} is not a multiple of num_attention_heads="
                         f"{config.num_attention_heads}.")
    return fields


def _side_pair(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def checkpoint_config(args: argparse.Namespace) -> ViTConfig | None:
    """The checkpoint's config, checked to be a ViT whose image size agrees with --image_size; None from scratch."""
    if args.model_name_or_path is None:
        return None
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    check_trainable_checkpoint(config, args.model_name_or_path)
    if config.model_type not in VIT_MODEL_TYPES:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path} is a {config.model_type!r} model; this "
                         "script trains ViT image classifiers (model_type 'vit' or 'surge_vit').")
    if args.image_size is not None and _side_pair(args.image_size) != _side_pair(config.image_size):
        raise ValueError(f"--image_size {args.image_size} differs from the checkpoint's image_size "
                         f"{config.image_size} (its position embeddings fit that size); drop --image_size.")
    return config


def load_data(args: argparse.Namespace, pretrained: ViTConfig | None) -> ImageClassificationData:
    """Load and check the data (resized and converted to what a checkpoint expects); keep the two columns used."""
    image_size = None if args.image_size is None else _side_pair(args.image_size)
    convert_rgb = args.convert_rgb
    if pretrained is not None:
        image_size = _side_pair(pretrained.image_size)
        convert_rgb = convert_rgb or pretrained.num_channels == 3
    data = load_image_classification_data(
        args.dataset, image_column=args.image_column, label_column=args.label_column, train_split=args.train_split,
        eval_split=args.eval_split, validation_fraction=args.validation_fraction, seed=args.seed,
        image_size=image_size, convert_rgb=convert_rgb, config_name=args.dataset_config_name, cache_dir=args.cache_dir,
    )
    info = data.info
    if pretrained is not None and pretrained.num_channels != info.num_channels:
        raise ValueError(f"--model_name_or_path expects {pretrained.num_channels} channel(s) but the images have "
                         f"{info.num_channels}; use a checkpoint for {info.num_channels}-channel images.")
    patch = pretrained.patch_size if pretrained is not None else ViTConfig(**args.vit_fields).patch_size
    if any(side % patch for side in info.image_size):
        raise ValueError(f"image size {info.image_size} is not a multiple of patch_size {patch}: pass --image_size "
                         "a multiple of it, or choose another patch_size.")
    columns = [info.image_column, info.label_column]
    data.train = data.train.select_columns(columns)
    data.eval = data.eval.select_columns(columns)
    if args.max_train_samples:
        data.train = data.train.select(range(min(args.max_train_samples, len(data.train))))
    if args.max_eval_samples:
        data.eval = data.eval.select(range(min(args.max_eval_samples, len(data.eval))))
    return data


def recipe_with_patch_embedding(surge_config: surge_hf.SurgeConfig) -> surge_hf.SurgeConfig:
    """The recipe with the patch embedding convolution added to its targets."""
    targets = surge_config.target_modules
    if targets is None:
        targets = DEFAULT_TARGET_MODULES["vit"]
    if isinstance(targets, str):
        targets = rf"(?:{targets})|(?:.*\.)?{re.escape(PATCH_EMBEDDING)}"
    else:
        targets = [*targets, PATCH_EMBEDDING]
    return surge_hf.SurgeConfig.from_dict({**surge_config.to_dict(), "target_modules": targets})


def load_student(args: argparse.Namespace, surge_config: surge_hf.SurgeConfig | None, info: ImageDataInfo,
                 pretrained: ViTConfig | None):
    """A SURGE ViT (or the plain ViT for `--binarize none`), from scratch or from the checkpoint's weights."""
    if pretrained is None:
        config = ViTConfig(**args.vit_fields, **info.model_config_kwargs())
        if surge_config is None:
            return ViTForImageClassification(config)
        vit_config = surge_hf.SurgeViTConfig.from_vit_config(config, surge_config=surge_config)
        return SurgeViTForImageClassification(vit_config)
    # Only the classification head can differ in size (the image geometry was checked against the data).
    kwargs = dict(id2label=info.id2label, label2id=info.label2id, dtype=torch.float32,  # id2label sets num_labels
                  problem_type="single_label_classification",
                  ignore_mismatched_sizes=pretrained.num_labels != info.num_labels,
                  **(NO_DROPOUT if args.recipe == "binary-vit" else {}))
    if surge_config is None:
        return ViTForImageClassification.from_pretrained(args.model_name_or_path, **kwargs)
    return SurgeViTForImageClassification.from_pretrained(args.model_name_or_path, surge=surge_config, **kwargs)


def normalization(args: argparse.Namespace, data: ImageClassificationData) -> tuple[tuple[float, ...], ...]:
    """Mean/std: the checkpoint's image processor's when it has one for these channels, else the training data's."""
    info = data.info
    if args.model_name_or_path is not None:
        try:
            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        except OSError:  # no preprocessor_config.json
            processor = None
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None and len(mean) == len(std) == info.num_channels:
            return tuple(mean), tuple(std)
    return compute_mean_std(data.train, info, max_images=args.mean_std_images, seed=args.seed)


def dataset_card_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Model-card dataset fields: the Hub id when known, else the local folder's name and form."""
    source = detect_dataset_source(args.dataset)
    name = args.dataset if source == "hub" else Path(args.dataset).resolve().name
    hub_id = args.dataset_hub_id or (args.dataset if source == "hub" else None)
    return {"dataset_name": name, "dataset_type": hub_id or ("imagefolder" if source == "imagefolder" else "arrow"),
            "dataset_config": args.dataset_config_name}


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags a run's checkpoints (and its teacher's stage record) hold: they change what it computes. The
    dataset is named by the content digest of its local files (or its Hub name)."""
    data = {"dataset": content_digest(args.dataset), "dataset_config_name": args.dataset_config_name,
            "train_split": args.train_split, "eval_split": args.eval_split}
    return {"image_size": args.image_size, "convert_rgb": args.convert_rgb,
            "augmentation": asdict(augment_config(args)), "max_train_samples": args.max_train_samples,
            "validation_fraction": args.validation_fraction, "data": data}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.push_only:
        return cli.push_existing_run(args)
    recipe = cli.recipe_from_args(args)
    if recipe is not None and args.binary_patch_embedding:
        recipe = recipe_with_patch_embedding(recipe)
    # A teacher trained by this command (below, before the student) has a known folder.
    teacher = (str(Path(args.output_dir) / TEACHER_DIR) if args.train_teacher != "none"
               else args.teacher_model_name_or_path)
    run = cli.build_run(args, "vit", model=args.model_name_or_path, teacher=teacher, surge_config=recipe,
                        config=args.vit_fields, **data_settings(args))
    cli.start_run(run, own_folders=(TEACHER_DIR,))
    with locked_output_dir(args.output_dir):
        return train_and_export(args, recipe, run)


def train_and_export(args: argparse.Namespace, surge_config: surge_hf.SurgeConfig | None, run: cli.RunSetup) -> dict:
    """Train the teacher (if any), then the student, and write the outputs, from checked flags (`main`)."""
    distillation, config = run.distillation, run.training
    teacher_plan = teacher_stage(args, config) if args.train_teacher != "none" else None  # before any work
    pretrained = checkpoint_config(args)
    data = load_data(args, pretrained)
    info = data.info
    if run.teacher and args.train_teacher == "none":
        check_image_teacher(AutoConfig.from_pretrained(run.teacher), info,
                            f"--teacher_model_name_or_path {run.teacher}")
    mean, std = normalization(args, data)

    accelerator = build_accelerator(config)
    model = load_student(args, surge_config, info, pretrained)
    train_collator = ImageCollator(info, mean, std, augment_config(args), seed=args.seed + accelerator.process_index)
    eval_collator = ImageCollator(info, mean, std)

    def loaders() -> dict[str, DataLoader]:
        return {"train": DataLoader(data.train, shuffle=True, collate_fn=train_collator,
                                    batch_size=args.per_device_train_batch_size,
                                    num_workers=args.dataloader_num_workers),
                "eval": DataLoader(data.eval, collate_fn=eval_collator, batch_size=args.per_device_eval_batch_size,
                                   num_workers=args.dataloader_num_workers)}

    if teacher_plan is not None:
        train_stage = functools.partial(train_teacher, args, accelerator, config, info, loaders(),
                                        train_collator.set_epoch, build_image_processor(info, mean, std),
                                        teacher_plan.stage)
        run_stages([dataclasses.replace(teacher_plan, train=train_stage)], total=2,
                   main_process=accelerator.is_main_process, log=accelerator.print)
        accelerator.print(f"Stage 2 of 2: the student into {args.output_dir}, distilled from {run.teacher}.")
    teacher = None
    if distillation is not None:
        teacher = load_image_teacher(run.teacher, info, mean, std)
    train_loader, eval_loader = loaders().values()
    result = train(accelerator, model, train_loader, {data.eval_split: eval_loader}, config,
                   functools.partial(compute_metrics, "classification"),
                   teacher=teacher, distillation=distillation, on_epoch_start=train_collator.set_epoch,
                   run_settings=run.settings)

    results = export_run(accelerator, model, result, training=config, hub=run.hub,
                         preprocessor=build_image_processor(info, mean, std), surge_config=surge_config,
                         distillation=distillation,
                         card_kind="image",
                         dataset={**dataset_card_fields(args), "image_mode": "L" if info.num_channels == 1 else "RGB"},
                         example_inputs={"pixel_values": torch.zeros(1, info.num_channels, *info.image_size)},
                         base_model=args.model_name_or_path,
                         teacher=run.teacher, command=args.command,
                         hyperparameters={"recipe preset": args.recipe} if args.recipe else None)
    if run.hub.push_to_hub:
        push_run(accelerator, args.output_dir, run.hub)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
