"""Text-classification data for GLUE-style fine-tuning: load, check, tokenize.

Data comes from the Hub by GLUE task name (``datasets.load_dataset("nyu-mll/glue", task)``) or from local
``train_file``/``validation_file`` (csv, json/jsonl or parquet). For local files the columns are picked as follows:

- text: ``sentence1`` and ``sentence2`` when both exist, else ``sentence``, else the first two text columns other
  than ``label`` (the first one when there is only one);
- label: the ``label`` column. Float labels make a regression task; otherwise the classes are the sorted set of the
  train labels (strings allowed), mapped to ids 0..n-1. A ``ClassLabel`` column keeps its names and ids.
  ``TextDataInfo.with_label_names`` names the classes of data that carries no names (e.g. ``0``/``1`` in a csv).

Every check on the files, columns and labels runs before any tokenization, and each error names the problem and
the fix. ``datasets`` is imported inside the functions that need it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

from ..training.objective import IGNORE_LABEL
from .metrics import get_glue_task, metric_config_name
from .text_augmentation import AUGMENTED_COLUMN

GLUE_HUB_ID = "nyu-mll/glue"
LABEL_COLUMN = "label"
FILE_FORMATS = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
"""Supported file extensions and the ``datasets`` builder that reads each."""

_TEXT_DTYPES = ("string", "large_string")
_FLOAT_DTYPES = ("float16", "float32", "float64")
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@dataclass(frozen=True)
class TextDataInfo:
    """What the loaded data turned out to be, as the model and the training loop need it.

    Attributes:
        task_name: the GLUE task, or None for local files.
        sentence_keys: one text column, or two for sentence pairs.
        label_list: class names (or raw label values) in id order; empty for regression.
        is_regression: whether the label is a real-valued score.
        eval_splits: the evaluation splits, e.g. ``("validation",)``; MNLI has matched and mismatched.
        label_to_id: raw label value -> class id, for local labels; None when the labels already are class ids
            (GLUE, ``ClassLabel`` columns) or for regression.
    """

    task_name: str | None
    sentence_keys: tuple[str, ...]
    label_list: tuple[Any, ...]
    is_regression: bool
    eval_splits: tuple[str, ...]
    label_to_id: dict[Any, int] | None = None

    @property
    def num_labels(self) -> int:
        """Number of model outputs: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_list)

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> id, for a model config (empty for regression)."""
        return {str(label): i for i, label in enumerate(self.label_list)}

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name, for a model config (empty for regression)."""
        return {i: str(label) for i, label in enumerate(self.label_list)}

    def with_label_names(self, names: Sequence[str]) -> TextDataInfo:
        """The same data with its classes named `names`, given in class-id order: the names that `id2label` /
        `label2id` of a model config (and so a pipeline's predictions and a model card) then show. The raw labels
        keep their ids. Raises ValueError for regression data, or unless there is one distinct, non-empty name per
        class."""
        names = tuple(names)
        check_label_names(names)
        if self.is_regression:
            raise ValueError(f"label names {list(names)} name classes, but the data is a regression task (float "
                             "labels, one output): drop the label names")
        if len(names) != self.num_labels:
            raise ValueError(f"{len(names)} label names {list(names)} for the data's {self.num_labels} classes "
                             f"{list(self.label_list)}: give one name per class, in class-id order")
        return dataclasses.replace(self, label_list=names)

    @property
    def metric_config(self) -> str:
        """Config name for ``surge_hf.data.metrics.compute_metrics`` / ``load_glue_metric``."""
        return metric_config_name(self.task_name, self.is_regression)


def load_text_data(
    task_name: str | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Any, TextDataInfo]:
    """Load a GLUE task from the Hub, or local train/validation files, and check it.

    Args:
        task_name: a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli); needs the Hub.
        train_file, validation_file: local files instead of a task, both csv, json/jsonl or parquet.
        cache_dir: where ``datasets`` caches the loaded data.

    Returns:
        ``(raw, info)``: a ``datasets.DatasetDict`` with the train and evaluation splits only, and what was found.
    """
    if task_name is not None and (train_file is not None or validation_file is not None):
        raise ValueError("pass either task_name or train_file/validation_file, not both")
    if task_name is None:
        if train_file is None or validation_file is None:
            raise ValueError("pass a GLUE task_name, or both train_file and validation_file for local data")
        file_format = _check_data_files(train_file, validation_file)
    else:
        get_glue_task(task_name)

    import datasets

    if task_name is not None:
        raw = datasets.load_dataset(GLUE_HUB_ID, task_name, cache_dir=cache_dir)
    else:
        # One call per file: a single call would cast the validation file to the train file's schema and fail
        # with an opaque error on differing columns, before the checks below can name the problem.
        raw = datasets.DatasetDict(
            {
                split: datasets.load_dataset(file_format, data_files=str(path), split="train", cache_dir=cache_dir)
                for split, path in (("train", train_file), ("validation", validation_file))
            }
        )
    info = resolve_data_info(raw, task_name)
    return datasets.DatasetDict({split: raw[split] for split in ("train", *info.eval_splits)}), info


def resolve_data_info(raw: Any, task_name: str | None = None) -> TextDataInfo:
    """Find the text columns and the labels of a ``DatasetDict``, checking that they are usable.

    With a GLUE ``task_name`` the columns and labels come from the task table and the labels must be class ids in
    [0, num_labels); without one they are picked from the ``train`` split (see the module docstring).
    """
    task = get_glue_task(task_name) if task_name is not None else None
    eval_splits = task.eval_splits if task is not None else ("validation",)
    splits = ("train", *eval_splits)
    missing_splits = [split for split in splits if split not in raw]
    if missing_splits:
        raise ValueError(
            f"the data has no {missing_splits} split(s) (it has {list(raw)}); it needs the splits {list(splits)}"
        )
    train = raw["train"]
    if LABEL_COLUMN not in train.column_names:
        raise ValueError(
            f"the train data has no {LABEL_COLUMN!r} column; columns: {train.column_names}; "
            f"rename the label column to {LABEL_COLUMN!r}"
        )
    sentence_keys = task.sentence_keys if task is not None else _pick_sentence_keys(train)
    for split in splits:
        _check_columns(raw[split], split, (*sentence_keys, LABEL_COLUMN))

    label_feature = train.features[LABEL_COLUMN]
    names = getattr(label_feature, "names", None)
    if task is not None:
        is_regression = task.is_regression
    else:
        is_regression = names is None and getattr(label_feature, "dtype", None) in _FLOAT_DTYPES
    if is_regression:
        return TextDataInfo(task_name, sentence_keys, (), True, eval_splits)

    if task is not None or names is not None:
        label_list = tuple(task.label_names if task is not None else names)
        if task is not None and names is not None and len(names) != task.num_labels:
            raise ValueError(
                f"the {task.name} data has {len(names)} classes {names}, but the GLUE task has {task.num_labels} "
                f"{list(task.label_names)}; load the {task.name!r} config of {GLUE_HUB_ID}"
            )
        for split in splits:
            _check_label_ids(raw[split], split, len(label_list))
        return TextDataInfo(task_name, sentence_keys, label_list, False, eval_splits)

    train_labels = train.unique(LABEL_COLUMN)
    if len(train_labels) < 2:
        raise ValueError(
            f"the train labels take a single value {train_labels}; classification needs at least 2 classes "
            "(use float labels for a regression task)"
        )
    label_list = tuple(sorted(train_labels))
    for split in eval_splits:
        unseen = sorted(set(raw[split].unique(LABEL_COLUMN)) - set(label_list), key=str)
        if unseen:
            raise ValueError(
                f"{split} labels {_preview(unseen)} do not occur in the train labels {_preview(label_list)}; "
                "every evaluation label must be a train label (check the label spelling or the split)"
            )
    label_to_id = {label: i for i, label in enumerate(label_list)}
    return TextDataInfo(None, sentence_keys, label_list, False, eval_splits, label_to_id)


def preprocess(
    raw: Any,
    info: TextDataInfo,
    tokenizer: Any,
    max_length: int = 128,
    pad_to_max_length: bool = False,
    pad_to_multiple_of: int | None = None,
) -> tuple[Any, Callable]:
    """Tokenize the train and evaluation splits and map their labels to ids, ready for a DataLoader.

    Texts are truncated to ``max_length`` tokens (pairs: longest first). Rows marked by ``AUGMENTED_COLUMN``
    (``surge_hf.data.text_augmentation``) get the label ``IGNORE_LABEL``: they are learnt from the teacher alone. With
    ``pad_to_max_length`` every example
    is padded to ``max_length`` and batches are stacked by ``default_data_collator``; otherwise batches are padded
    to their longest example (rounded up to ``pad_to_multiple_of``) by ``DataCollatorWithPadding``.

    Returns:
        ``(processed, collator)``: a ``DatasetDict`` of the train and evaluation splits with the tokenizer's
        columns and ``labels`` (int ids, or floats for regression), and the data collator to batch it with.
    """
    from transformers import DataCollatorWithPadding, default_data_collator

    splits = ("train", *info.eval_splits)
    missing = [split for split in splits if split not in raw]
    if missing:
        raise ValueError(f"the data has no {missing} split(s) (it has {list(raw)}); pass the data that info describes")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if max_length > tokenizer.model_max_length:
        raise ValueError(
            f"max_length {max_length} exceeds the tokenizer's model_max_length {tokenizer.model_max_length}; "
            f"pass max_length <= {tokenizer.model_max_length}"
        )
    if pad_to_multiple_of is not None:
        if pad_to_max_length:
            raise ValueError("pad_to_multiple_of only applies to dynamic padding; drop it or pad_to_max_length")
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")

    padding = "max_length" if pad_to_max_length else False

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(
            *(batch[key] for key in info.sentence_keys), padding=padding, max_length=max_length, truncation=True
        )
        labels = batch[LABEL_COLUMN]
        if info.is_regression:
            encoded["labels"] = [float(label) for label in labels]
        elif info.label_to_id is not None:
            encoded["labels"] = [info.label_to_id[label] for label in labels]
        else:
            encoded["labels"] = list(labels)
        if AUGMENTED_COLUMN in batch:
            encoded["labels"] = [IGNORE_LABEL if augmented else label
                                 for label, augmented in zip(encoded["labels"], batch[AUGMENTED_COLUMN])]
        return encoded

    import datasets

    processed = datasets.DatasetDict(
        {
            split: raw[split].map(
                tokenize, batched=True, remove_columns=raw[split].column_names, desc=f"Tokenizing {split}"
            )
            for split in splits
        }
    )
    if pad_to_max_length:
        return processed, default_data_collator
    return processed, DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def _check_data_files(train_file: str | os.PathLike, validation_file: str | os.PathLike) -> str:
    """Check that both local files exist, share a supported format and hold data; return the builder name."""
    formats = {}
    for name, path in (("train_file", train_file), ("validation_file", validation_file)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} {str(path)!r} does not exist; pass the path of an existing file")
        extension = os.path.splitext(str(path))[1].lstrip(".").lower()
        if extension not in FILE_FORMATS:
            raise ValueError(
                f"{name} {str(path)!r} has unsupported extension {extension!r}; "
                f"use one of: {', '.join(FILE_FORMATS)}"
            )
        formats[name] = FILE_FORMATS[extension]
    if formats["train_file"] != formats["validation_file"]:
        raise ValueError(
            f"train_file is {formats['train_file']} but validation_file is {formats['validation_file']}; "
            "save both splits in the same format"
        )
    file_format = formats["train_file"]
    for name, path in (("train_file", train_file), ("validation_file", validation_file)):
        if not _has_rows(str(path), file_format):
            raise ValueError(f"{name} {str(path)!r} is empty (no data rows); add examples or pass the right file")
    return file_format


def _has_rows(path: str, file_format: str) -> bool:
    """Whether a csv / json(l) / parquet file holds at least one example, reading as little as possible."""
    if os.path.getsize(path) == 0:
        return False
    if file_format == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_metadata(path).num_rows > 0
    with open(path, encoding="utf-8", newline="") as handle:
        if file_format == "csv":
            rows = csv.reader(handle)
            next(rows, None)  # header
            return any(any(cell.strip() for cell in row) for row in rows)
        head = handle.read(65536).strip()
    if head.startswith("["):  # a JSON array rather than JSON lines
        return not head[1:].lstrip().startswith("]")
    return bool(head)


def _pick_sentence_keys(train: Any) -> tuple[str, ...]:
    """Text columns of local data: sentence1/sentence2, else sentence, else the first one or two text columns."""
    columns = train.column_names
    if "sentence1" in columns and "sentence2" in columns:
        return ("sentence1", "sentence2")
    if "sentence" in columns:
        return ("sentence",)
    text_columns = [
        name
        for name in columns
        if name != LABEL_COLUMN and getattr(train.features[name], "dtype", None) in _TEXT_DTYPES
    ]
    if not text_columns:
        raise ValueError(
            f"the train data has no text column besides {LABEL_COLUMN!r}; columns: {_describe_columns(train)}; "
            "name the text column 'sentence' (or 'sentence1' and 'sentence2' for pairs)"
        )
    return tuple(text_columns[:2])


def _check_columns(dataset: Any, split: str, required: tuple[str, ...]) -> None:
    """Every required column exists, has no missing values, and the text columns hold strings."""
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the {split} data has no column(s) {missing}; columns: {dataset.column_names}; "
            "give every split the same column names"
        )
    if len(dataset) == 0:
        raise ValueError(f"the {split} data has no rows; add examples")
    table = dataset.with_format("arrow")[:]
    for name in required:
        dtype = getattr(dataset.features[name], "dtype", None)
        if name != LABEL_COLUMN and dtype not in _TEXT_DTYPES:
            raise ValueError(
                f"column {name!r} of the {split} data holds {dtype}, not text; sentence columns must be strings"
            )
        null_count = table.column(name).null_count
        if null_count:
            raise ValueError(
                f"column {name!r} of the {split} data has {null_count} missing value(s); fill or drop those rows"
            )


def check_label_names(names: Sequence[str]) -> None:
    """Raise ValueError unless `names` are distinct, non-empty class names (leading or trailing spaces count as
    empty: `label2id` would not find the name as written)."""
    if not names or any(not isinstance(name, str) or not name or name != name.strip() for name in names):
        raise ValueError(f"label names {list(names)} must be non-empty strings without surrounding spaces")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"label names {list(names)} repeat {repeated}: give each class its own name")


def _check_label_ids(dataset: Any, split: str, num_labels: int) -> None:
    """Labels that already are class ids must be integers in [0, num_labels)."""
    dtype = getattr(dataset.features[LABEL_COLUMN], "dtype", None)
    if dtype not in _INT_DTYPES:
        raise ValueError(
            f"the {split} labels are {dtype}, but this data needs integer class ids in [0, {num_labels})"
        )
    bad = sorted(label for label in dataset.unique(LABEL_COLUMN) if not 0 <= label < num_labels)
    if bad:
        raise ValueError(
            f"the {split} labels {_preview(bad)} fall outside [0, {num_labels}); labels must be class ids "
            f"0..{num_labels - 1} (unlabeled test splits cannot be used for training or evaluation)"
        )


def _describe_columns(dataset: Any) -> str:
    return ", ".join(f"{name} ({getattr(dataset.features[name], 'dtype', 'nested')})" for name in dataset.column_names)


def _preview(values: Any, limit: int = 10) -> str:
    values = list(values)
    shown = ", ".join(repr(value) for value in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
