"""Which encoder Linears lose most to 1-bit weights, and would another weight form or scale help? (no training)

    OMP_NUM_THREADS=1 python benchmarks/weight_error.py --output benchmarks/results/weight_error_cpu.json

For a task-fine-tuned MiniLM-L6 classifier (default: the full-precision Rotten Tomatoes teacher of the augment
suite) and each of its 36 encoder Linears y = x W^T + b (W: out x in), with s = sign(W) in {-1, +1}:

(a) the error of each weight form W_q below, in weight space and in output space on the module's real inputs X
    (every non-padding token of the first `--num_snippets` training snippets at `--max_length`, as the float model
    computes them; captured by forward pre-hooks and kept as the Gram matrix G = X^T X):

        weight error  ||W - W_q||_F / ||W||_F
        output error  ||X W^T - X W_q^T||_F / ||X W^T||_F = sqrt(tr(D G D^T) / tr(W G W^T)),   D = W - W_q

    (the bias is the same on both sides and left out);
(b) sensitivity: the model with one group of Linears (one module type in every layer, or all of them: in each form;
    one layer, or all but one type: per_row only) with full-precision activations, and with surge_hf's W1A1 recipe
    (elastic sign activations, learned per-channel alpha, `surge_hf.calibrate` on the first 32 training snippets),
    compared with the float model on every validation snippet: accuracy, agreement with the float model's
    predictions, and the mean token cosine of the last hidden state (padding excluded;
    `calibration_effect.layer_similarity`);
(c) the mean of (a) per module type and per layer.

Weight forms, per output row o (w = W_o, s = sign(w)):

    per_row          alpha s, alpha = mean|w|                  surge_hf's per-channel binary weight
    per_row_ls       alpha s, alpha = <X w, X s> / ||X s||^2 = w^T G s / s^T G s     least squares in output space
    row_column       s * (a b^T)_o, a b^T the best rank-1 approximation of |W|      OneBit
    two_plane        alpha1 s + alpha2 sign(w - alpha1 s), alpha1 = mean|w|, alpha2 = mean|w - alpha1 s|   residual
    ternary          alpha s 1[|w| > delta], delta = 0.7 mean|w|, alpha = mean |w| over the kept entries      TWN
    outlier_columns  per_row on all input columns but the 1% of largest input energy G_jj, which stay exact

per_row and per_row_ls are XNOR-popcount layers at W1A1; row_column is one only with real-valued inputs (the column
factor folds into the input); two_plane costs 2 bits and twice the binary operations, ternary log2(3) bits;
outlier_columns keeps 1% of the weights, and those input channels, in full precision. The output-space alpha is
fitted on the tokens it is measured on (one number per row from thousands of tokens).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from statistics import mean

import torch
from calibration_effect import SHARED, layer_similarity, snippets
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import surge_hf
from surge_hf.quantizers import binary_weight, binary_weight_scale, sign

DEFAULT_MODEL = SHARED.parent / "runs" / "augment" / "full_precision_3ep" / "lr5e-05" / "seed42"
# Module-name suffix inside a BERT layer -> the short type name used in the tables, in the layer's order.
MODULE_TYPES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
                "attention.output.dense": "attention_output", "intermediate.dense": "intermediate",
                "output.dense": "output"}
ENCODER_LINEAR = re.compile(r".*encoder\.layer\.(\d+)\.(.+)")
W1A1 = "W1A1 (surge_hf, calibrated)"


# -- the weight forms -----------------------------------------------------------------------------------------------
def per_row_binary(weight: Tensor) -> Tensor:
    """alpha_o sign(W_o) with alpha_o = mean_i |W_oi|: surge_hf's binary weight with a per-channel scale."""
    return binary_weight(sign(weight), binary_weight_scale(weight, "channel"))


def least_squares_scale(weight: Tensor, gram: Tensor) -> Tensor:
    """The per-row alpha minimising ||X w_o - alpha_o X s_o||^2, s = sign(W), G = X^T X, as an (out, 1) column:

        alpha_o = <X w_o, X s_o> / ||X s_o||^2 = w_o^T G s_o / s_o^T G s_o      (mean|w_o| when G = I)
    """
    w, s, g = weight.double(), sign(weight).double(), gram.double()
    return (((w @ g) * s).sum(1) / ((s @ g) * s).sum(1)).unsqueeze(1).to(weight.dtype)


def least_squares_binary(weight: Tensor, gram: Tensor) -> Tensor:
    """alpha_o sign(W_o) with the output-space least-squares alpha of `least_squares_scale`."""
    return binary_weight(sign(weight), least_squares_scale(weight, gram))


def row_column_binary(weight: Tensor) -> Tensor:
    """sign(W) * (a b^T), a b^T = sigma u v^T the best rank-1 approximation of |W| (top singular triplet).

    Since W - sign(W) * M = sign(W) * (|W| - M) elementwise, this form's weight error is || |W| - a b^T ||_F, which
    the top singular triplet minimises (Eckart-Young). |W| is non-negative, so u and v can be taken non-negative
    (Perron-Frobenius); abs() removes the SVD's arbitrary common sign.
    """
    u, sigma, vh = torch.linalg.svd(weight.abs().double(), full_matrices=False)
    return sign(weight) * (sigma[0] * torch.outer(u[:, 0].abs(), vh[0].abs())).to(weight.dtype)


def two_plane_binary(weight: Tensor) -> Tensor:
    """B1 + B2 with B1 = per_row_binary(W) and B2 = per_row_binary(W - B1), i.e. per row

        alpha1 sign(w) + alpha2 sign(r),   r = w - alpha1 sign(w),   alpha1 = mean|w|,   alpha2 = mean|r|
    """
    first = per_row_binary(weight)
    return first + per_row_binary(weight - first)


def ternary(weight: Tensor, threshold_factor: float = 0.7) -> Tensor:
    """TWN's ternary weight, per row: alpha sign(w) 1[|w| > delta] with delta = 0.7 mean|w| and alpha the mean of
    |w| over the kept entries (the least-squares scale for that mask; 0 for a row that keeps nothing)."""
    magnitude = weight.abs()
    kept = (magnitude > threshold_factor * binary_weight_scale(weight, "channel")).to(weight.dtype)
    alpha = (magnitude * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1)
    return alpha * sign(weight) * kept


def outlier_columns_binary(weight: Tensor, gram: Tensor, fraction: float = 0.01) -> Tensor:
    """W's ceil(fraction * in) input columns of largest input energy G_jj = sum_t x_tj^2 kept in full precision, the
    other columns C per row alpha_o sign(W_oC), alpha_o = mean_{j in C} |W_oj| (a binary layer plus a sparse
    full-precision product over the few outlier input channels)."""
    count = math.ceil(fraction * weight.shape[1])
    kept = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    kept[torch.diagonal(gram).topk(count).indices] = True
    return torch.where(kept, weight, binary_weight(sign(weight), binary_weight_scale(weight[:, ~kept], "channel")))


# Every form as W_q = form(W, G); only the output-space forms read G.
FORMS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "per_row": lambda weight, gram: per_row_binary(weight),
    "per_row_ls": least_squares_binary,
    "row_column": lambda weight, gram: row_column_binary(weight),
    "two_plane": lambda weight, gram: two_plane_binary(weight),
    "ternary": lambda weight, gram: ternary(weight),
    "outlier_columns": outlier_columns_binary,
}


def relative_error(weight: Tensor, approximation: Tensor, gram: Tensor | None = None) -> float:
    """||W - W_q||_F / ||W||_F without `gram`; with G = X^T X, the output-space error

        ||X (W - W_q)^T||_F / ||X W^T||_F = sqrt(tr(D G D^T) / tr(W G W^T)),   D = W - W_q
    """
    w, d = weight.double(), (weight - approximation).double()
    if gram is None:
        return (d.norm() / w.norm()).item()
    g = gram.double()
    return (((d @ g) * d).sum() / ((w @ g) * w).sum()).sqrt().item()


# -- the model's modules and their inputs ---------------------------------------------------------------------------
def encoder_linears(model: nn.Module) -> dict[str, tuple[str, int]]:
    """name -> (module type, layer index) of every encoder Linear listed in MODULE_TYPES, in model order."""
    found = {}
    for name, module in model.named_modules():
        match = ENCODER_LINEAR.fullmatch(name)
        if isinstance(module, nn.Linear) and match and match.group(2) in MODULE_TYPES:
            found[name] = (MODULE_TYPES[match.group(2)], int(match.group(1)))
    return found


@torch.no_grad()
def input_grams(model: nn.Module, names: Iterable[str], batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """G = X^T X (float64) of each named module's input X: its rows are the non-padding tokens of `batches`."""
    grams: dict[str, Tensor] = {}
    current_mask: list[Tensor] = []

    def accumulate(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0][current_mask[0].bool()].double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(accumulate(name)) for name in names]
    try:
        for batch in batches:
            current_mask[:] = [batch["attention_mask"]]
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def module_errors(model: nn.Module, linears: dict[str, tuple[str, int]],
                  grams: dict[str, Tensor]) -> dict[str, dict[str, object]]:
    """(a): every module's weight and output error per form."""
    rows = {}
    for name, (kind, layer) in linears.items():
        weight = model.get_submodule(name).weight.detach()
        approximations = {form: make(weight, grams[name]) for form, make in FORMS.items()}
        rows[name] = {"type": kind, "layer": layer, "shape": list(weight.shape),
                      "weight_error": {form: relative_error(weight, w_q) for form, w_q in approximations.items()},
                      "output_error": {form: relative_error(weight, w_q, grams[name])
                                       for form, w_q in approximations.items()}}
    return rows


def summarize(rows: dict[str, dict[str, object]],
              group_of: Callable[[dict[str, object]], str]) -> dict[str, dict[str, dict[str, float]]]:
    """(c): the mean weight and output error per form over the modules in each group (`group_of(row)`)."""
    groups: dict[str, list[dict[str, object]]] = {}
    for row in rows.values():
        groups.setdefault(group_of(row), []).append(row)
    return {group: {error: {form: mean(row[error][form] for row in members) for form in FORMS}
                    for error in ("weight_error", "output_error")}
            for group, members in groups.items()}


# -- sensitivity ----------------------------------------------------------------------------------------------------
def module_groups(linears: dict[str, tuple[str, int]]) -> dict[str, list[str]]:
    """The module sets quantized together: each type, each layer, all of them, and all but each type."""
    kinds = list(dict.fromkeys(kind for kind, _ in linears.values()))
    layers = sorted({layer for _, layer in linears.values()})
    groups = {kind: [n for n, (k, _) in linears.items() if k == kind] for kind in kinds}
    groups |= {f"layer {layer}": [n for n, (_, i) in linears.items() if i == layer] for layer in layers}
    groups["all"] = list(linears)
    groups |= {f"all but {kind}": [n for n, (k, _) in linears.items() if k != kind] for kind in kinds}
    return groups


@torch.no_grad()
def with_weight_form(model: nn.Module, names: list[str], form: str, grams: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` whose named Linears hold W_q = form(W, G) (activations stay full precision)."""
    quantized = copy.deepcopy(model)
    for name in names:
        weight = quantized.get_submodule(name).weight
        weight.copy_(FORMS[form](weight, grams[name]))
    return quantized


@torch.no_grad()
def with_w1a1(model: nn.Module, names: list[str], calibration: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` whose named Linears are surge_hf W1A1 layers (the scripts/glue.py default recipe:
    elastic activations, learned per-channel alpha), calibrated on `calibration`."""
    binary = surge_hf.binarize(copy.deepcopy(model),
                               surge_hf.SurgeConfig(target_modules=names, learnable_weight_scale=True))
    return surge_hf.calibrate(binary, **calibration).eval()


@torch.no_grad()
def compare(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor,
            reference: tuple[tuple[Tensor, ...], Tensor]) -> dict[str, float]:
    """Accuracy, agreement with the reference predictions, last-layer token and first-token cosine to the reference
    hidden states (`reference` = (hidden states, predictions) of the float model)."""
    outputs = model(**inputs, output_hidden_states=True)
    predictions = outputs.logits.argmax(-1)
    similarity = layer_similarity(reference[0], outputs.hidden_states, inputs["attention_mask"].float())
    return {"accuracy": (predictions == labels).float().mean().item(),
            "agreement": (predictions == reference[1]).float().mean().item(),
            "last_layer_token_cosine": similarity["token_cosine_per_layer"][-1],
            "last_layer_first_token_cosine": similarity["last_layer_first_token_cosine"]}


# -- input and output -----------------------------------------------------------------------------------------------
def labelled_snippets(path: Path) -> tuple[list[str], Tensor]:
    """Every (sentence, label) row of a csv split."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row["sentence"] for row in rows], torch.tensor([int(row["label"]) for row in rows])


def markdown(results: dict[str, object]) -> str:
    """The README tables: output / weight error per form by type and by layer, then accuracy (cosine) per group."""
    forms, summary = list(FORMS), results["summary"]
    lines = []
    for title, groups in (("module type", summary["by_type"] | {"all 36": summary["all"]}),
                          ("layer", summary["by_layer"])):
        lines += [f"| {title} | " + " | ".join(forms) + " |", "| --- |" + " --- |" * len(forms)]
        for group, errors in groups.items():
            lines.append(f"| {group} | " + " | ".join(
                f"{errors['output_error'][f]:.3f} / {errors['weight_error'][f]:.3f}" for f in forms) + " |")
        lines.append("")
    columns = forms + [W1A1]
    lines += ["| quantized | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for group, outcomes in results["sensitivity"].items():
        lines.append(f"| {group} | " + " | ".join(
            f"{100 * outcomes[c]['accuracy']:.1f} ({outcomes[c]['last_layer_token_cosine']:.2f})" if c in outcomes
            else "" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="A fine-tuned BERT-family sequence classifier (folder with its tokenizer).")
    parser.add_argument("--data_dir", type=Path, default=SHARED / "data" / "rotten_tomatoes")
    parser.add_argument("--num_snippets", type=int, default=256, help="Training snippets whose tokens form X.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(texts: list[str]) -> dict[str, Tensor]:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length))

    train = snippets(args.data_dir / "train.csv", args.num_snippets)
    batches = [encode(train[i:i + args.batch_size]) for i in range(0, len(train), args.batch_size)]
    texts, labels = labelled_snippets(args.data_dir / "validation.csv")
    validation = encode(texts)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    linears = encoder_linears(model)
    grams = input_grams(model, linears, batches)
    rows = module_errors(model, linears, grams)
    with torch.no_grad():
        float_outputs = model(**validation, output_hidden_states=True)
    reference = (float_outputs.hidden_states, float_outputs.logits.argmax(-1))
    results = {
        "command": "python benchmarks/weight_error.py " + " ".join(sys.argv[1:]),
        "machine": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))",
        "torch": torch.__version__, "model": str(args.model), "max_length": args.max_length,
        "calibration_tokens": sum(int(batch["attention_mask"].sum()) for batch in batches),
        "validation_snippets": len(texts),
        "float_accuracy": (reference[1] == labels).float().mean().item(),
        "summary": {"by_type": summarize(rows, lambda row: row["type"]),
                    "by_layer": summarize(rows, lambda row: f"layer {row['layer']}"),
                    "all": summarize(rows, lambda row: "all")["all"]},
        "modules": rows, "sensitivity": {},
    }
    for group, names in module_groups(linears).items():
        forms = FORMS if group in {*MODULE_TYPES.values(), "all"} else ["per_row"]  # a CPU-time budget
        results["sensitivity"][group] = {
            form: compare(with_weight_form(model, names, form, grams), validation, labels, reference)
            for form in forms} | {W1A1: compare(with_w1a1(model, names, batches[0]), validation, labels, reference)}
        print(group, json.dumps({k: round(v["accuracy"], 4) for k, v in results["sensitivity"][group].items()}),
              flush=True)
    print(markdown(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
