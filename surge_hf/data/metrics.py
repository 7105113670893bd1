"""The evaluation metrics of both scripts, in plain numpy: GLUE's official metrics, and accuracy for any
classifier (text or image).

The table gives, for each GLUE task, the input columns, the label names, the metrics and the evaluation splits.
The metrics follow the official GLUE definitions (and the key names of the ``glue`` metric of ``evaluate``):

- ``accuracy`` = mean(prediction == reference)
- ``f1`` (mrpc, qqp) = 2 TP / (2 TP + FP + FN), positive class 1; 0.0 when there is no positive at all
- ``matthews_correlation`` (cola) = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), with s samples, c correct ones,
  t and p the per-class counts of references and predictions (for two classes this is
  (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))); 0.0 when the denominator is 0
- ``pearson`` (stsb) = cov(x, y) / (std(x) std(y))
- ``spearmanr`` (stsb) = the Pearson correlation of the average ranks (ties share the mean of their ranks)

Data without a GLUE task name (local text files, every image dataset) is scored with ``accuracy`` for
classification and ``pearson``/``spearmanr`` for regression (the metric configs ``"classification"`` and
``"regression"``).

:func:`load_glue_metric` returns the same metrics as an ``evaluate`` module, loaded offline from the script that
ships in this package (``glue_metric/glue_metric.py``), so the ``evaluate`` API works without the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its input columns, labels, metrics and evaluation splits.

    ``label_names`` is empty for the regression task (stsb), whose single output is the score.
    """

    name: str
    sentence_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        """Whether the task predicts a real-valued score instead of a class."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Number of model outputs: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)


_ACCURACY = ("accuracy",)
_ACCURACY_F1 = ("accuracy", "f1")
_CORRELATIONS = ("pearson", "spearmanr")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), _ACCURACY),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _ACCURACY_F1),
        GlueTask("stsb", ("sentence1", "sentence2"), (), _CORRELATIONS),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), _ACCURACY_F1),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            _ACCURACY,
            ("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), _ACCURACY),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), _ACCURACY),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), _ACCURACY),
    )
}

LOCAL_METRICS: dict[str, tuple[str, ...]] = {"classification": _ACCURACY, "regression": _CORRELATIONS}
"""Metrics for data without a GLUE task name, by kind of label."""

METRIC_FILE = Path(__file__).resolve().parent / "glue_metric" / "glue_metric.py"
"""The ``evaluate`` metric script shipped with the package."""


def get_glue_task(task_name: str) -> GlueTask:
    """Return the table entry of a GLUE task; raise ValueError naming the valid tasks if it is unknown."""
    try:
        return GLUE_TASKS[task_name]
    except KeyError:
        raise ValueError(
            f"unknown GLUE task {task_name!r}; valid task names: {', '.join(GLUE_TASKS)}"
        ) from None


def metric_config_name(task_name: str | None, is_regression: bool) -> str:
    """Metric config for a dataset: the GLUE task name, else ``"classification"`` or ``"regression"``."""
    if task_name is not None:
        return get_glue_task(task_name).name
    return "regression" if is_regression else "classification"


def metric_names(config_name: str) -> tuple[str, ...]:
    """Names of the metrics that ``compute_metrics(config_name, ...)`` returns, in order."""
    if config_name in LOCAL_METRICS:
        return LOCAL_METRICS[config_name]
    if config_name in GLUE_TASKS:
        return GLUE_TASKS[config_name].metric_names
    valid = ", ".join([*GLUE_TASKS, *LOCAL_METRICS])
    raise ValueError(f"unknown GLUE task or metric config {config_name!r}; valid names: {valid}")


def is_regression_config(config_name: str) -> bool:
    """Whether a metric config scores real-valued predictions (stsb, ``"regression"``)."""
    return metric_names(config_name) == _CORRELATIONS


def compute_metrics(task_name: str, predictions: Any, references: Any) -> dict[str, float]:
    """Score predictions with the official metrics of a GLUE task (or of a local metric config).

    Args:
        task_name: a GLUE task name (see ``GLUE_TASKS``), or ``"classification"``/``"regression"`` for local data.
        predictions: one predicted class id (or score, for regression) per example.
        references: the true class ids (or scores), same length.

    Returns:
        ``{metric name: value}`` with the keys of :func:`metric_names`, values as Python floats.
    """
    names = metric_names(task_name)
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.ndim != 1 or refs.ndim != 1:
        raise ValueError(
            f"predictions and references must be 1-D, got shapes {preds.shape} and {refs.shape}; "
            "pass one class id (or score) per example, e.g. logits.argmax(-1)"
        )
    if len(preds) != len(refs):
        raise ValueError(
            f"predictions has {len(preds)} values but references has {len(refs)}; pass one prediction per reference"
        )
    if len(preds) == 0:
        raise ValueError("predictions and references are empty; evaluate on at least one example")
    if is_regression_config(task_name):
        preds, refs = preds.astype(np.float64), refs.astype(np.float64)
    return {name: float(_METRICS[name](preds, refs)) for name in names}


def load_glue_metric(task_name: str, **load_kwargs: Any) -> Any:
    """Load the metrics of a GLUE task as an ``evaluate`` module, offline, from the script in this package.

    ``task_name`` is a GLUE task or ``"classification"``/``"regression"``; ``load_kwargs`` go to
    ``evaluate.load`` (e.g. ``experiment_id``, ``keep_in_memory``). The module computes exactly
    :func:`compute_metrics`.
    """
    metric_names(task_name)  # raises ValueError for an unknown name, before evaluate is imported
    import evaluate

    return evaluate.load(str(METRIC_FILE), config_name=task_name, **load_kwargs)


def _accuracy(preds: np.ndarray, refs: np.ndarray) -> float:
    return float(np.mean(preds == refs))


def _binary_f1(preds: np.ndarray, refs: np.ndarray) -> float:
    pred_pos, ref_pos = preds == 1, refs == 1
    true_pos = np.sum(pred_pos & ref_pos)
    denominator = pred_pos.sum() + ref_pos.sum()  # = 2 TP + FP + FN
    return 0.0 if denominator == 0 else float(2 * true_pos / denominator)


def _matthews_correlation(preds: np.ndarray, refs: np.ndarray) -> float:
    classes = np.union1d(preds, refs)
    ref_counts = np.array([np.sum(refs == c) for c in classes], dtype=np.float64)
    pred_counts = np.array([np.sum(preds == c) for c in classes], dtype=np.float64)
    samples = float(len(refs))
    correct = float(np.sum(preds == refs))
    numerator = correct * samples - ref_counts @ pred_counts
    denominator = np.sqrt((samples**2 - pred_counts @ pred_counts) * (samples**2 - ref_counts @ ref_counts))
    return 0.0 if denominator == 0 else float(numerator / denominator)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either input is constant (the correlation is undefined)."""
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    return float("nan") if denominator == 0 else float(dx @ dy / denominator)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _pearson(_average_ranks(x), _average_ranks(y))


_METRICS = {
    "accuracy": _accuracy,
    "f1": _binary_f1,
    "matthews_correlation": _matthews_correlation,
    "pearson": _pearson,
    "spearmanr": _spearman,
}
