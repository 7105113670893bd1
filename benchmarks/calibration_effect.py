"""How far is a freshly binarized MiniLM-L6 from the pretrained one, with and without activation calibration?

    python benchmarks/calibration_effect.py --output benchmarks/results/calibration_effect.json

Binarizes all-MiniLM-L6-v2 (default W1A1 recipe, `rsign` and `elastic` activation binarizers) and compares its
last hidden states with the full-precision model's on Rotten Tomatoes validation snippets: the mean cosine
similarity per token (padding excluded) and of the first token, with the binarizers at their default initialisation
(tau = 0, s = 1) and after `surge_hf.calibrate` on a separate batch of training snippets.
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


def snippets(path: Path, count: int) -> list[str]:
    with open(path, newline="") as handle:
        return [row["sentence"] for row, _ in zip(csv.DictReader(handle), range(count))]


def similarity(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    tokens = F.cosine_similarity(reference, candidate, dim=-1)
    return {"token_cosine": (tokens * mask).sum().item() / mask.sum().item(),
            "first_token_cosine": tokens[:, 0].mean().item()}


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
    reference = full(**evaluation).last_hidden_state
    results = {"command": "python benchmarks/calibration_effect.py", "batch_size": args.batch_size,
               "machine": "CPU", "torch": torch.__version__, "binarizers": {}}
    for binarizer in ("rsign", "elastic"):
        binary = surge_hf.binarize(copy.deepcopy(full), surge_hf.SurgeConfig(activation_binarizer=binarizer))
        default = similarity(reference, binary(**evaluation).last_hidden_state, mask)
        surge_hf.calibrate(binary, **calibration)
        calibrated = similarity(reference, binary(**evaluation).last_hidden_state, mask)
        results["binarizers"][binarizer] = {"default_init": default, "calibrated": calibrated}
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
