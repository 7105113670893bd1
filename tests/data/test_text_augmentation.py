"""Teacher-labelled new sentences: neighbours, word operations, determinism, labels and the loss on them."""

from __future__ import annotations

import random
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F

from surge_hf.data.text import TextDataInfo, preprocess
from surge_hf.data.text_augmentation import (
    AUGMENTED_COLUMN,
    TextAugmentationConfig,
    augment_dataset,
    augment_rows,
    embedding_neighbours,
    perturb,
    recombine,
    whole_word_vocabulary,
)
from surge_hf.training.objective import IGNORE_LABEL, task_loss

VOCAB = {"[PAD]": 0, "[UNK]": 1, "good": 2, "great": 3, "bad": 4, "awful": 5, "##ly": 6, "a": 7, "the": 8,
         "movie": 9, "film": 10, "Big": 11, "42": 12}


def embedding_table() -> torch.Tensor:
    """Rows chosen so that the nearest words are known: good~great, bad~awful, movie~film."""
    rows = torch.zeros(len(VOCAB), 3)
    rows[2], rows[3] = torch.tensor([1.0, 0.1, 0.0]), torch.tensor([1.0, 0.2, 0.0])
    rows[4], rows[5] = torch.tensor([-1.0, 0.0, 0.1]), torch.tensor([-1.0, 0.0, 0.3])
    rows[9], rows[10] = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.1, 0.0, 1.0])
    rows[6], rows[7], rows[8] = torch.tensor([1.0, 0.15, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0, 1, 0.2])
    return rows


def test_whole_word_vocabulary_keeps_lowercase_words_of_two_letters_or_more():
    assert whole_word_vocabulary(VOCAB) == {"good": 2, "great": 3, "bad": 4, "awful": 5, "the": 8, "movie": 9,
                                            "film": 10}


def test_embedding_neighbours_are_the_nearest_whole_words_by_cosine():
    neighbours = embedding_neighbours(["good", "bad", "movie", "unknown"], embedding_table(), VOCAB, 2)
    # "##ly" is nearer to "good" than "great" is, but it is not a whole word.
    # cosines by hand: good.film 0.099 > good.the 0.098; bad.movie 0.0995 > bad.the 0.0195; movie.awful 0.287
    assert neighbours == {"good": ("great", "film"), "bad": ("awful", "movie"), "movie": ("film", "awful")}
    assert embedding_neighbours(["good"], embedding_table(), VOCAB, 1, chunk_size=1) == {"good": ("great",)}


def test_perturb_replaces_content_words_keeps_stop_words_and_punctuation():
    config = TextAugmentationConfig(replace_probability=1.0, drop_probability=0.0)
    neighbours = {"good": ("great",), "the": ("a",), "movie": ("film",)}
    words = "The movie, was (good)!".split()
    assert perturb(words, neighbours, config, random.Random(0)) == ["The", "film,", "was", "(great)!"]
    unchanged = TextAugmentationConfig(replace_probability=0.0, drop_probability=0.0)
    assert perturb(words, neighbours, unchanged, random.Random(0)) == words


def test_word_dropout_keeps_at_least_one_word():
    config = TextAugmentationConfig(replace_probability=0.0, drop_probability=0.99)
    for seed in range(20):
        kept = perturb(["one", "two", "three"], {}, config, random.Random(seed))
        assert len(kept) >= 1 and set(kept) <= {"one", "two", "three"}


def test_recombine_takes_the_first_half_and_the_partners_second_half():
    assert recombine(["a", "b", "c"], ["w", "x", "y", "z"]) == ["a", "b", "y", "z"]
    assert recombine(["a"], ["w", "x", "y"]) == ["a", "y"]


def rows() -> dict[str, list]:
    return {"sentence": ["a good movie", "the bad film", "good good good", "awful"], "label": [1, 0, 1, 0],
            "idx": [10, 11, 12, 13]}


def test_augment_rows_is_deterministic_per_example_and_copy():
    config = TextAugmentationConfig(copies=3, replace_probability=0.5, drop_probability=0.2, seed=7)
    neighbours = {"good": ("great",), "bad": ("awful",), "movie": ("film",)}
    first = augment_rows(rows(), ("sentence",), "label", neighbours, config)
    assert first == augment_rows(rows(), ("sentence",), "label", neighbours, config)
    assert len(first["sentence"]) == 12
    assert first["label"] == [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0] and first["idx"][:4] == [10, 10, 10, 11]
    # Example i's copies do not depend on the other examples (only on the same-label pool of recombination).
    no_recombination = TextAugmentationConfig(copies=3, replace_probability=0.5, drop_probability=0.2,
                                              recombine_probability=0.0, seed=7)
    full = augment_rows(rows(), ("sentence",), "label", neighbours, no_recombination)
    head = {name: values[:2] for name, values in rows().items()}
    assert augment_rows(head, ("sentence",), "label", neighbours, no_recombination)["sentence"] == full["sentence"][:6]
    other_seed = TextAugmentationConfig(copies=3, replace_probability=0.5, drop_probability=0.2, seed=8)
    assert augment_rows(rows(), ("sentence",), "label", neighbours, other_seed) != first


def test_recombination_draws_partners_of_the_same_label():
    config = TextAugmentationConfig(copies=5, replace_probability=0.0, drop_probability=0.0,
                                    recombine_probability=1.0)
    data = {"sentence": ["p1 p2", "n1 n2", "p3 p4", "n3 n4"], "label": [1, 0, 1, 0]}
    new = augment_rows(data, ("sentence",), "label", {}, config)
    for sentence, label in zip(new["sentence"], new["label"]):
        first, second = sentence.split()
        prefix = "p" if label == 1 else "n"
        assert first.startswith(prefix) and second.startswith(prefix)


def test_sentence_pairs_are_perturbed_but_never_recombined():
    config = TextAugmentationConfig(copies=2, replace_probability=1.0, drop_probability=0.0,
                                    recombine_probability=1.0)
    data = {"sentence1": ["good movie"], "sentence2": ["bad film here"], "label": [1]}
    new = augment_rows(data, ("sentence1", "sentence2"), "label", {"good": ("great",), "bad": ("awful",)}, config)
    assert new["sentence1"] == ["great movie"] * 2 and new["sentence2"] == ["awful film here"] * 2


def test_augment_dataset_appends_marked_rows_and_preprocess_ignores_their_labels():
    train = datasets.Dataset.from_dict({"sentence": ["a good movie", "the bad film"], "label": [1, 0]})
    config = TextAugmentationConfig(copies=2, num_neighbours=1)
    augmented = augment_dataset(train, ("sentence",), "label", embedding_table(), VOCAB, config)
    assert len(augmented) == 6
    assert augmented[AUGMENTED_COLUMN] == [False, False, True, True, True, True]
    assert augmented["sentence"][:2] == ["a good movie", "the bad film"]

    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=VOCAB, do_lower_case=True)
    info = TextDataInfo(None, ("sentence",), (0, 1), False, ("validation",), {0: 0, 1: 1})
    raw = datasets.DatasetDict({"train": augmented, "validation": train})
    processed, _ = preprocess(raw, info, tokenizer, max_length=8)
    assert processed["train"]["labels"] == [1, 0, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL]
    assert processed["validation"]["labels"] == [1, 0]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("copies", 0, "copies=0 must be an integer >= 1"),
    ("replace_probability", 1.5, r"replace_probability=1.5 must lie in \[0, 1\]"),
    ("drop_probability", 1.0, "would drop every word"),
    ("num_neighbours", 0, "num_neighbours=0 must be an integer >= 1"),
])
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TextAugmentationConfig(**{field: value})


def test_task_loss_counts_only_labelled_rows_and_is_zero_without_any():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, IGNORE_LABEL, 1])
    outputs = SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))
    expected = (F.cross_entropy(logits[:1], labels[:1]) + F.cross_entropy(logits[2:], labels[2:])) / 2
    torch.testing.assert_close(task_loss(outputs, None, labels), expected)

    unlabelled = torch.full((3,), IGNORE_LABEL)
    nan_loss = SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, unlabelled))
    assert torch.isnan(nan_loss.loss)
    zero = task_loss(nan_loss, None, unlabelled)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
