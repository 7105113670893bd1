"""Accuracy change from storing the embeddings of a trained packed text classifier in int8 (per-row scales).

Loads a packed checkpoint (e.g. the output of `scripts/glue.py`), evaluates it on a validation CSV (`sentence`,
`label`) as saved (float32 embeddings) and after `model.quantize_embeddings()`, and saves the int8 form next to a
temporary copy to compare file sizes. Reports both accuracies, the share of identical predictions and the largest
logit difference.

    DATA=../shared/data/rotten_tomatoes
    python scripts/glue.py --model_name_or_path ../shared/models/all-MiniLM-L6-v2 \\
        --train_file $DATA/train.csv --validation_file $DATA/validation.csv \\
        --binarize ste --num_train_epochs 2 --max_seq_length 32 --per_device_train_batch_size 32 --seed 0 \\
        --output_dir outputs/rt-ste
    python benchmarks/int8_embeddings.py --model outputs/rt-ste     # writes benchmarks/results/int8_embeddings.json

Without a trained model, `--binarize_untrained ../shared/models/all-MiniLM-L6-v2` packs the pretrained model as it is
(binarized, not fine-tuned, random classifier): its accuracy is meaningless. Both modes also report the same
comparison for Gaussian noise of the int8 rounding error's size added to the float tables, to tell the effect of int8
from the model's sensitivity to any perturbation of that size.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import surge_hf
from surge_hf.embeddings import quantize_rows

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


def logits_with_noise_like_int8(model, tokenizer, sentences: list[str], max_length: int) -> torch.Tensor:
    """Logits with each embedding table perturbed by Gaussian noise of the int8 rounding error's size (per table
    RMS), restoring the tables afterwards: how much any perturbation of that size moves this model."""
    tables = [module.weight for module in model.modules() if type(module) is torch.nn.Embedding]
    originals = [table.detach().clone() for table in tables]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for table in tables:
            quantized, scale = quantize_rows(table)
            error_rms = (table - quantized.float() * scale.unsqueeze(1)).pow(2).mean().sqrt()
            table.add_(torch.randn(table.shape, generator=generator) * error_rms)
    logits = logits_of(model, tokenizer, sentences, max_length)
    with torch.no_grad():
        for table, original in zip(tables, originals):
            table.copy_(original)
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path,
                        help="a packed (or train-form, packed here) checkpoint folder with its tokenizer")
    source.add_argument("--binarize_untrained", type=Path, help="a float BERT checkpoint to binarize and pack as is")
    parser.add_argument("--validation_file", type=Path, default=VALIDATION)
    parser.add_argument("--max_seq_length", type=int, default=32)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "int8_embeddings.json")
    args = parser.parse_args()
    source = f"--binarize_untrained {args.binarize_untrained}" if args.binarize_untrained else f"--model {args.model}"
    transformers.logging.set_verbosity_error()
    with args.validation_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sentences, labels = [row["sentence"] for row in rows], torch.tensor([int(row["label"]) for row in rows])
    if args.binarize_untrained:
        tokenizer = AutoTokenizer.from_pretrained(args.binarize_untrained)
        torch.manual_seed(0)
        model = surge_hf.SurgeBertForSequenceClassification.from_pretrained(
            args.binarize_untrained, surge=surge_hf.SurgeConfig(), dtype=torch.float32, num_labels=2).finalize()
        args.model = Path(tempfile.mkdtemp())
        model.save_pretrained(args.model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    if not model.is_packed:  # a train-form checkpoint (e.g. OUTPUT_DIR/train_state): pack it here
        model.finalize()
        args.model = Path(tempfile.mkdtemp())
        model.save_pretrained(args.model)
    float_logits = logits_of(model, tokenizer, sentences, args.max_seq_length)
    noise_logits = logits_with_noise_like_int8(model, tokenizer, sentences, args.max_seq_length)
    model.quantize_embeddings()
    int8_logits = logits_of(model, tokenizer, sentences, args.max_seq_length)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        int8_file = (Path(folder) / "model.safetensors").stat().st_size
    float_predictions, int8_predictions = float_logits.argmax(-1), int8_logits.argmax(-1)
    report = {
        "command": f"python benchmarks/int8_embeddings.py {source} --output {args.output}",
        "model": source.split(" ", 1)[1],
        "trained": not args.binarize_untrained,
        "validation_examples": len(labels),
        "int8_embeddings": model.config.surge_int8_embeddings,
        "accuracy_float32_embeddings": (float_predictions == labels).float().mean().item(),
        "accuracy_int8_embeddings": (int8_predictions == labels).float().mean().item(),
        "identical_predictions": (float_predictions == int8_predictions).float().mean().item(),
        "max_abs_logit_difference": (float_logits - int8_logits).abs().max().item(),
        "same_size_noise": {
            "identical_predictions": (float_predictions == noise_logits.argmax(-1)).float().mean().item(),
            "max_abs_logit_difference": (float_logits - noise_logits).abs().max().item(),
        },
        "majority_class_share": max(labels.float().mean().item(), 1 - labels.float().mean().item()),
        "file_bytes": {"float32_embeddings": (args.model / "model.safetensors").stat().st_size,
                       "int8_embeddings": int8_file},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
