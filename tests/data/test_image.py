"""Tests of surge_hf.data.image, image_transforms, image_processing and benchmarks/prepare_fashion_mnist.py, on tiny
generated datasets (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from surge_hf.data.image import ImageDataInfo, detect_dataset_source, load_image_classification_data
from surge_hf.data.image_processing import ImageCollator, build_image_processor, compute_mean_std
from surge_hf.data.image_transforms import (
    AugmentConfig,
    crop_with_offsets,
    cutmix_batch,
    mixup_batch,
    normalize,
    prepare_image,
    random_crop,
    random_horizontal_flip,
    resize_image,
    to_tensor,
)

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CLASSES = ("ant", "bee", "cat")


def pixels(index: int, mode: str, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """A distinct deterministic uint8 image: HxW for L, HxWx3 for RGB."""
    height, width = size
    base = (np.arange(height * width).reshape(height, width) * 3 + index * 17) % 256
    if mode == "L":
        return base.astype(np.uint8)
    return np.stack([base, 255 - base, (base + 100) % 256], axis=-1).astype(np.uint8)


def pil_images(mode: str, count: int = 12, size: tuple[int, int] = (8, 8)) -> list:
    return [Image.fromarray(pixels(index, mode, size)) for index in range(count)]


def image_dataset(images: list, labels: list[int] | None = None, label_feature=None) -> datasets.Dataset:
    labels = [index % 3 for index in range(len(images))] if labels is None else labels
    features = datasets.Features(
        {"image": datasets.Image(), "label": label_feature or datasets.ClassLabel(names=list(CLASSES))}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def write_imagefolder(root: Path, mode: str) -> Path:
    for index, image in enumerate(pil_images(mode)):
        folder = root / CLASSES[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    return root


@pytest.fixture
def info_rgb() -> ImageDataInfo:
    return ImageDataInfo("image", "label", 3, (8, 8), CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# Source detection and the three input forms
# ---------------------------------------------------------------------------------------------------------------


def test_detect_dataset_source(tmp_path, monkeypatch):
    image_dataset(pil_images("L", 3)).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": image_dataset(pil_images("L", 3))}).save_to_disk(str(tmp_path / "dict"))
    write_imagefolder(tmp_path / "folder", "L")
    (tmp_path / "file.txt").write_text("x")
    assert detect_dataset_source(tmp_path / "single") == "disk"
    assert detect_dataset_source(str(tmp_path / "dict")) == "disk"
    assert detect_dataset_source(tmp_path / "folder") == "imagefolder"
    monkeypatch.chdir(tmp_path)
    assert detect_dataset_source("user/dataset") == "hub"
    assert detect_dataset_source("mnist") == "hub"
    for missing in ("./nothing", str(tmp_path / "nothing"), "a/b/c", "folder/nothing", "~/surely_not_here_42"):
        with pytest.raises(FileNotFoundError, match=r"dataset path '.*' does not exist: check the path"):
            detect_dataset_source(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_dataset_source(Path("nothing"))
    with pytest.raises(ValueError, match=r"'file.txt' is a file, not a directory"):
        detect_dataset_source("file.txt")


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_imagefolder_loads_with_deterministic_carved_validation(tmp_path, mode, channels):
    root = write_imagefolder(tmp_path / "folder", mode)
    kwargs = dict(validation_fraction=0.25, seed=3, cache_dir=str(tmp_path / "cache"))
    data = load_image_classification_data(root, **kwargs)
    again = load_image_classification_data(str(root), **kwargs)
    assert (len(data.train), len(data.eval)) == (9, 3)
    assert data.eval_split == "train[carved 0.25, seed 3]"
    assert data.info == ImageDataInfo("image", "label", channels, (8, 8), CLASSES)
    assert data.eval["label"] == again.eval["label"]
    assert [np.asarray(im).tolist() for im in data.eval["image"]] == [
        np.asarray(im).tolist() for im in again.eval["image"]
    ]
    assert data.info.model_config_kwargs() == {
        "image_size": 8,
        "num_channels": channels,
        "num_labels": 3,
        "id2label": {0: "ant", 1: "bee", 2: "cat"},
        "label2id": {"ant": 0, "bee": 1, "cat": 2},
        "problem_type": "single_label_classification",
    }


def test_save_to_disk_dict_uses_its_validation_split(tmp_path):
    path = tmp_path / "disk"
    datasets.DatasetDict(
        {"train": image_dataset(pil_images("RGB", 9)), "validation": image_dataset(pil_images("RGB", 3))}
    ).save_to_disk(str(path))
    data = load_image_classification_data(str(path))
    assert (len(data.train), len(data.eval), data.eval_split) == (9, 3, "validation")
    assert data.info.num_channels == 3


def test_save_to_disk_single_dataset_is_split(tmp_path):
    path = tmp_path / "single"
    image_dataset(pil_images("L", 12)).save_to_disk(str(path))
    data = load_image_classification_data(path, validation_fraction=0.5)
    assert (len(data.train), len(data.eval)) == (6, 6)
    with pytest.raises(ValueError, match="the dataset is a single split: drop eval_split="):
        load_image_classification_data(path, eval_split="validation")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, cache_dir=None):
        calls.append((name, config, cache_dir))
        return datasets.DatasetDict(
            {"train": image_dataset(pil_images("L", 10)), "test": image_dataset(pil_images("L", 2))}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_image_classification_data("someone/fashion", config_name="default", cache_dir="c")
    assert calls == [("someone/fashion", "default", "c")]
    assert (len(data.train), len(data.eval)) == (9, 1)  # the test split is never used implicitly
    data = load_image_classification_data("someone/fashion", eval_split="test")
    assert (len(data.train), len(data.eval), data.eval_split) == (10, 2, "test")


# ---------------------------------------------------------------------------------------------------------------
# Column detection and bad inputs
# ---------------------------------------------------------------------------------------------------------------


def test_column_detection():
    images = pil_images("L", 6)
    plain = datasets.Dataset.from_dict({"img": images, "labels": [0, 1, 2, 0, 1, 2]})
    plain = plain.cast_column("img", datasets.Image())
    info = load_image_classification_data(plain).info
    assert (info.image_column, info.label_column, info.label_names) == ("img", "labels", ("0", "1", "2"))
    custom = image_dataset(images).rename_columns({"image": "picture", "label": "target"})
    info = load_image_classification_data(custom, label_column="target").info
    assert (info.image_column, info.label_column, info.label_names) == ("picture", "target", CLASSES)
    arrays = datasets.Dataset.from_dict({"pixel_values": [pixels(i, "RGB") for i in range(4)], "label": [0, 1, 0, 1]})
    info = load_image_classification_data(arrays, validation_fraction=0.25).info
    assert (info.image_column, info.num_channels, info.image_size) == ("pixel_values", 3, (8, 8))


def test_missing_columns_are_named():
    dataset = image_dataset(pil_images("L", 4))
    with pytest.raises(ValueError, match=r"image column 'photo' not found; the dataset has columns \['image', 'label'\]"
                       r": pass image_column= one of them"):
        load_image_classification_data(dataset, image_column="photo")
    no_image = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no image column found; the dataset has columns \['text', 'label'\]: pass "
                       "image_column="):
        load_image_classification_data(no_image)
    no_label = dataset.remove_columns("label")
    with pytest.raises(
        ValueError, match=r"no label column found; the dataset has columns \['image'\]: pass label_column="
    ):
        load_image_classification_data(no_label)
    with pytest.raises(ValueError, match=r"label column 'y' not found"):
        load_image_classification_data(dataset, label_column="y")


@pytest.mark.parametrize(
    "labels, feature, kind",
    [
        (["a", "b", "a", "b"], datasets.Value("string"), "string"),
        ([0.0, 1.0, 0.0, 1.0], datasets.Value("float32"), "float32"),
    ],
)
def test_label_column_must_be_integer(labels, feature, kind):
    dataset = image_dataset(pil_images("L", 4), labels, feature)
    with pytest.raises(ValueError, match=rf"label column 'label' has type {kind}; labels must be integers or a "
                       r"ClassLabel: encode them with dataset.class_encode_column\('label'\)"):
        load_image_classification_data(dataset)


def test_negative_labels_are_refused():
    dataset = image_dataset(pil_images("L", 4), [0, 1, -1, 1], datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"holds a negative label \(-1\): remove unlabelled rows"):
        load_image_classification_data(dataset, validation_fraction=0.25)


def test_empty_and_missing_splits():
    empty = image_dataset([], [])
    with pytest.raises(ValueError, match=r"the train split 'train' is empty \(0 rows\)"):
        load_image_classification_data(empty)
    both = datasets.DatasetDict({"train": image_dataset(pil_images("L", 4)), "validation": empty})
    with pytest.raises(ValueError, match=r"the eval split 'validation' is empty \(0 rows\)"):
        load_image_classification_data(both)
    with pytest.raises(ValueError, match=r"train split 'training' not found; the dataset has splits \['train', "
                       r"'validation'\]: pass train_split="):
        load_image_classification_data(both, train_split="training")
    with pytest.raises(ValueError, match=r"eval split 'dev' not found"):
        load_image_classification_data(both, eval_split="dev")
    with pytest.raises(ValueError, match=r"cannot carve a validation split off a train split of 1 row\(s\)"):
        load_image_classification_data(image_dataset(pil_images("L", 1)))


def test_unknown_path_is_refused_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: check the path"):
        load_image_classification_data(str(tmp_path / "missing"))


def test_bad_arguments():
    dataset = image_dataset(pil_images("L", 4))
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\), got 1.0"):
        load_image_classification_data(dataset, validation_fraction=1.0)
    with pytest.raises(ValueError, match=r"image_size must be a positive int or \(height, width\)"):
        load_image_classification_data(dataset, image_size=(8, 0))
    with pytest.raises(ValueError, match="AugmentConfig.crop_padding must be >= 0"):
        AugmentConfig(crop_padding=-1)
    with pytest.raises(ValueError, match="AugmentConfig.mixup_alpha and cutmix_alpha must be >= 0"):
        AugmentConfig(mixup_alpha=-0.1)


def test_mixed_sizes_need_image_size():
    images = pil_images("RGB", 6) + [Image.fromarray(pixels(6, "RGB", (10, 8)))]
    dataset = image_dataset(images)
    with pytest.raises(ValueError, match=r"images in column 'image' have mixed sizes \(\(8, 8\) at row 0 of split "
                       r"'train', \(10, 8\) at row \d of split '.*', as \(height, width\); checked the first 64 and 64 "
                       r"random rows of each split\): pass image_size=\(height, width\) to resize every image"):
        load_image_classification_data(dataset, validation_fraction=0.3)
    info = load_image_classification_data(dataset, validation_fraction=0.3, image_size=(8, 8)).info
    assert (info.image_size, info.resize) == ((8, 8), True)
    uniform = load_image_classification_data(image_dataset(pil_images("RGB", 6)), image_size=8).info
    assert (uniform.image_size, uniform.resize) == ((8, 8), False)
    upsized = load_image_classification_data(image_dataset(pil_images("RGB", 6)), image_size=(12, 16)).info
    assert (upsized.image_size, upsized.resize) == ((12, 16), True)
    assert upsized.model_config_kwargs()["image_size"] == [12, 16]


def test_mixed_sizes_beyond_the_sample_fail_in_the_collator():
    images = pil_images("L", 5) + [Image.fromarray(pixels(5, "L", (6, 8)))]
    data = load_image_classification_data(image_dataset(images), sample_size=1, validation_fraction=0.2)
    collate = ImageCollator(data.info, [0.5], [0.5])
    with pytest.raises(ValueError, match=r"image has size \(6, 8\) but \(8, 8\) was expected \(height, width\): reload "
                       r"with image_size=\(8, 8\)"):
        collate([{"image": image, "label": 0} for image in images])


def test_mixed_modes_need_convert_rgb():
    dataset = image_dataset(pil_images("RGB", 4) + pil_images("L", 4))
    with pytest.raises(ValueError, match=r"images in column 'image' have mixed modes \('RGB' at row 0 of split "
                       r"'train', 'L' at row \d of split .*\): pass convert_rgb=True to convert every image to RGB"):
        load_image_classification_data(dataset, validation_fraction=0.25)
    info = load_image_classification_data(dataset, validation_fraction=0.25, convert_rgb=True).info
    assert (info.num_channels, info.convert_rgb) == (3, True)


def test_unsupported_mode_is_refused():
    images = [Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA") for _ in range(4)]
    with pytest.raises(ValueError, match=r"image at row 0 of split 'train' has mode 'RGBA'; supported modes are 'L' "
                       r"and 'RGB': convert the images first"):
        load_image_classification_data(image_dataset(images))


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


def test_to_tensor_exact_values():
    gray = np.array([[0, 51], [255, 102]], dtype=np.uint8)
    expected = torch.tensor([[[0.0, 0.2], [1.0, 0.4]]])
    assert torch.equal(to_tensor(gray), expected)
    assert torch.equal(to_tensor(Image.fromarray(gray)), expected)
    assert torch.equal(to_tensor(gray.astype(np.int64)), expected)
    rgb = pixels(1, "RGB", (2, 3))
    assert torch.equal(to_tensor(Image.fromarray(rgb)), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match=r"pixel values must be integers in \[0, 255\] \(uint8\), got dtype float32"):
        to_tensor(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"image array must be HxW, HxWx1 or HxWx3, got shape \(2, 2, 4\)"):
        to_tensor(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="image mode 'RGBA' is not supported"):
        to_tensor(Image.new("RGBA", (2, 2)))


@pytest.mark.parametrize("source, target", [((8, 8), (16, 16)), ((28, 28), (16, 16)), ((13, 7), (5, 9))])
def test_resize_matches_pil_within_one_grey_level(source, target):
    array = np.random.default_rng(0).integers(0, 256, (*source, 3), dtype=np.uint8)
    ours = resize_image(to_tensor(array), target)
    pil = to_tensor(Image.fromarray(array).resize(target[::-1], Image.BILINEAR))
    assert ours.shape == (3, *target)
    assert float((ours - pil).abs().max()) <= 1 / 255 + 1e-7
    assert torch.equal(ours * 255, (ours * 255).round())


def test_crop_with_offsets_exact():
    batch = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    cases = {(0, 0): [[0, 0], [0, 1]], (1, 1): [[1, 2], [3, 4]], (2, 1): [[3, 4], [0, 0]], (1, 2): [[2, 0], [4, 0]]}
    for offset, expected in cases.items():
        out = crop_with_offsets(batch, 1, torch.tensor([offset]))
        assert torch.equal(out, torch.tensor([[expected]], dtype=torch.float32))


def test_random_crop_and_flip_use_the_generator():
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = random_crop(batch, 2, torch.Generator().manual_seed(7))
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, crop_with_offsets(batch, 2, offsets))
    assert torch.equal(random_crop(batch, 0, torch.Generator()), batch)

    flipped = random_horizontal_flip(batch, torch.Generator().manual_seed(1))
    mask = torch.rand(2, generator=torch.Generator().manual_seed(1)) < 0.5
    for index in range(2):
        expected = batch[index].flip(-1) if mask[index] else batch[index]
        assert torch.equal(flipped[index], expected)
    always = random_horizontal_flip(batch, torch.Generator(), p=1.0)
    assert torch.equal(always[0, 0, 0], torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))


def test_normalize_exact():
    batch = torch.tensor([[[[0.5]], [[1.0]]]])
    assert torch.equal(normalize(batch, [0.25, 0.5], [0.5, 0.25]), torch.tensor([[[[0.5]], [[2.0]]]]))


@pytest.mark.parametrize("mix", [mixup_batch, cutmix_batch])
def test_mix_soft_labels_match_the_mixed_pixels(mix):
    # Image b is constant b and has class b: the mean pixel of each mixed image is then sum_k soft[b, k] * k.
    num = 6
    pixel_values = torch.arange(num, dtype=torch.float32).view(num, 1, 1, 1).expand(num, 2, 8, 8).contiguous()
    labels = torch.arange(num)
    for seed in range(5):
        mixed, soft = mix(pixel_values, labels, num, 1.0, torch.Generator().manual_seed(seed))
        again, soft_again = mix(pixel_values, labels, num, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
        assert soft.shape == (num, num) and soft.dtype == torch.float32
        assert torch.allclose(soft.sum(dim=1), torch.ones(num), atol=1e-6)
        assert torch.allclose(mixed.mean(dim=(1, 2, 3)), soft @ torch.arange(num, dtype=torch.float32), atol=1e-5)


def test_collator_eval_and_train(info_rgb):
    examples = [{"image": image, "label": index % 3} for index, image in enumerate(pil_images("RGB", 4))]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    batch = ImageCollator(info_rgb, mean, std)(examples)
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (4, 3, 8, 8)
    assert torch.equal(batch["labels"], torch.tensor([0, 1, 2, 0]))
    manual = normalize(torch.stack([to_tensor(example["image"]) for example in examples]), mean, std)
    assert torch.equal(batch["pixel_values"], manual)

    augment = AugmentConfig(crop_padding=2, horizontal_flip=True, mixup_alpha=0.4, cutmix_alpha=1.0)
    first = ImageCollator(info_rgb, mean, std, augment, seed=5)
    second = ImageCollator(info_rgb, mean, std, augment, seed=5)
    runs = [first(examples), first(examples)]
    assert set(runs[0]) == {"pixel_values", "labels", "soft_labels"}
    assert runs[0]["soft_labels"].shape == (4, 3)
    assert torch.equal(second(examples)["pixel_values"], runs[0]["pixel_values"])
    assert torch.equal(second(examples)["pixel_values"], runs[1]["pixel_values"])
    assert not torch.equal(runs[0]["pixel_values"], runs[1]["pixel_values"])
    first.set_epoch(0)
    assert torch.equal(first(examples)["pixel_values"], runs[0]["pixel_values"])
    first.set_epoch(1)
    assert not torch.equal(first(examples)["pixel_values"], runs[0]["pixel_values"])


def test_collator_in_dataloader_workers_is_reproducible(info_rgb):
    examples = [{"image": pixels(0, "RGB"), "label": 0}] * 8
    augment = AugmentConfig(crop_padding=1, horizontal_flip=True)

    def run() -> list[torch.Tensor]:
        collate = ImageCollator(info_rgb, [0.5] * 3, [0.5] * 3, augment, seed=1)
        loader = torch.utils.data.DataLoader(examples, batch_size=2, num_workers=2, collate_fn=collate)
        return [batch["pixel_values"] for batch in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # batches 0 and 1 come from workers 0 and 1: their seeds differ


def test_collator_augmentation_is_keyed_by_batch_index(info_rgb):
    """Same draws with or without workers, and a loader resumed at batch k (skipping batches 0..k-1 uncollated)
    draws what batch k drew."""
    examples = [{"image": pixels(0, "RGB"), "label": 0}] * 8
    augment = AugmentConfig(crop_padding=1, horizontal_flip=True, mixup_alpha=0.5)

    def run(num_workers: int, first_batch: int = 0) -> list[torch.Tensor]:
        collate = ImageCollator(info_rgb, [0.5] * 3, [0.5] * 3, augment, seed=1)
        collate.set_epoch(3, first_batch=first_batch)
        loader = torch.utils.data.DataLoader(examples[2 * first_batch:], batch_size=2, num_workers=num_workers,
                                             collate_fn=collate)
        return [batch["pixel_values"] for batch in loader]

    serial = run(0)
    assert all(torch.equal(a, b) for a, b in zip(serial, run(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(serial[1:], run(0, first_batch=1), strict=True))
    with pytest.raises(ValueError, match="first_batch must be >= 0, got -1"):
        ImageCollator(info_rgb, [0.5] * 3, [0.5] * 3, augment).set_epoch(0, first_batch=-1)


def test_collator_checks_mean_std(info_rgb):
    with pytest.raises(ValueError, match=r"mean and std need one value per channel \(3\), got 1 and 3"):
        ImageCollator(info_rgb, [0.5], [0.5] * 3)
    with pytest.raises(ValueError, match="std must be > 0 for every channel"):
        ImageCollator(info_rgb, [0.5] * 3, [0.5, 0.0, 0.5])


def test_prepare_image_converts_gray_to_rgb():
    info = ImageDataInfo("image", "label", 3, (8, 8), CLASSES, convert_rgb=True)
    gray = pixels(2, "L")
    assert torch.equal(prepare_image(gray, info), to_tensor(gray).expand(3, 8, 8))
    with pytest.raises(ValueError, match=r"image has 1 channel\(s\) but the dataset was loaded with 3: reload with "
                       "convert_rgb=True"):
        prepare_image(gray, ImageDataInfo("image", "label", 3, (8, 8), CLASSES))


def test_compute_mean_std_exact(info_rgb):
    images = pil_images("RGB", 5)
    dataset = image_dataset(images)
    stacked = np.stack([np.asarray(image) for image in images]).astype(np.float64) / 255
    mean, std = compute_mean_std(dataset, info_rgb, max_images=None)
    assert np.allclose(mean, stacked.mean(axis=(0, 1, 2)), atol=1e-12)
    assert np.allclose(std, stacked.std(axis=(0, 1, 2)), atol=1e-12)
    assert compute_mean_std(dataset, info_rgb, max_images=3) == compute_mean_std(dataset, info_rgb, max_images=3)
    flat = image_dataset([Image.new("RGB", (8, 8))] * 2)
    with pytest.raises(ValueError, match="zero variance in some channel"):
        compute_mean_std(flat, info_rgb)


# ---------------------------------------------------------------------------------------------------------------
# Image processor saved with the model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, convert_rgb, image_size, atol",
    [
        (pil_images("RGB", 4), False, None, 1e-6),
        (pil_images("L", 4), False, None, 1e-6),
        (pil_images("L", 2) + pil_images("RGB", 2), True, None, 1e-6),
        (pil_images("RGB", 2) + pil_images("RGB", 2, (10, 6)), False, (12, 12), 1 / 255 / 0.2 + 1e-6),
    ],
)
def test_saved_processor_reproduces_eval_transform(tmp_path, images, convert_rgb, image_size, atol):
    from transformers import AutoImageProcessor

    data = load_image_classification_data(
        image_dataset(images), validation_fraction=0.25, convert_rgb=convert_rgb, image_size=image_size
    )
    mean, std = compute_mean_std(data.train, data.info)
    build_image_processor(data.info, mean, std).save_pretrained(tmp_path / "model")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    assert processor.do_resize == (image_size is not None)
    expected = ImageCollator(data.info, mean, std)([{"image": image, "label": 0} for image in images])
    got = processor(images=images, return_tensors="pt")["pixel_values"]
    assert got.shape == expected["pixel_values"].shape
    assert min(std) > 0.2
    assert torch.allclose(got, expected["pixel_values"], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/prepare_fashion_mnist.py
# ---------------------------------------------------------------------------------------------------------------


def load_prepare_script():
    path = REPO / "benchmarks" / "prepare_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("prepare_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fake_npz(folder: Path, sizes: dict[str, int]) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in sizes.items():
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=(np.arange(count) % 10).astype(np.uint8))


def test_prepare_fashion_mnist_round_trip(tmp_path):
    script = load_prepare_script()
    write_fake_npz(tmp_path / "npz", {"train": 20, "validation": 5})
    output = tmp_path / "hf"
    script.main(["--data_dir", str(tmp_path / "npz"), "--output_dir", str(output), "--train_limit", "12"])
    data = load_image_classification_data(output)
    assert (len(data.train), len(data.eval), data.eval_split) == (12, 5, "validation")
    assert data.info == ImageDataInfo("image", "label", 1, (28, 28), script.CLASS_NAMES)
    assert data.info.label_names[0] == "T-shirt/top" and data.info.label_names[9] == "Ankle boot"
    with np.load(tmp_path / "npz" / "train.npz") as arrays:
        assert np.array_equal(np.asarray(data.train[3]["image"]), arrays["images"][3])
        assert data.train["label"] == arrays["labels"][:12].tolist()
    with pytest.raises(FileExistsError, match="exists and is not empty: pass a new --output_dir"):
        script.main(["--data_dir", str(tmp_path / "npz"), "--output_dir", str(output)])


def test_prepare_fashion_mnist_bad_inputs(tmp_path):
    script = load_prepare_script()
    with pytest.raises(FileNotFoundError, match="train.npz not found: pass --data_dir"):
        script.main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--train_limit must be >= 1, got 0"):
        script.main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--train_limit", "0"])
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.array([0, 10], np.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got \[0, 10\]"):
        script.read_split(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 28, 28), np.float32), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\) uint8"):
        script.read_split(tmp_path / "float.npz")


def test_shared_fashion_mnist_arrays_have_the_expected_layout():
    folder = SHARED / "data" / "fashion_mnist"
    if not folder.is_dir():
        pytest.skip("../shared/data/fashion_mnist is absent")
    images, labels = load_prepare_script().read_split(folder / "validation.npz")
    assert images.shape == (5000, 28, 28) and labels.shape == (5000,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))
