"""Training-step cost of full precision, STE and SURGE on BERT shapes: time per step and memory, as ratios
measured in one run.

    python benchmarks/step_cost.py --shape bert-base --batch_size 32 --seq_len 128 --device cuda --bf16
    python benchmarks/step_cost.py --shape minilm --batch_size 32 --seq_len 64          # CPU
    python benchmarks/step_cost.py --shape minilm --batch_size 32 --seq_len 32 --adamw fused,foreach

Each recipe gets its own randomly initialised `BertForSequenceClassification` (encoder Linear layers binarized,
W1A1) and the AdamW of the training loop (`surge_hf.training.loop.adamw` over `parameter_groups`: torch's fused
kernel where the device has one); `--adamw fused,foreach` runs every recipe with both implementations
(`recipe+foreach` is torch's default per-tensor loop, what the training loop used before). Steps are interleaved
round-robin over the runs (one step of each per round), so drifts of the machine hit every run alike; the time of a
run is the median over the timed rounds. Memory: on CUDA the peak allocated bytes that one step adds (activations
and temporaries); on the CPU, which has no allocator statistics, the bytes of the tensors saved for backward. Both
are reported with the bytes of the parameters, their gradients and the two AdamW moments added.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import surge_hf
from surge_hf.training.loop import adamw, parameter_groups

SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
RECIPES = {
    "full_precision": None,
    "ste": surge_hf.SurgeConfig(compensator="ste"),
    "surge": surge_hf.SurgeConfig(compensator="surge"),
    "surge_frozen_aux": surge_hf.SurgeConfig(compensator="surge", aux_weight="frozen"),
    "surge_aux_loss": surge_hf.SurgeConfig(compensator="surge", aux_loss_weight=0.1),
}


def build(
    shape: str, recipe: surge_hf.SurgeConfig | None, device: torch.device, implementation: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=2, **SHAPES[shape]))
    if recipe is not None:
        surge_hf.binarize(model, recipe)
    model.to(device).train()
    groups = parameter_groups(model, 0.01)
    if implementation == "foreach":
        return model, torch.optim.AdamW(groups, lr=1e-4, foreach=True)
    return model, adamw(groups, 1e-4)


def saved_activation_bytes(model, batch, autocast) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def step(model, optimizer, batch, autocast, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="bert-base")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--adamw", default="fused",
                        help="fused (the training loop's), foreach (torch's per-tensor loop), or both: fused,foreach")
    parser.add_argument("--output", type=Path, help="JSON file to write the results to.")
    args = parser.parse_args()

    device = torch.device(args.device)
    names = args.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    implementations = args.adamw.split(",")
    if not implementations or not set(implementations) <= {"fused", "foreach"}:
        parser.error(f"--adamw {args.adamw!r}: pass fused, foreach or fused,foreach")
    # (label, recipe, AdamW implementation); the first implementation's runs keep the recipe's name
    plan = [(name if implementation == implementations[0] else f"{name}+{implementation}", name, implementation)
            for implementation in implementations for name in names]
    names = [label for label, _, _ in plan]

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=generator).to(device),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (args.batch_size,), generator=generator).to(device),
    }
    runs = {label: build(args.shape, RECIPES[recipe], device, implementation) for label, recipe, implementation in plan}
    memory: dict[str, int] = {}
    for name, (model, optimizer) in runs.items():
        for _ in range(args.warmup):
            step(model, optimizer, batch, autocast, device)
        state = (sum(p.numel() * p.element_size() * 4 for p in model.parameters())  # weights, grads, 2 moments
                 + sum(b.numel() * b.element_size() for b in model.buffers()))  # a frozen W_a, ...
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(model, optimizer, batch, autocast, device)
            memory[name] = state + torch.cuda.max_memory_allocated() - before
        else:
            memory[name] = state + saved_activation_bytes(model, batch, autocast)

    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            times[name].append(step(model, optimizer, batch, autocast, device))
    baseline = statistics.median(times[names[0]])
    results = {
        "command": "python benchmarks/step_cost.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k not in ("output", "bf16") and v is not None)
        + (" --bf16" if args.bf16 else ""),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": args.shape, "batch_size": args.batch_size, "seq_len": args.seq_len, "bf16": args.bf16,
        "memory_kind": ("cuda peak added by a step" if device.type == "cuda" else "saved activations")
        + " + weights, grads, AdamW moments",
        "recipes": {
            name: {
                "median_ms": 1000 * statistics.median(times[name]),
                "time_ratio_vs_first": statistics.median(times[name]) / baseline,
                "memory_mib": memory[name] / 2**20,
                "memory_ratio_vs_first": memory[name] / memory[names[0]],
            }
            for name in names
        },
    }
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
