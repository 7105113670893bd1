"""Teacher outputs computed once per training input and reused across epochs and runs.

Distillation runs the full-precision teacher on every training batch: a forward pass paid again in every epoch and
every run that distils from the same teacher on the same data. `build_teacher_cache` runs the teacher once over the
training set and stores, in float16, what the distillation terms read:

    <cache_dir>/<key>/logits.npy          (N, C)        the teacher's logits for example i in row i
    <cache_dir>/<key>/hidden_states.npy   (T, L + 1, H)  the hidden states of every real (unpadded) token, example
                                                         after example (only when hidden states are distilled)
    <cache_dir>/<key>/offsets.npy         (N + 1,)      example i's tokens are rows offsets[i]:offsets[i + 1]

`key` is a SHA-256 over the teacher (its config and every parameter and buffer: name, dtype, shape, bytes), the
training inputs (the tokens, token types and attention masks of every example, in order) and whether hidden states
are kept: another teacher or other data gives another key, so a stale entry is never read. An entry is written into
a temporary folder and renamed when complete, so an interrupted build leaves nothing that could be read.

`CachedTeacher` stands in for the teacher during training: given the batch's `TEACHER_INDEX` column (each row's
index in the training set) it returns the stored logits and hidden states as float32, the hidden states scattered
to the batch's real-token positions and zero at padding. Padding is therefore not distilled from it, and the
distillation must ignore padded positions (`DistillationConfig.mask_padding`). Its values are the teacher's,
rounded to float16; the teacher computes them in batches of the training set in order, so a live teacher on other
batch compositions can differ by float32 reduction order before that rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

TEACHER_INDEX = "teacher_index"
"""The batch column that carries each example's row in the training set (read by `CachedTeacher` only)."""
_INPUT_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of a model's config and of every parameter and buffer (name, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    config = getattr(teacher, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_fingerprint(dataset: Any) -> str:
    """SHA-256 of the model inputs of every example of a tokenized `datasets.Dataset`, in order."""
    digest = hashlib.sha256()
    columns = [name for name in _INPUT_COLUMNS if name in dataset.column_names]
    digest.update(",".join(columns).encode())
    for row in dataset.select_columns(columns).iter(batch_size=1024):
        for name in columns:
            for values in row[name]:
                digest.update(np.asarray(values, dtype=np.int64).tobytes())
                digest.update(b"|")
    return digest.hexdigest()


@dataclass(frozen=True)
class TeacherCacheEntry:
    """A complete cache entry: its folder and whether it holds hidden states."""

    path: Path
    has_hidden_states: bool


def cache_key(teacher: nn.Module, dataset: Any, hidden_states: bool) -> str:
    """The entry name for this teacher, these inputs and this content."""
    parts = {"teacher": teacher_fingerprint(teacher), "inputs": inputs_fingerprint(dataset),
             "hidden_states": hidden_states, "format": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, dataset: Any, collate_fn: Any, cache_dir: str | os.PathLike,
                        hidden_states: bool, batch_size: int = 64) -> TeacherCacheEntry:
    """The cache entry of `teacher` on the tokenized `dataset` (computed now unless it exists).

    `collate_fn` batches the dataset's rows as training does (dynamic padding or not: only real tokens are kept).
    """
    path = Path(cache_dir) / cache_key(teacher, dataset, hidden_states)
    entry = TeacherCacheEntry(path, hidden_states)
    if (path / "offsets.npy").is_file():
        return entry
    columns = [name for name in _INPUT_COLUMNS if name in dataset.column_names]
    rows = dataset.select_columns(columns)
    lengths = [int(sum(mask)) for mask in rows["attention_mask"]]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    config = teacher.config
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    teacher.eval()
    logits = hidden = None
    for start in range(0, len(rows), batch_size):
        batch = collate_fn([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        outputs = teacher(**{k: v for k, v in batch.items() if k in columns}, output_hidden_states=hidden_states)
        if logits is None:
            logits = np.lib.format.open_memmap(tmp / "logits.npy", mode="w+", dtype=np.float16,
                                               shape=(len(rows), outputs.logits.shape[-1]))
            if hidden_states:
                hidden = np.lib.format.open_memmap(
                    tmp / "hidden_states.npy", mode="w+", dtype=np.float16,
                    shape=(int(offsets[-1]), len(outputs.hidden_states), config.hidden_size))
        logits[start:start + len(batch["input_ids"])] = outputs.logits.half().numpy()
        if hidden_states:
            stacked = torch.stack(outputs.hidden_states, dim=2).half()  # (B, L, layers, H)
            mask = batch["attention_mask"].bool()
            for row in range(stacked.shape[0]):
                index = start + row
                hidden[offsets[index]:offsets[index + 1]] = stacked[row][mask[row]].numpy()
    for array in (logits, hidden):
        if array is not None:
            array.flush()
    np.save(tmp / "offsets.npy", offsets)
    (tmp / "meta.json").write_text(json.dumps({"examples": len(rows), "tokens": int(offsets[-1]),
                                               "hidden_states": hidden_states}))
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same entry first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


class CachedTeacher(nn.Module):
    """The teacher's stored outputs, looked up by `TEACHER_INDEX` (see the module docstring)."""

    def __init__(self, entry: TeacherCacheEntry) -> None:
        super().__init__()
        self.entry = entry
        self.logits = np.load(entry.path / "logits.npy", mmap_mode="r")
        self.offsets = np.load(entry.path / "offsets.npy")
        self.hidden_states = (np.load(entry.path / "hidden_states.npy", mmap_mode="r")
                              if entry.has_hidden_states else None)

    def forward(self, teacher_index: Tensor, attention_mask: Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if output_attentions:
            raise ValueError("The teacher-output cache holds no attention maps: set the attention-map "
                             "distillation weight to 0, or distil from the live teacher (no cache).")
        index = teacher_index.cpu().numpy()
        logits = torch.from_numpy(np.asarray(self.logits[index], dtype=np.float32)).to(attention_mask.device)
        hidden_states = None
        if output_hidden_states:
            if self.hidden_states is None:
                raise ValueError("This teacher-output cache was built without hidden states; rebuild it with "
                                 "hidden-state distillation on.")
            rows = [np.asarray(self.hidden_states[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32)
                    for i in index]
            batch, length = attention_mask.shape
            dense = torch.zeros(batch, length, *rows[0].shape[1:], device=attention_mask.device)
            mask = attention_mask.bool()
            for row, values in enumerate(rows):
                dense[row][mask[row]] = torch.from_numpy(values).to(dense.device)
            hidden_states = tuple(dense.unbind(dim=2))
        return SequenceClassifierOutput(logits=logits, hidden_states=hidden_states)
