"""The teacher-output cache: stored values equal the live teacher's in float16, keys follow teacher and data."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, DataCollatorWithPadding

from surge_hf import DistillationConfig, compute_loss
from surge_hf.training.objective import layerwise_mse
from surge_hf.training.teacher_cache import TEACHER_INDEX, CachedTeacher, build_teacher_cache, cache_key

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "plot", "very", "the"]


@pytest.fixture(scope="module")
def setup():
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    texts = ["good movie", "the very bad plot", "bad", "very very good the movie plot", "plot"]
    dataset = datasets.Dataset.from_dict(dict(tokenizer(texts)))
    return tokenizer, teacher, dataset, DataCollatorWithPadding(tokenizer)


def test_cached_outputs_are_the_live_teachers_in_float16_at_real_tokens_and_zero_at_padding(setup, tmp_path):
    tokenizer, teacher, dataset, collator = setup
    entry = build_teacher_cache(teacher, dataset, collator, tmp_path, hidden_states=True, batch_size=2)
    cached = CachedTeacher(entry)
    for rows in ([0, 1], [2, 3], [4]):  # the build's own batches, so the float32 values are the same
        batch = collator([dataset[i] for i in rows])
        with torch.no_grad():
            live = teacher(**batch, output_hidden_states=True)
        got = cached(teacher_index=torch.tensor(rows), attention_mask=batch["attention_mask"],
                     output_hidden_states=True)
        assert torch.equal(got.logits, live.logits.half().float())
        mask = batch["attention_mask"].bool()
        for mine, theirs in zip(got.hidden_states, live.hidden_states, strict=True):
            assert torch.equal(mine[mask], theirs[mask].half().float())
            assert torch.equal(mine[~mask], torch.zeros_like(mine[~mask]))
    # Rows in another order and batch composition come back by index.
    batch = collator([dataset[i] for i in (3, 0)])
    got = cached(teacher_index=torch.tensor([3, 0]), attention_mask=batch["attention_mask"])
    reference = cached(teacher_index=torch.tensor([0, 3]), attention_mask=batch["attention_mask"])
    assert torch.equal(got.logits, reference.logits.flip(0)) and got.hidden_states is None


def test_the_key_follows_teacher_data_and_content_and_an_entry_is_reused(setup, tmp_path, monkeypatch):
    tokenizer, teacher, dataset, collator = setup
    key = cache_key(teacher, dataset, hidden_states=True)
    assert key == cache_key(teacher, dataset, hidden_states=True)
    assert key != cache_key(teacher, dataset, hidden_states=False)
    assert key != cache_key(teacher, dataset.select([1, 0, 2, 3, 4]), hidden_states=True)
    other = BertForSequenceClassification(teacher.config)
    other.load_state_dict(teacher.state_dict())
    assert cache_key(other, dataset, hidden_states=True) == key
    with torch.no_grad():
        other.classifier.bias[0] += 1e-6
    assert cache_key(other, dataset, hidden_states=True) != key

    entry = build_teacher_cache(teacher, dataset, collator, tmp_path, hidden_states=True)
    assert entry.path.name == key and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: pytest.fail("a complete entry is not recomputed"))
    assert build_teacher_cache(teacher, dataset, collator, tmp_path, hidden_states=True) == entry


def test_masked_hidden_state_loss_counts_real_tokens_only():
    student = (torch.tensor([[[1.0, 2.0], [9.0, 9.0]]]),)
    teacher = (torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]),)
    mask = torch.tensor([[1, 0]])
    assert layerwise_mse(student, teacher, "hidden states", mask).item() == pytest.approx((1 + 4) / 2)
    assert layerwise_mse(student, teacher, "hidden states").item() == pytest.approx((1 + 4 + 81 + 81) / 4)


def test_distilling_from_the_cache_equals_distilling_from_float16_teacher_outputs(setup, tmp_path):
    tokenizer, teacher, dataset, collator = setup
    entry = build_teacher_cache(teacher, dataset, collator, tmp_path, hidden_states=True, batch_size=2)
    batch = collator([{**dataset[i], "labels": i % 2} for i in (0, 1)])
    config = DistillationConfig(hidden_states_weight=1.0, mask_padding=True)
    student = BertForSequenceClassification(teacher.config).train()
    from_cache, _ = compute_loss(student, {**batch, TEACHER_INDEX: torch.tensor([0, 1])}, CachedTeacher(entry),
                                 config)

    class HalfTeacher(torch.nn.Module):  # the live teacher, its outputs rounded like the cache's
        def forward(self, **inputs):
            out = teacher(**inputs)
            out.logits = out.logits.half().float()
            out.hidden_states = tuple(h.half().float() for h in out.hidden_states)
            return out

    live, _ = compute_loss(student, batch, HalfTeacher(), config)
    assert torch.equal(from_cache, live)
