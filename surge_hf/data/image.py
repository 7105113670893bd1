"""Image-classification data for binary ViTs: loading and checks.

:func:`load_image_classification_data` loads a Hub dataset, an ``imagefolder`` directory or a folder written by
``save_to_disk``, finds the image and label columns, checks a bounded sample of images, and returns the train and
eval splits with an :class:`ImageDataInfo` (channels, size, label names). The tensors are made by
``surge_hf.data.image_transforms`` and batched by ``surge_hf.data.image_processing.ImageCollator``.

``datasets`` is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
EVAL_SPLIT_CANDIDATES = ("validation", "valid", "val")
MODE_CHANNELS = {"L": 1, "RGB": 3}
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")



@dataclass(frozen=True)
class ImageDataInfo:
    """What the model and the transforms need to know about an image-classification dataset.

    Attributes:
        image_column: column holding the images (PIL images or uint8 arrays).
        label_column: column holding the integer class ids.
        num_channels: channels of the tensors fed to the model (1 for ``L``, 3 for ``RGB``).
        image_size: ``(height, width)`` of the tensors fed to the model.
        label_names: class names, index = class id.
        resize: whether images are resized to ``image_size`` (False when the checked images already have it).
        convert_rgb: whether grayscale images are converted to RGB (channel replicated three times).
    """

    image_column: str
    label_column: str
    num_channels: int
    image_size: tuple[int, int]
    label_names: tuple[str, ...]
    resize: bool = False
    convert_rgb: bool = False

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name, as ``PretrainedConfig.id2label`` wants it."""
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> id, as ``PretrainedConfig.label2id`` wants it."""
        return {name: index for index, name in enumerate(self.label_names)}

    def model_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a ``ViTConfig``: image size (an int when square), channels, labels and problem type."""
        height, width = self.image_size
        return {
            "image_size": height if height == width else [height, width],
            "num_channels": self.num_channels,
            "num_labels": self.num_labels,
            "id2label": self.id2label,
            "label2id": self.label2id,
            "problem_type": "single_label_classification",
        }


@dataclass
class ImageClassificationData:
    """Train and eval splits (``datasets.Dataset``) with the :class:`ImageDataInfo` describing them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    info: ImageDataInfo
    eval_split: str


# ----------------------------------------------------------------------------------------------------------------
# Loading and checks
# ----------------------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """True for a string that a user meant as a local path rather than a Hub id such as ``"user/dataset"``."""
    if name.startswith((".", "~")) or "\\" in name or os.path.isabs(name):
        return True
    if name.count("/") > 1 or name.endswith("/"):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def detect_dataset_source(dataset: str | os.PathLike[str]) -> str:
    """Tell how ``dataset`` is to be loaded: ``"disk"``, ``"imagefolder"`` or ``"hub"``.

    An existing directory that holds ``dataset_dict.json``, or ``dataset_info.json`` and ``state.json``, was written by
    ``save_to_disk`` (``"disk"``); any other existing directory is an ``imagefolder``; anything else is a Hub dataset
    name. A path-looking argument (absolute, starting with ``.`` or ``~``, several ``/``, or whose first component is
    an existing local folder) that does not exist raises ``FileNotFoundError`` instead of going to the Hub.
    """
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return "disk"
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return "disk"
        return "imagefolder"
    if path.exists():
        raise ValueError(
            f"dataset path '{dataset}' is a file, not a directory: pass a folder of images (imagefolder layout "
            "class_name/image.png), a folder written by save_to_disk, or a Hub dataset name"
        )
    if isinstance(dataset, os.PathLike) or _looks_like_path(str(dataset)):
        raise FileNotFoundError(
            f"dataset path '{dataset}' does not exist: check the path, or pass a Hub dataset name such as "
            "'user/dataset'"
        )
    return "hub"


def _load_raw(
    dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict,
    config_name: str | None,
    cache_dir: str | None,
) -> datasets.Dataset | datasets.DatasetDict:
    """Load ``dataset`` in the form :func:`detect_dataset_source` finds (or return a dataset object unchanged)."""
    import datasets

    if isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        return dataset
    source = detect_dataset_source(dataset)
    if source == "disk":
        return datasets.load_from_disk(str(Path(dataset).expanduser()))
    if source == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=str(Path(dataset).expanduser()), cache_dir=cache_dir)
    return datasets.load_dataset(str(dataset), config_name, cache_dir=cache_dir)


def _resolve_column(
    columns: Sequence[str], requested: str | None, candidates: Sequence[str], kind: str, argument: str
) -> str | None:
    """Return ``requested`` if present (else raise), or the first of ``candidates`` present, or None."""
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"{kind} column '{requested}' not found; the dataset has columns {list(columns)}: pass "
                f"{argument}= one of them"
            )
        return requested
    return next((name for name in candidates if name in columns), None)


def _image_column(features: datasets.Features, requested: str | None) -> str:
    """Find the image column: ``requested``, else ``image``/``img``/``pixel_values``, else the first ``Image``."""
    import datasets

    columns = list(features)
    found = _resolve_column(columns, requested, IMAGE_COLUMN_CANDIDATES, "image", "image_column")
    if found is None:
        found = next((name for name in columns if isinstance(features[name], datasets.Image)), None)
    if found is None:
        raise ValueError(
            f"no image column found; the dataset has columns {columns}: pass image_column= the column that holds "
            "the images"
        )
    return found


def _label_column(features: datasets.Features, requested: str | None) -> str:
    """Find the label column (``requested``, else ``label``/``labels``) and check it holds integers or a ClassLabel."""
    import datasets

    columns = list(features)
    found = _resolve_column(columns, requested, LABEL_COLUMN_CANDIDATES, "label", "label_column")
    if found is None:
        raise ValueError(
            f"no label column found; the dataset has columns {columns}: pass label_column= the column that holds "
            "the class ids"
        )
    feature = features[found]
    is_integer = isinstance(feature, datasets.Value) and feature.dtype in INTEGER_DTYPES
    if not (isinstance(feature, datasets.ClassLabel) or is_integer):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise ValueError(
            f"label column '{found}' has type {kind}; labels must be integers or a ClassLabel: encode them with "
            f"dataset.class_encode_column('{found}')"
        )
    return found


def _select_splits(
    raw: datasets.Dataset | datasets.DatasetDict,
    train_split: str,
    eval_split: str | None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, str | None]:
    """Pick the train split and the eval split (``eval_split``, else validation/valid/val, else None to carve)."""
    import datasets

    if isinstance(raw, datasets.Dataset):
        if eval_split is not None:
            raise ValueError(
                f"eval split '{eval_split}' requested, but the dataset is a single split: drop eval_split= to carve "
                "a validation split off it"
            )
        return raw, None, None
    splits = list(raw)
    if train_split not in raw:
        raise ValueError(f"train split '{train_split}' not found; the dataset has splits {splits}: pass train_split=")
    if eval_split is not None and eval_split not in raw:
        raise ValueError(f"eval split '{eval_split}' not found; the dataset has splits {splits}: pass eval_split=")
    if eval_split is None:
        eval_split = next((name for name in EVAL_SPLIT_CANDIDATES if name in raw and name != train_split), None)
    return raw[train_split], (raw[eval_split] if eval_split is not None else None), eval_split


def _carve_validation(
    train: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``round(fraction * n)`` rows (at least one) off ``train``, shuffled with ``seed``."""
    num_eval = max(1, round(fraction * len(train)))
    if num_eval >= len(train):
        raise ValueError(
            f"cannot carve a validation split off a train split of {len(train)} row(s) with "
            f"validation_fraction={fraction}: provide an eval split (eval_split=) or more training data"
        )
    parts = train.train_test_split(test_size=num_eval, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def _sample_indices(num_rows: int, sample_size: int, seed: int) -> list[int]:
    """The first ``sample_size`` row ids plus ``sample_size`` distinct random ones from the rest (seeded)."""
    head = list(range(min(sample_size, num_rows)))
    rest = num_rows - len(head)
    if rest <= 0:
        return head
    picks = np.random.default_rng(seed).choice(rest, size=min(sample_size, rest), replace=False) + len(head)
    return head + sorted(int(index) for index in picks)


def _image_mode(image: Any) -> str:
    """PIL mode of an image, or the mode an uint8 array stands for (``L`` for HxW or HxWx1, ``RGB`` for HxWx3)."""
    mode = getattr(image, "mode", None)
    if isinstance(mode, str):
        return mode
    array = np.asarray(image)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return "L"
    if array.ndim == 3 and array.shape[2] == 3:
        return "RGB"
    return f"array of shape {tuple(array.shape)}"


def _image_hw(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or an HxW[xC] array."""
    if hasattr(image, "height") and hasattr(image, "width"):
        return int(image.height), int(image.width)
    array = np.asarray(image)
    return int(array.shape[0]), int(array.shape[1])


def _check_images(
    splits: Mapping[str, datasets.Dataset],
    column: str,
    sample_size: int,
    seed: int,
    convert_rgb: bool,
    resize_to: tuple[int, int] | None,
) -> tuple[str, tuple[int, int], bool]:
    """Check a bounded sample of every split for one mode and one size; return (mode, size, sizes_all_equal).

    Only the first ``sample_size`` rows and ``sample_size`` random rows of each split are decoded, so an odd image
    further down can still pass here; the collator then raises when it meets it.
    """
    reference: tuple[str, int, str, tuple[int, int]] | None = None
    same_size = True
    checked = f"checked the first {sample_size} and {sample_size} random rows of each split"
    for split, dataset in splits.items():
        for index in _sample_indices(len(dataset), sample_size, seed):
            image = dataset[index][column]
            mode, size = _image_mode(image), _image_hw(image)
            if mode not in MODE_CHANNELS:
                raise ValueError(
                    f"image at row {index} of split '{split}' has mode '{mode}'; supported modes are 'L' and 'RGB': "
                    f"convert the images first, e.g. dataset.map(lambda ex: {{'{column}': ex['{column}'].convert("
                    "'RGB')})"
                )
            if reference is None:
                reference = (split, index, mode, size)
                continue
            ref_split, ref_index, ref_mode, ref_size = reference
            if mode != ref_mode and not convert_rgb:
                raise ValueError(
                    f"images in column '{column}' have mixed modes ('{ref_mode}' at row {ref_index} of split "
                    f"'{ref_split}', '{mode}' at row {index} of split '{split}'; {checked}): pass convert_rgb=True "
                    "to convert every image to RGB"
                )
            if size != ref_size:
                same_size = False
                if resize_to is None:
                    raise ValueError(
                        f"images in column '{column}' have mixed sizes ({ref_size} at row {ref_index} of split "
                        f"'{ref_split}', {size} at row {index} of split '{split}', as (height, width); {checked}): "
                        "pass image_size=(height, width) to resize every image"
                    )
    assert reference is not None  # callers check for empty splits first
    return reference[2], reference[3], same_size


def _label_names(
    features: datasets.Features, column: str, splits: Mapping[str, datasets.Dataset]
) -> tuple[str, ...]:
    """Class names from a ClassLabel, else ``"0" .. str(max label)``; raise on negative labels."""
    import datasets

    largest = 0
    for split, dataset in splits.items():
        labels = np.asarray(dataset[column])
        if labels.min() < 0:
            raise ValueError(
                f"label column '{column}' of split '{split}' holds a negative label ({int(labels.min())}): remove "
                "unlabelled rows (e.g. dataset.filter) before training"
            )
        largest = max(largest, int(labels.max()))
    feature = features[column]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    return tuple(str(index) for index in range(largest + 1))


def as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``int`` or ``(height, width)`` -> ``(height, width)``; checks positivity."""
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        raise ValueError(f"image_size must be a positive int or (height, width) of positive ints, got {image_size!r}")
    return size  # type: ignore[return-value]


def load_image_classification_data(
    dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    convert_rgb: bool = False,
    sample_size: int = 64,
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> ImageClassificationData:
    """Load an image-classification dataset and check it before any training starts.

    Args:
        dataset: a Hub dataset name (``datasets.load_dataset(name, config_name)``), an ``imagefolder`` directory
            (``class_name/*.png``, optionally under ``train/``, ``validation/``), a folder written by
            ``save_to_disk`` (DatasetDict or single Dataset), or a ``Dataset``/``DatasetDict`` object.
            See :func:`detect_dataset_source`.
        image_column: defaults to the first of ``image``, ``img``, ``pixel_values``, else the first ``Image`` column.
        label_column: defaults to ``label`` or ``labels``; must be an integer ``Value`` or a ``ClassLabel``.
        train_split: the split to train on.
        eval_split: the split to evaluate on; by default ``validation``, ``valid`` or ``val`` when present, else
            ``max(1, round(validation_fraction * n))`` rows are carved off train with ``seed`` (the ``test`` split
            is never used implicitly).
        validation_fraction: share of train carved off when there is no eval split, in (0, 1).
        seed: seed of the carved split and of the random rows checked.
        image_size: ``int`` or ``(height, width)`` to resize every image to (then sizes may be mixed); by default
            the size of the first training image, and all checked images must have it.
        convert_rgb: convert grayscale images to RGB (then modes ``L`` and ``RGB`` may be mixed).
        sample_size: the image check decodes the first ``sample_size`` and ``sample_size`` random rows of each
            split, not every image: a bounded cost on large datasets.
        config_name: Hub dataset configuration name.
        cache_dir: ``datasets`` cache folder for Hub and imagefolder loading.

    Raises:
        FileNotFoundError: a path-looking ``dataset`` that does not exist.
        ValueError: a missing split or column, a label column that is not integer/ClassLabel, negative labels,
            an empty split, unsupported image modes, mixed image sizes (without ``image_size``) or modes (without
            ``convert_rgb``), or a bad argument value.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    resize_to = as_size(image_size)

    raw = _load_raw(dataset, config_name, cache_dir)
    train, evaluation, eval_name = _select_splits(raw, train_split, eval_split)
    if len(train) == 0:
        raise ValueError(f"the train split '{train_split}' is empty (0 rows): check the dataset path and train_split=")
    if evaluation is not None and len(evaluation) == 0:
        raise ValueError(f"the eval split '{eval_name}' is empty (0 rows): pass another eval_split= or none to carve "
                         "one off train")
    features = train.features
    image_col = _image_column(features, image_column)
    label_col = _label_column(features, label_column)
    if evaluation is None:
        train, evaluation = _carve_validation(train, validation_fraction, seed)
        eval_name = f"{train_split}[carved {validation_fraction:g}, seed {seed}]"
    missing = [col for col in (image_col, label_col) if col not in evaluation.column_names]
    if missing:
        raise ValueError(
            f"eval split '{eval_name}' lacks column(s) {missing}; it has columns {evaluation.column_names}: pass "
            "an eval_split= that has them"
        )
    splits = {train_split: train, str(eval_name): evaluation}

    mode, size, same_size = _check_images(splits, image_col, sample_size, seed, convert_rgb, resize_to)
    names = _label_names(features, label_col, splits)
    info = ImageDataInfo(
        image_column=image_col,
        label_column=label_col,
        num_channels=3 if convert_rgb else MODE_CHANNELS[mode],
        image_size=resize_to or size,
        label_names=names,
        resize=resize_to is not None and not (same_size and size == resize_to),
        convert_rgb=convert_rgb,
    )
    return ImageClassificationData(train=train, eval=evaluation, info=info, eval_split=str(eval_name))
