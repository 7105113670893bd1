"""Model cards: the Hub front matter and body of text and image cards, input checks, and atomic writes."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from model_card_contexts import BIT_ACCOUNT, RECIPE, image_context, text_context
from surge_hf.hub.model_card import ModelCardContext, render_model_card, write_model_card


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, "card does not start with a YAML front matter block"
    return yaml.safe_load(match.group(1))


def test_text_card_front_matter_is_exact():
    card = render_model_card("text", text_context())
    assert front_matter(card) == {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "datasets": ["nyu-mll/glue"],
        "language": "en",
        "library_name": "transformers",
        "license": "apache-2.0",
        "metrics": ["accuracy", "f1"],
        "pipeline_tag": "text-classification",
        "tags": ["surge", "binary-neural-network", "1-bit", "glue"],
        "model-index": [
            {
                "name": "binary-minilm-mrpc",
                "results": [
                    {
                        "task": {"type": "text-classification"},
                        "dataset": {
                            "name": "GLUE MRPC",
                            "type": "nyu-mll/glue",
                            "config": "mrpc",
                            "split": "validation",
                        },
                        "metrics": [
                            {"type": "accuracy", "value": 0.7125, "name": "Accuracy"},
                            {"type": "f1", "value": 0.8123456789, "name": "F1"},
                        ],
                    }
                ],
            }
        ],
    }


def test_text_card_parses_as_hub_model_card():
    data = ModelCard(render_model_card("text", text_context())).data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.model_name == "binary-minilm-mrpc"
    assert [(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results] == [
        ("text-classification", "nyu-mll/glue", "mrpc", "validation")
    ] * 2
    assert [(r.metric_type, r.metric_value, r.metric_name) for r in data.eval_results] == [
        ("accuracy", 0.7125, "Accuracy"),
        ("f1", 0.8123456789, "F1"),
    ]


def test_text_card_body():
    card = render_model_card("text", text_context())
    recipe_block = re.search(r"```json\n(.*?)\n```", card, flags=re.DOTALL).group(1)
    assert json.loads(recipe_block) == RECIPE
    assert f"```text\n{BIT_ACCOUNT}\n```" in card
    assert "| learning rate | 0.0001 |\n| epochs | 4 |\n| seed | 42 |" in card
    assert "| distillation | from sentence-transformers/all-MiniLM-L6-v2 |" in card
    assert "| batch size | 32 |\n| max length | 64 |" in card
    assert "| Accuracy | 0.7125 | GLUE MRPC | mrpc | validation |" in card
    assert "| F1 | 0.8123 | GLUE MRPC | mrpc | validation |" in card
    assert "| 1,000,000 (0.95 MiB) |" in card and "| 32,000,000 (30.52 MiB) |" in card
    assert "The packed checkpoint is 32.0x smaller than float32." in card
    assert "fine-tuned from [sentence-transformers/all-MiniLM-L6-v2]" in card
    assert "import surge_hf" in card
    assert 'AutoModelForSequenceClassification.from_pretrained("surge/binary-minilm-mrpc")' in card
    assert 'AutoTokenizer.from_pretrained("surge/binary-minilm-mrpc")' in card
    assert (
        'AutoModelForSequenceClassification.from_pretrained("surge/binary-minilm-mrpc", trust_remote_code=True)'
        in card
    )
    assert "{{" not in card and "{%" not in card


def test_image_card_from_scratch():
    card = render_model_card("image", ModelCardContext(**image_context()))
    meta = front_matter(card)
    assert "base_model" not in meta and "language" not in meta
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["tags"] == ["surge", "binary-neural-network", "1-bit"]
    assert meta["model-index"] == [
        {
            "name": "binary-vit-fashion-mnist",
            "results": [
                {
                    "task": {"type": "image-classification"},
                    "dataset": {
                        "name": "Fashion-MNIST",
                        "type": "zalando-datasets/fashion_mnist",
                        "split": "validation",
                    },
                    "metrics": [{"type": "accuracy", "value": 0.834, "name": "Accuracy"}],
                }
            ],
        }
    ]
    assert "It was trained from scratch on Fashion-MNIST." in card
    assert "| distillation | none |" in card
    assert "| Accuracy | 0.8340 | Fashion-MNIST | - | validation |" in card
    assert "The packed checkpoint is 10.0x smaller than float32." in card
    assert 'AutoModelForImageClassification.from_pretrained("binary-vit-fashion-mnist")' in card
    assert 'AutoImageProcessor.from_pretrained("binary-vit-fashion-mnist")' in card
    assert 'from_pretrained("binary-vit-fashion-mnist", trust_remote_code=True)' in card
    assert "AutoTokenizer" not in card
    assert "Trained with:" not in card


def test_card_shows_the_recipe_preset_and_the_training_command():
    command = "accelerate launch scripts/vit.py --dataset fmnist --recipe binary-vit --output_dir out"
    card = render_model_card("image", ModelCardContext(**image_context(
        command=command, hyperparameters={"recipe preset": "binary-vit"})))
    assert f"Trained with:\n\n```bash\n{command}\n```" in card
    assert "| recipe preset | binary-vit |" in card


@pytest.mark.parametrize(
    ("kind", "context", "message"),
    [
        ("audio", text_context(), r"kind must be one of \['image', 'text'\], got 'audio'"),
        ("text", text_context(language=None), r"text model card needs the language of its data: pass language='en'"),
        ("image", image_context(language="en"), r"language applies to text models only; pass language=None"),
        ("text", {"repo_id": "a/b"}, r"missing required keys \['bit_account', 'dataset_name', "),
        ("text", text_context(epochs=3), r"unknown keys \['epochs'\] \(valid keys: "),
        ("text", text_context(metrics={}), r"metrics must be a non-empty mapping of metric type to value"),
        ("text", text_context(metrics={"f1": float("nan")}), r"metrics\['f1'\] must be a finite number, got nan"),
        ("text", text_context(surge_config={"eta": {1, 2}}), r"surge_config must be JSON-serialisable"),
        ("text", text_context(learning_rate=0), r"learning_rate must be a positive number, got 0"),
        ("text", text_context(seed=1.5), r"seed must be an int, got 1.5"),
        ("text", text_context(packed_bytes=0), r"packed_bytes must be a positive int \(bytes\), got 0"),
        ("text", text_context(dataset_split=""), r"dataset_split must be a non-empty string, got ''"),
        ("text", text_context(tags="glue"), r"tags must be a list of non-empty strings, got 'glue'"),
        ("text", text_context(repo_id="org/a/b"), r"repo_id 'org/a/b' is not a valid Hub model id: use 'namespace/"),
    ],
)
def test_render_rejects_bad_input(kind, context, message):
    with pytest.raises(ValueError, match=message):
        render_model_card(kind, context)


def test_write_model_card_replaces_readme_atomically(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    path = write_model_card(tmp_path, "text", text_context())
    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == render_model_card("text", text_context())
    assert metadata_load(path) == front_matter(path.read_text(encoding="utf-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_write_model_card_keeps_old_readme_on_bad_context(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    with pytest.raises(ValueError, match="text model card needs the language"):
        write_model_card(tmp_path, "text", text_context(language=None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    assert (tmp_path / "README.md").read_text() == "old card"


def test_write_model_card_needs_existing_dir(tmp_path):
    with pytest.raises(ValueError, match=r"is not a directory: save the model there first"):
        write_model_card(tmp_path / "missing", "text", text_context())
