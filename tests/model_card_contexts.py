"""Model card contexts of a text and an image model, for the tests that render cards."""

from __future__ import annotations

RECIPE = {"eta": 0.1, "method": "surge", "targets": ["query", "key", "value"], "weight_scale": "channel_mean"}
BIT_ACCOUNT = "\n".join(
    ["layer                 params   bits", "encoder.*.query       147456      1", "classifier              770     32"]
)


def text_context(**changes) -> dict:
    values = dict(
        repo_id="surge/binary-minilm-mrpc",
        dataset_name="GLUE MRPC",
        dataset_type="nyu-mll/glue",
        dataset_config="mrpc",
        dataset_split="validation",
        metrics={"accuracy": 0.7125, "f1": 0.8123456789},
        surge_config=RECIPE,
        learning_rate=1e-4,
        num_epochs=4,
        seed=42,
        bit_account=BIT_ACCOUNT,
        packed_bytes=1_000_000,
        float32_bytes=32_000_000,
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        language="en",
        distillation="sentence-transformers/all-MiniLM-L6-v2",
        hyperparameters={"batch size": 32, "max length": 64},
        tags=["glue"],
    )
    values.update(changes)
    return values


def image_context(**changes) -> dict:
    values = dict(
        repo_id="binary-vit-fashion-mnist",
        dataset_name="Fashion-MNIST",
        dataset_type="zalando-datasets/fashion_mnist",
        dataset_split="validation",
        metrics={"accuracy": 0.834},
        surge_config=RECIPE,
        learning_rate=1e-3,
        num_epochs=12,
        seed=0,
        bit_account=BIT_ACCOUNT,
        packed_bytes=300_000,
        float32_bytes=3_000_000,
    )
    values.update(changes)
    return values
