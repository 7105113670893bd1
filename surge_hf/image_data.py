"""Image-classification data for binary ViTs: loading, checks, torch transforms, and the saved image processor.

Three parts, used in this order by a training script:

1. :func:`load_image_classification_data` loads a Hub dataset, an ``imagefolder`` directory or a folder written by
   ``save_to_disk``, finds the image and label columns, checks a bounded sample of images, and returns the train and
   eval splits with an :class:`ImageDataInfo` (channels, size, label names).
2. :class:`ImageCollator` turns a list of examples into ``{"pixel_values": FloatTensor[B, C, H, W],
   "labels": LongTensor[B]}`` with plain torch (no torchvision): uint8 -> [0, 1], optional resize, random crop with
   zero padding, horizontal flip, per-channel normalisation, and optional batch-level mixup / cutmix (which add
   ``"soft_labels"``: FloatTensor[B, K]). Randomness comes from a seeded ``torch.Generator``.
3. :func:`build_image_processor` builds a ``transformers.ViTImageProcessor`` whose settings reproduce the eval
   transform, to be saved next to the model so that ``AutoImageProcessor.from_pretrained(folder)`` gives the same
   inputs at inference.

``datasets`` and ``transformers`` are imported inside the functions that need them: the collator and transforms need
only torch and numpy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import datasets
    from transformers import ViTImageProcessor

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
EVAL_SPLIT_CANDIDATES = ("validation", "valid", "val")
MODE_CHANNELS = {"L": 1, "RGB": 3}
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, the resize our torch resize mirrors


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


def _as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
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
    resize_to = _as_size(image_size)

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


# ----------------------------------------------------------------------------------------------------------------
# Tensor transforms (plain torch)
# ----------------------------------------------------------------------------------------------------------------


def to_tensor(image: Any) -> torch.Tensor:
    """PIL image (mode ``L``/``RGB``) or uint8 array (HxW, HxWx1, HxWx3) -> FloatTensor[C, H, W] = pixel / 255."""
    mode = getattr(image, "mode", None)
    if isinstance(mode, str) and mode not in MODE_CHANNELS:
        raise ValueError(f"image mode '{mode}' is not supported: convert the image to 'RGB' or 'L' first")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        out_of_range = array.size > 0 and (array.min() < 0 or array.max() > 255)
        if not np.issubdtype(array.dtype, np.integer) or out_of_range:
            raise ValueError(
                f"pixel values must be integers in [0, 255] (uint8), got dtype {array.dtype}: convert float images "
                "in [0, 1] with (x * 255).round().astype('uint8')"
            )
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image array must be HxW, HxWx1 or HxWx3, got shape {tuple(array.shape)}")
    return torch.tensor(array).permute(2, 0, 1).float().div(255.0)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a [0, 1] FloatTensor[C, H, W] to ``size`` = (height, width), as a uint8 image resize.

    ``round(interpolate(255 * x, antialias=True)) / 255``: the antialiased bilinear filter of PIL, rounded to grey
    levels like PIL's uint8 output; it agrees with ``PIL.Image.resize(BILINEAR)`` within one grey level (1/255).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    scaled = F.interpolate(image[None] * 255.0, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return scaled.round().clamp(0.0, 255.0).div(255.0)


def prepare_image(image: Any, info: ImageDataInfo) -> torch.Tensor:
    """The deterministic part shared by train and eval: :func:`to_tensor`, grayscale -> RGB, resize.

    Returns FloatTensor[info.num_channels, *info.image_size] in [0, 1].
    """
    tensor = to_tensor(image)
    if info.convert_rgb and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1).contiguous()
    if tensor.shape[0] != info.num_channels:
        raise ValueError(
            f"image has {tensor.shape[0]} channel(s) but the dataset was loaded with {info.num_channels}: reload "
            "with convert_rgb=True to convert grayscale images to RGB"
        )
    size = tuple(tensor.shape[-2:])
    if size != info.image_size:
        if not info.resize:
            raise ValueError(
                f"image has size {size} but {info.image_size} was expected (height, width): reload with "
                f"image_size={info.image_size} to resize every image"
            )
        tensor = resize_image(tensor, info.image_size)
    return tensor


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean[c]) / std[c]`` of FloatTensor[B, C, H, W] (or [C, H, W])."""
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=batch.dtype).view(shape)
    std_t = torch.tensor(std, dtype=batch.dtype).view(shape)
    return (batch - mean_t) / std_t


def crop_with_offsets(batch: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad FloatTensor[B, C, H, W] by ``padding`` on every side, then cut HxW at ``offsets[b] = (top, left)``.

    Offsets lie in ``[0, 2 * padding]``; ``(padding, padding)`` gives the image back unchanged.
    """
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (padding, padding, padding, padding))
    return torch.stack(
        [padded[b, :, top : top + height, left : left + width] for b, (top, left) in enumerate(offsets.tolist())]
    )


def random_crop(batch: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding: offsets ``(top, left)`` uniform in ``[0, 2 * padding]`` per image."""
    if padding == 0:
        return batch
    offsets = torch.randint(0, 2 * padding + 1, (batch.shape[0], 2), generator=generator)
    return crop_with_offsets(batch, padding, offsets)


def random_horizontal_flip(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of FloatTensor[B, C, H, W] left-right with probability ``p`` (``torch.rand(B) < p``)."""
    flip = torch.rand(batch.shape[0], generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)


def _sample_beta(alpha: float, generator: torch.Generator) -> float:
    """A draw of Beta(alpha, alpha), seeded from ``generator`` (torch has no seeded Beta sampler)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _one_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    return F.one_hot(labels, num_labels).float()


def mixup_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, num_labels: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup: ``lam ~ Beta(alpha, alpha)``, ``pi`` a random permutation of the batch,

        x'_b = lam * x_b + (1 - lam) * x_pi(b),   y'_b = lam * onehot(y_b) + (1 - lam) * onehot(y_pi(b)).

    Returns (mixed pixel values, soft labels FloatTensor[B, num_labels]); each soft row sums to 1.
    """
    lam = _sample_beta(alpha, generator)
    perm = torch.randperm(pixel_values.shape[0], generator=generator)
    mixed = lam * pixel_values + (1.0 - lam) * pixel_values[perm]
    targets = _one_hot(labels, num_labels)
    return mixed, lam * targets + (1.0 - lam) * targets[perm]


def cutmix_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, num_labels: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: paste one box of ``x_pi(b)`` into every ``x_b`` (``pi`` a random permutation of the batch).

    ``lam ~ Beta(alpha, alpha)``; box sides ``h = int(H * sqrt(1 - lam))``, ``w = int(W * sqrt(1 - lam))`` centred at
    a uniform pixel ``(cy, cx)`` and clipped to the image; the soft labels use the area actually pasted:

        lam' = 1 - box_area / (H * W),   y'_b = lam' * onehot(y_b) + (1 - lam') * onehot(y_pi(b)).

    Returns (mixed pixel values, soft labels FloatTensor[B, num_labels]); each soft row sums to 1.
    """
    height, width = pixel_values.shape[-2:]
    lam = _sample_beta(alpha, generator)
    perm = torch.randperm(pixel_values.shape[0], generator=generator)
    ratio = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = max(cy - box_h // 2, 0), min(cy - box_h // 2 + box_h, height)
    left, right = max(cx - box_w // 2, 0), min(cx - box_w // 2 + box_w, width)
    mixed = pixel_values.clone()
    mixed[:, :, top:bottom, left:right] = pixel_values[perm][:, :, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    targets = _one_hot(labels, num_labels)
    return mixed, kept * targets + (1.0 - kept) * targets[perm]


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets, batch mean: ``-mean_b sum_k t_bk * log_softmax(logits)_bk``."""
    return -(soft_labels * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; the defaults do nothing.

    Attributes:
        crop_padding: zero padding of the random crop, in pixels (0: no crop).
        horizontal_flip: mirror each image with probability 0.5.
        mixup_alpha: Beta parameter of mixup (0: off).
        cutmix_alpha: Beta parameter of cutmix (0: off). With both on, each batch takes one of the two with
            probability 0.5.
    """

    crop_padding: int = 0
    horizontal_flip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(
                f"mixup_alpha and cutmix_alpha must be >= 0 (0 turns them off), got {self.mixup_alpha} and "
                f"{self.cutmix_alpha}"
            )

    @property
    def mixes(self) -> bool:
        """Whether batches get mixup or cutmix (and so ``soft_labels``)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class ImageCollator:
    """Collate examples ``{image_column: image, label_column: int}`` into model inputs.

    Output: ``{"pixel_values": FloatTensor[B, C, H, W], "labels": LongTensor[B]}``, plus
    ``"soft_labels": FloatTensor[B, K]`` when ``augment`` mixes batches (train with :func:`soft_cross_entropy` on
    those; ``labels`` keeps each row's own class). Order: :func:`prepare_image`, random crop, flip (train),
    :func:`normalize`, mixup/cutmix (train). Without ``augment`` it is the eval transform that
    :func:`build_image_processor` reproduces.

    Randomness: each batch draws from its own ``torch.Generator``, seeded from ``(seed, epoch, batch index)``, so the
    augmentation does not depend on ``num_workers``, and a run resumed mid-epoch (whose loader skips the first batches
    without collating them) draws what the uninterrupted run drew, given the index of its first batch through
    :meth:`set_epoch`. Each collator copy counts its calls: the batch index is ``first_batch + calls`` in the main
    process and ``first_batch + w + calls * n`` in DataLoader worker ``w`` of ``n`` (a map-style DataLoader hands
    batches to its workers in turn). Call :meth:`set_epoch` at each epoch (non-persistent workers get a fresh copy of
    the collator each epoch); in multi-process training pass ``seed + process_index``.
    """

    def __init__(
        self,
        info: ImageDataInfo,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if len(mean) != info.num_channels or len(std) != info.num_channels:
            raise ValueError(
                f"mean and std need one value per channel ({info.num_channels}), got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {list(std)}")
        self.info = info
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.first_batch = 0
        self._calls = 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Start epoch ``epoch`` at batch ``first_batch`` (> 0 when a resumed run skips the batches before it).

        The augmentation of batch ``b`` of epoch ``e`` depends only on (seed, e, b).
        """
        if first_batch < 0:
            raise ValueError(f"first_batch must be >= 0, got {first_batch}")
        self.epoch = epoch
        self.first_batch = first_batch
        self._calls = 0

    def _generator(self) -> torch.Generator:
        """A generator for the next batch, seeded from (seed, epoch, batch index); see the class docstring."""
        worker = torch.utils.data.get_worker_info()
        offset, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        batch_index = self.first_batch + offset + self._calls * stride
        self._calls += 1
        state = np.random.SeedSequence([self.seed, self.epoch, batch_index]).generate_state(1, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0]) >> 1)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        info = self.info
        pixel_values = torch.stack([prepare_image(example[info.image_column], info) for example in examples])
        labels = torch.tensor([int(example[info.label_column]) for example in examples], dtype=torch.long)
        augment = self.augment
        if augment is None:
            return {"pixel_values": normalize(pixel_values, self.mean, self.std), "labels": labels}
        generator = self._generator()
        pixel_values = random_crop(pixel_values, augment.crop_padding, generator)
        if augment.horizontal_flip:
            pixel_values = random_horizontal_flip(pixel_values, generator)
        pixel_values = normalize(pixel_values, self.mean, self.std)
        batch = {"pixel_values": pixel_values, "labels": labels}
        if augment.mixes:
            use_cutmix = augment.cutmix_alpha > 0 and (
                augment.mixup_alpha == 0 or float(torch.rand(1, generator=generator)) < 0.5
            )
            mix = cutmix_batch if use_cutmix else mixup_batch
            alpha = augment.cutmix_alpha if use_cutmix else augment.mixup_alpha
            batch["pixel_values"], batch["soft_labels"] = mix(pixel_values, labels, info.num_labels, alpha, generator)
        return batch


def compute_mean_std(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    info: ImageDataInfo,
    max_images: int | None = 10_000,
    seed: int = 0,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of :func:`prepare_image` outputs (values in [0, 1]).

    ``mean_c = E[x_c]``, ``std_c = sqrt(E[x_c^2] - mean_c^2)`` over all pixels of ``max_images`` rows drawn at
    random with ``seed`` (all rows when ``max_images`` is None or the dataset is smaller), accumulated in float64.
    """
    if len(dataset) == 0:
        raise ValueError("cannot compute mean/std of an empty dataset")
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    total = torch.zeros(info.num_channels, dtype=torch.float64)
    squares = torch.zeros(info.num_channels, dtype=torch.float64)
    pixels = 0
    for row in rows.tolist():
        tensor = prepare_image(dataset[row][info.image_column], info).double()
        total += tensor.sum(dim=(1, 2))
        squares += tensor.square().sum(dim=(1, 2))
        pixels += tensor.shape[1] * tensor.shape[2]
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0.0).sqrt()
    if float(std.min()) == 0.0:
        raise ValueError(
            f"pixel values have zero variance in some channel (std {std.tolist()}): pass mean and std to "
            "ImageCollator yourself"
        )
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------------------------------------------
# Image processor saved with the model
# ----------------------------------------------------------------------------------------------------------------


def build_image_processor(info: ImageDataInfo, mean: Sequence[float], std: Sequence[float]) -> ViTImageProcessor:
    """A ``ViTImageProcessor`` that reproduces the eval transform of :class:`ImageCollator` (``augment=None``).

    Settings: ``do_convert_rgb = info.convert_rgb``; ``do_resize = info.resize`` to ``info.image_size`` with
    bilinear resampling; ``do_rescale`` by 1/255; ``do_normalize`` with ``mean``/``std``. Without resizing the
    outputs equal the eval transform up to float rounding (1e-6); with resizing, within one grey level before
    normalisation (see :func:`resize_image`). Save it with ``save_pretrained(folder)`` next to the model.
    """
    from transformers import ViTImageProcessor

    height, width = info.image_size
    return ViTImageProcessor(
        do_convert_rgb=info.convert_rgb,
        do_resize=info.resize,
        size={"height": height, "width": width},
        resample=PIL_BILINEAR,
        do_rescale=True,
        rescale_factor=1.0 / 255.0,
        do_normalize=True,
        image_mean=[float(value) for value in mean],
        image_std=[float(value) for value in std],
    )
