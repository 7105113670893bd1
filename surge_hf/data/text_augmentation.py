"""New training sentences for distillation, made offline from the training set and the model's own vocabulary.

A binary student re-learns its teacher's function from the inputs it is shown; new inputs labelled by the teacher
(its soft outputs, not a human label) are what closes most of that gap in published binary BERTs (BiT, BiBERT,
TinyBERT's augmented distillation). Those recipes replace words with GloVe and masked-LM neighbours; this module
needs no download and no MLM head:

- **word replacement**: each content word (alphabetic, not a stop word, a single token of the tokenizer's
  vocabulary) is replaced with probability ``replace_probability`` by one of its ``num_neighbours`` nearest words
  in the model's input-embedding table (cosine similarity over whole-word vocabulary entries);
- **word dropout**: each word is dropped with probability ``drop_probability`` (at least one word is kept);
- **recombination** (single-sentence data): with probability ``recombine_probability`` a new sentence starts as
  the first half of the example's words followed by the second half of another training example of the same
  label, before replacement and dropout.

Every example gets ``copies`` new sentences. The result is a pure function of the data, the embedding table and
``seed``: the same inputs give the same sentences in the same order, so paired runs share them and a resumed run
sees what the interrupted one saw. New rows carry ``AUGMENTED_COLUMN = True``; their label is never used as a
target (``surge_hf.data.text.preprocess`` gives them ``IGNORE_LABEL``), the teacher's outputs on them are.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

AUGMENTED_COLUMN = "is_augmented"
_WORD = re.compile(r"([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)")
# Function words carry the syntax the teacher's prediction leans on; replacing them by neighbours makes noise.
STOP_WORDS = frozenset(
    "a an the and or but if then than so as of at by for with about against between into through during before "
    "after above below to from up down in out on off over under again further once here there when where why how "
    "all any both each few more most other some such no nor not only own same too very can will just don should "
    "now i me my we our you your he him his she her it its they them their what which who whom this that these "
    "those am is are was were be been being have has had having do does did doing would could ought isn aren wasn "
    "weren hasn haven hadn doesn didn won wouldn shan shouldn can't cannot couldn mustn s t d ll m o re ve y".split()
)


@dataclass(frozen=True)
class TextAugmentationConfig:
    """How many new sentences per training example, and how they are made (see the module docstring).

    Args:
        copies: new sentences per training example, labelled by the teacher alone (word replacement by the
            model's own embedding neighbours, word dropout, recombination of same-label snippets).
        replace_probability: probability that a content word is replaced by an embedding neighbour.
        drop_probability: probability that a word is dropped.
        recombine_probability: probability that a new sentence joins halves of two same-label examples.
        num_neighbours: the nearest words a replacement is drawn from.
        seed: the seed of every random choice.
    """

    copies: int = 4
    replace_probability: float = 0.3
    drop_probability: float = 0.1
    recombine_probability: float = 0.25
    num_neighbours: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.copies, int) or self.copies < 1:
            raise ValueError(f"TextAugmentationConfig.copies={self.copies!r} must be an integer >= 1 (new sentences "
                             "per training example).")
        for name in ("replace_probability", "drop_probability", "recombine_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TextAugmentationConfig.{name}={value!r} must lie in [0, 1].")
        if self.drop_probability == 1.0:
            raise ValueError("TextAugmentationConfig.drop_probability=1.0 would drop every word; use a value < 1.")
        if not isinstance(self.num_neighbours, int) or self.num_neighbours < 1:
            raise ValueError(f"TextAugmentationConfig.num_neighbours={self.num_neighbours!r} must be an integer >= 1.")


def whole_word_vocabulary(vocab: Mapping[str, int]) -> dict[str, int]:
    """The entries of a WordPiece vocabulary that are whole lowercase words of two letters or more."""
    return {token: index for token, index in vocab.items() if len(token) > 1 and token.isalpha() and token.islower()}


def embedding_neighbours(
    words: Sequence[str], embeddings: Tensor, vocab: Mapping[str, int], num_neighbours: int, chunk_size: int = 2048
) -> dict[str, tuple[str, ...]]:
    """For each word of `words` that is a whole-word entry of `vocab`, its `num_neighbours` nearest other whole
    words by cosine similarity of the rows of `embeddings` (the model's input-embedding table), nearest first."""
    candidates = whole_word_vocabulary(vocab)
    names = sorted(candidates, key=candidates.__getitem__)
    table = torch.nn.functional.normalize(embeddings.detach().float()[[candidates[n] for n in names]], dim=-1)
    position = {name: i for i, name in enumerate(names)}
    queries = sorted({w for w in words if w in position})
    result: dict[str, tuple[str, ...]] = {}
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start:start + chunk_size]
        rows = torch.tensor([position[w] for w in chunk])
        similarity = table[rows] @ table.T
        similarity[torch.arange(len(chunk)), rows] = -2.0  # a word is not its own neighbour
        top = similarity.topk(min(num_neighbours, len(names) - 1), dim=-1).indices
        for word, indices in zip(chunk, top.tolist()):
            result[word] = tuple(names[i] for i in indices)
    return result


def _content_word(token: str) -> tuple[str, str, str] | None:
    """(prefix, word, suffix) of a whitespace token whose letters form one word, else None."""
    match = _WORD.fullmatch(token)
    return None if match is None else match.groups()


def perturb(words: list[str], neighbours: Mapping[str, Sequence[str]], config: TextAugmentationConfig,
            rng: random.Random) -> list[str]:
    """Word replacement by embedding neighbours, then word dropout (keeping at least one word)."""
    replaced = []
    for token in words:
        parts = _content_word(token)
        if parts is not None:
            prefix, word, suffix = parts
            lower = word.lower()
            if lower not in STOP_WORDS and lower in neighbours and rng.random() < config.replace_probability:
                token = prefix + rng.choice(neighbours[lower]) + suffix
        replaced.append(token)
    kept = [token for token in replaced if rng.random() >= config.drop_probability]
    return kept or [rng.choice(replaced)]


def recombine(words: list[str], partner: list[str]) -> list[str]:
    """The first half of `words` (rounded up) followed by the second half of `partner` (rounded down)."""
    return words[: (len(words) + 1) // 2] + partner[(len(partner) + 1) // 2:]


def augment_rows(
    rows: Mapping[str, Sequence[Any]],
    sentence_keys: Sequence[str],
    label_key: str,
    neighbours: Mapping[str, Sequence[str]],
    config: TextAugmentationConfig,
) -> dict[str, list[Any]]:
    """`config.copies` new rows per row of `rows` (columns as lists), in example order, copy by copy.

    New row `c` of example `i` is drawn from its own generator seeded by `(config.seed, i, c)`, so it does not
    depend on the other rows' draws. Columns other than the sentences keep the source example's values.
    """
    columns = list(rows)
    size = len(rows[sentence_keys[0]])
    by_label: dict[Any, list[int]] = {}
    for i, label in enumerate(rows[label_key]):
        by_label.setdefault(label, []).append(i)
    out: dict[str, list[Any]] = {name: [] for name in columns}
    for i in range(size):
        for copy in range(config.copies):
            rng = random.Random(f"{config.seed}:{i}:{copy}")
            new = {name: rows[name][i] for name in columns}
            for key in sentence_keys:
                words = str(rows[key][i]).split()
                if len(sentence_keys) == 1 and words and rng.random() < config.recombine_probability:
                    partner = rng.choice(by_label[rows[label_key][i]])
                    words = recombine(words, str(rows[key][partner]).split())
                new[key] = " ".join(perturb(words, neighbours, config, rng)) if words else rows[key][i]
            for name in columns:
                out[name].append(new[name])
    return out


def augment_dataset(dataset: Any, sentence_keys: Sequence[str], label_key: str, embeddings: Tensor,
                    vocab: Mapping[str, int], config: TextAugmentationConfig) -> Any:
    """The training `datasets.Dataset` followed by its new rows (`augment_rows`), with `AUGMENTED_COLUMN`."""
    import datasets

    rows = dataset.to_dict()
    words = set()
    for key in sentence_keys:
        for text in rows[key]:
            for token in str(text).split():
                parts = _content_word(token)
                if parts is not None:
                    words.add(parts[1].lower())
    neighbours = embedding_neighbours(sorted(words), embeddings, vocab, config.num_neighbours)
    new_rows = augment_rows(rows, sentence_keys, label_key, neighbours, config)
    original = dataset.add_column(AUGMENTED_COLUMN, [False] * len(dataset))
    new = datasets.Dataset.from_dict({**new_rows, AUGMENTED_COLUMN: [True] * len(new_rows[label_key])},
                                     features=original.features)
    return datasets.concatenate_datasets([original, new])
