"""What a training script leaves behind, written so that nothing good is ever lost.

`export_run` writes into `output_dir`:
- the deployable model at the top: the packed 1-bit checkpoint for SURGE/STE recipes (the float model for
  `--binarize none`), with its tokenizer or image processor and the custom-code files of `auto_map`;
- `train_state/`: the train-form model (latent weights, auxiliary branches) to continue training from;
- `all_results.json` (final metrics, bit account, sizes, recipe) and `training_history.json` (logged losses,
  SURGE diagnostics and per-epoch metrics);
- `README.md`: the model card (`surge_hf.hub`).
Everything is first written to a staging folder and then moved into place entry by entry, so an interrupted export
leaves the previous outputs intact. `push_run` uploads the result (see `surge_hf.hub.push_to_hub`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from .accounting import summary
from .configuration_surge import SurgeConfig
from .deployment import measure_deployment
from .hub import ModelCardContext, push_to_hub, write_model_card
from .objective import DistillationConfig
from .training import TrainingResult

STAGING_DIR = ".export.tmp"
TRAIN_STATE_DIR = "train_state"
_REPLACED_SUFFIX = ".replaced"


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Move every entry of `staging` into `output_dir`, replacing older entries of the same name."""
    for entry in staging.iterdir():
        target = output_dir / entry.name
        old = output_dir / f".{entry.name}{_REPLACED_SUFFIX}"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            target.rename(old)
        entry.rename(target)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    staging.rmdir()


def _card_repo_id(args: argparse.Namespace) -> str:
    if args.hub_model_id:
        return args.hub_model_id
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(args.output_dir).resolve().name)
    return name.strip("-.") or "surge-model"


def export_run(
    accelerator: Accelerator,
    model: nn.Module,
    args: argparse.Namespace,
    result: TrainingResult,
    *,
    preprocessor: Any,
    recipe: SurgeConfig | None,
    distillation: DistillationConfig | None,
    card_kind: str,
    dataset: dict[str, Any],
    example_inputs: dict[str, torch.Tensor],
    base_model: str | None = None,
) -> dict[str, Any]:
    """Write the run's outputs (see the module docstring) from the main process; returns `all_results`."""
    accelerator.wait_for_everyone()
    output_dir = Path(args.output_dir)
    model = accelerator.unwrap_model(model).eval()
    account = summary(model, **{k: v.to(accelerator.device) for k, v in example_inputs.items()})
    first_split = next(iter(result.metrics))
    all_results = {
        "eval": result.metrics,
        "completed_steps": result.completed_steps,
        "num_processes": accelerator.num_processes,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "calibrate_activations": args.calibrate_activations,
        "recipe": None if recipe is None else recipe.to_dict(),
        "distillation": None if distillation is None else asdict(distillation),
        "bit_account": account.to_dict(),
    }
    if accelerator.is_main_process:
        staging = output_dir / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if recipe is None:
            model.save_pretrained(staging)
        else:
            model.save_pretrained(staging / TRAIN_STATE_DIR)
            preprocessor.save_pretrained(staging / TRAIN_STATE_DIR)
            model.save_pretrained(staging, packed=True)
        preprocessor.save_pretrained(staging)
        all_results["model_file_bytes"] = (staging / "model.safetensors").stat().st_size
        if recipe is not None:
            cpu_inputs = {name: value.cpu() for name, value in example_inputs.items()}
            all_results["deployment"] = measure_deployment(
                type(model).from_pretrained(staging), cpu_inputs, file_bytes=all_results["model_file_bytes"]
            ).to_dict()
        (staging / "all_results.json").write_text(json.dumps(all_results, indent=2))
        (staging / "training_history.json").write_text(json.dumps(result.history))
        card = ModelCardContext(
            repo_id=_card_repo_id(args),
            dataset_split=first_split,
            metrics=result.metrics[first_split],
            surge_recipe=all_results["recipe"] or {"compensator": "none (full precision)"},
            learning_rate=args.learning_rate,
            num_epochs=result.history[-1].get("epoch", args.num_train_epochs) if result.history else 1,
            seed=args.seed,
            bit_account=str(account),
            packed_bytes=all_results["model_file_bytes"],
            float32_bytes=account.float32_bytes,
            deployment=all_results.get("deployment"),
            base_model=base_model,
            distillation=getattr(args, "teacher_model_name_or_path", None),
            hyperparameters={"batch size per device": args.per_device_train_batch_size,
                             "processes": accelerator.num_processes,
                             "gradient accumulation": args.gradient_accumulation_steps,
                             "optimizer steps": result.completed_steps},
            **dataset,
        )
        write_model_card(staging, card_kind, card)
        _move_into_place(staging, output_dir)
    accelerator.wait_for_everyone()
    return all_results


def push_run(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Upload the deployable files of `args.output_dir` to `args.hub_model_id` (main process only)."""
    if accelerator.is_main_process:
        url = push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
        accelerator.print(f"Pushed {args.output_dir} to {url}")
    accelerator.wait_for_everyone()
