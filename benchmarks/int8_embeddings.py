"""Accuracy change from storing the embeddings of a trained packed text classifier in int8 (per-row scales) or in
4 bits (a scale per group of columns).

Loads a packed checkpoint (e.g. the output of `scripts/glue.py`), evaluates it on a validation CSV (`sentence`,
`label`) as saved (float32 embeddings), after `model.quantize_embeddings()` (int8) and after
`model.quantize_embeddings(bits=4, group_size=G)` for each `--int4_group_sizes`, and saves each quantized form in a
temporary folder to compare file sizes (with `--teacher`, also against that float32 checkpoint). Reports each
accuracy, the share of predictions identical to the float32 tables', the largest logit difference and each table's
rounding error (RMS).

    DATA=../shared/data/rotten_tomatoes
    python scripts/glue.py --model_name_or_path ../shared/models/all-MiniLM-L6-v2 \\
        --train_file $DATA/train.csv --validation_file $DATA/validation.csv \\
        --binarize ste --num_train_epochs 2 --max_seq_length 32 --per_device_train_batch_size 32 --seed 0 \\
        --output_dir outputs/rt-ste
    python benchmarks/int8_embeddings.py --model outputs/rt-ste     # writes benchmarks/results/int8_embeddings.json
    python benchmarks/int8_embeddings.py --model outputs/rt-ste --teacher outputs/rt-teacher \\
        --int4_group_sizes 32 64 128 384 --output benchmarks/results/int4_embeddings.json

Without a trained model, `--binarize_untrained ../shared/models/all-MiniLM-L6-v2` packs the pretrained model as it is
(binarized, not fine-tuned, random classifier): its accuracy is meaningless. Both modes also report the same
comparison for Gaussian noise of each rounding error's size added to the float tables, to tell the effect of the
quantization from the model's sensitivity to any perturbation of that size.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import surge_hf
from surge_hf.embeddings import Int4Embedding, Int8Embedding

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ROOT.parent / "shared" / "data" / "rotten_tomatoes" / "validation.csv"


def logits_of(model, tokenizer, sentences: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            outputs.append(model(**batch).logits)
    return torch.cat(outputs)


def rounding_error_rms(table: torch.nn.Embedding, layout: dict[str, int]) -> torch.Tensor:
    """RMS of the rounding error of `table` in the quantized form `layout` (`{}`: int8, `{"group_size": G}`: 4-bit)."""
    table_type = Int4Embedding if layout else Int8Embedding
    return (table.weight - table_type.from_embedding(table, **layout).weight).pow(2).mean().sqrt()


def logits_with_noise_like(model, tokenizer, sentences: list[str], max_length: int,
                           layout: dict[str, int]) -> torch.Tensor:
    """Logits with each embedding table perturbed by Gaussian noise of the rounding error's size of the quantized
    form `layout` (per table RMS), restoring the tables afterwards: how much any perturbation of that size moves
    this model."""
    tables = [module for module in model.modules() if type(module) is torch.nn.Embedding]
    originals = [table.weight.detach().clone() for table in tables]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for table in tables:
            error_rms = rounding_error_rms(table, layout)
            table.weight.add_(torch.randn(table.weight.shape, generator=generator) * error_rms)
    logits = logits_of(model, tokenizer, sentences, max_length)
    with torch.no_grad():
        for table, original in zip(tables, originals):
            table.weight.copy_(original)
    return logits


def compare(float_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of `logits`, the share of predictions equal to those of `float_logits` and the largest difference."""
    predictions = logits.argmax(-1)
    return {"accuracy": (predictions == labels).float().mean().item(),
            "identical_predictions": (predictions == float_logits.argmax(-1)).float().mean().item(),
            "max_abs_logit_difference": (float_logits - logits).abs().max().item()}


def quantized_option(folder: Path, tokenizer, sentences: list[str], labels: torch.Tensor, max_length: int,
                     float_logits: torch.Tensor, layout: dict[str, int]) -> dict:
    """Load the packed checkpoint `folder`, measure its outputs with noise of the rounding error's size, quantize its
    embeddings to `layout` and measure again, and save it to read the file size."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    error_rms = {name: rounding_error_rms(module, layout).item() for name, module in model.named_modules()
                 if type(module) is torch.nn.Embedding}
    noise_logits = logits_with_noise_like(model, tokenizer, sentences, max_length, layout)
    model.quantize_embeddings(bits=4 if layout else 8, **layout)
    report = compare(float_logits, logits_of(model, tokenizer, sentences, max_length), labels)
    report["same_size_noise"] = compare(float_logits, noise_logits, labels)
    report["rounding_error_rms"] = error_rms
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        report["file_bytes"] = (Path(saved) / "model.safetensors").stat().st_size
    return report


def packed_checkpoint(args: argparse.Namespace) -> tuple[Path, AutoTokenizer]:
    """The folder of the packed checkpoint to measure and its tokenizer (packing a train-form or float checkpoint
    into a temporary folder first)."""
    if args.binarize_untrained:
        tokenizer = AutoTokenizer.from_pretrained(args.binarize_untrained)
        torch.manual_seed(0)
        model = surge_hf.SurgeBertForSequenceClassification.from_pretrained(
            args.binarize_untrained, surge=surge_hf.SurgeConfig(), dtype=torch.float32, num_labels=2).finalize()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model)
        if model.is_packed:
            return args.model, tokenizer
        model.finalize()  # a train-form checkpoint (e.g. OUTPUT_DIR/train_state): pack it here
    folder = Path(tempfile.mkdtemp())
    model.save_pretrained(folder)
    return folder, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path,
                        help="a packed (or train-form, packed here) checkpoint folder with its tokenizer")
    source.add_argument("--binarize_untrained", type=Path, help="a float BERT checkpoint to binarize and pack as is")
    parser.add_argument("--teacher", type=Path, help="a float32 checkpoint folder to compare the file sizes with")
    parser.add_argument("--int4_group_sizes", type=int, nargs="*", default=[],
                        help="also measure 4-bit tables with each of these group sizes")
    parser.add_argument("--validation_file", type=Path, default=VALIDATION)
    parser.add_argument("--max_seq_length", type=int, default=32)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "int8_embeddings.json")
    args = parser.parse_args()
    source = f"--binarize_untrained {args.binarize_untrained}" if args.binarize_untrained else f"--model {args.model}"
    options = f" --validation_file {args.validation_file}" if args.validation_file != VALIDATION else ""
    options += f" --teacher {args.teacher}" if args.teacher else ""
    options += f" --int4_group_sizes {' '.join(map(str, args.int4_group_sizes))}" if args.int4_group_sizes else ""
    transformers.logging.set_verbosity_error()
    with args.validation_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sentences, labels = [row["sentence"] for row in rows], torch.tensor([int(row["label"]) for row in rows])
    folder, tokenizer = packed_checkpoint(args)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    float_logits = logits_of(model, tokenizer, sentences, args.max_seq_length)
    measure = functools.partial(quantized_option, folder, tokenizer, sentences, labels, args.max_seq_length,
                                float_logits)
    int8 = measure({})
    int4 = {f"group_size={size}": measure({"group_size": size}) for size in args.int4_group_sizes}
    file_bytes = {"float32_embeddings": (folder / "model.safetensors").stat().st_size,
                  "int8_embeddings": int8["file_bytes"],
                  **{f"int4_embeddings_{name}": option["file_bytes"] for name, option in int4.items()}}
    report = {
        "command": f"python benchmarks/int8_embeddings.py {source}{options} --output {args.output}",
        "model": source.split(" ", 1)[1],
        "trained": not args.binarize_untrained,
        "validation_examples": len(labels),
        "embeddings": [name for name, module in model.named_modules() if type(module) is torch.nn.Embedding],
        "accuracy_float32_embeddings": (float_logits.argmax(-1) == labels).float().mean().item(),
        "accuracy_int8_embeddings": int8["accuracy"],
        "identical_predictions": int8["identical_predictions"],
        "max_abs_logit_difference": int8["max_abs_logit_difference"],
        "same_size_noise": {key: int8["same_size_noise"][key]
                            for key in ("identical_predictions", "max_abs_logit_difference")},
        "int8_rounding_error_rms": int8["rounding_error_rms"],
        "int4_embeddings": {name: {key: value for key, value in option.items() if key != "file_bytes"}
                            for name, option in int4.items()},
        "majority_class_share": max(labels.float().mean().item(), 1 - labels.float().mean().item()),
        "file_bytes": file_bytes,
    }
    if args.teacher:
        teacher_bytes = (args.teacher / "model.safetensors").stat().st_size
        report["teacher_file_bytes"] = teacher_bytes
        report["times_smaller_than_teacher"] = {name: teacher_bytes / size for name, size in file_bytes.items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
