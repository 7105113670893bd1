"""Measure CPU inference: packed binary layers on the XNOR-popcount kernel against float32 and int8 dynamic.

Layer level: `BinaryLinear` (W1A1, the default `SurgeConfig()` recipe, recorded in the JSON; with bias) against
float32 `F.linear` and `torch.ao.quantization.quantize_dynamic` int8 `nn.Linear`, and against the packed layer's own
reference path (kernel off: unpack + float product), on BERT-base shapes (768x768, 768x3072, 3072x768) and MiniLM
shapes (384x384, 384x1536, 1536x384; `in x out`), M = 1, 8, 32, 128, 512 rows, with 1 and 2 threads.

End to end: sequence classifiers in three forms (float32, int8 dynamic of the float32 model, packed SURGE model on the
kernel; plus the packed model without sign outputs, i.e. with float outputs from every layer (`surge_hf.fusion`),
and on its reference path), batch 1 x 32 tokens (latency) and 32 x 64 (throughput): a
MiniLM-L6 (the real all-MiniLM-L6-v2 weights, binarized untrained: speed does not depend on the values) and a
random BERT-base-shaped model. Memory: the resident-set growth of a fresh process that loads the model and runs one
1 x 32 forward and reads every weight (`/proc/self/status` VmRSS), the bytes of the tensors the model holds, and
the file sizes (`model.safetensors`; the int8 dynamic model as a `torch.save` of its state dict). The packed forms:
binarized layers packed, embeddings float32 (`packed`) or int8 with per-row scales (`packed_int8_embeddings`).

With `--compiled`, the end-to-end part also times the packed model under `torch.compile`, after one eager call:
graph capture alone (`backend="eager"`, whose float operations round as in eager mode) and inductor (which generates
its own code for LayerNorm, adds and attention, so its floats may round otherwise and flip an activation's sign), with
each one's largest logit difference from the eager packed model.

Convolutions (`--parts conv`): a packed W1A1 `BinaryConv2d` (3x3, padding 1, no bias, the default recipe) on the
kernel against its reference path (kernel off: unpack + `F.conv2d`) and float32 `F.conv2d` (`nn.Conv2d`), on the
ResNet-18 stage shapes 64->64 at 56x56, 128->128 at 28x28, 256->256 at 14x14 and 512->512 at 7x7, batch 1 and 8,
with 1 and 2 threads; NCHW inputs, and channels_last inputs for the kernel and float32 (where neither transposes).

Binary attention (`--parts attention`): the scores `sign(Q) sign(K)^T * d^-1/2` of `SurgeConfig(binarize_attention=
True)` on the kernel (`kernels.sign_scores`) against the reference float path (`torch.matmul` of the +-1 floats, then
the scale), and the whole `surge_binary` attention function (scores, softmax, {0, alpha} probabilities, `P_b V`)
with the kernel on and off, at BERT-base (12 heads) and ViT-small (3 heads) shapes, head_dim 64, batch 1 and 8,
with 1 and 2 threads; Q, K, V as transformers passes them (transposed views of (batch, tokens, heads, head_dim)), no
mask.

Timing: every configuration runs its candidates round-robin (`--rounds` rounds, each call repeated to fill about
`--min_ms`), and reports medians, so a busy shared machine slows all candidates of one configuration alike; the
ratios are the figures to read, not the absolute times.

    python benchmarks/inference.py      # writes benchmarks/results/inference_cpu.{json,md,png}
    python benchmarks/inference.py --quick     # fewer shapes and rounds, for a smoke run
    python benchmarks/inference.py --profile   # where the packed MiniLM's time goes: results/inference_profile_cpu.json
    python benchmarks/inference.py --parts end_to_end --models minilm-l6 --output results/<name>.json   # one part
    python benchmarks/inference.py --parts end_to_end --models minilm-l6 --threads 1 --compiled \
        --output benchmarks/results/inference_compiled_cpu_minilm.json   # + the packed model under torch.compile
    python benchmarks/inference.py --parts conv --output benchmarks/results/inference_conv_cpu.json   # convolutions
    python benchmarks/inference.py --parts attention --rounds 21 \
        --output benchmarks/results/inference_attention_cpu.json   # binary attention
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from surge_hf import SurgeBertForSequenceClassification, SurgeConfig, SurgeConv2d, SurgeLinear, kernels
from surge_hf.binary_attention import BinaryAttentionProbabilities, _sign, binary_attention_forward
from surge_hf.fusion import unfold_sign_outputs
from surge_hf.layers import BinaryConv2d, BinaryLinear

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2"
RESULTS = ROOT / "benchmarks" / "results"
LAYER_SHAPES = {"bert-base": [(768, 768), (768, 3072), (3072, 768)], "minilm": [(384, 384), (384, 1536), (1536, 384)]}
ROWS = (1, 8, 32, 128, 512)
THREADS = (1, 2)
BATCHES = ((1, 32), (32, 64))
FORMS = ("float32", "int8_dynamic", "binary_kernel", "binary_float_outputs", "binary_reference")
COMPILED_FORMS = ("binary_compiled", "binary_inductor")
MODELS = ("minilm-l6", "bert-base-shape")
CONV_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))  # ResNet-18 stages: channels in = out, input height = width
CONV_BATCHES = (1, 8)
# (model, heads, tokens): BERT-base; ViT-small at 224 x 224, patch 32 (7 x 7 patches + CLS) and 16 (14 x 14 + CLS)
ATTENTION_SHAPES = (("bert-base", 12, 32), ("bert-base", 12, 64), ("bert-base", 12, 128), ("vit-small", 3, 50),
                    ("vit-small", 3, 197))
ATTENTION_BATCHES = (1, 8)
HEAD_DIM = 64
PARTS = ("layers", "end_to_end", "memory", "conv", "attention")


def median_seconds(candidates: dict[str, Callable[[], object]], rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin (see the module docstring)."""
    repeats = {}
    for name, call in candidates.items():
        call()  # warm-up: first-use builds, caches
        start = time.perf_counter()
        call()
        repeats[name] = max(1, round(min_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            samples[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def without_kernel(call: Callable[[], object]) -> Callable[[], object]:
    def run():
        with kernels.disabled():
            return call()
    return run


def int8_dynamic(model: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def with_ratios(seconds: dict[str, float]) -> dict:
    kernel = seconds["binary_kernel"]
    return {"ms": {name: 1e3 * value for name, value in seconds.items()},
            "speedup_of_binary_kernel_over": {name: value / kernel for name, value in seconds.items()
                                              if name != "binary_kernel"}}


def layer_level(rounds: int, min_seconds: float, shapes: dict, rows: tuple[int, ...]) -> list[dict]:
    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for family, family_shapes in shapes.items():
            for in_features, out_features in family_shapes:
                torch.manual_seed(0)
                linear = nn.Linear(in_features, out_features)
                quantized = int8_dynamic(nn.Sequential(linear))
                binary = BinaryLinear.from_surge(SurgeLinear.from_float(nn.Linear(in_features, out_features),
                                                                        SurgeConfig())).eval()
                for m in rows:
                    x = torch.randn(m, in_features)
                    with torch.inference_mode():
                        seconds = median_seconds({
                            "float32": lambda: linear(x),
                            "int8_dynamic": lambda: quantized(x),
                            "binary_kernel": lambda: binary(x),
                            "binary_reference": without_kernel(lambda: binary(x)),
                        }, rounds, min_seconds)
                    row = {"family": family, "in_features": in_features, "out_features": out_features, "rows": m,
                           "threads": threads, **with_ratios(seconds)}
                    results.append(row)
                    print(f"layer {family} {in_features}x{out_features} M={m} threads={threads}: "
                          + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()), flush=True)
    return results


def conv_level(rounds: int, min_seconds: float, shapes: tuple[tuple[int, int], ...],
               batches: tuple[int, ...]) -> list[dict]:
    """3x3 convolutions with padding 1 (see the module docstring): the packed layer on the kernel and on its reference
    path, float32 `nn.Conv2d`, on NCHW inputs, and the kernel and float32 on channels_last inputs."""
    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for channels, size in shapes:
            torch.manual_seed(0)
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            surge = SurgeConv2d.from_float(nn.Conv2d(channels, channels, 3, padding=1, bias=False), SurgeConfig())
            binary = BinaryConv2d.from_surge(surge).eval()
            for batch in batches:
                x = torch.randn(batch, channels, size, size)
                x_last = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    seconds = median_seconds({
                        "float32": lambda: conv(x),
                        "binary_kernel": lambda: binary(x),
                        "binary_reference": without_kernel(lambda: binary(x)),
                        "float32_channels_last": lambda: conv(x_last),
                        "binary_kernel_channels_last": lambda: binary(x_last),
                    }, rounds, min_seconds)
                row = {"channels": channels, "size": size, "batch": batch, "threads": threads, **with_ratios(seconds)}
                row["channels_last_speedup_of_binary_kernel_over_float32"] = (
                    seconds["float32_channels_last"] / seconds["binary_kernel_channels_last"])
                results.append(row)
                print(f"conv {channels}x{channels} 3x3 at {size}x{size} batch={batch} threads={threads}: "
                      + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()), flush=True)
    return results


def attention_level(rounds: int, min_seconds: float, shapes: tuple[tuple[str, int, int], ...],
                    batches: tuple[int, ...]) -> list[dict]:
    """Binary attention (see the module docstring): the scores on the kernel and on the reference path, and the whole
    attention function with the kernel on and off."""
    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for model, heads, tokens in shapes:
            module = nn.Module()
            module.binary_attention = BinaryAttentionProbabilities(heads, SurgeConfig().attention_alpha_init)
            module.eval()
            scaling = HEAD_DIM**-0.5
            for batch in batches:
                torch.manual_seed(0)
                q, k, v = (torch.randn(batch, tokens, heads, HEAD_DIM).transpose(1, 2) for _ in range(3))

                def attention(module=module, q=q, k=k, v=v):
                    return binary_attention_forward(module, q, k, v, None, scaling=scaling)

                with torch.inference_mode():
                    seconds = median_seconds({
                        "scores_reference": lambda q=q, k=k: torch.matmul(_sign(q), _sign(k).transpose(2, 3)) * scaling,
                        "scores_kernel": lambda q=q, k=k: kernels.sign_scores(q, k, scaling),
                        "attention_reference": without_kernel(attention),
                        "attention_kernel": attention,
                    }, rounds, min_seconds)
                row = {"model": model, "heads": heads, "tokens": tokens, "head_dim": HEAD_DIM, "batch": batch,
                       "threads": threads, "ms": {name: 1e3 * value for name, value in seconds.items()},
                       "scores_speedup_of_kernel": seconds["scores_reference"] / seconds["scores_kernel"],
                       "attention_speedup_of_kernel": seconds["attention_reference"] / seconds["attention_kernel"]}
                results.append(row)
                print(f"attention {model} heads={heads} tokens={tokens} batch={batch} threads={threads}: "
                      + ", ".join(f"{k} {v:.4f} ms" for k, v in row["ms"].items()), flush=True)
    return results


def save_models(workdir: Path, names: tuple[str, ...], minilm: Path) -> dict[str, dict[str, Path]]:
    """Save the float32 and packed forms of each end-to-end model of `names`; returns their folders."""
    bases = {}
    if "minilm-l6" in names and minilm.is_dir():
        bases["minilm-l6"] = BertForSequenceClassification.from_pretrained(minilm, dtype=torch.float32, num_labels=2)
    elif "minilm-l6" in names:
        print(f"{minilm} is absent: skipping MiniLM-L6")
    if "bert-base-shape" in names:
        torch.manual_seed(0)
        bases["bert-base-shape"] = BertForSequenceClassification(BertConfig(num_labels=2))
    folders = {}
    for name, model in bases.items():
        float_dir, packed_dir, int8_embedding_dir = (workdir / name / form for form in ("float32", "packed",
                                                                                      "packed_int8_embeddings"))
        model.save_pretrained(float_dir)
        surge = SurgeBertForSequenceClassification.from_pretrained(float_dir, surge=SurgeConfig()).finalize()
        surge.save_pretrained(packed_dir)
        surge.quantize_embeddings().save_pretrained(int8_embedding_dir)
        torch.save(int8_dynamic(model).state_dict(), workdir / name / "int8_dynamic.pt")
        folders[name] = {"float32": float_dir, "packed": packed_dir, "packed_int8_embeddings": int8_embedding_dir,
                         "int8_dynamic": workdir / name / "int8_dynamic.pt"}
    return folders


def load(form: str, folder: Path) -> nn.Module:
    if form in ("float32", "int8_dynamic"):
        model = BertForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        return (int8_dynamic(model) if form == "int8_dynamic" else model).eval()
    return SurgeBertForSequenceClassification.from_pretrained(folder).eval()


def compiled_forms(binary: nn.Module) -> dict[str, nn.Module]:
    """The packed model under `torch.compile` (after an eager call has built its kernel panels and sign-output
    bounds, see the README): graph capture alone (`backend="eager"`: no generated code, so every float operation
    rounds as in eager mode) and inductor (generated code for the float parts: LayerNorm, adds, attention)."""
    return {"binary_compiled": torch.compile(binary, backend="eager", dynamic=False),
            "binary_inductor": torch.compile(copy.deepcopy(binary), dynamic=False)}


def compiled_ratios(seconds: dict[str, float], logits: dict[str, torch.Tensor]) -> dict:
    """Each compiled form's speed-up over the eager float32 and int8 models, and its largest logit difference from
    the eager packed model (0 when its outputs are `torch.equal`)."""
    return {form: {"speedup_over": {base: seconds[base] / seconds[form] for base in ("float32", "int8_dynamic",
                                                                                   "binary_kernel")},
                   "max_abs_logit_difference": (logits[form] - logits["binary_kernel"]).abs().max().item()}
            for form in COMPILED_FORMS if form in seconds}


def end_to_end(folders: dict, rounds: int, min_seconds: float, threads_list: tuple[int, ...] = THREADS,
               compiled: bool = False) -> list[dict]:
    results = []
    for name, paths in folders.items():
        models = {"float32": load("float32", paths["float32"]), "int8_dynamic": load("int8_dynamic", paths["float32"]),
                  "binary": load("packed", paths["packed"])}
        models["binary_float_outputs"] = copy.deepcopy(models["binary"])
        unfold_sign_outputs(models["binary_float_outputs"])
        vocab = models["float32"].config.vocab_size
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch, length in BATCHES:
                ids = torch.randint(1000, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                with torch.inference_mode():
                    logits = {"binary_kernel": models["binary"](**inputs).logits}
                    candidates = {
                        "float32": lambda: models["float32"](**inputs),
                        "int8_dynamic": lambda: models["int8_dynamic"](**inputs),
                        "binary_kernel": lambda: models["binary"](**inputs),
                        "binary_float_outputs": lambda: models["binary_float_outputs"](**inputs),
                        "binary_reference": without_kernel(lambda: models["binary"](**inputs)),
                    }
                    for form, model in (compiled_forms(models["binary"]) if compiled else {}).items():
                        logits[form] = model(**inputs).logits
                        candidates[form] = lambda model=model: model(**inputs)
                    seconds = median_seconds(candidates, rounds, min_seconds)
                row = {"model": name, "batch": batch, "tokens": length, "threads": threads,
                       **with_ratios({form: seconds[form] for form in FORMS}),
                       **({"compiled": compiled_ratios(seconds, logits),
                           "compiled_ms": {form: 1e3 * seconds[form] for form in COMPILED_FORMS}} if compiled else {})}
                results.append(row)
                print(f"e2e {name} {batch}x{length} threads={threads}: "
                      + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in seconds.items()), flush=True)
    return results


def profile(rounds: int, minilm: Path) -> dict:
    """Self CPU time per operator of the packed MiniLM-L6 classifier at 32 x 64, one thread (torch.profiler)."""
    torch.set_num_threads(1)
    model = SurgeBertForSequenceClassification.from_pretrained(minilm, surge=SurgeConfig(), dtype=torch.float32,
                                                               num_labels=2).finalize()
    ids = torch.randint(1000, model.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids)
        with torch.profiler.profile() as profiler:
            for _ in range(rounds):
                model(input_ids=ids)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    return {"command": shlex.join(["python", "benchmarks/inference.py", *sys.argv[1:]]), "model": "minilm-l6 packed",
            "batch": [32, 64],
            "threads": 1, "forwards": rounds, "ms_per_forward": total / 1e3 / rounds,
            "self_cpu_share": {event.key: event.self_cpu_time_total / total for event in events[:8]}}


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tensor_bytes(value: object) -> int:
    """Bytes of the tensors in `value` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    return 0


def measure_memory(form: str, folder: Path) -> dict[str, int]:
    """Run in a fresh process: RSS growth from loading `form`, running one 1 x 32 forward and reading every weight
    (weights loaded from safetensors may stay file-backed until read), and the bytes of the tensors the model holds
    (state dict, plus the packed layers' kernel panels)."""
    torch.set_num_threads(1)
    gc.collect()
    before = resident_bytes()
    model = load(form, folder)
    with torch.inference_mode():
        model(input_ids=torch.full((1, 32), 1000))
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    gc.collect()
    held = tensor_bytes(model.state_dict()) + sum(tensor_bytes(module.__dict__.get("_panels"))
                                                  for module in model.modules())
    return {"rss_delta_bytes": resident_bytes() - before, "tensor_bytes": held}


def memory_and_files(folders: dict) -> dict:
    results = {}
    for name, paths in folders.items():
        row = {"rss_delta_bytes": {}, "tensor_bytes": {}, "file_bytes": {}}
        for form in ("float32", "int8_dynamic", "packed", "packed_int8_embeddings"):
            folder = paths["float32"] if form == "int8_dynamic" else paths[form]
            command = [sys.executable, __file__, "--memory", form, str(folder)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
            for key, value in json.loads(output.rpartition("MEMORY=")[2]).items():
                row[key][form] = value
            path = paths[form] if form == "int8_dynamic" else paths[form] / "model.safetensors"
            row["file_bytes"][form] = path.stat().st_size
        for key in ("file_bytes", "rss_delta_bytes", "tensor_bytes"):
            row[f"{key}_ratio_float32_over"] = {form: row[key]["float32"] / size for form, size in row[key].items()}
        results[name] = row
        print(f"memory {name}: {row}", flush=True)
    return results


COMPILED_FORM_NAMES = {"binary_compiled": "torch.compile, backend eager (graph capture only)",
                       "binary_inductor": "torch.compile, inductor"}
FORM_NAMES = {"float32": "float32", "int8_dynamic": "int8 dyn.", "binary_kernel": "binary kernel",
              "binary_float_outputs": "binary, float outputs", "binary_reference": "binary reference"}


def timing_table(title: str, rows: list[dict], label_columns: str, label: Callable[[dict], str],
                 digits: int) -> list[str]:
    """A markdown section (none without rows): label, threads, each candidate's ms and the binary kernel's speed-up
    over the others."""
    if not rows:
        return []
    forms = [form for form in FORMS if form in rows[0]["ms"]]
    others = [form for form in forms if form != "binary_kernel"]
    header = (f"| {label_columns} | threads | " + " | ".join(FORM_NAMES[form] for form in forms) + " | "
              + " | ".join(f"vs {FORM_NAMES[form]}" for form in others) + " |")
    lines = ["", f"## {title}", "", header, "| --- " * (header.count("|") - 1) + "|"]
    for row in rows:
        ms, ratio = row["ms"], row["speedup_of_binary_kernel_over"]
        times = " | ".join(f"{ms[form]:.{digits}f}" for form in forms)
        ratios = " | ".join(f"{ratio[form]:.2f}x" for form in others)
        lines.append(f"| {label(row)} | {row['threads']} | {times} | {ratios} |")
    return lines


def compiled_table(rows: list[dict]) -> list[str]:
    """The markdown section of the compiled packed models (none without them): ms per batch, speed-up over the eager
    float32, int8 dynamic and packed models, and the largest logit difference from the eager packed model."""
    rows = [row for row in rows if "compiled" in row]
    if not rows:
        return []
    lines = ["", "## The packed model under torch.compile (ms per batch; speed-up over the eager models)", "",
             "| model | batch x tokens | threads | form | ms | vs float32 | vs int8 dyn. | vs binary kernel (eager) | "
             "max abs logit difference from eager |", "| --- " * 9 + "|"]
    for row in rows:
        for form, result in row["compiled"].items():
            ratio = result["speedup_over"]
            lines.append(f"| {row['model']} | {row['batch']} x {row['tokens']} | {row['threads']} | "
                         f"{COMPILED_FORM_NAMES[form]} | {row['compiled_ms'][form]:.1f} | {ratio['float32']:.2f}x | "
                         f"{ratio['int8_dynamic']:.2f}x | {ratio['binary_kernel']:.2f}x | "
                         f"{result['max_abs_logit_difference']:.2g} |")
    return lines


def conv_table(rows: list[dict]) -> list[str]:
    """The markdown section of the convolutions (none without rows): ms per call and the kernel's speed-ups."""
    if not rows:
        return []
    lines = ["", "## Convolutions, 3x3, padding 1, W1A1 (ms per call; speed-up of the binary kernel over each)", "",
             "| channels | input | batch | threads | float32 | binary kernel | binary reference | vs float32 "
             "| vs binary reference | channels_last: float32 | binary kernel | vs float32 |",
             "| --- " * 12 + "|"]
    for row in rows:
        ms, ratio = row["ms"], row["speedup_of_binary_kernel_over"]
        lines.append(
            f"| {row['channels']} -> {row['channels']} | {row['size']} x {row['size']} | {row['batch']} | "
            f"{row['threads']} | {ms['float32']:.3f} | {ms['binary_kernel']:.3f} | {ms['binary_reference']:.3f} | "
            f"{ratio['float32']:.2f}x | {ratio['binary_reference']:.2f}x | {ms['float32_channels_last']:.3f} | "
            f"{ms['binary_kernel_channels_last']:.3f} | "
            f"{row['channels_last_speedup_of_binary_kernel_over_float32']:.2f}x |")
    return lines


def attention_table(rows: list[dict]) -> list[str]:
    """The markdown section of binary attention (none without rows): ms per call and the kernel's speed-ups."""
    if not rows:
        return []
    lines = ["", f"## Binary attention, head_dim {HEAD_DIM} (ms per call; speed-up of the kernel over the reference "
             "path)", "",
             "| model | heads | tokens | batch | threads | scores: reference | kernel | speed-up "
             "| attention function: reference | kernel | speed-up |",
             "| --- " * 11 + "|"]
    for row in rows:
        ms = row["ms"]
        lines.append(
            f"| {row['model']} | {row['heads']} | {row['tokens']} | {row['batch']} | {row['threads']} | "
            f"{ms['scores_reference']:.4f} | {ms['scores_kernel']:.4f} | {row['scores_speedup_of_kernel']:.2f}x | "
            f"{ms['attention_reference']:.4f} | {ms['attention_kernel']:.4f} | "
            f"{row['attention_speedup_of_kernel']:.2f}x |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# CPU inference: `{report['command']}`", "",
             f"{report['machine']}; torch {report['torch']}, kernel instruction set `{report['kernel_isa']}`. "
             "Medians of round-robin rounds on a shared machine: read the ratios. Load average (1 min) at the start "
             f"and the end: {report['load_average']['start']:.1f}, {report['load_average']['end']:.1f}. "
             + report.get("note", ""),
             *timing_table("Layer level (ms per call; speed-up of the binary kernel over each)", report["layers"],
                           "shape (in x out) | M",
                           lambda r: f"{r['family']} {r['in_features']}x{r['out_features']} | {r['rows']}", 3),
             *timing_table("End to end, sequence classification (ms per batch)", report["end_to_end"],
                           "model | batch x tokens", lambda r: f"{r['model']} | {r['batch']} x {r['tokens']}", 1),
             *compiled_table(report["end_to_end"]), *conv_table(report["conv"]), *attention_table(report["attention"])]
    if report["memory"]:
        lines += ["", "## Memory and files (MB; in parentheses: float32 / this form)", "",
                  "| model | form | file | tensors held | RSS growth after load, 1 forward, reading every weight |",
                  "| --- | --- | --- | --- | --- |"]
    for name, row in report["memory"].items():
        for form in row["file_bytes"]:
            cells = [f"{row[key][form] / 1e6:.1f} ({row[f'{key}_ratio_float32_over'][form]:.1f}x)"
                     for key in ("file_bytes", "tensor_bytes", "rss_delta_bytes")]
            lines.append(f"| {name} | {form} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(THREADS), figsize=(6 * len(THREADS), 4.2), sharey=True)
    for axis, threads in zip(axes, THREADS):
        for family, shapes in LAYER_SHAPES.items():
            for in_features, out_features in shapes:
                rows = [r for r in report["layers"] if r["threads"] == threads and r["family"] == family
                        and (r["in_features"], r["out_features"]) == (in_features, out_features)]
                if not rows:
                    continue
                axis.plot([r["rows"] for r in rows], [r["speedup_of_binary_kernel_over"]["float32"] for r in rows],
                          marker="o", linestyle="-" if family == "bert-base" else "--",
                          label=f"{family} {in_features}x{out_features}")
        axis.axhline(1, color="gray", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set_xlabel("rows M")
        axis.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
    axes[0].set_ylabel("binary kernel speed-up over float32 F.linear")
    axes[-1].legend(fontsize=8)
    figure.suptitle("W1A1 BinaryLinear (XNOR-popcount) vs float32, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="round-robin rounds per configuration")
    parser.add_argument("--min_ms", type=float, default=20.0, help="repeat each call to fill this many ms per round")
    parser.add_argument("--quick", action="store_true",
                        help="MiniLM shapes, M = 1 and 32, the 256- and 512-channel convolutions at batch 1, "
                             "three attention shapes at batch 1, 3 rounds")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default results/inference_cpu.json, or results/inference_cpu_quick.json)")
    parser.add_argument("--profile", action="store_true", help="profile the packed MiniLM-L6 at 32 x 64 instead")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"end-to-end models, a comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--minilm", type=Path, default=MINILM, help="the all-MiniLM-L6-v2 folder")
    parser.add_argument("--threads", default=",".join(map(str, THREADS)),
                        help="comma-separated thread counts of the end-to-end part")
    parser.add_argument("--compiled", action="store_true",
                        help="end to end: also the packed model under torch.compile (graph capture only, and inductor)")
    parser.add_argument("--note", default="", help="a note on the conditions, kept in the JSON and the markdown")
    parser.add_argument("--memory", nargs=2, metavar=("FORM", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    parts, models = tuple(args.parts.split(",")), tuple(args.models.split(","))
    thread_counts = tuple(int(count) for count in args.threads.split(","))
    if not set(parts) <= set(PARTS) or not set(models) <= set(MODELS):
        parser.error(f"--parts takes {', '.join(PARTS)}; --models takes {', '.join(MODELS)}")
    if args.memory:
        print("MEMORY=" + json.dumps(measure_memory(args.memory[0], Path(args.memory[1]))))
        return
    if not kernels.available():
        raise SystemExit("The surge_hf CPU kernel is not available here; nothing to measure.")
    transformers.logging.set_verbosity_error()
    if args.profile:
        report = profile(args.rounds, args.minilm)
        (args.output or RESULTS / "inference_profile_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return
    output = args.output or RESULTS / ("inference_cpu_quick.json" if args.quick else "inference_cpu.json")
    shapes, rows, rounds = (({"minilm": LAYER_SHAPES["minilm"]}, (1, 32), 3) if args.quick
                            else (LAYER_SHAPES, ROWS, args.rounds))
    threads = torch.get_num_threads()
    conv_shapes, conv_batches = (CONV_SHAPES[2:], (1,)) if args.quick else (CONV_SHAPES, CONV_BATCHES)
    attention_shapes, attention_batches = ((ATTENTION_SHAPES[::2], (1,)) if args.quick
                                           else (ATTENTION_SHAPES, ATTENTION_BATCHES))
    report = {
        "command": shlex.join(["python", "benchmarks/inference.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {platform.system()}, "
                   f"{torch.get_num_threads()} threads available",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernel_isa": kernels.isa(),
        "note": args.note,
        "recipe": SurgeConfig().to_dict(),
        "rounds": rounds,
        "min_ms": args.min_ms,
        "layers": layer_level(rounds, args.min_ms / 1e3, shapes, rows) if "layers" in parts else [],
        "end_to_end": [],
        "memory": {},
        "conv": [],
        "attention": [],
        "load_average": {"start": os.getloadavg()[0]},
    }
    if "end_to_end" in parts or "memory" in parts:
        with tempfile.TemporaryDirectory() as workdir:
            folders = save_models(Path(workdir), models, args.minilm)
            if "end_to_end" in parts:
                report["end_to_end"] = end_to_end(folders, rounds, args.min_ms / 1e3, thread_counts, args.compiled)
            if "memory" in parts:
                report["memory"] = memory_and_files(folders)
    if "conv" in parts:
        report["conv"] = conv_level(rounds, args.min_ms / 1e3, conv_shapes, conv_batches)
    if "attention" in parts:
        report["attention"] = attention_level(rounds, args.min_ms / 1e3, attention_shapes, attention_batches)
    report["load_average"]["end"] = os.getloadavg()[0]
    torch.set_num_threads(threads)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(report))
    if report["layers"]:
        plot(report, output.with_suffix(".png"))
    print(f"wrote {output} (+ .md{', .png' if report['layers'] else ''})")


if __name__ == "__main__":
    main()
