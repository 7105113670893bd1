"""Convert the Fashion-MNIST arrays in ``../shared/data/fashion_mnist`` to a ``datasets.DatasetDict`` on disk.

Input: ``{train,validation}.npz``, each with ``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8 in [0, 10).
Output: ``save_to_disk`` folder with splits ``train`` and ``validation``, columns ``image`` (``datasets.Image``,
grayscale PNG) and ``label`` (``ClassLabel`` with the Fashion-MNIST class names). ``--train_limit N`` keeps the
first N training images (the arrays are already shuffled), e.g. 25000 for the reference ViT recipe.

    python benchmarks/prepare_fashion_mnist.py --output_dir data/fashion_mnist_hf --train_limit 25000

The result loads with ``surge_hf.data.image.load_image_classification_data("data/fashion_mnist_hf")``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLITS = ("train", "validation")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist"


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``images`` (N, H, W) uint8 and ``labels`` (N,) from one npz file, checking shapes, dtypes and range."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data_dir the folder holding train.npz and validation.npz")
    with np.load(path) as arrays:
        missing = [key for key in ("images", "labels") if key not in arrays.files]
        if missing:
            raise ValueError(f"{path} lacks array(s) {missing}; it has {arrays.files}")
        images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{path}: images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be ({len(images)},) integers, got {labels.shape} {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{path}: labels must lie in [0, {len(CLASS_NAMES)}), got [{labels.min()}, {labels.max()}]")
    return images, labels


def build_dataset_dict(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> datasets.DatasetDict:
    """``{split: (images, labels)}`` -> ``datasets.DatasetDict`` with an ``Image`` column and a ``ClassLabel``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
            for name, (images, labels) in splits.items()
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``argv`` None reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="folder to save_to_disk into")
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with train/validation.npz")
    parser.add_argument("--train_limit", type=int, default=None, help="keep only the first N training images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Read both splits, check them, and save the DatasetDict to ``--output_dir``."""
    args = parse_args(argv)
    if args.train_limit is not None and args.train_limit < 1:
        raise ValueError(f"--train_limit must be >= 1, got {args.train_limit}")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise FileExistsError(f"{args.output_dir} exists and is not empty: pass a new --output_dir or remove it")
    splits = {name: read_split(args.data_dir / f"{name}.npz") for name in SPLITS}
    if args.train_limit is not None:
        images, labels = splits["train"]
        splits["train"] = (images[: args.train_limit], labels[: args.train_limit])
    build_dataset_dict(splits).save_to_disk(str(args.output_dir))
    sizes = ", ".join(f"{name} {len(labels)}" for name, (_, labels) in splits.items())
    print(f"saved {sizes} images to {args.output_dir}")


if __name__ == "__main__":
    main()
