"""Measure checkpoint file sizes: the packed SURGE checkpoint against the float32 checkpoint of the same model.

For each model (the real all-MiniLM-L6-v2 from ``../shared/models``, and a random BERT-base-shaped model: hidden 768,
12 layers, intermediate 3072) it saves, as a sequence classifier with 2 labels:

- ``float32``: the plain transformers model in float32 (``BertForSequenceClassification.save_pretrained``);
- ``train``: the SURGE training checkpoint (latent weights + auxiliary weights + thresholds);
- ``packed``: the SURGE packed checkpoint (``save_pretrained(path, packed=True)``),

and reports the real ``model.safetensors`` sizes, plus the bytes of the binarized layers read from the packed
file's tensors:

- ``binarized_weights``: packed sign bits + per-channel scales, against the float32 bytes of the same weights
  (``4 * out * in``); the ratio is at most 32 (the scales cost ``4 * out`` bytes per layer);
- ``binarized_layers``: every tensor of those layers (bits, scales, biases, activation thresholds), against float32
  weights + biases.

    python benchmarks/checkpoint_size.py            # writes benchmarks/results/checkpoint_size.json

Runs on CPU in well under a minute; needs about 2 GB of free disk in the temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification

from surge_hf import BinaryLinear, SurgeBertForSequenceClassification, SurgeConfig, summary

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "checkpoint_size.json"
_DTYPE_BYTES = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}


def file_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def binarized_layer_bytes(folder: Path, model: SurgeBertForSequenceClassification) -> dict[str, int]:
    """Stored bytes of the binarized layers of a packed checkpoint, and the float32 bytes they replace."""
    totals = dict.fromkeys(("weights_stored", "weights_float32", "layers_stored", "layers_float32"), 0)
    with safe_open(folder / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        for name, module in model.named_modules():
            if not isinstance(module, BinaryLinear):
                continue
            weight_float32 = 4 * math.prod(module.weight_shape)
            bias_float32 = 4 * module.weight_shape[0] if module.bias is not None else 0
            totals["weights_float32"] += weight_float32
            totals["layers_float32"] += weight_float32 + bias_float32
            for key in sorted(k for k in keys if k.startswith(f"{name}.")):
                part = handle.get_slice(key)
                size = math.prod(part.get_shape()) * _DTYPE_BYTES[part.get_dtype()]
                totals["layers_stored"] += size
                if key.endswith((".weight_packed", ".weight_scale")):
                    totals["weights_stored"] += size
    return totals


def measure(name: str, float_model: BertForSequenceClassification, workdir: Path) -> dict:
    """Save the three forms of `float_model` under `workdir/name` and return the sizes and ratios."""
    folder = workdir / name
    float_model.save_pretrained(folder / "float32")
    surge = SurgeBertForSequenceClassification.from_pretrained(folder / "float32", surge=SurgeConfig())
    surge.save_pretrained(folder / "train")
    surge.save_pretrained(folder / "packed", packed=True)
    packed = SurgeBertForSequenceClassification.from_pretrained(folder / "packed")
    layers = binarized_layer_bytes(folder / "packed", packed)
    account = summary(packed)
    sizes = {form: file_bytes(folder / form) for form in ("float32", "train", "packed")}
    return {
        "file_bytes": sizes,
        "whole_file_ratio_float32_over_packed": sizes["float32"] / sizes["packed"],
        "binarized_weights": {
            "packed_bits_and_scales_bytes": layers["weights_stored"],
            "float32_bytes": layers["weights_float32"],
            "ratio": layers["weights_float32"] / layers["weights_stored"],
        },
        "binarized_layers_with_bias_and_thresholds": {
            "stored_bytes": layers["layers_stored"],
            "float32_weight_and_bias_bytes": layers["layers_float32"],
            "ratio": layers["layers_float32"] / layers["layers_stored"],
        },
        "summary": {
            "binary_params": account.binary_params,
            "full_precision_params": account.full_precision_params,
            "binarized_layer_compression_ratio": account.binarized_layer_compression_ratio,
            "compression_ratio": account.compression_ratio,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    results = {
        "command": "python benchmarks/checkpoint_size.py",
        "machine": f"{platform.machine()} CPU, {platform.system()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "recipe": SurgeConfig().to_dict(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        if MINILM.is_dir():
            minilm = BertForSequenceClassification.from_pretrained(MINILM, dtype=torch.float32, num_labels=2)
            results["models"]["all-MiniLM-L6-v2"] = measure("minilm", minilm, Path(workdir))
        else:
            print(f"{MINILM} is absent: skipping MiniLM-L6")
        torch.manual_seed(0)
        bert_base = BertForSequenceClassification(BertConfig(num_labels=2))
        results["models"]["bert-base-shape (random)"] = measure("bert_base", bert_base, Path(workdir))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for name, row in results["models"].items():
        print(f"{name}: packed {row['file_bytes']['packed']:,} B vs float32 {row['file_bytes']['float32']:,} B "
              f"({row['whole_file_ratio_float32_over_packed']:.2f}x whole file); binarized weights "
              f"{row['binarized_weights']['ratio']:.2f}x, with bias and thresholds "
              f"{row['binarized_layers_with_bias_and_thresholds']['ratio']:.2f}x")


if __name__ == "__main__":
    main()
