"""Command-line flags shared by `scripts/glue.py` and `scripts/vit.py`, and their mapping to typed configs.

Each setting is declared once, as a field of its config: the recipe flags are `SurgeConfig`'s fields, the training
flags `TrainingConfig`'s, the distillation flags `DistillationConfig`'s (`--distill_<field>`) and the Hub flags
`HubConfig`'s, with their help taken from each class's field docs (`surge_hf.training.config_flags`). So a config's
error names the flag to fix, and the library below never sees `argparse`.

A run (an earlier stage or the final model) is a `RunSetup`: the model it starts from, its teacher and its typed
configs, built once from the flags (`build_run`) and checked, before any model or data is loaded, by `start_run`.
A script that trains in stages builds one `RunSetup` per stage; none of them changes the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..configuration_surge import ACTIVATION_BITS, COMPENSATORS, WEIGHT_PLANES, SurgeConfig
from ..hub.upload import HubConfig, check_push_access
from .config_flags import add_config_flags, config_from_flags, flag_values
from .export import push_run
from .loop import TrainingConfig, check_resume
from .objective import DistillationConfig
from .output_dir import check_output_dir

BINARIZE_CHOICES = (*COMPENSATORS, "none")
# SurgeConfig fields set otherwise than by a flag of their own: `--binarize` (compensator), the stage schedules
# (weight_planes), and the format fields.
_RECIPE_SKIP = ("compensator", "weight_planes", "eps", "version")
# DistillationConfig's flags: `--distill_<field>`, but `--embedding_mixup_alpha` (a way of making inputs).
DISTILLATION_FLAGS: dict[str, Any] = {"prefix": "distill_",
                                      "rename": {"embedding_mixup_alpha": "embedding_mixup_alpha"}}
# The distillation terms every student takes; transformer students also take the intermediate ones.
_DISTILLATION_TERMS = ("temperature", "label_weight", "logits_weight")
_INTERMEDIATE_TERMS = ("hidden_states_weight", "hidden_states_loss", "hidden_relations_weight", "attentions_weight")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """`--binarize` and the SURGE recipe flags (unset flags keep the recipe file's or the default value)."""
    group = parser.add_argument_group("binarization recipe")
    group.add_argument("--binarize", choices=BINARIZE_CHOICES, default="surge",
                       help="surge (DPGC + AGS), fixed (DPGC with lam = eta), ste (no auxiliary branch), "
                            "none (full precision, e.g. to train a teacher).")
    group.add_argument("--recipe_file", type=Path, help="JSON file with a SurgeConfig dict; flags override it.")
    add_config_flags(group, SurgeConfig, skip=_RECIPE_SKIP, unset=True)


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


def recipe_from_args(args: argparse.Namespace, **stage_fields: Any) -> SurgeConfig | None:
    """The validated recipe (the recipe file, then the flags given, then a stage's own `stage_fields` such as
    `weight_planes=2`), or None for `--binarize none`."""
    if args.binarize == "none":
        return None
    recipe = {}
    if args.recipe_file is not None:
        if not args.recipe_file.is_file():
            raise FileNotFoundError(f"--recipe_file {args.recipe_file} does not exist.")
        recipe = json.loads(args.recipe_file.read_text())
    given = flag_values(args, SurgeConfig, skip=_RECIPE_SKIP)
    recipe.update({name: value for name, value in given.items() if value is not None})
    return SurgeConfig.from_dict({**recipe, **stage_fields, "compensator": args.binarize})


def parse_with_recipe_preset(parser: argparse.ArgumentParser, argv: list[str] | None,
                             presets: Mapping[str, Mapping[str, Any]]) -> argparse.Namespace:
    """`argv` parsed under the defaults of its `--recipe` preset (one of `presets`, each a dict of flag
    destinations to values); flags given explicitly still win."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--recipe", choices=list(presets))
    preset = probe.parse_known_args(argv)[0].recipe
    if preset is not None:
        parser.set_defaults(**presets[preset])
    return parser.parse_args(argv)


def add_training_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, batch_size: int,
                           epochs: int, calibrate: bool = False) -> None:
    """Optimisation, logging, checkpoint and Accelerate flags: `TrainingConfig`'s fields (defaults given per
    script), and `--with_tracking`."""
    group = parser.add_argument_group("training")
    add_config_flags(group, TrainingConfig, defaults={
        "output_dir": None, "learning_rate": learning_rate, "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": 2 * batch_size, "num_train_epochs": epochs, "calibrate_activations": calibrate,
        "report_to": None})
    group.add_argument("--with_tracking", action="store_true",
                       help="Log to the --report_to trackers (default all; without it, --report_to defaults to none).")


def training_config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainingConfig:
    """The run's `TrainingConfig` from its flags, with a stage's `overrides` (output folder, learning rate, ...)."""
    report_to = args.report_to or ("all" if args.with_tracking else "none")
    return config_from_flags(TrainingConfig, args, **{"output_dir": str(args.output_dir), "report_to": report_to,
                                                      **overrides})


def add_distillation_arguments(parser: argparse.ArgumentParser, *, intermediate: bool) -> None:
    """Teacher flags; `intermediate` adds the hidden-state and attention-map terms (transformer students)."""
    group = parser.add_argument_group("distillation from a full-precision teacher")
    group.add_argument("--teacher_model_name_or_path",
                       help="A full-precision model fine-tuned on the same labels (scripts/glue.py: `auto`, the "
                            "default, fine-tunes one first; `none` trains without a teacher).")
    terms = (*_DISTILLATION_TERMS, *(_INTERMEDIATE_TERMS if intermediate else ()))
    add_config_flags(group, DistillationConfig, only=terms, **DISTILLATION_FLAGS)


def distillation_from_args(args: argparse.Namespace, teacher: str | None) -> DistillationConfig | None:
    """The distillation weights of a run distilled from `teacher` (None without one); terms a script has no flag
    for keep their defaults."""
    if teacher is None:
        return None
    return config_from_flags(DistillationConfig, args, **DISTILLATION_FLAGS)


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """`HubConfig`'s flags, and `--push_only`."""
    group = parser.add_argument_group("Hugging Face Hub")
    add_config_flags(group, HubConfig)
    group.add_argument("--push_only", action="store_true",
                       help="Only push the finished run in --output_dir to --hub_model_id (no training), e.g. after "
                            "a failed push.")


def hub_config_from_args(args: argparse.Namespace) -> HubConfig:
    """The Hub settings, checked for a push that could not happen (offline, no token) before any training."""
    hub = config_from_flags(HubConfig, args, push_to_hub=args.push_to_hub or args.push_only)
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
                           calibrate=calibrate)
    add_distillation_arguments(parser, intermediate=intermediate_distillation)
    add_hub_arguments(parser)


@dataclass(frozen=True)
class RunSetup:
    """One training run (an earlier stage or the final model), typed: the model it starts from, the teacher it is
    distilled from, its configs, and `settings`, what its checkpoints are written with besides the
    `TrainingConfig` fields (the script name, the recipe, the distillation weights and the script's data settings:
    maximum length, image size, augmentation, the data's `content_digest`, ...)."""

    model_name_or_path: str | None
    teacher: str | None
    surge_config: SurgeConfig | None
    distillation: DistillationConfig | None
    training: TrainingConfig
    hub: HubConfig
    settings: dict[str, Any]
    inputs: dict[str, str | None]

    def with_training(self, **changes: Any) -> RunSetup:
        """The same run with `TrainingConfig` fields changed (e.g. where a stage resumes from)."""
        return dataclasses.replace(self, training=dataclasses.replace(self.training, **changes))


def build_run(args: argparse.Namespace, script: str, *, model: str | None, teacher: str | None,
              surge_config: SurgeConfig | None, training: TrainingConfig | None = None, hub: HubConfig | None = None,
              **data: Any) -> RunSetup:
    """The `RunSetup` of a run that starts from `model`, is distilled from `teacher` (no distillation without one),
    binarized by `surge_config` (the recipe) and trained by `training` (default: the flags'), with the script's `data`
    settings; every config validates its fields here. `hub` defaults to the flags' Hub settings; the inputs are the
    models the flags name."""
    distillation = distillation_from_args(args, teacher)
    settings = {"script": script, "recipe": None if surge_config is None else surge_config.to_dict(),
                "distillation": None if distillation is None else asdict(distillation), **data}
    return RunSetup(model, teacher, surge_config, distillation, training or training_config_from_args(args),
                    hub or hub_config_from_args(args), settings, input_models(args))


def input_models(args: argparse.Namespace) -> dict[str, str | None]:
    """Flag -> model (folder or Hub id) that the flags name."""
    return {"--model_name_or_path": args.model_name_or_path,
            "--teacher_model_name_or_path": args.teacher_model_name_or_path}


def check_run_folder(run: RunSetup, *, own_folders: tuple[str, ...] = ()) -> None:
    """The output-folder rules for `run` (`surge_hf.training.output_dir`), before any work. `own_folders` are the
    folders of its output folder that the run's earlier stages write (they do not make it "non-empty")."""
    check_output_dir(run.training.output_dir, inputs=run.inputs, overwrite=run.training.overwrite_output_dir,
                     resume=run.training.resume_from_checkpoint is not None, own_folders=own_folders)


def check_run_checkpoint(run: RunSetup) -> None:
    """When `run` resumes, check that its checkpoint is sound and was written with the same settings."""
    check_resume(run.training, run.settings)


def start_run(run: RunSetup, *, own_folders: tuple[str, ...] = ()) -> None:
    """Check, before any model or data loads, that `run` may start: its output folder (`check_run_folder`) and the
    checkpoint it resumes from (`check_run_checkpoint`)."""
    check_run_folder(run, own_folders=own_folders)
    check_run_checkpoint(run)


def validate_common_args(args: argparse.Namespace) -> None:
    """Checks that need no model or data: each config built from the flags validates its fields."""
    recipe_from_args(args)
    config_from_flags(DistillationConfig, args, **DISTILLATION_FLAGS)
    training_config_from_args(args)
    hub_config_from_args(args)
