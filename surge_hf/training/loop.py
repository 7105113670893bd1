"""The Accelerate training loop shared by `scripts/glue.py` and `scripts/vit.py`.

One loop, any task: the scripts build the model, the data loaders and a metric function; `train()` runs mixed
precision, gradient accumulation, multi-process data parallelism, distillation, periodic evaluation, logging of the
SURGE diagnostics, resumable checkpoints and the final evaluation.

Checkpoints (`surge_hf.training.checkpointing`) are written every `checkpointing_steps` steps and at the last step.
A run resumed from step N's checkpoint replays exactly what the uninterrupted run did after step N (same data order,
same RNG states); a run resumed from its last step takes no further step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..binarize import diagnostics, surge_layers
from ..layers import SURGE_ONLY_TENSORS
from .calibration import calibrate
from .checkpointing import (
    check_checkpoint,
    load_checkpoint,
    new_run_id,
    resolve_checkpoint,
    save_checkpoint,
)
from .objective import DistillationConfig, compute_loss
from .output_dir import check_output_dir
from .teacher_cache import TEACHER_INDEX

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]
# Normalisation layers: their weights (gains) and biases are never decayed.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# Biases and the binarizers' thresholds and scales (activation threshold/step, learned weight scale): never decayed.
NO_DECAY_PARAMETERS = ("bias", *(tensor.name for tensor in SURGE_ONLY_TENSORS if tensor.binarizer))
# TrainingConfig fields that do not change what a run computes: they may differ when a run is resumed.
# The settings of a run that steps its final model down from two weight planes: an earlier stage's run has none.
NO_PLANE_ANNEAL = {"plane_anneal_steps": None, "plane_anneal_ratio": None}
_BOOKKEEPING_FIELDS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps",
                       "checkpointing_steps", "checkpoints_total_limit", "report_to", "cpu",
                       "per_device_eval_batch_size")


@dataclass
class TrainingConfig:
    """Optimisation and bookkeeping settings of one run (the scripts' flags are these fields, `training.cli`).

    Args:
        output_dir: the folder the run writes (checkpoints, final model, results).
        overwrite_output_dir: write into a non-empty output_dir (its files of the same names are replaced).
        per_device_train_batch_size: training examples per process and step.
        per_device_eval_batch_size: evaluation examples per process and batch.
        learning_rate: the peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay (never on biases, normalisation layers and quantizer
            parameters).
        num_train_epochs: passes over the training data (unless max_train_steps is set).
        max_train_steps: optimizer steps in all; overrides num_train_epochs.
        gradient_accumulation_steps: batches accumulated per optimizer step.
        lr_scheduler_type: the learning-rate schedule after warmup.
        num_warmup_steps: steps of linear warmup from 0.
        max_grad_norm: clip the gradient norm to this value; 0 or None disables clipping.
        seed: the seed of initialisation, data order and augmentation.
        mixed_precision: no, fp16 or bf16; overrides the `accelerate launch` setting.
        logging_steps: log the loss and SURGE diagnostics every N steps.
        checkpointing_steps: save a resumable checkpoint every N steps (and at the last step).
        checkpoints_total_limit: keep only the latest N checkpoints.
        resume_from_checkpoint: a checkpoints/step_<N> folder, or 'latest'.
        report_to: an Accelerate tracker (tensorboard, wandb, ...), all or none.
        cpu: train on the CPU even when a GPU is present.
        calibrate_activations: initialise activation thresholds/scales from the first training batch.
        latent_weight_learning_rate: learning rate (and no weight decay, unless binary_weight_decay) for the latent
            weights of binarized layers.
        quantizer_learning_rate: learning rate (and no weight decay, unless binary_weight_decay) for activation
            thresholds/scales and learned weight scales.
        binary_weight_decay: weight decay of the binarized layers' latent weights (default: weight_decay, or 0 with
            latent_weight_learning_rate); 0 keeps decay from pulling latent weights towards their sign flips.
        plane_anneal_steps: step down from two weight planes to one over the first N steps: each 1-bit layer
            trains with its latent weight's residual second plane weighted by g = 1 - step / N (codes s_1 + g
            (alpha_2 / alpha_1) s_2), so a model started from a two-plane stage starts with that stage's function
            and is 1-bit from step N on (at most the run's steps).
        plane_anneal_ratio: plane_anneal_steps as a fraction of the run's steps, in (0, 1]: N = ceil(ratio x
            steps), so the anneal follows the run's length (as warmup_ratio does warmup_steps); pass one of the two.
    """

    output_dir: str = field(metadata={"flag_type": Path})
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    num_train_epochs: int = 3
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = field(default="linear", metadata={"choices": LR_SCHEDULERS})
    num_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    mixed_precision: str | None = field(default=None, metadata={"choices": MIXED_PRECISIONS})
    logging_steps: int = 50
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    report_to: str = "none"
    cpu: bool = False
    calibrate_activations: bool = False
    latent_weight_learning_rate: float | None = None
    quantizer_learning_rate: float | None = None
    binary_weight_decay: float | None = None
    plane_anneal_steps: int | None = None
    plane_anneal_ratio: float | None = None

    def __post_init__(self) -> None:
        positive = ("learning_rate", "num_train_epochs", "gradient_accumulation_steps", "logging_steps",
                    "per_device_train_batch_size", "per_device_eval_batch_size")
        if self.max_grad_norm == 0:
            self.max_grad_norm = None  # 0 disables clipping, as in transformers' TrainingArguments
        optional = ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "max_grad_norm",
                    "latent_weight_learning_rate", "quantizer_learning_rate", "plane_anneal_steps")
        for name in (*positive, *(name for name in optional if getattr(self, name) is not None)):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"TrainingConfig.{name} must be > 0, got {value!r}.")
        if self.plane_anneal_steps and self.max_train_steps and self.plane_anneal_steps > self.max_train_steps:
            raise ValueError(f"TrainingConfig.plane_anneal_steps={self.plane_anneal_steps} is more than "
                             f"max_train_steps={self.max_train_steps}: the model would end with its second weight "
                             f"plane still weighted in, not 1-bit. Pass at most {self.max_train_steps}.")
        if self.plane_anneal_ratio is not None:
            if self.plane_anneal_steps is not None:
                raise ValueError("TrainingConfig.plane_anneal_steps and plane_anneal_ratio both set the anneal's "
                                 "length: pass one of them.")
            if not 0 < self.plane_anneal_ratio <= 1:
                raise ValueError(f"TrainingConfig.plane_anneal_ratio must be in (0, 1] (a fraction of the run's "
                                 f"steps), got {self.plane_anneal_ratio!r}.")
        for name in ("num_warmup_steps", "weight_decay", "binary_weight_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"TrainingConfig.{name} must be >= 0, got {value!r}.")

    def plane_anneal_length(self, max_steps: int) -> int | None:
        """The steps over which the second weight plane steps down in a run of `max_steps` steps:
        plane_anneal_steps, or ceil(plane_anneal_ratio x max_steps), or None (no anneal)."""
        if self.plane_anneal_ratio is not None:
            return math.ceil(self.plane_anneal_ratio * max_steps)
        return self.plane_anneal_steps

    def run_settings(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fields that decide what the run computes, with the caller's `extra` settings (recipe, maximum
        length, ...): what a checkpoint is written with and compared with on resume."""
        own = {name: value for name, value in asdict(self).items() if name not in _BOOKKEEPING_FIELDS}
        return {**own, **(extra or {})}


@dataclass
class TrainingResult:
    """Final metrics per evaluation split, the number of optimizer steps, and the logged history."""

    metrics: dict[str, dict[str, float]]
    completed_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def build_accelerator(config: TrainingConfig) -> Accelerator:
    """An `Accelerator` with a seedable sampler (reproducible, resumable data order) and the run's trackers."""
    set_seed(config.seed)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,
    )


def plane_annealed_layers(model: nn.Module, anneal_steps: int | None, max_steps: int) -> list[nn.Module]:
    """The layers whose second weight plane `TrainingConfig.plane_anneal_steps` steps down (every SURGE layer with
    one binary weight plane; none without the setting), checked before any step: the anneal must end within the
    run's `max_steps`, and the model must have such a layer."""
    if anneal_steps is None:
        return []
    if anneal_steps > max_steps:
        raise ValueError(f"TrainingConfig.plane_anneal_steps={anneal_steps} is more than the run's {max_steps} steps: "
                         "the model would end with its second weight plane still weighted in, not 1-bit. Pass at "
                         f"most {max_steps}.")
    layers = [layer for _, layer in surge_layers(model)
              if layer.surge_config.binarize_weights and layer.surge_config.weight_planes == 1]
    if not layers:
        raise ValueError("TrainingConfig.plane_anneal_steps steps 1-bit weights down from two planes, but this model "
                         "has no SURGE layer with binary weights and weight_planes=1; drop plane_anneal_steps (or "
                         "plane_anneal_ratio).")
    return layers


def set_second_plane_weight(layers: list[nn.Module], anneal_steps: int | None, completed_steps: int) -> None:
    """Weight the second weight plane of `layers` by g = max(0, 1 - completed_steps / anneal_steps): the value for
    the step after `completed_steps` (and for an evaluation then), a function of the step alone, so a resumed run
    continues the anneal exactly."""
    for layer in layers:
        layer.second_plane_weight = max(0.0, 1.0 - completed_steps / anneal_steps)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that weight decay applies to, decided by the module that holds each one.

    Not decayed: every parameter of a normalisation layer (`NORM_LAYERS`: LayerNorm, BatchNorm, GroupNorm, ...,
    whatever the model names the attribute, and model-specific norm classes whose name ends in "Norm", such as
    `LlamaRMSNorm`), biases, the activation binarizers' thresholds and scales, and learned weight scales
    (`NO_DECAY_PARAMETERS`).
    """
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS) or type(module).__name__.endswith("Norm"):
            continue
        for name, _ in module.named_parameters(recurse=False):
            if name not in NO_DECAY_PARAMETERS:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    latent_weight_learning_rate: float | None = None,
    quantizer_learning_rate: float | None = None,
    binary_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: `weight_decay` on `decay_parameter_names(model)`, none on the rest.

    The latent weights of binarized layers (whose signs are the binary weights) form a group of their own with
    `latent_weight_learning_rate` (so that signs can move within a short run whatever the base learning rate) or
    `binary_weight_decay` (their weight decay; 0 where only the learning rate is their own); otherwise they are
    decayed like any other weight. With `quantizer_learning_rate`, the quantizers' thresholds and scales (tau, s,
    learned alpha) form one too, without weight decay. The scheduler scales every group's learning rate by the same
    factor.
    """
    latent_ids, quantizer_ids = set(), set()
    for _, layer in surge_layers(model):
        if layer.surge_config.binarize_weights:
            latent_ids.add(id(layer.weight))
        quantizer_ids.update(id(p) for p in (layer.input_threshold, layer.input_scale, layer.weight_scale)
                             if p is not None)
    separate_latent = latent_weight_learning_rate is not None or binary_weight_decay is not None
    separate_quantizer = quantizer_learning_rate is not None
    decayed = decay_parameter_names(model)
    decay, no_decay, latent, quantizer = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if separate_latent and id(param) in latent_ids:
            latent.append(param)
        elif separate_quantizer and id(param) in quantizer_ids:
            quantizer.append(param)
        elif name in decayed:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for params, learning_rate, decay_rate in ((latent, latent_weight_learning_rate, binary_weight_decay or 0.0),
                                              (quantizer, quantizer_learning_rate, 0.0)):
        if params:
            groups.append({"params": params, "weight_decay": decay_rate,
                           **({} if learning_rate is None else {"lr": learning_rate})})
    return groups


def adamw(groups: list[dict[str, Any]], learning_rate: float) -> torch.optim.AdamW:
    """AdamW over `groups`, with torch's fused kernel where every parameter lives on a device that has one (CPU,
    CUDA): one pass over each tensor instead of a dozen elementwise operations, about 4.5x faster than the default
    per-tensor loops on one CPU thread for MiniLM's 22M parameters. The update is AdamW's either way; the fused
    kernel rounds differently in the last bits."""
    devices = {param.device.type for group in groups for param in group["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused)


def evaluate(
    accelerator: Accelerator, model: nn.Module, dataloader: DataLoader, metric_fn: MetricFn, is_regression: bool
) -> dict[str, float]:
    """Metrics of `model` on `dataloader`, with predictions gathered from every process (no duplicates)."""
    model.eval()
    predictions, references = [], []
    for batch in dataloader:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "soft_labels")}
        with torch.no_grad():
            logits = model(**inputs).logits
        prediction = logits.squeeze(-1).float() if is_regression else logits.argmax(dim=-1)
        prediction, reference = accelerator.gather_for_metrics((prediction, batch["labels"]))
        predictions.append(prediction.cpu())
        references.append(reference.cpu())
    return metric_fn(torch.cat(predictions).numpy(), torch.cat(references).numpy())


def prepare_run(
    config: TrainingConfig,
    run_settings: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str | None] | None = None,
    own_folders: Collection[str] = (),
) -> dict[str, Any] | None:
    """Check, before any model or data is loaded, that the run may start: the output-folder rules
    (`surge_hf.training.output_dir`) and, when resuming, that the checkpoint is sound and was written with the same
    settings (`config.run_settings()` and `run_settings`, as `train` stores them).

    Returns the checkpoint's loop state, or None for a fresh run. `inputs` names the model folders the run reads,
    `own_folders` the folders of `output_dir` that the run's earlier stages wrote.
    """
    check_output_dir(config.output_dir, inputs=inputs, overwrite=config.overwrite_output_dir,
                      resume=config.resume_from_checkpoint is not None, own_folders=own_folders)
    return check_resume(config, run_settings)


def check_resume(config: TrainingConfig, run_settings: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The loop state of the checkpoint `config` resumes from, checked to be sound and written with the same
    settings (`config.run_settings(run_settings)`); None for a fresh run."""
    path = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    return None if path is None else check_checkpoint(path, config.run_settings(run_settings))


def calibration_batch(dataloader: DataLoader) -> dict[str, torch.Tensor]:
    """The first examples of the dataset in order (no shuffling, no RNG used), collated, without labels."""
    ordered = DataLoader(dataloader.dataset, batch_size=dataloader.batch_size, collate_fn=dataloader.collate_fn)
    return {k: v for k, v in next(iter(ordered)).items() if k not in ("labels", "soft_labels", TEACHER_INDEX)}


def _log_entry(step: int, loss: float, lr: float, model: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": step, "loss": loss, "learning_rate": lr}
    layers = diagnostics(model)
    if layers:
        entry["layers"] = layers
        for key in ("lam", "grad_norm_binary", "grad_norm_aux", "sign_flip_ratio"):
            values = [stats[key] for stats in layers.values() if key in stats]
            if values:
                entry[f"mean_{key}"] = float(np.mean(values))
    return entry


def train(
    accelerator: Accelerator,
    model: nn.Module,
    train_dataloader: DataLoader,
    eval_dataloaders: dict[str, DataLoader],
    config: TrainingConfig,
    metric_fn: MetricFn,
    *,
    teacher: nn.Module | None = None,
    distillation: DistillationConfig | None = None,
    is_regression: bool = False,
    on_epoch_start: Callable[[int, int], None] | None = None,
    run_settings: Mapping[str, Any] | None = None,
) -> TrainingResult:
    """Train `model`, evaluating on every split of `eval_dataloaders` after each epoch.

    With `config.calibrate_activations`, the activation binarizers are first initialised from the first training
    batch (`surge_hf.training.calibration`); a resumed run skips this and restores the trained values from its
    checkpoint.

    `on_epoch_start(epoch, first_batch)`, when given, is called before each epoch's first training batch is drawn:
    `first_batch` is the index of the first batch the loader will yield (> 0 only in the epoch a run resumes in,
    whose earlier batches are skipped without being drawn). Use it to reseed per-epoch randomness that lives outside
    the sampler, e.g. `ImageCollator.set_epoch`.

    `run_settings` (JSON values: recipe, maximum length, script, ...) are stored with the checkpoints together with
    `config.run_settings()`; resuming a checkpoint written with other settings raises `CheckpointError`.

    Returns the metrics of the last evaluation. `model` is prepared (possibly wrapped) in place of the one given;
    use `accelerator.unwrap_model` to save it. Call `accelerator.end_training()` once all outputs are written.
    """
    settings = config.run_settings(run_settings)
    resume_path = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    state = None if resume_path is None else check_checkpoint(resume_path, settings)
    if config.calibrate_activations and resume_path is None:  # a resumed run loads the trained values instead
        calibrate(model, **calibration_batch(train_dataloader))
    if train_dataloader.generator is None:
        # Without its own generator a DataLoader draws its workers' base seed from the global RNG each epoch, so a
        # resumed run (which starts iterating after restoring the RNG) would see other dropout masks.
        train_dataloader.generator = torch.Generator().manual_seed(config.seed)
    train_dataloader = accelerator.prepare(train_dataloader)
    # Counted on the prepared loader: with N processes each one sees 1/N of the batches.
    steps_per_epoch = math.ceil(len(train_dataloader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    accelerator.print(f"Training into {config.output_dir}: {max_steps} optimizer steps ({num_epochs} epoch(s) of "
                      f"{steps_per_epoch} steps) at learning rate {config.learning_rate:g}.")
    anneal_steps = config.plane_anneal_length(max_steps)
    annealed = plane_annealed_layers(model, anneal_steps, max_steps)
    groups = parameter_groups(model, config.weight_decay, config.latent_weight_learning_rate,
                              config.quantizer_learning_rate, config.binary_weight_decay)
    optimizer = adamw(groups, config.learning_rate)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.num_warmup_steps,
                              num_training_steps=max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    eval_dataloaders = {name: accelerator.prepare(loader) for name, loader in eval_dataloaders.items()}
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)
    if accelerator.trackers:
        accelerator.init_trackers("surge_hf", config=asdict(config))

    completed_steps, history, run_id = 0, [], new_run_id()
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path)
        completed_steps, history = state["completed_steps"], state.get("history", [])
        run_id = state.get("run_id", run_id)
        accelerator.print(f"Resumed from {resume_path} at step {completed_steps}.")
    # A run resumed from its last step has nothing left to train.
    start_epoch = num_epochs if completed_steps >= max_steps else completed_steps // steps_per_epoch
    batches_to_skip = (completed_steps % steps_per_epoch) * config.gradient_accumulation_steps

    def evaluate_all() -> dict[str, dict[str, float]]:
        return {name: evaluate(accelerator, model, loader, metric_fn, is_regression)
                for name, loader in eval_dataloaders.items()}

    progress = tqdm(total=max_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(model)
    metrics: dict[str, dict[str, float]] = {}
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    if resume_path is not None:
        # The loss summed since the last log over all processes goes back on the main process alone: the logged
        # mean over processes is what the uninterrupted run logs.
        running_loss.fill_(state.get("running_loss", 0.0) if accelerator.is_main_process else 0.0)
        running_batches = state.get("running_batches", 0)
    set_second_plane_weight(annealed, anneal_steps, completed_steps)
    for epoch in range(start_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        first_batch = batches_to_skip if epoch == start_epoch else 0
        if on_epoch_start is not None:
            on_epoch_start(epoch, first_batch)
        batches = train_dataloader
        if first_batch:
            batches = accelerator.skip_first_batches(train_dataloader, first_batch)
        for batch in batches:
            with accelerator.accumulate(model):
                loss, _ = compute_loss(model, batch, teacher, distillation, is_regression)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            running_loss += loss.detach()
            running_batches += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            set_second_plane_weight(annealed, anneal_steps, completed_steps)
            progress.update(1)
            if completed_steps % config.logging_steps == 0 or completed_steps == max_steps:
                mean_loss = accelerator.gather(running_loss).mean().item() / running_batches
                entry = _log_entry(completed_steps, mean_loss, scheduler.get_last_lr()[0], unwrapped)
                history.append(entry)
                accelerator.log({k: v for k, v in entry.items() if k != "layers"}, step=completed_steps)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                running_loss.zero_()
                running_batches = 0
            if config.checkpointing_steps and (completed_steps % config.checkpointing_steps == 0
                                               or completed_steps == max_steps):
                save_checkpoint(accelerator, config.output_dir, completed_steps,
                                {"completed_steps": completed_steps, "history": history,
                                 "running_loss": accelerator.gather(running_loss).sum().item(),
                                 "running_batches": running_batches, "run_id": run_id, "settings": settings},
                                keep=config.checkpoints_total_limit)
            if completed_steps >= max_steps:
                break
        metrics = evaluate_all()
        history.append({"epoch": epoch + 1, "step": completed_steps, "eval": metrics})
        accelerator.log({f"eval/{split}/{k}": v for split, m in metrics.items() for k, v in m.items()},
                        step=completed_steps)
        accelerator.print(f"epoch {epoch + 1}: {metrics}")
    if not metrics:  # resumed from the last step's checkpoint: only the final evaluation is left
        metrics = evaluate_all()
        history.append({"epoch": num_epochs, "step": completed_steps, "eval": metrics})
    progress.close()
    return TrainingResult(metrics=metrics, completed_steps=completed_steps, history=history)
