"""Measure what `import surge_hf` costs against `import torch, transformers`, the floor any transformers user pays.

Each statement runs in a fresh interpreter, timed inside it (interpreter start-up excluded); the statements take
turns within each round, so that a change in the machine's load reaches all of them alike, and the medians over the
rounds are reported, with the ratio of each median to the torch + transformers one. Two references frame
`import surge_hf`, which registers the SURGE BERT / ViT classes with the Auto classes and so imports transformers'
BERT and ViT modeling code: that modeling code alone (what loading any BERT costs), and surge_hf with the training
harness (Trainer, accelerate training loop, Hub), as the first use of those names imports it.

    python benchmarks/import_time.py --rounds 5     # writes benchmarks/results/import_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "import_time_cpu.json"
BASELINE = "torch + transformers"
STATEMENTS = {
    BASELINE: "import torch, transformers",
    "transformers BERT + ViT modeling": "from transformers import BertModel, ViTModel",
    "surge_hf": "import surge_hf",
    "surge_hf + harness": "import surge_hf; from surge_hf import SurgeTrainer, push_to_hub, train",
}
HARNESS_MODULES = ("transformers.trainer", "accelerate", "datasets", "evaluate", "jinja2")
_TIMED = (
    "import json, sys, time\n"
    "start = time.perf_counter()\n"
    "{statement}\n"
    "seconds = time.perf_counter() - start\n"
    "print(json.dumps({{'seconds': seconds, 'harness': [m for m in {harness!r} if m in sys.modules]}}))\n"
)


def time_import(statement: str) -> dict:
    """Seconds `statement` takes in a fresh interpreter, and which harness modules it leaves imported."""
    code = _TIMED.format(statement=statement, harness=HARNESS_MODULES)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(completed.stdout.splitlines()[-1])


def measure(rounds: int) -> dict[str, dict]:
    """Per statement: the seconds of every round, their median, its ratio to the baseline's, the harness modules."""
    seconds: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    harness: dict[str, list[str]] = {}
    for _ in range(rounds):
        for name, statement in STATEMENTS.items():
            result = time_import(statement)
            seconds[name].append(round(result["seconds"], 3))
            harness[name] = result["harness"]
    baseline = statistics.median(seconds[BASELINE])
    return {
        name: {
            "statement": STATEMENTS[name],
            "seconds": values,
            "median_seconds": round(statistics.median(values), 3),
            "ratio_to_torch_transformers": round(statistics.median(values) / baseline, 2),
            "harness_modules_imported": harness[name],
        }
        for name, values in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters per statement (median reported)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    results = {
        "command": f"python benchmarks/import_time.py --rounds {args.rounds}",
        "machine": f"CPU ({platform.machine()}, {os.cpu_count()} cores), {platform.system()}, Python "
                   f"{platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rounds": args.rounds,
        "imports": measure(args.rounds),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["imports"].items():
        print(f"{name:34s} median {entry['median_seconds']:7.3f} s  x{entry['ratio_to_torch_transformers']:.2f}")


if __name__ == "__main__":
    main()
