"""Does SURGE beat STE on text? Runs `scripts/glue.py` for each recipe and seed on Rotten Tomatoes with MiniLM-L6
and collects validation accuracy.

    # the GPU run (all recipes as parallel processes on one GPU; bf16 autocast):
    python benchmarks/text_accuracy.py --suite full --parallel 12 --mixed_precision bf16 \
        --output benchmarks/results/text_accuracy_gpu.json
    # the shortened CPU run committed here (one thread per run, so a run is not slowed by others on the machine):
    OMP_NUM_THREADS=1 python benchmarks/text_accuracy.py --suite cpu --output benchmarks/results/text_accuracy_cpu.json

Each run writes its full outputs (packed model, card, history) to `--runs_dir/<recipe>/lr<lr>/seed<seed>/`. A
recipe named `*_kd` distils from the full-precision run of the same seed (or of the suite's first teacher seed),
trained first. Results are one JSON
record per run plus a summary (mean, standard deviation, min, max per recipe and learning rate); `report.py`
turns them into tables and plots.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KD_FLAGS = ("--distill_logits_weight", "1", "--distill_hidden_states_weight", "1", "--distill_label_weight", "1")

# recipe name -> glue.py flags
RECIPES: dict[str, tuple[str, ...]] = {
    "full_precision": ("--binarize", "none"),
    "ste": ("--binarize", "ste"),
    "surge": ("--binarize", "surge", "--eta", "0.1"),
    "surge_fixed_lam": ("--binarize", "fixed", "--eta", "0.1"),
    "surge_shared_aux": ("--binarize", "surge", "--eta", "0.1", "--aux_weight", "shared"),
    "surge_previous_lam": ("--binarize", "surge", "--eta", "0.1", "--lambda_placement", "previous"),
    "surge_eta0.03": ("--binarize", "surge", "--eta", "0.03"),
    "surge_eta0.3": ("--binarize", "surge", "--eta", "0.3"),
    "ste_kd": ("--binarize", "ste", *KD_FLAGS),
    "surge_kd": ("--binarize", "surge", "--eta", "0.1", *KD_FLAGS),
}


@dataclass(frozen=True)
class Suite:
    recipes: tuple[str, ...]
    seeds: tuple[int, ...]
    learning_rates: dict[str, tuple[float, ...]]  # per recipe kind: "full_precision" or "binary"
    epochs: int
    max_seq_length: int
    max_train_samples: int | None = None
    teacher_seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the full-precision runs (teachers of the *_kd recipes)


SUITES = {
    "full": Suite(tuple(RECIPES), (0, 1, 2), {"full_precision": (3e-5,), "binary": (5e-5, 1e-4, 2e-4)}, 4, 64),
    "cpu": Suite(("full_precision", "ste", "surge", "ste_kd", "surge_kd"), (0, 1),
                 {"full_precision": (1e-4,), "binary": (1e-4,)}, 1, 32, 4000, teacher_seeds=(0,)),
    "smoke": Suite(("full_precision", "ste", "surge", "surge_kd"), (0,), {"full_precision": (1e-4,),
                                                                        "binary": (1e-4,)}, 1, 16, 64, (0,)),
}


def run_dir(runs_dir: Path, recipe: str, lr: float, seed: int) -> Path:
    return runs_dir / recipe / f"lr{lr:g}" / f"seed{seed}"


def glue_command(args: argparse.Namespace, suite: Suite, recipe: str, lr: float, seed: int) -> list[str]:
    command = [
        sys.executable, str(ROOT / "scripts" / "glue.py"),
        "--model_name_or_path", str(args.model), "--train_file", str(args.data_dir / "train.csv"),
        "--validation_file", str(args.data_dir / "validation.csv"),
        "--output_dir", str(run_dir(args.runs_dir, recipe, lr, seed)),
        "--max_seq_length", str(suite.max_seq_length), "--num_train_epochs", str(suite.epochs),
        "--per_device_train_batch_size", "32", "--learning_rate", f"{lr:g}", "--seed", str(seed),
        "--logging_steps", "25", *RECIPES[recipe],
    ]
    if suite.max_train_samples:
        command += ["--max_train_samples", str(suite.max_train_samples)]
    if args.mixed_precision:
        command += ["--mixed_precision", args.mixed_precision]
    if recipe.endswith("_kd"):
        teacher_lr = suite.learning_rates["full_precision"][0]
        teacher_seed = seed if seed in suite.teacher_seeds else suite.teacher_seeds[0]
        command += ["--teacher_model_name_or_path",
                    str(run_dir(args.runs_dir, "full_precision", teacher_lr, teacher_seed))]
    return command


def run_one(args: argparse.Namespace, suite: Suite, recipe: str, lr: float, seed: int) -> dict:
    out = run_dir(args.runs_dir, recipe, lr, seed)
    results_file = out / "all_results.json"
    start = time.perf_counter()
    if not (args.reuse and results_file.exists()):
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"seed{seed}.log", "w") as log:
            subprocess.run(glue_command(args, suite, recipe, lr, seed), check=True, stdout=log,
                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = json.loads(results_file.read_text())
    return {"recipe": recipe, "learning_rate": lr, "seed": seed,
            "accuracy": results["eval"]["validation"]["accuracy"], "steps": results["completed_steps"],
            "wall_s": time.perf_counter() - start, "run_dir": str(out.relative_to(ROOT) if out.is_relative_to(ROOT)
                                                                   else out)}


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[float]] = {}
    for record in records:
        groups.setdefault((record["recipe"], record["learning_rate"]), []).append(100 * record["accuracy"])
    return [{"recipe": recipe, "learning_rate": lr, "seeds": len(values), "mean": statistics.mean(values),
             "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
             "values": values} for (recipe, lr), values in groups.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="cpu")
    parser.add_argument("--recipes", help="Comma-separated subset of the suite's recipes.")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--data_dir", type=Path, default=SHARED / "data" / "rotten_tomatoes")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "outputs" / "text_accuracy")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (GPU: many small runs share it).")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--reuse", action="store_true", help="Keep runs whose all_results.json exists.")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    recipes = args.recipes.split(",") if args.recipes else list(suite.recipes)
    for path in (args.model, args.data_dir / "train.csv"):
        if not path.exists():
            parser.error(f"{path} does not exist; pass --model / --data_dir (the shared MiniLM and Rotten Tomatoes).")

    def jobs(kd: bool) -> list[tuple[str, float, int]]:
        return [(recipe, lr, seed) for recipe in recipes if recipe.endswith("_kd") == kd
                for lr in suite.learning_rates["full_precision" if recipe == "full_precision" else "binary"]
                for seed in (suite.teacher_seeds if recipe == "full_precision" else suite.seeds)]

    start = time.perf_counter()
    records = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for kd in (False, True):  # teachers (full precision) before the students that distil from them
            records += list(pool.map(lambda job: run_one(args, suite, *job), jobs(kd)))
    import torch

    report = {
        "command": "python benchmarks/text_accuracy.py " + " ".join(sys.argv[1:]),
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "suite": args.suite, "epochs": suite.epochs, "max_seq_length": suite.max_seq_length,
        "max_train_samples": suite.max_train_samples, "total_wall_s": time.perf_counter() - start,
        "runs": records, "summary": summarize(records),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for row in report["summary"]:
        print(f"{row['recipe']:>20} lr {row['learning_rate']:<7g} {row['mean']:6.2f} +- {row['std']:5.2f} "
              f"({row['seeds']} seeds: {', '.join(f'{v:.1f}' for v in row['values'])})")


if __name__ == "__main__":
    main()
