"""What a training script leaves behind, written so that nothing good is ever lost.

`export_run` writes into `output_dir`:
- the deployable model at the top: the packed 1-bit checkpoint for SURGE/STE recipes (the float model for
  `--binarize none`, the train form for a two-plane weight stage, which has no 1-bit form), with its tokenizer or
  image processor and the custom-code files of `auto_map`;
- `train_state/`: the train-form model (latent weights, auxiliary branches) to continue training from;
- `all_results.json` (final metrics, bit account, sizes, recipe) and `training_history.json` (logged losses,
  SURGE diagnostics and per-epoch metrics);
- `README.md`: the model card (`surge_hf.hub.model_card`).
Everything is first written to a staging folder and then moved into place entry by entry, so an interrupted export
leaves the previous outputs intact; a failed export removes the staging folder, and a full disk raises
`surge_hf.saving.DiskFullError` naming the folder and the space it needs. `push_run` uploads the result (see
`surge_hf.hub.upload.push_to_hub`); a failed push names the push-only command that uploads the finished outputs again
without training.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..analysis.accounting import summary
from ..configuration_surge import SurgeConfig, renamed_surge_config_keyword
from ..hub.model_card import ModelCardContext, write_model_card
from ..hub.upload import HubConfig, push_to_hub
from ..saving import removed_on_failure, tensor_bytes
from .loop import TrainingConfig, TrainingResult
from .objective import DistillationConfig
from .output_dir import TRAIN_STATE_DIR

STAGING_DIR = ".export.tmp"
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


def _apply_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a new file gets (0666 / 0777 less the umask).

    Some writers (safetensors' `save_file`) create their files with mode 0600, which a shared folder or a container
    volume cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def card_model_reference(name_or_path: str, output_dir: str | Path) -> str:
    """How a model card names a model a run read: its Hub id, or its local folder relative to `output_dir`
    (`teacher/`, `../models/bert/`): never an absolute path of the training machine, which a push would publish."""
    if not Path(name_or_path).exists():
        return name_or_path
    return Path(os.path.relpath(Path(name_or_path).resolve(), Path(output_dir).resolve())).as_posix() + "/"


def portable_command(command: str) -> str:
    """`command` with every absolute path among its arguments (`/abs/x` or `--flag=/abs/x`) made relative to the
    working directory, from which the command runs."""
    def portable(argument: str) -> str:
        flag, equals, value = argument.rpartition("=") if argument.startswith("-") else ("", "", argument)
        return flag + equals + (os.path.relpath(value) if os.path.isabs(value) else value)

    return shlex.join(portable(argument) for argument in shlex.split(command))


def _card_base_model(base_model: str | None, output_dir: str | Path) -> dict[str, str | None]:
    """The card's `base_model` (a Hub id) or `local_base_model` (a folder relative to the output folder)."""
    if base_model is None or not Path(base_model).exists():
        return {"base_model": base_model}
    return {"local_base_model": card_model_reference(base_model, output_dir)}


def _card_labels(config: Any) -> list[str]:
    """The class names a classifier's config gives its outputs, in class-id order, for the model card: none for a
    regression model or for transformers' placeholder names `LABEL_0..LABEL_{n-1}`, which say nothing."""
    if getattr(config, "problem_type", None) == "regression":
        return []
    names = [config.id2label[index] for index in sorted(config.id2label)]
    return [] if names == [f"LABEL_{index}" for index in range(len(names))] else names


def _card_repo_id(output_dir: str, hub: HubConfig) -> str:
    if hub.hub_model_id:
        return hub.hub_model_id
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(output_dir).resolve().name)
    return name.strip("-.") or "surge-model"


@renamed_surge_config_keyword("recipe")
def export_run(
    accelerator: Accelerator,
    model: nn.Module,
    result: TrainingResult,
    *,
    training: TrainingConfig,
    hub: HubConfig,
    preprocessor: Any,
    surge_config: SurgeConfig | None,
    distillation: DistillationConfig | None,
    card_kind: str,
    dataset: dict[str, Any],
    example_inputs: dict[str, torch.Tensor],
    base_model: str | None = None,
    teacher: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Write the run's outputs (see the module docstring) from the main process; returns `all_results`.

    `base_model` is what the run fine-tuned, through all its stages (a Hub id, a local folder, or None from
    scratch), `teacher` names the distillation teacher (both shown on the card as Hub ids or as folders relative to
    the output folder), `hyperparameters` adds rows to the card's recipe table and `command` is the command line
    shown on the card (absolute paths made relative to the working directory).
    """
    accelerator.wait_for_everyone()
    output_dir = Path(training.output_dir)
    model = accelerator.unwrap_model(model).eval()
    account = summary(model, **{k: v.to(accelerator.device) for k, v in example_inputs.items()})
    first_split = next(iter(result.metrics))
    all_results = {
        "eval": result.metrics,
        "completed_steps": result.completed_steps,
        "num_processes": accelerator.num_processes,
        "seed": training.seed,
        "learning_rate": training.learning_rate,
        "calibrate_activations": training.calibrate_activations,
        "recipe": None if surge_config is None else surge_config.to_dict(),
        "distillation": None if distillation is None else asdict(distillation),
        "bit_account": account.to_dict(),
    }

    def write_outputs(staging: Path) -> None:
        """Every output, into the empty folder `staging`."""
        # The deployable form: packed, or the float model, or the train form of a two-plane stage (no 1-bit form).
        if surge_config is not None and surge_config.packable:
            model.save_pretrained(staging, packed=True)
        else:
            model.save_pretrained(staging)
        if surge_config is not None:
            model.save_pretrained(staging / TRAIN_STATE_DIR)
            preprocessor.save_pretrained(staging / TRAIN_STATE_DIR)
        preprocessor.save_pretrained(staging)
        all_results["model_file_bytes"] = (staging / "model.safetensors").stat().st_size
        (staging / "all_results.json").write_text(json.dumps(all_results, indent=2))
        (staging / "training_history.json").write_text(json.dumps(result.history))
        card = ModelCardContext(
            repo_id=_card_repo_id(training.output_dir, hub),
            dataset_split=first_split,
            metrics=result.metrics[first_split],
            surge_config=all_results["recipe"] or {"compensator": "none (full precision)"},
            learning_rate=training.learning_rate,
            num_epochs=result.history[-1].get("epoch", training.num_train_epochs) if result.history else 1,
            seed=training.seed,
            bit_account=str(account),
            packed_bytes=all_results["model_file_bytes"],
            float32_bytes=account.float32_bytes,
            **_card_base_model(base_model, output_dir),
            distillation=None if teacher is None else card_model_reference(teacher, output_dir),
            command=None if command is None else portable_command(command),
            labels=_card_labels(model.config),
            hyperparameters={"batch size per device": training.per_device_train_batch_size,
                             "processes": accelerator.num_processes,
                             "gradient accumulation": training.gradient_accumulation_steps,
                             "optimizer steps": result.completed_steps, **(hyperparameters or {})},
            **dataset,
        )
        write_model_card(staging, card_kind, card)
        _apply_umask(staging)

    if accelerator.is_main_process:
        staging = output_dir / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        with removed_on_failure(staging, what=f"the outputs of {output_dir}",  # train form + deployable form:
                                needed_bytes=lambda: tensor_bytes(model.state_dict().values()) + account.packed_bytes,
                                fix="The previous outputs of the folder are intact; with --checkpointing_steps, "
                                    "--resume_from_checkpoint latest exports again without training."):
            staging.mkdir(parents=True)
            write_outputs(staging)
        _move_into_place(staging, output_dir)
    accelerator.wait_for_everyone()
    return all_results


def push_run(accelerator: Accelerator, output_dir: str | Path, hub: HubConfig) -> None:
    """Upload the deployable files of `output_dir` to `hub.hub_model_id` (main process only).

    A failed push leaves `output_dir` as it was; the error names the `--push_only` command that retries the upload
    without training again.
    """
    if accelerator.is_main_process:
        try:
            url = push_to_hub(output_dir, hub.hub_model_id, token=hub.hub_token, private=hub.hub_private)
        except RuntimeError as error:
            raise RuntimeError(
                f"{error} To retry without training again, run the same script with --push_only --output_dir "
                f"{output_dir} --hub_model_id {hub.hub_model_id} (it uploads the finished outputs only), or call "
                f"surge_hf.push_to_hub({str(output_dir)!r}, {hub.hub_model_id!r})."
            ) from error
        accelerator.print(f"Pushed {output_dir} to {url}")
    accelerator.wait_for_everyone()
