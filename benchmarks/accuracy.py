"""Does SURGE beat STE? Runs the training scripts for each recipe, learning rate and seed, and collects validation
accuracy, on real data: MiniLM-L6 on Rotten Tomatoes (`--task text`, `scripts/glue.py`) or a ViT from scratch on
Fashion-MNIST (`--task vision`, `scripts/vit.py`).

    # GPU (all runs of a suite as parallel processes on one GPU, bf16 autocast):
    python benchmarks/accuracy.py --task text --suite full --parallel 12 --mixed_precision bf16 \
        --output benchmarks/results/text_accuracy_gpu.json
    # the shortened CPU runs committed here (one thread per run, so runs do not slow each other):
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --task text --suite cpu \
        --output benchmarks/results/text_accuracy_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --task vision --suite cpu \
        --output benchmarks/results/vision_accuracy_cpu.json

Every recipe of a suite gets the same data, steps, batch size and learning rates (the learning rate is chosen on
validation for STE and SURGE alike); a recipe's own flags come last and override the suite's. `{teacher}` in a
recipe's flags stands for the full-precision run of the same seed (or of the suite's first teacher seed), which is
trained first: `--teacher_model_name_or_path {teacher}` distils from it, `--model_name_or_path {teacher}` starts
the binary student from the task-fine-tuned model. Each run keeps its outputs (packed model, card,
`training_history.json`) under `--runs_dir/<recipe>/lr<lr>/seed<seed>/`.

Equal wall time instead of equal steps: `--equal_time_as RECIPE` gives every other recipe the training time of
RECIPE's steps on this machine. Each recipe's time per step is probed first (two short runs of `--probe_steps`
steps, 5 and 25 by default, same flags and seed; the difference of their wall times over the difference of their
steps, so loading, evaluation and a teacher stage cancel), and a recipe then trains
`round(steps_RECIPE * step_s_RECIPE / step_s)` steps;
its runs live under `--runs_dir/<recipe>@time_of_<RECIPE>/` and its record carries the probed step times.

The result file holds one record per run and a summary (mean, standard deviation, min, max per recipe and learning
rate); `report.py` makes tables and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER = "{teacher}"
TEXT_KD = ("--distill_logits_weight", "1", "--distill_hidden_states_weight", "1", "--distill_label_weight", "1",
           "--teacher_model_name_or_path", TEACHER)
VISION_KD = ("--distill_logits_weight", "1", "--distill_label_weight", "1", "--teacher_model_name_or_path", TEACHER)
# The recipe ladder of the text suite `ladder`: a binary student started from the task-fine-tuned teacher, then one
# element added at a time (BiT-style distillation of logits and every hidden state, calibrated elastic activations,
# learned weight scales, activation bits).
# Every rung names its flags, whatever the scripts' defaults: the earlier rungs use the former defaults (rsign
# activations, no calibration, no teacher).
FROM_TEACHER = ("--model_name_or_path", TEACHER)
PLAIN = ("--activation_binarizer", "rsign", "--no-calibrate_activations", "--teacher_model_name_or_path", "none",
         "--distill_hidden_states_weight", "0")
LADDER_KD = ("--teacher_model_name_or_path", TEACHER, "--distill_logits_weight", "1")
HIDDEN_KD = ("--distill_hidden_states_weight", "1")
ELASTIC = ("--activation_binarizer", "elastic", "--calibrate_activations")
BIT = (*FROM_TEACHER, *PLAIN, *LADDER_KD, *HIDDEN_KD, *ELASTIC)
ALPHA = ("--learnable_weight_scale",)
SPLIT_LR = ("--learning_rate", "1e-4", "--latent_weight_learning_rate", "5e-4", "--quantizer_learning_rate", "5e-4")
# glue.py's defaults (the built-in recipe: elastic activations, calibration, learned alpha, logits + hidden-state
# distillation, lr 5e-4) on the suite's shared teacher instead of a teacher stage of its own.
DEFAULT_RECIPE = (*FROM_TEACHER, "--teacher_model_name_or_path", TEACHER)
STEPS_1250 = ("--max_train_steps", "1250")
VISION_SHORTCUTS = ("--shortcuts",)
VISION_RESNET_KD = ("--train_teacher", "resnet", "--distill_logits_weight", "1", "--distill_label_weight", "0")


@dataclass(frozen=True)
class Suite:
    """Recipes x learning rates x seeds, with the flags every run of the suite shares."""

    recipes: tuple[str, ...]
    seeds: tuple[int, ...]
    learning_rates: dict[str, tuple[float, ...]]  # "full_precision" and "binary"
    flags: tuple[str, ...]
    teacher_seeds: tuple[int, ...] = (0, 1, 2)
    teacher: str = "full_precision"  # the full-precision recipe that `{teacher}` names


@dataclass(frozen=True)
class Task:
    script: str
    recipes: dict[str, tuple[str, ...]]  # recipe name -> script flags
    suites: dict[str, Suite] = field(default_factory=dict)


def _surge(eta: str, *extra: str) -> tuple[str, ...]:
    """SURGE at `eta`, with a trained auxiliary weight (`--aux_weight separate`) unless `extra` names another: the
    scripts' defaults change, a recipe of this file does not."""
    aux = () if "--aux_weight" in extra else ("--aux_weight", "separate")
    return ("--binarize", "surge", "--eta", eta, *aux, *extra)


def _ladder_suite(*recipes: str, seeds: tuple[int, ...] = (0,)) -> Suite:
    """The text recipe ladder's protocol: one epoch, max length 32, batch 32, students at lr 5e-4, every student
    started from (and distilled from, where the recipe says so) the 3-epoch full-precision run of seed 42."""
    return Suite(("full_precision_3ep", *recipes), seeds, {"full_precision": (5e-5,), "binary": (5e-4,)},
                 ("--num_train_epochs", "1", "--max_seq_length", "32", "--per_device_train_batch_size", "32"),
                 teacher_seeds=(42,), teacher="full_precision_3ep")


TEXT = Task(
    script="glue.py",
    recipes={
        "full_precision": ("--binarize", "none"),
        "ste": ("--binarize", "ste"),
        "surge": _surge("0.1"),
        "surge_fixed_lam": ("--binarize", "fixed", "--eta", "0.1", "--aux_weight", "separate"),
        "surge_shared_aux": _surge("0.1", "--aux_weight", "shared"),
        "surge_previous_lam": _surge("0.1", "--lambda_placement", "previous"),
        "surge_eta0.03": _surge("0.03"),
        "surge_eta0.3": _surge("0.3"),
        "ste_kd": ("--binarize", "ste", *TEXT_KD),
        "surge_kd": (*_surge("0.1"), *TEXT_KD),
        "full_precision_3ep": ("--binarize", "none", "--num_train_epochs", "3"),
        "surge_init": (*_surge("0.1"), *FROM_TEACHER, *PLAIN),
        "surge_init_kd_logits": (*_surge("0.1"), *FROM_TEACHER, *PLAIN, *LADDER_KD),
        "surge_init_kd_hidden": (*_surge("0.1"), *FROM_TEACHER, *PLAIN, *LADDER_KD, *HIDDEN_KD),
        "surge_bit": (*_surge("0.1"), *BIT),
        "surge_bit_alpha": (*_surge("0.1"), *BIT, *ALPHA),
        "surge_bit_alpha_latent_lr": (*_surge("0.1"), *BIT, *ALPHA, "--latent_weight_learning_rate", "2e-3"),
        # the binary layers' latent weights and quantizers at 5e-4, everything else (embeddings, norms, head) at 1e-4
        "surge_bit_alpha_split_lr": (*_surge("0.1"), *BIT, *ALPHA, *SPLIT_LR),
        "surge_bit_alpha_a8": (*_surge("0.1"), *BIT, *ALPHA, "--activation_bits", "8"),
        "surge_bit_alpha_a4": (*_surge("0.1"), *BIT, *ALPHA, "--activation_bits", "4"),
        "surge_bit_alpha_a2": (*_surge("0.1"), *BIT, *ALPHA, "--activation_bits", "2"),
        # progressive precision in the same budget: half the steps at W1A2, then half at W1A1 (one epoch = 312 steps)
        "surge_bit_alpha_a2_to_a1": (*_surge("0.1"), *BIT, *ALPHA, "--activation_bits_schedule", "2,1",
                                     "--max_train_steps", "156"),
        "ste_bit_alpha": ("--binarize", "ste", *BIT, *ALPHA),
        # SURGE's own knobs under the best recipe (eta 0.1, lam at the fork, unscaled W_a gradient by default)
        "surge_bit_alpha_eta0.3": (*_surge("0.3"), *BIT, *ALPHA),
        "surge_bit_alpha_eta0.03": (*_surge("0.03"), *BIT, *ALPHA),
        "surge_bit_alpha_previous_lam": (*_surge("0.1"), *BIT, *ALPHA, "--lambda_placement", "previous"),
        "surge_bit_alpha_scale_aux_grad": (*_surge("0.1"), *BIT, *ALPHA, "--scale_aux_grad"),
        # Teacher-labelled new inputs at equal student steps (1,250 = 4 epochs of the original data, 0.8 of a pass
        # over the data with 4 new sentences per snippet).
        "surge_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250),
        "ste_1250": ("--binarize", "ste", *DEFAULT_RECIPE, *STEPS_1250),
        "surge_aug4_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250, "--augment", "4"),
        "ste_aug4_1250": ("--binarize", "ste", *DEFAULT_RECIPE, *STEPS_1250, "--augment", "4"),
        "surge_aug4_a8_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250, "--augment", "4",
                               "--activation_bits", "8"),
        "surge_aug4_mixup_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250, "--augment", "4",
                                  "--embedding_mixup_alpha", "0.4"),
        # SURGE with a frozen auxiliary weight (no G_a product, no optimizer state for W_a): the cheaper step
        "surge_frozen_aux_1250": (*_surge("0.1", "--aux_weight", "frozen"), *DEFAULT_RECIPE, *STEPS_1250),
        # the weight axis in the same 1,250 steps: 625 with two binary weight planes, then 625 at one plane from them
        "surge_w2_to_w1_1250": (*_surge("0.1"), *DEFAULT_RECIPE, "--weight_planes_schedule", "2,1",
                                "--max_train_steps", "625"),
        # twice the steps on teacher-labelled new inputs, with what helped or cost nothing at 1,250 steps: the frozen
        # W_a (the cheaper step) and the weight axis (1,250 steps with two planes, then 1,250 at one plane)
        "surge_frozen_aug4_w2_to_w1_2500": (*_surge("0.1", "--aux_weight", "frozen"), *DEFAULT_RECIPE, "--augment", "4",
                                            "--weight_planes_schedule", "2,1", *STEPS_1250),
        # the same with the 1-bit stage distilled from the two-plane stage (the nearer teacher)
        "surge_frozen_aug4_w2_to_w1_2500_stage_teacher": (
            *_surge("0.1", "--aux_weight", "frozen"), *DEFAULT_RECIPE, "--augment", "4", "--weight_planes_schedule",
            "2,1", "--stage_teacher", "previous", *STEPS_1250),
        # the same with the 1-bit stage stepped down from two planes over its first 625 steps (plane_anneal_steps):
        # it starts with the two-plane stage's function instead of dropping the second plane at once
        "surge_frozen_aug4_w2_to_w1_2500_anneal": (
            *_surge("0.1", "--aux_weight", "frozen"), *DEFAULT_RECIPE, "--augment", "4", "--weight_planes_schedule",
            "2,1", "--plane_anneal_steps", "625", *STEPS_1250),
        # the same with the scale-free hidden-state term (BiBERT's normalized distance) in both stages
        "surge_frozen_aug4_w2_to_w1_2500_anneal_normalized_hidden": (
            *_surge("0.1", "--aux_weight", "frozen"), *DEFAULT_RECIPE, "--augment", "4", "--weight_planes_schedule",
            "2,1", "--plane_anneal_steps", "625", "--distill_hidden_states_loss", "normalized", *STEPS_1250),
        # optimiser hygiene and distillation forms at 1,250 steps: no weight decay on the latent weights; the
        # hidden-state term scale-free; the token-token relations of the hidden states added to it
        "surge_no_latent_decay_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250, "--binary_weight_decay", "0"),
        "surge_normalized_hidden_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250,
                                         "--distill_hidden_states_loss", "normalized"),
        "surge_hidden_relations_1250": (*_surge("0.1"), *DEFAULT_RECIPE, *STEPS_1250,
                                        "--distill_hidden_relations_weight", "1"),
    },
    suites={
        "full": Suite(("full_precision", "ste", "surge", "surge_fixed_lam", "surge_shared_aux", "surge_previous_lam",
                       "surge_eta0.03", "surge_eta0.3", "ste_kd", "surge_kd"), (0, 1, 2),
                      {"full_precision": (3e-5,), "binary": (5e-5, 1e-4, 2e-4)},
                      ("--num_train_epochs", "4", "--max_seq_length", "64", "--per_device_train_batch_size", "32")),
        "cpu": Suite(("full_precision", "ste", "surge", "ste_kd", "surge_kd"), (0, 1),
                     {"full_precision": (1e-4,), "binary": (1e-4,)},
                     ("--num_train_epochs", "1", "--max_seq_length", "32", "--per_device_train_batch_size", "32",
                      "--max_train_samples", "4000"), teacher_seeds=(0,)),
        "cpu_long": Suite(("ste", "surge"), (0, 1), {"full_precision": (1e-4,), "binary": (1e-4,)},
                          ("--num_train_epochs", "2", "--max_seq_length", "32", "--per_device_train_batch_size",
                           "32"), teacher_seeds=(0,)),
        "ladder": _ladder_suite("surge_init", "surge_init_kd_logits", "surge_init_kd_hidden", "surge_bit",
                                "surge_bit_alpha", "surge_bit_alpha_latent_lr", "surge_bit_alpha_split_lr",
                                "surge_bit_alpha_a8", "surge_bit_alpha_a4", "surge_bit_alpha_a2",
                                "surge_bit_alpha_a2_to_a1", "ste_bit_alpha"),
        # the best W1A1 rung of the ladder, SURGE against STE, three seeds (seed 0 is the ladder's run)
        "ladder_seeds": _ladder_suite("surge_bit_alpha", "ste_bit_alpha", seeds=(0, 1, 2)),
        "augment": _ladder_suite("surge_1250", "ste_1250", "surge_aug4_1250", "surge_aug4_mixup_1250", "ste_aug4_1250",
                                 "surge_aug4_a8_1250", "surge_w2_to_w1_1250", "surge_frozen_aux_1250",
                                 "surge_frozen_aug4_w2_to_w1_2500", "surge_frozen_aug4_w2_to_w1_2500_stage_teacher",
                                 "surge_frozen_aug4_w2_to_w1_2500_anneal",
                                 "surge_frozen_aug4_w2_to_w1_2500_anneal_normalized_hidden",
                                 "surge_no_latent_decay_1250",
                                 "surge_normalized_hidden_1250", "surge_hidden_relations_1250"),
        "surge_knobs": _ladder_suite("surge_bit_alpha", "surge_bit_alpha_eta0.3", "surge_bit_alpha_eta0.03",
                                     "surge_bit_alpha_previous_lam", "surge_bit_alpha_scale_aux_grad"),
        "smoke": Suite(("full_precision", "ste", "surge", "surge_kd"), (0,), {"full_precision": (1e-4,),
                                                                            "binary": (1e-4,)},
                       ("--num_train_epochs", "1", "--max_seq_length", "16", "--max_train_samples", "64"), (0,)),
    },
)
VIT_SIZES = "hidden_size=192,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384"


def _vision_ladder_suite(recipes: tuple[str, ...], train_samples: int, *extra: str,
                         seeds: tuple[int, ...] = (0, 1, 2)) -> Suite:
    """The binary-ViT ladder's protocol on `train_samples` Fashion-MNIST images: 5 epochs, batch 128, lr 1e-3,
    cosine decay, no weight decay, rsign activations without calibration, seeds 0-2 (and the suite's `extra`
    flags)."""
    return Suite(recipes, seeds, {"full_precision": (1e-3,), "binary": (1e-3,)},
                 ("--config", f"{VIT_SIZES},patch_size=7", "--num_train_epochs", "5", "--per_device_train_batch_size",
                  "128", "--num_warmup_steps", "20", "--crop_padding", "2", "--horizontal_flip",
                  "--max_train_samples", str(train_samples), "--lr_scheduler_type", "cosine", "--weight_decay", "0",
                  "--activation_binarizer", "rsign", "--no-calibrate_activations", *extra), (0,))


VISION = Task(
    script="vit.py",
    recipes={
        "full_precision": ("--binarize", "none"),
        "ste": ("--binarize", "ste"),
        "surge": _surge("0.5"),
        "surge_eta0.1": _surge("0.1"),
        "surge_eta1.0": _surge("1.0"),
        "ste_kd": ("--binarize", "ste", *VISION_KD),
        "surge_kd": (*_surge("0.5"), *VISION_KD),
        # The binary-ViT ladder (issue: binary ViT close to full precision): shortcuts around every binary Linear,
        # then logit-only distillation from a small full-precision ResNet that each run trains first.
        "surge_shortcuts": (*_surge("0.5"), *VISION_SHORTCUTS),
        "ste_shortcuts_resnet_teacher": ("--binarize", "ste", *VISION_SHORTCUTS, *VISION_RESNET_KD),
        "surge_shortcuts_resnet_teacher": (*_surge("0.5"), *VISION_SHORTCUTS, *VISION_RESNET_KD),
        "surge_shortcuts_resnet_teacher_eta0.2": (*_surge("0.2"), *VISION_SHORTCUTS, *VISION_RESNET_KD),
        "surge_shortcuts_resnet_teacher_eta1.0": (*_surge("1.0"), *VISION_SHORTCUTS, *VISION_RESNET_KD),
        "surge_shortcuts_resnet_teacher_previous_lam": (*_surge("0.5", "--lambda_placement", "previous"),
                                                        *VISION_SHORTCUTS, *VISION_RESNET_KD),
        "surge_binary_attention": (*_surge("0.5"), *VISION_SHORTCUTS, *VISION_RESNET_KD, "--binarize_attention"),
        "full_precision_resnet_teacher": ("--binarize", "none", *VISION_RESNET_KD),
    },
    suites={
        "full": Suite(("full_precision", "ste", "surge", "surge_eta0.1", "surge_eta1.0", "ste_kd", "surge_kd"),
                      (0, 1, 2), {"full_precision": (1e-3,), "binary": (5e-4, 1e-3, 2e-3)},
                      ("--config", f"{VIT_SIZES},patch_size=4", "--num_train_epochs", "12",
                       "--per_device_train_batch_size", "256", "--num_warmup_steps", "100", "--crop_padding", "2",
                       "--horizontal_flip", "--max_train_samples", "25000")),
        "cpu": Suite(("full_precision", "ste", "surge"), (0, 1, 2), {"full_precision": (1e-3,), "binary": (1e-3,)},
                     ("--config", f"{VIT_SIZES},patch_size=7", "--num_train_epochs", "5",
                      "--per_device_train_batch_size", "128", "--num_warmup_steps", "20", "--crop_padding", "2",
                      "--horizontal_flip", "--max_train_samples", "5000")),
        # The ladder on the CPU: the budget of "cpu", with cosine decay and no weight decay for every rung, and the
        # rsign activations (no calibration) that the committed runs used.
        "cpu_ladder": _vision_ladder_suite(("full_precision", "surge", "surge_shortcuts",
                                            "surge_shortcuts_resnet_teacher", "ste_shortcuts_resnet_teacher",
                                            "surge_binary_attention", "full_precision_resnet_teacher"), 5000),
        # `--recipe binary-vit` (the ladder's distilled rung, which the preset resolves to) at twice the images:
        # SURGE, STE and the full-precision ViT distilled from the same ResNet, three seeds each
        "cpu_settle": _vision_ladder_suite(("surge_shortcuts_resnet_teacher", "ste_shortcuts_resnet_teacher",
                                            "full_precision_resnet_teacher"), 10000),
        # the same budget as a step count (5 epochs of 10,000 images at batch 128 = 395 steps), so that
        # `--equal_time_as surge_shortcuts_resnet_teacher` can give STE SURGE's wall time
        "cpu_settle_time": _vision_ladder_suite(("surge_shortcuts_resnet_teacher", "ste_shortcuts_resnet_teacher"),
                                                10000, "--max_train_steps", "395"),
        # SURGE's own knobs under that recipe, seed 0: eta (0.5 in the preset) and where lam applies
        "cpu_settle_knobs": _vision_ladder_suite(("surge_shortcuts_resnet_teacher_eta0.2",
                                                  "surge_shortcuts_resnet_teacher_eta1.0",
                                                  "surge_shortcuts_resnet_teacher_previous_lam"), 10000, seeds=(0,)),
        "smoke": Suite(("full_precision", "ste", "surge"), (0,), {"full_precision": (1e-3,), "binary": (1e-3,)},
                       ("--config", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32,"
                        "patch_size=7", "--max_train_steps", "4", "--max_train_samples", "256",
                        "--max_eval_samples", "128"), (0,)),
    },
)
TASKS = {"text": TEXT, "vision": VISION}


def run_dir(runs_dir: Path, recipe: str, lr: float, seed: int) -> Path:
    return runs_dir / recipe / f"lr{lr:g}" / f"seed{seed}"


def data_flags(args: argparse.Namespace) -> tuple[str, ...]:
    if args.task == "text":
        return ("--model_name_or_path", str(args.model), "--train_file", str(args.data_dir / "train.csv"),
                "--validation_file", str(args.data_dir / "validation.csv"))
    return ("--dataset", str(args.vision_dataset), "--dataset_hub_id", "zalando-datasets/fashion_mnist")


def command(args: argparse.Namespace, suite: Suite, recipe: str, lr: float, seed: int,
            output_dir: Path | None = None) -> list[str]:
    task = TASKS[args.task]
    teacher_seed = seed if seed in suite.teacher_seeds else suite.teacher_seeds[0]
    teacher = run_dir(args.runs_dir, suite.teacher, suite.learning_rates["full_precision"][0], teacher_seed)
    recipe_flags = [str(teacher) if flag == TEACHER else flag for flag in task.recipes[recipe]]
    flags = [sys.executable, str(ROOT / "scripts" / task.script), *data_flags(args), *suite.flags,
             "--output_dir", str(output_dir or run_dir(args.runs_dir, recipe, lr, seed)), "--overwrite_output_dir",
             "--learning_rate", f"{lr:g}", "--seed", str(seed), "--logging_steps", "25", *recipe_flags]
    if args.mixed_precision:
        flags += ["--mixed_precision", args.mixed_precision]
    return flags


PROBE_STEPS = "5,25"


def recipe_steps(task: Task, suite: Suite, recipe: str) -> int:
    """The `--max_train_steps` a recipe's (or else its suite's) flags give: equal time needs a step budget."""
    for flags in (task.recipes[recipe], suite.flags):
        if "--max_train_steps" in flags:
            return int(flags[flags.index("--max_train_steps") + 1])
    raise ValueError(f"--equal_time_as {recipe}: the recipe has no --max_train_steps to convert into time.")


def probe_step_seconds(args: argparse.Namespace, suite: Suite, recipe: str, lr: float, seed: int) -> float:
    """Seconds per training step of a recipe on this machine, from two short runs (see the module docstring)."""
    probe_steps = [int(steps) for steps in args.probe_steps.split(",")]
    walls = []
    for steps in probe_steps:
        out = args.runs_dir / "probes" / recipe / f"steps{steps}"
        flags = command(args, suite, recipe, lr, seed, out) + ["--max_train_steps", str(steps),
                                                               "--max_eval_samples", "64"]
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / "probe.log", "w") as log:
            subprocess.run(flags, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        walls.append(time.perf_counter() - start)
    return (walls[1] - walls[0]) / (probe_steps[1] - probe_steps[0])


def uses_teacher(task: Task, recipe: str) -> bool:
    return TEACHER in task.recipes[recipe]


def equal_time_steps(args: argparse.Namespace, suite: Suite, recipe: str, lr: float, seed: int) -> dict | None:
    """With `--equal_time_as`, the steps that give `recipe` the reference recipe's training time (None for the
    reference itself or without the option); probed step times are kept in the runs folder and reused."""
    reference = args.equal_time_as
    if reference is None or recipe == reference:
        return None
    probes_file = args.runs_dir / "probes" / "step_seconds.json"
    probes = json.loads(probes_file.read_text()) if probes_file.exists() else {}
    for name in (reference, recipe):
        if name not in probes:
            probes[name] = probe_step_seconds(args, suite, name, lr, seed)
            probes_file.parent.mkdir(parents=True, exist_ok=True)
            probes_file.write_text(json.dumps(probes, indent=2))
    budget_s = recipe_steps(TASKS[args.task], suite, reference) * probes[reference]
    return {"reference": reference, "budget_s": budget_s, "step_s": probes[recipe],
            "reference_step_s": probes[reference], "steps": max(1, round(budget_s / probes[recipe]))}


def run_one(args: argparse.Namespace, suite: Suite, recipe: str, lr: float, seed: int) -> dict:
    equal_time = equal_time_steps(args, suite, recipe, lr, seed)
    name = recipe if equal_time is None else f"{recipe}@time_of_{equal_time['reference']}"
    out = run_dir(args.runs_dir, name, lr, seed)
    results_file = out / "all_results.json"
    start = time.perf_counter()
    wall_file = out / "benchmark_wall_s.json"  # a reused run reports the time it took when it ran
    if not (args.reuse and results_file.exists()):
        out.mkdir(parents=True, exist_ok=True)
        flags = command(args, suite, recipe, lr, seed, out)
        if equal_time is not None:
            flags += ["--max_train_steps", str(equal_time["steps"])]
        with open(out.parent / f"seed{seed}.log", "w") as log:
            subprocess.run(flags, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall_file.write_text(json.dumps(time.perf_counter() - start))
    results = json.loads(results_file.read_text())
    metrics = next(iter(results["eval"].values()))
    record = {"recipe": name, "learning_rate": lr, "seed": seed, "accuracy": metrics["accuracy"],
              "steps": results["completed_steps"],
              "wall_s": json.loads(wall_file.read_text()) if wall_file.exists() else time.perf_counter() - start,
              "run_dir": str(out), **({"equal_time": equal_time} if equal_time else {})}
    teacher_file = out / "teacher" / "all_results.json"  # runs that trained their own teacher (--train_teacher)
    if teacher_file.exists():
        record["teacher_accuracy"] = next(iter(json.loads(teacher_file.read_text())["eval"].values()))["accuracy"]
    return record


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[float]] = {}
    for record in records:
        groups.setdefault((record["recipe"], record["learning_rate"]), []).append(100 * record["accuracy"])
    return [{"recipe": recipe, "learning_rate": lr, "seeds": len(values), "mean": statistics.mean(values),
             "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
             "values": values} for (recipe, lr), values in groups.items()]


def prepare_vision_dataset(args: argparse.Namespace) -> None:
    """Convert the shared Fashion-MNIST arrays to a `save_to_disk` dataset once."""
    if not (args.vision_dataset / "dataset_dict.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare_fashion_mnist.py"),
                        "--data_dir", str(args.data_dir), "--output_dir", str(args.vision_dataset)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--recipes", help="Comma-separated subset of the suite's recipes.")
    parser.add_argument("--seeds", help="Comma-separated seeds for every recipe (default: the suite's).")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "all-MiniLM-L6-v2", help="text only")
    parser.add_argument("--data_dir", type=Path,
                        help="Rotten Tomatoes csv folder (text) or Fashion-MNIST npz folder (vision); "
                             "default: the one in ../shared.")
    parser.add_argument("--runs_dir", type=Path)
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (GPU: many small runs share it).")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--reuse", action="store_true", help="Keep runs whose all_results.json exists.")
    parser.add_argument("--equal_time_as", help="Give every recipe the wall time of this recipe's steps (probed).")
    parser.add_argument("--probe_steps", default=PROBE_STEPS,
                        help="The step counts of the two probe runs, FEW,MANY: more steps between them average out "
                             "what each run does besides training (loading, a teacher stage).")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    task = TASKS[args.task]
    if args.suite not in task.suites:
        parser.error(f"--suite {args.suite!r}: the {args.task} task has suites {', '.join(task.suites)}")
    suite = task.suites[args.suite]
    recipes = args.recipes.split(",") if args.recipes else list(suite.recipes)
    if args.equal_time_as is not None:
        recipe_steps(task, suite, args.equal_time_as)  # a step budget to convert, checked before any run
    seeds = tuple(int(seed) for seed in args.seeds.split(",")) if args.seeds else None
    args.data_dir = args.data_dir or SHARED / "data" / ("rotten_tomatoes" if args.task == "text" else "fashion_mnist")
    args.runs_dir = args.runs_dir or ROOT / "outputs" / f"{args.task}_accuracy"
    args.vision_dataset = args.runs_dir / "fashion_mnist_dataset"
    needed = [args.data_dir] + ([args.model] if args.task == "text" else [])
    for path in needed:
        if not path.exists():
            parser.error(f"{path} does not exist; pass --model / --data_dir.")
    if args.task == "vision":
        prepare_vision_dataset(args)

    def jobs(kd: bool) -> list[tuple[str, float, int]]:
        return [(recipe, lr, seed) for recipe in recipes if uses_teacher(task, recipe) == kd
                for lr in suite.learning_rates["full_precision" if recipe == suite.teacher else "binary"]
                for seed in (seeds or (suite.teacher_seeds if recipe == suite.teacher else suite.seeds))]

    start = time.perf_counter()
    records = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for kd in (False, True):  # teachers (full precision) before the students that distil from them
            for job in jobs(kd):  # step times probed one recipe at a time, before the runs share the machine
                equal_time_steps(args, suite, *job)
            records += list(pool.map(lambda job: run_one(args, suite, *job), jobs(kd)))
    import torch

    report = {
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"CPU ({platform.machine()}, {os.cpu_count()} cores, {os.environ.get('OMP_NUM_THREADS', 'all')} "
        "thread(s) per run)",
        "task": args.task, "suite": args.suite, "flags": list(suite.flags),
        "total_wall_s": time.perf_counter() - start, "runs": records, "summary": summarize(records),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for row in report["summary"]:
        print(f"{row['recipe']:>20} lr {row['learning_rate']:<7g} {row['mean']:6.2f} +- {row['std']:5.2f} "
              f"({row['seeds']} seeds: {', '.join(f'{v:.1f}' for v in row['values'])})")


if __name__ == "__main__":
    main()
