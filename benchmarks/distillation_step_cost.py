"""Student steps per hour under distillation: live teacher vs the teacher-output cache, batches padded to the
maximum length vs to their own longest example. Ratios measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/distillation_step_cost.py --teacher <fine-tuned MiniLM folder> \
        --output benchmarks/results/distillation_step_cost_cpu.json

The student is the W1A1 SURGE BERT of glue.py's default recipe (learned weight scales, logits + hidden-state
distillation, real tokens only), started from the teacher; the data are the first `--batches` training batches of
Rotten Tomatoes (max length 32, batch 32) in a fixed shuffled order. Each round runs one optimizer step of every
mode on the same batch, so drifts of the machine hit every mode alike; a mode's time is the median over the timed
rounds. The cache is built before timing (its one-off cost, one teacher forward per example, is reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import surge_hf
from surge_hf.training.objective import DistillationConfig, compute_loss
from surge_hf.training.teacher_cache import TEACHER_INDEX, CachedTeacher, build_teacher_cache

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODES = ("max_length_live", "dynamic_live", "max_length_cached", "dynamic_cached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="A fine-tuned full-precision BERT folder.")
    parser.add_argument("--train_file", type=Path, default=SHARED / "data" / "rotten_tomatoes" / "train.csv")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--cache_dir", type=Path, default=Path("outputs/teacher_cache"))
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    rows = datasets.load_dataset("csv", data_files=str(args.train_file), split="train").shuffle(seed=0)
    rows = rows.select(range(args.batches * args.batch_size))
    tokenized = {
        padding: rows.map(lambda b, p=padding: tokenizer(b["sentence"], truncation=True, max_length=args.max_length,
                                                          padding=p),
                          batched=True, remove_columns=rows.column_names)
        for padding in ("max_length", False)
    }
    collator = DataCollatorWithPadding(tokenizer)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher, dtype=torch.float32).eval()
    distillation = DistillationConfig(hidden_states_weight=1.0, mask_padding=True)
    start = time.perf_counter()
    cached = {key: CachedTeacher(build_teacher_cache(teacher, data, collator, args.cache_dir, hidden_states=True))
              for key, data in (("max_length", tokenized["max_length"]), ("dynamic", tokenized[False]))}
    cache_build_s = time.perf_counter() - start

    students, optimizers = {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        students[mode] = surge_hf.SurgeBertForSequenceClassification.from_pretrained(
            args.teacher, surge=surge_hf.SurgeConfig(learnable_weight_scale=True), dtype=torch.float32).train()
        optimizers[mode] = torch.optim.AdamW(students[mode].parameters(), lr=5e-4)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: dict[str, int] = {mode: 0 for mode in MODES}
    for index in range(args.batches):
        indices = list(range(index * args.batch_size, (index + 1) * args.batch_size))
        for mode in MODES:
            padding = "max_length" if mode.startswith("max_length") else False
            batch = collator([{**tokenized[padding][i], "labels": 0} for i in indices])
            live = mode.endswith("live")
            if not live:
                batch[TEACHER_INDEX] = torch.tensor(indices)
            model, optimizer = students[mode], optimizers[mode]
            tick = time.perf_counter()
            loss, _ = compute_loss(model, batch, teacher if live else cached["max_length" if padding else "dynamic"],
                                   distillation)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if index >= args.warmup:
                times[mode].append(time.perf_counter() - tick)
                tokens[mode] += batch["input_ids"].numel()
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    baseline = medians["max_length_live"]
    report = {
        "command": "python benchmarks/distillation_step_cost.py " + " ".join(os.sys.argv[1:]),
        "machine": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))",
        "batch_size": args.batch_size, "max_length": args.max_length, "timed_rounds": len(times[MODES[0]]),
        "cache_build_s": cache_build_s,
        "modes": {mode: {"median_step_s": medians[mode], "steps_per_hour": 3600 / medians[mode],
                         "speedup_vs_max_length_live": baseline / medians[mode],
                         "mean_tokens_per_batch": tokens[mode] / len(times[mode])} for mode in MODES},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for mode, row in report["modes"].items():
        print(f"{mode:>18}: {row['median_step_s'] * 1000:7.0f} ms/step  {row['steps_per_hour']:6.0f} steps/h  "
              f"x{row['speedup_vs_max_length_live']:.2f}  {row['mean_tokens_per_batch']:.0f} tokens/batch")


if __name__ == "__main__":
    main()
