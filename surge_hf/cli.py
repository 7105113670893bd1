"""Command-line flags shared by `scripts/glue.py` and `scripts/vit.py`, and their validation.

Every check here runs before any model or data is loaded, so bad flags fail in a second with a message that
names the flag and the fix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .configuration_surge import (
    ACTIVATION_BINARIZERS,
    ACTIVATION_BITS,
    AUX_WEIGHTS,
    COMPENSATORS,
    LAMBDA_PLACEMENTS,
    SURROGATES,
    WEIGHT_SCALES,
    SurgeConfig,
)
from .objective import DistillationConfig
from .training import TrainingConfig

BINARIZE_CHOICES = (*COMPENSATORS, "none")
_RECIPE_FLAGS = {
    "eta": float, "surrogate": SURROGATES, "activation_binarizer": ACTIVATION_BINARIZERS,
    "weight_scale": WEIGHT_SCALES, "aux_weight": AUX_WEIGHTS, "lambda_placement": LAMBDA_PLACEMENTS,
    "aux_loss_weight": float, "swish_beta": float, "target_modules": str, "exclude_modules": str,
    "activation_bits": int, "unsigned_activation_modules": str,
}
_RECIPE_SWITCHES = ("binarize_weights", "binarize_activations", "scale_aux_grad", "learnable_weight_scale")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """`--binarize` and the SURGE recipe flags (unset flags keep the recipe file's or the default value)."""
    group = parser.add_argument_group("binarization recipe")
    group.add_argument("--binarize", choices=BINARIZE_CHOICES, default="surge",
                       help="surge (DPGC + AGS), fixed (DPGC with lam = eta), ste (no auxiliary branch), "
                            "none (full precision, e.g. to train a teacher).")
    group.add_argument("--recipe_file", type=Path, help="JSON file with a SurgeConfig dict; flags override it.")
    for name, kind in _RECIPE_FLAGS.items():
        if isinstance(kind, tuple):
            group.add_argument(f"--{name}", choices=kind)
        else:
            group.add_argument(f"--{name}", type=kind)
    for name in _RECIPE_SWITCHES:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)


def bits_schedule(text: str) -> list[int]:
    """`--activation_bits_schedule 8,4,2,1`: activation bits per stage, each from `ACTIVATION_BITS`, non-increasing."""
    try:
        bits = [int(part) for part in text.split(",")]
    except ValueError:
        bits = []
    allowed = ", ".join(map(str, ACTIVATION_BITS))
    if not bits or any(b not in ACTIVATION_BITS for b in bits) or bits != sorted(bits, reverse=True):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a schedule of activation bits: give comma-separated values from {allowed}, from the "
            "highest to the lowest, e.g. 4,2,1."
        )
    return bits


def recipe_from_args(args: argparse.Namespace) -> SurgeConfig | None:
    """The validated recipe, or None for `--binarize none`."""
    if args.binarize == "none":
        return None
    recipe = {}
    if args.recipe_file is not None:
        if not args.recipe_file.is_file():
            raise FileNotFoundError(f"--recipe_file {args.recipe_file} does not exist.")
        recipe = json.loads(args.recipe_file.read_text())
    for name in (*_RECIPE_FLAGS, *_RECIPE_SWITCHES):
        value = getattr(args, name)
        if value is not None:
            recipe[name] = value
    recipe["compensator"] = args.binarize
    return SurgeConfig.from_dict(recipe)


def add_training_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, batch_size: int,
                           epochs: int, output_dir_required: bool = True, calibrate: bool = False) -> None:
    """Optimisation, logging, checkpoint and Accelerate flags (defaults given per script)."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=Path, required=output_dir_required)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--weight_decay", type=float, default=0.01)
    group.add_argument("--num_train_epochs", type=int, default=epochs)
    group.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    group.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    group.add_argument("--per_device_eval_batch_size", type=int, default=2 * batch_size)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--lr_scheduler_type", default="linear",
                       choices=["linear", "cosine", "constant", "constant_with_warmup"])
    group.add_argument("--num_warmup_steps", type=int, default=0)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                       help="Overrides the `accelerate launch` setting.")
    group.add_argument("--cpu", action="store_true", help="Train on the CPU even when a GPU is present.")
    group.add_argument("--logging_steps", type=int, default=50)
    group.add_argument("--checkpointing_steps", type=int, help="Save a resumable checkpoint every N steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=2)
    group.add_argument("--resume_from_checkpoint", help="A checkpoints/step_<N> folder, or 'latest'.")
    group.add_argument("--report_to", default="none", help="An Accelerate tracker: tensorboard, wandb, ... or none.")
    group.add_argument("--calibrate_activations", action=argparse.BooleanOptionalAction, default=calibrate,
                       help="Initialise activation thresholds/scales from the first training batch.")
    group.add_argument("--latent_weight_learning_rate", type=float,
                       help="Learning rate (and no weight decay) for the latent weights of binarized layers.")
    group.add_argument("--quantizer_learning_rate", type=float,
                       help="Learning rate (and no weight decay) for activation thresholds/scales and learned "
                            "weight scales.")


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    return TrainingConfig(
        output_dir=str(args.output_dir), learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        num_train_epochs=args.num_train_epochs, max_train_steps=args.max_train_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, lr_scheduler_type=args.lr_scheduler_type,
        num_warmup_steps=args.num_warmup_steps, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        mixed_precision=args.mixed_precision, logging_steps=args.logging_steps,
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, report_to=args.report_to, cpu=args.cpu,
        calibrate_activations=args.calibrate_activations,
        latent_weight_learning_rate=args.latent_weight_learning_rate,
        quantizer_learning_rate=args.quantizer_learning_rate,
    )


def add_distillation_arguments(parser: argparse.ArgumentParser, *, intermediate: bool) -> None:
    """Teacher flags; `intermediate` adds hidden-state and attention-map weights (transformer students)."""
    group = parser.add_argument_group("distillation from a full-precision teacher")
    group.add_argument("--teacher_model_name_or_path",
                       help="A full-precision model fine-tuned on the same labels (scripts/glue.py: `auto`, the "
                            "default, fine-tunes one first; `none` trains without a teacher).")
    group.add_argument("--distill_temperature", type=float, default=1.0)
    group.add_argument("--distill_label_weight", type=float, default=0.0)
    group.add_argument("--distill_logits_weight", type=float, default=1.0)
    if intermediate:
        group.add_argument("--distill_hidden_states_weight", type=float, default=0.0)
        group.add_argument("--distill_attentions_weight", type=float, default=0.0)


def distillation_from_args(args: argparse.Namespace) -> DistillationConfig | None:
    if args.teacher_model_name_or_path is None:
        return None
    return DistillationConfig(
        temperature=args.distill_temperature, label_weight=args.distill_label_weight,
        logits_weight=args.distill_logits_weight,
        hidden_states_weight=getattr(args, "distill_hidden_states_weight", 0.0),
        attentions_weight=getattr(args, "distill_attentions_weight", 0.0),
    )


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", help="namespace/name of the model repository to push to.")
    group.add_argument("--hub_token", help="Defaults to the token saved by `hf auth login`.")
    group.add_argument("--hub_private", action="store_true")


def hub_id_or_none(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repository; None for a local folder or nothing (model-card `base_model`)."""
    if name_or_path is None or Path(name_or_path).exists():
        return None
    return name_or_path


def validate_common_args(args: argparse.Namespace) -> None:
    """Checks that need no model or data."""
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id namespace/name (the repository to create or update).")
