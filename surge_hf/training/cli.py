"""Command-line flags shared by `scripts/glue.py` and `scripts/vit.py`, and their mapping to typed configs.

The flags carry the names of the config fields they fill (`--learning_rate` -> `TrainingConfig.learning_rate`,
`--hub_model_id` -> `HubConfig.hub_model_id`, ...), so a config's error names the flag to fix. The library below
never sees `argparse`. Every check here runs before any model or data is loaded (`start_run`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..configuration_surge import (
    ACTIVATION_BINARIZERS,
    ACTIVATION_BITS,
    AUX_WEIGHTS,
    COMPENSATORS,
    LAMBDA_PLACEMENTS,
    SURROGATES,
    WEIGHT_PLANES,
    WEIGHT_SCALES,
    SurgeConfig,
)
from ..hub.upload import HubConfig, check_push_access
from .export import push_run
from .loop import TrainingConfig, prepare_run
from .objective import HIDDEN_STATES_LOSSES, DistillationConfig

BINARIZE_CHOICES = (*COMPENSATORS, "none")
_RECIPE_FLAGS = {
    "eta": float, "surrogate": SURROGATES, "activation_binarizer": ACTIVATION_BINARIZERS,
    "weight_scale": WEIGHT_SCALES, "aux_weight": AUX_WEIGHTS, "lambda_placement": LAMBDA_PLACEMENTS,
    "aux_loss_weight": float, "swish_beta": float, "target_modules": str, "exclude_modules": str,
    "activation_bits": int, "unsigned_activation_modules": str, "shortcut_gate_init": float,
    "attention_alpha_init": float,
}
_RECIPE_SWITCHES = ("binarize_weights", "binarize_activations", "scale_aux_grad", "learnable_weight_scale", "shortcuts",
                    "binarize_attention")


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


def _decreasing_schedule(text: str, allowed: tuple[int, ...], what: str, example: str) -> list[int]:
    """Comma-separated values from `allowed`, strictly decreasing, or `ArgumentTypeError` saying how to write one."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v not in allowed for v in values) or values != sorted(set(values), reverse=True):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a schedule of {what}: give comma-separated values from {', '.join(map(str, allowed))}, "
            "each lower than the one before (no repeats; train longer with --num_train_epochs instead), e.g. "
            f"{example}."
        )
    return values


def bits_schedule(text: str) -> list[int]:
    """`--activation_bits_schedule 8,4,2,1`: activation bits per stage, each from `ACTIVATION_BITS`, strictly
    decreasing (each stage has its own folder, named by its bits, so no entry repeats)."""
    return _decreasing_schedule(text, ACTIVATION_BITS, "activation bits", "4,2,1")


def planes_schedule(text: str) -> list[int]:
    """`--weight_planes_schedule 2,1`: binary weight planes per stage (`SurgeConfig.weight_planes`), strictly
    decreasing and ending at 1, the only form that packs to 1 bit."""
    planes = _decreasing_schedule(text, WEIGHT_PLANES, "weight planes", "2,1")
    if planes[-1] != 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} ends at {planes[-1]} weight planes, but the final model must have 1 (it is packed to 1 bit "
            "per weight): end the schedule with 1, e.g. 2,1."
        )
    return planes


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
    if getattr(args, "weight_planes", None) is not None:  # set per stage by `--weight_planes_schedule`, not a flag
        recipe["weight_planes"] = args.weight_planes
    recipe["compensator"] = args.binarize
    return SurgeConfig.from_dict(recipe)


def add_training_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, batch_size: int,
                           epochs: int, output_dir_required: bool = True, calibrate: bool = False) -> None:
    """Optimisation, logging, checkpoint and Accelerate flags (defaults given per script)."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=Path, required=output_dir_required)
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Write into a non-empty --output_dir (its files of the same names are replaced).")
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
    group.add_argument("--report_to", default=None,
                       help="An Accelerate tracker: tensorboard, wandb, ..., all or none (default: none, or all "
                            "with --with_tracking).")
    group.add_argument("--with_tracking", action="store_true", help="Log to the --report_to trackers (default all).")
    group.add_argument("--calibrate_activations", action=argparse.BooleanOptionalAction, default=calibrate,
                       help="Initialise activation thresholds/scales from the first training batch.")
    group.add_argument("--latent_weight_learning_rate", type=float,
                       help="Learning rate (and no weight decay, unless --binary_weight_decay) for the latent "
                            "weights of binarized layers.")
    group.add_argument("--quantizer_learning_rate", type=float,
                       help="Learning rate (and no weight decay, unless --binary_weight_decay) for activation "
                            "thresholds/scales and learned weight scales.")
    group.add_argument("--binary_weight_decay", type=float,
                       help="Weight decay of the binarized layers' latent weights (default: --weight_decay, or 0 "
                            "with --latent_weight_learning_rate); 0 keeps decay from pulling latent weights towards "
                            "their sign flips.")


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    report_to = args.report_to or ("all" if args.with_tracking else "none")
    return TrainingConfig(
        output_dir=str(args.output_dir), overwrite_output_dir=args.overwrite_output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        num_train_epochs=args.num_train_epochs, max_train_steps=args.max_train_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, lr_scheduler_type=args.lr_scheduler_type,
        num_warmup_steps=args.num_warmup_steps, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        mixed_precision=args.mixed_precision, logging_steps=args.logging_steps,
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, report_to=report_to, cpu=args.cpu,
        calibrate_activations=args.calibrate_activations,
        latent_weight_learning_rate=args.latent_weight_learning_rate,
        quantizer_learning_rate=args.quantizer_learning_rate, binary_weight_decay=args.binary_weight_decay,
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
        group.add_argument("--distill_hidden_states_loss", choices=HIDDEN_STATES_LOSSES, default="mse",
                           help="mse: hidden states as they are; normalized: their directions, 2 - 2 cos per token "
                                "(scale-free).")
        group.add_argument("--distill_hidden_relations_weight", type=float, default=0.0,
                           help="Weight of the MSE between the student's and the teacher's token-token cosine "
                                "similarities in every layer's hidden states.")
        group.add_argument("--distill_attentions_weight", type=float, default=0.0)


def distillation_from_args(args: argparse.Namespace) -> DistillationConfig | None:
    if args.teacher_model_name_or_path is None:
        return None
    return DistillationConfig(
        temperature=args.distill_temperature, label_weight=args.distill_label_weight,
        logits_weight=args.distill_logits_weight,
        hidden_states_weight=getattr(args, "distill_hidden_states_weight", 0.0),
        hidden_states_loss=getattr(args, "distill_hidden_states_loss", "mse"),
        hidden_relations_weight=getattr(args, "distill_hidden_relations_weight", 0.0),
        attentions_weight=getattr(args, "distill_attentions_weight", 0.0),
        embedding_mixup_alpha=getattr(args, "embedding_mixup_alpha", 0.0),
        mask_padding=getattr(args, "distill_mask_padding", False),
    )


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", help="namespace/name of the model repository to push to.")
    group.add_argument("--hub_token", help="Defaults to the token saved by `hf auth login`.")
    group.add_argument("--hub_private", action="store_true")
    group.add_argument("--push_only", action="store_true",
                       help="Only push the finished run in --output_dir to --hub_model_id (no training), e.g. after "
                            "a failed push.")


def hub_config_from_args(args: argparse.Namespace) -> HubConfig:
    """The Hub settings, checked for a push that could not happen (offline, no token) before any training."""
    hub = HubConfig(push_to_hub=args.push_to_hub or args.push_only, hub_model_id=args.hub_model_id,
                    hub_token=args.hub_token, hub_private=args.hub_private)
    check_push_access(hub)
    return hub


def push_existing_run(args: argparse.Namespace) -> dict[str, Any]:
    """`--push_only`: upload the finished run in `--output_dir` without training; returns its all_results.json."""
    hub = hub_config_from_args(args)
    if args.output_dir is None:
        raise ValueError("--push_only needs --output_dir, the folder of the finished run to push.")
    results = Path(args.output_dir) / "all_results.json"
    if not results.is_file():
        raise FileNotFoundError(f"--push_only: {results} does not exist; --output_dir must hold a finished run "
                                "(train it first, without --push_only).")
    push_run(Accelerator(cpu=True), args.output_dir, hub)
    return json.loads(results.read_text())


def add_shared_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, batch_size: int, epochs: int,
                         intermediate_distillation: bool, calibrate: bool = False) -> None:
    """The flags both scripts take: recipe, training, distillation and Hub (defaults given per script)."""
    add_recipe_arguments(parser)
    add_training_arguments(parser, learning_rate=learning_rate, batch_size=batch_size, epochs=epochs,
                           output_dir_required=False, calibrate=calibrate)
    add_distillation_arguments(parser, intermediate=intermediate_distillation)
    add_hub_arguments(parser)


@dataclass
class RunSetup:
    """The typed configs of one run, built from the flags, and the settings its checkpoints are written with."""

    recipe: SurgeConfig | None
    distillation: DistillationConfig | None
    training: TrainingConfig
    hub: HubConfig
    settings: dict[str, Any]


def input_models(args: argparse.Namespace) -> dict[str, str | None]:
    """Flag -> model (folder or Hub id) the run reads: the output folder may not overwrite them."""
    return {"--model_name_or_path": args.model_name_or_path,
            "--teacher_model_name_or_path": args.teacher_model_name_or_path}


def start_run(args: argparse.Namespace, script: str, recipe: SurgeConfig | None, *,
              own_folders: tuple[str, ...] = (), **data: Any) -> RunSetup:
    """Map the shared flags to typed configs and check, before any model or data loads, that the run may start
    (`surge_hf.training.loop.prepare_run`: output folder, checkpoint to resume).

    `recipe` is the run's recipe (the script may have adapted `recipe_from_args(args)`); `data` holds the script's
    settings that change the result (maximum length, image size, augmentation, the data's `content_digest`, ...),
    stored with the checkpoints with the script name, the recipe and the distillation weights. `own_folders` are
    the folders of `--output_dir` that the run's earlier stages wrote (they do not make it "non-empty").
    """
    training = training_config_from_args(args)
    settings = script_settings(args, script, recipe, **data)
    prepare_run(training, settings, inputs=input_models(args), own_folders=own_folders)
    return RunSetup(recipe, distillation_from_args(args), training, hub_config_from_args(args), settings)


def script_settings(args: argparse.Namespace, script: str, recipe: SurgeConfig | None, **data: Any) -> dict[str, Any]:
    """The settings a run's checkpoints are stored with besides its `TrainingConfig` fields: the script name, the
    recipe, the distillation weights and the script's `data` settings (see `start_run`)."""
    distillation = distillation_from_args(args)
    return {"script": script, "recipe": None if recipe is None else recipe.to_dict(),
            "distillation": None if distillation is None else asdict(distillation), **data}


def run_settings(args: argparse.Namespace, script: str, recipe: SurgeConfig | None, **data: Any) -> dict[str, Any]:
    """Everything that decides what a run computes, as its checkpoints store it (`TrainingConfig.run_settings` of
    the flags with `script_settings`): what a stage of a staged run is recorded with (`surge_hf.training.stages`)."""
    return training_config_from_args(args).run_settings(script_settings(args, script, recipe, **data))


def validate_common_args(args: argparse.Namespace) -> None:
    """Checks that need no model or data: each config built from the flags validates its fields."""
    recipe_from_args(args)
    distillation_from_args(args)
    training_config_from_args(args)
    hub_config_from_args(args)
