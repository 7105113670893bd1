"""The README's Python examples, run as written with a tiny local BERT in place of the Hub id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import surge_hf

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = '"bert-base-uncased"'


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def tiny_bert(tmp_path, monkeypatch) -> str:
    """A local BERT checkpoint to stand in for the Hub id; the examples write their folders under tmp_path."""
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    return repr(str(tmp_path / "bert"))


def run_example(index: int, hub_stand_in: str) -> dict:
    code = python_examples()[index]
    assert HUB_ID in code
    namespace: dict = {}
    exec(compile(code.replace(HUB_ID, hub_stand_in), f"README example {index + 1}", "exec"), namespace)
    return namespace


def test_the_readme_has_the_three_library_examples():
    assert len(python_examples()) == 3


def test_use_it_on_any_model(tiny_bert, capsys):
    model = run_example(0, tiny_bert)["model"]
    assert "packed size" in capsys.readouterr().out
    packed = [name for name, module in model.named_modules() if isinstance(module, surge_hf.BinaryLinear)]
    assert len(packed) == 12 and not model.training


def test_hugging_face_models(tiny_bert):
    namespace = run_example(1, tiny_bert)
    student, model = namespace["student"].eval(), namespace["model"]
    assert type(model) is surge_hf.SurgeBertForSequenceClassification and model.is_packed
    input_ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(input_ids=input_ids).logits, student(input_ids=input_ids).logits)
    trained = surge_hf.SurgeBertForSequenceClassification.from_pretrained("train-form")
    assert isinstance(trained.bert.encoder.layer[0].output.dense, surge_hf.SurgeLinear)


def test_fast_and_small_on_a_cpu(tiny_bert, capsys):
    namespace = run_example(2, tiny_bert)
    report, model = namespace["report"], namespace["model"]
    assert report.packed_ms > 0 and report.float32_ms > 0 and report.input_shapes == {"input_ids": [1, 4]}
    assert "deployment: measured on" in capsys.readouterr().out
    reloaded = surge_hf.SurgeBertForSequenceClassification.from_pretrained("packed-int8")
    assert isinstance(reloaded.bert.embeddings.word_embeddings, surge_hf.Int8Embedding)
    input_ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)

