"""How far is a freshly binarized MiniLM-L6 from the pretrained one, per recipe and per layer?

    python benchmarks/calibration_effect.py --output benchmarks/results/calibration_effect.json

Binarizes all-MiniLM-L6-v2 with each recipe below and compares every layer's hidden states (the embedding output
and the output of each of the 6 layers) with the full-precision model's on Rotten Tomatoes validation snippets:
the mean cosine similarity per token (padding excluded), and of the first token for the last layer. Recipes with
learnable quantizers are measured at their default initialisation (tau = 0, s = 1, alpha = mean |W|) and after
`surge_hf.calibrate` on a separate batch of training snippets.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertModel

import surge_hf

SHARED = Path(__file__).resolve().parents[2] / "shared"
FFN_OUTPUT = r".*layer\.\d+\.output\.dense"  # its input is the GELU output: non-negative up to -0.17
RECIPES = {
    "rsign (W1A1, the former default)": {},
    "elastic W1A1": {"activation_binarizer": "elastic"},
    "elastic W1A1 + learned alpha": {"activation_binarizer": "elastic", "learnable_weight_scale": True},
    "elastic W1A1 + unsigned FFN input": {"activation_binarizer": "elastic",
                                          "unsigned_activation_modules": FFN_OUTPUT},
    "elastic W1A2": {"activation_binarizer": "elastic", "activation_bits": 2},
    "elastic W1A4": {"activation_binarizer": "elastic", "activation_bits": 4},
    "elastic W1A8": {"activation_binarizer": "elastic", "activation_bits": 8},
    "elastic W1A8 + learned alpha": {"activation_binarizer": "elastic", "activation_bits": 8,
                                     "learnable_weight_scale": True},
}


def snippets(path: Path, count: int) -> list[str]:
    with open(path, newline="") as handle:
        return [row["sentence"] for row, _ in zip(csv.DictReader(handle), range(count))]


def layer_similarity(reference: tuple[torch.Tensor, ...], candidate: tuple[torch.Tensor, ...],
                     mask: torch.Tensor) -> dict[str, object]:
    """Mean token cosine of every hidden state (embeddings first), and the last layer's first-token cosine."""
    per_layer = [(F.cosine_similarity(r, c, dim=-1) * mask).sum().item() / mask.sum().item()
                 for r, c in zip(reference, candidate)]
    first = F.cosine_similarity(reference[-1][:, 0], candidate[-1][:, 0], dim=-1).mean().item()
    return {"token_cosine_per_layer": per_layer, "last_layer_first_token_cosine": first}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--data_dir", type=Path, default=SHARED / "data" / "rotten_tomatoes")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64))

    calibration = encode(snippets(args.data_dir / "train.csv", args.batch_size))
    evaluation = encode(snippets(args.data_dir / "validation.csv", args.batch_size))
    mask = evaluation["attention_mask"].float()
    full = BertModel.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = full(**evaluation, output_hidden_states=True).hidden_states
    results = {"command": "python benchmarks/calibration_effect.py", "batch_size": args.batch_size,
               "machine": "CPU", "torch": torch.__version__, "recipes": {}}
    for name, fields in RECIPES.items():
        binary = surge_hf.binarize(copy.deepcopy(full), surge_hf.SurgeConfig(**fields))
        row = {"recipe": fields,
               "default_init": layer_similarity(reference, binary(**evaluation, output_hidden_states=True)
                                                .hidden_states, mask)}
        if fields.get("activation_binarizer") == "elastic":
            surge_hf.calibrate(binary, **calibration)
            row["calibrated"] = layer_similarity(
                reference, binary(**evaluation, output_hidden_states=True).hidden_states, mask)
        results["recipes"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "recipe"}))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
