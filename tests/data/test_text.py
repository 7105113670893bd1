"""Text-classification data: loading local csv/json/parquet files, column and label resolution, tokenization,
and the errors raised before any work is done."""

import csv
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertConfig, BertTokenizer

from surge_hf.data.text import TextDataInfo, load_text_data, preprocess, resolve_data_info
from surge_hf.training.compatibility import check_label_compatibility

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "movie", "film", "great", "awful", "the",
         "cat", "sat", "dog", "ran"]
VOCAB = {token: index for index, token in enumerate(WORDS)}
PAD, UNK, CLS, SEP = 0, 1, 2, 3


@pytest.fixture
def tokenizer():
    return BertTokenizer(vocab=VOCAB)


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows as csv, JSON lines or parquet, by the file's extension."""
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix in (".json", ".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(tmp_path, train_rows, validation_rows, extension="csv"):
    train = write(tmp_path / f"train.{extension}", train_rows)
    validation = write(tmp_path / f"validation.{extension}", validation_rows)
    return load_text_data(train_file=train, validation_file=validation, cache_dir=tmp_path / "cache")


def test_csv_single_sentence_string_labels(tmp_path, tokenizer):
    train = [
        {"sentence": "a good movie", "label": "pos"},
        {"sentence": "a bad film", "label": "neg"},
        {"sentence": "the cat sat the dog ran a good movie", "label": "pos"},
    ]
    raw, info = load(tmp_path, train, [{"sentence": "an awful film", "label": "neg"}])
    assert info == TextDataInfo(None, ("sentence",), ("neg", "pos"), False, ("validation",), {"neg": 0, "pos": 1})
    assert (info.num_labels, info.label2id, info.id2label) == (2, {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"})
    assert info.metric_config == "classification"
    assert list(raw) == ["train", "validation"]

    processed, collator = preprocess(raw, info, tokenizer, max_length=6, pad_to_max_length=True)
    assert processed["train"].column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert processed["train"]["input_ids"][:] == [
        [CLS, 5, 6, 8, SEP, PAD],
        [CLS, 5, 7, 9, SEP, PAD],
        [CLS, 12, 13, 14, 12, SEP],  # truncated to max_length
    ]
    assert processed["train"]["attention_mask"][0] == [1, 1, 1, 1, 1, 0]
    assert processed["train"]["labels"][:] == [1, 0, 1]
    assert processed["validation"][0]["input_ids"] == [CLS, UNK, 11, 9, SEP, PAD]
    assert processed["validation"][0]["labels"] == 0
    batch = collator([processed["train"][i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 6)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].dtype == torch.long


@pytest.mark.parametrize("extension", ["json", "jsonl"])
def test_json_sentence_pairs_integer_labels_dynamic_padding(tmp_path, tokenizer, extension):
    train = [
        {"sentence1": "the cat sat", "sentence2": "the dog ran", "label": 2},
        {"sentence1": "a movie", "sentence2": "a film", "label": 0},
    ]
    raw, info = load(tmp_path, train, [{"sentence1": "a cat", "sentence2": "a dog", "label": 2}], extension)
    assert info.sentence_keys == ("sentence1", "sentence2")
    assert (info.label_list, info.label_to_id, info.label2id) == ((0, 2), {0: 0, 2: 1}, {"0": 0, "2": 1})

    processed, collator = preprocess(raw, info, tokenizer, max_length=32, pad_to_multiple_of=4)
    first = processed["train"][0]
    assert first["input_ids"] == [CLS, 12, 13, 14, SEP, 12, 15, 16, SEP]
    assert first["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert processed["train"]["labels"][:] == [1, 0]
    assert processed["validation"]["labels"][:] == [1]
    batch = collator([processed["train"][0], processed["train"][1]])
    assert batch["input_ids"].shape == (2, 12)  # longest (9) rounded up to a multiple of 4
    assert batch["input_ids"][1].tolist() == [CLS, 5, 8, SEP, 5, 9, SEP] + [PAD] * 5
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 5


def test_json_array_file(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"sentence": "a good movie", "label": 1}, {"sentence": "bad", "label": 0}]))
    validation = write(tmp_path / "validation.json", [{"sentence": "a film", "label": 0}])
    raw, info = load_text_data(train_file=train, validation_file=validation, cache_dir=tmp_path / "cache")
    assert (raw["train"].num_rows, info.label_list) == (2, (0, 1))


def test_parquet_regression(tmp_path, tokenizer):
    train = [
        {"sentence1": "a cat", "sentence2": "a dog", "label": 0.5},
        {"sentence1": "a good movie", "sentence2": "a great film", "label": 4.25},
    ]
    raw, info = load(tmp_path, train, [{"sentence1": "the cat", "sentence2": "the cat", "label": 5.0}], "parquet")
    assert info == TextDataInfo(None, ("sentence1", "sentence2"), (), True, ("validation",))
    assert (info.num_labels, info.label2id, info.metric_config) == (1, {}, "regression")

    processed, collator = preprocess(raw, info, tokenizer, max_length=16)
    assert processed["train"]["labels"][:] == [0.5, 4.25]
    batch = collator([processed["train"][0], processed["train"][1]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 4.25]
    assert batch["input_ids"].shape == (2, 9)


def test_parquet_class_label_keeps_names_and_ids(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = {"train": {"text": ["a", "b"], "label": [1, 0]}, "validation": {"text": ["c"], "label": [1]}}
    for split, rows in splits.items():
        datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / f"{split}.parquet")
    _, info = load_text_data(
        train_file=tmp_path / "train.parquet", validation_file=tmp_path / "validation.parquet", cache_dir=tmp_path / "c"
    )
    assert info == TextDataInfo(None, ("text",), ("neg", "pos"), False, ("validation",))


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text", "label"], ("text",)),
        (["question", "answer", "id", "label"], ("question", "answer")),
        (["label", "id", "review"], ("review",)),
        (["sentence2", "sentence", "sentence1", "label"], ("sentence1", "sentence2")),
        (["sentence1", "sentence", "label"], ("sentence",)),
    ],
)
def test_sentence_key_selection(tmp_path, columns, expected):
    def row(label):
        return {name: (label if name == "label" else 7 if name == "id" else "a movie") for name in columns}

    _, info = load(tmp_path, [row(0), row(1)], [row(1)])
    assert info.sentence_keys == expected


def glue_like(task_splits: dict[str, list[int]], names: list[str], text_columns=("premise", "hypothesis")):
    features = datasets.Features({**{c: datasets.Value("string") for c in text_columns},
                                  "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {**{c: ["a cat"] * len(labels) for c in text_columns}, "label": labels, "idx": list(range(len(labels)))},
            features=features,
        )
        for split, labels in task_splits.items()
    })


def test_glue_task_data_offline(tokenizer):
    names = ["entailment", "neutral", "contradiction"]
    raw = glue_like({"train": [0, 1, 2], "validation_matched": [2], "validation_mismatched": [1], "test_matched": [-1]},
                    names)
    info = resolve_data_info(raw, "mnli")
    assert info == TextDataInfo("mnli", ("premise", "hypothesis"), tuple(names), False,
                                ("validation_matched", "validation_mismatched"))
    assert (info.num_labels, info.metric_config) == (3, "mnli")
    processed, _ = preprocess(raw, info, tokenizer, max_length=8, pad_to_max_length=True)
    assert list(processed) == ["train", "validation_matched", "validation_mismatched"]
    assert processed["train"]["labels"][:] == [0, 1, 2]
    assert processed["validation_mismatched"]["labels"][:] == [1]


def test_glue_stsb_is_regression():
    raw = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [3.8]})
        for split in ("train", "validation")
    })
    assert resolve_data_info(raw, "stsb") == TextDataInfo("stsb", ("sentence1", "sentence2"), (), True, ("validation",))


# ---- errors, all raised before tokenization ----

GOOD = [{"sentence": "a good movie", "label": 1}, {"sentence": "a bad movie", "label": 0}]


def test_unknown_task_name():
    with pytest.raises(ValueError, match=r"^unknown GLUE task 'sst3'; valid task names: cola, sst2, mrpc, stsb, qqp, "
                                         r"mnli, qnli, rte, wnli$"):
        load_text_data(task_name="sst3")


def test_task_and_files_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match=r"^pass either task_name or train_file/validation_file, not both$"):
        load_text_data(task_name="sst2", train_file=tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"^pass a GLUE task_name, or both train_file and validation_file"):
        load_text_data(train_file=tmp_path / "train.csv")


def test_missing_file(tmp_path):
    train = write(tmp_path / "train.csv", GOOD)
    with pytest.raises(FileNotFoundError, match=r"validation_file '.*valid\.csv' does not exist; pass the path of an"):
        load_text_data(train_file=train, validation_file=tmp_path / "valid.csv")


def test_unsupported_extension(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a good movie\t1\n")
    with pytest.raises(ValueError, match=r"train_file '.*train\.txt' has unsupported extension 'txt'; use one of: "
                                         r"csv, json, jsonl, parquet$"):
        load_text_data(train_file=train, validation_file=train)


def test_mismatched_extensions(tmp_path):
    train, validation = write(tmp_path / "train.csv", GOOD), write(tmp_path / "validation.json", GOOD)
    with pytest.raises(ValueError, match=r"^train_file is csv but validation_file is json; save both splits in the "):
        load_text_data(train_file=train, validation_file=validation)


@pytest.mark.parametrize(
    ("name", "content"),
    [("validation.csv", ""), ("validation.csv", "sentence,label\n"), ("validation.json", "\n"),
     ("validation.json", "[ ]\n"), ("validation.parquet", None)],
)
def test_empty_file(tmp_path, name, content):
    extension = name.split(".")[1]
    train = write(tmp_path / f"train.{extension}", GOOD)
    validation = tmp_path / name
    if content is None:
        pq.write_table(pa.Table.from_pylist(GOOD).slice(0, 0), validation)
    else:
        validation.write_text(content)
    with pytest.raises(ValueError, match=r"validation_file '.*' is empty \(no data rows\); add examples or pass"):
        load_text_data(train_file=train, validation_file=validation)


def test_missing_label_column(tmp_path):
    rows = [{"sentence": "a good movie", "labels": 1}, {"sentence": "a bad movie", "labels": 0}]
    with pytest.raises(ValueError, match=r"^the train data has no 'label' column; columns: \['sentence', 'labels'\]; "
                                         r"rename the label column to 'label'$"):
        load(tmp_path, rows, rows)


def test_misnamed_validation_column(tmp_path):
    with pytest.raises(ValueError, match=r"^the validation data has no column\(s\) \['sentence'\]; columns: "
                                         r"\['text', 'label'\]; give every split the same column names$"):
        load(tmp_path, GOOD, [{"text": "a movie", "label": 1}])


def test_no_text_column(tmp_path):
    rows = [{"score": 1.5, "label": 1}, {"score": 0.5, "label": 0}]
    with pytest.raises(ValueError, match=r"^the train data has no text column besides 'label'; columns: "
                                         r"score \(float64\), label \(int64\); name the text column 'sentence'"):
        load(tmp_path, rows, rows)


def test_sentence_column_must_hold_text(tmp_path):
    with pytest.raises(ValueError, match=r"^column 'sentence' of the validation data holds int64, not text"):
        load(tmp_path, GOOD, [{"sentence": 42, "label": 1}])


def test_missing_values(tmp_path):
    with pytest.raises(ValueError, match=r"^column 'sentence' of the train data has 1 missing value\(s\); fill or "):
        load(tmp_path, [*GOOD, {"sentence": None, "label": 1}], GOOD, "jsonl")
    with pytest.raises(ValueError, match=r"^column 'label' of the validation data has 1 missing value\(s\)"):
        load(tmp_path, GOOD, [{"sentence": "a", "label": 1}, {"sentence": "b", "label": ""}])


def test_validation_label_not_in_train(tmp_path):
    train = [{"sentence": "a", "label": "pos"}, {"sentence": "b", "label": "neg"}]
    with pytest.raises(ValueError, match=r"^validation labels \['neutral', 'positive'\] do not occur in the train "
                                         r"labels \['neg', 'pos'\]; every evaluation label must be a train label"):
        load(tmp_path, train, [{"sentence": "c", "label": "positive"}, {"sentence": "d", "label": "neutral"}])


def test_single_class(tmp_path):
    rows = [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 1}]
    with pytest.raises(ValueError, match=r"^the train labels take a single value \[1\]; classification needs at "):
        load(tmp_path, rows, rows)


def test_integer_labels_outside_range():
    raw = glue_like({"train": [0, 1], "validation": [1, 0]}, ["negative", "positive"], ("sentence",))
    raw["validation"] = raw["validation"].cast_column("label", datasets.Value("int64")).map(
        lambda row: {"label": [2, -1][row["idx"]]})
    with pytest.raises(ValueError, match=r"^the validation labels \[-1, 2\] fall outside \[0, 2\); labels must be "
                                         r"class ids 0\.\.1"):
        resolve_data_info(raw, "sst2")


def test_float_labels_for_a_classification_task():
    raw = datasets.DatasetDict({s: datasets.Dataset.from_dict({"sentence": ["a"], "label": [0.0]})
                                for s in ("train", "validation")})
    with pytest.raises(ValueError, match=r"^the train labels are float64, but this data needs integer class ids in "):
        resolve_data_info(raw, "sst2")


def test_missing_eval_split():
    raw = glue_like({"train": [0], "validation_matched": [0]}, ["entailment", "neutral", "contradiction"])
    with pytest.raises(ValueError, match=r"^the data has no \['validation_mismatched'\] split\(s\) \(it has "
                                         r"\['train', 'validation_matched'\]\); it needs the splits"):
        resolve_data_info(raw, "mnli")


def test_preprocess_argument_errors(tmp_path, tokenizer):
    raw, info = load(tmp_path, GOOD, GOOD)
    with pytest.raises(ValueError, match=r"^max_length must be a positive integer, got 0$"):
        preprocess(raw, info, tokenizer, max_length=0)
    with pytest.raises(ValueError, match=r"^max_length 32 exceeds the tokenizer's model_max_length 16; pass "
                                         r"max_length <= 16$"):
        preprocess(raw, info, BertTokenizer(vocab=VOCAB, model_max_length=16), max_length=32)
    with pytest.raises(ValueError, match=r"^pad_to_multiple_of only applies to dynamic padding"):
        preprocess(raw, info, tokenizer, pad_to_max_length=True, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match=r"^the data has no \['validation'\] split\(s\)"):
        preprocess(datasets.DatasetDict({"train": raw["train"]}), info, tokenizer)


# ---- teacher / model config compatibility ----

INFO = TextDataInfo("sst2", ("sentence",), ("negative", "positive"), False, ("validation",))


def test_label_compatibility_accepts_same_or_generic_labels():
    check_label_compatibility(BertConfig(num_labels=2), INFO)  # generic LABEL_0, LABEL_1
    check_label_compatibility(BertConfig(label2id={"negative": 0, "positive": 1},
                                         id2label={0: "negative", 1: "positive"}), INFO)
    check_label_compatibility(BertConfig(label2id={"NEGATIVE": 0, "POSITIVE": 1},
                                         id2label={0: "NEGATIVE", 1: "POSITIVE"}), INFO)
    regression = TextDataInfo("stsb", ("sentence1", "sentence2"), (), True, ("validation",))
    check_label_compatibility(BertConfig(num_labels=1, problem_type="regression"), regression)


def test_label_compatibility_errors():
    with pytest.raises(ValueError, match=r"^the model config has num_labels=3 but the data needs 2 classes "
                                         r"\['negative', 'positive'\]; use a model fine-tuned"):
        check_label_compatibility(BertConfig(num_labels=3), INFO)
    with pytest.raises(ValueError, match=r"^the model config has label2id=\{'positive': 0, 'negative': 1\} but the "
                                         r"data has \{'negative': 0, 'positive': 1\}; use a model fine-tuned with the "
                                         r"same classes in the same order$"):
        check_label_compatibility(BertConfig(label2id={"positive": 0, "negative": 1},
                                             id2label={0: "positive", 1: "negative"}), INFO)
    regression = TextDataInfo(None, ("sentence",), (), True, ("validation",))
    with pytest.raises(ValueError, match=r"num_labels=2 but the data needs regression \(1 output\)"):
        check_label_compatibility(BertConfig(num_labels=2), regression)
    with pytest.raises(ValueError, match=r"^the model config has problem_type='multi_label_classification' but the "
                                         r"data needs 'single_label_classification'; use a model fine-tuned on"):
        check_label_compatibility(BertConfig(num_labels=2, problem_type="multi_label_classification"), INFO)


# ---- the real data and tokenizer in ../shared ----


def test_rotten_tomatoes(tmp_path):
    folder = SHARED / "data" / "rotten_tomatoes"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    raw, info = load_text_data(
        train_file=folder / "train.csv", validation_file=folder / "validation.csv", cache_dir=tmp_path / "cache"
    )
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (9956, 993)
    assert info == TextDataInfo(None, ("sentence",), (0, 1), False, ("validation",), {0: 0, 1: 1})
    assert info.num_labels == 2


def test_real_minilm_tokenizer(tmp_path):
    folder = SHARED / "models" / "all-MiniLM-L6-v2"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(folder)
    rows = [{"sentence1": "A good movie.", "sentence2": "A great film!", "label": 1},
            {"sentence1": "Awful.", "sentence2": "Bad.", "label": 0}]
    raw, info = load(tmp_path, rows, rows)
    processed, collator = preprocess(raw, info, real, max_length=16)
    ids = processed["train"][0]["input_ids"]
    assert real.decode(ids) == "[CLS] a good movie. [SEP] a great film! [SEP]"
    assert collator([processed["train"][0], processed["train"][1]])["input_ids"].shape == (2, len(ids))


def test_label_names_name_integer_labels_which_keep_their_ids(tmp_path, tokenizer):
    train = [{"sentence": "a good movie", "label": 1}, {"sentence": "a bad film", "label": 0}]
    raw, info = load(tmp_path, train, [{"sentence": "an awful film", "label": 0}])
    named = info.with_label_names(["negative", "positive"])
    assert named == TextDataInfo(None, ("sentence",), ("negative", "positive"), False, ("validation",), {0: 0, 1: 1})
    assert (named.id2label, named.label2id) == ({0: "negative", 1: "positive"}, {"negative": 0, "positive": 1})
    processed, _ = preprocess(raw, named, tokenizer, max_length=8)
    assert processed["train"]["labels"][:] == [1, 0]


def test_label_names_rename_the_classes_of_string_labels_in_id_order(tmp_path):
    _, info = load(tmp_path, [{"sentence": "a", "label": "pos"}, {"sentence": "b", "label": "neg"}],
                   [{"sentence": "c", "label": "neg"}])
    named = info.with_label_names(("Negative", "Positive"))
    assert (named.label_list, named.label_to_id) == (("Negative", "Positive"), {"neg": 0, "pos": 1})


@pytest.mark.parametrize(("names", "message"), [
    (["negative"], "1 label names ['negative'] for the data's 2 classes [0, 1]: give one name per class, in "
                   "class-id order"),
    (["a", "b", "c"], "3 label names ['a', 'b', 'c'] for the data's 2 classes [0, 1]: give one name per class, in "
                      "class-id order"),
    (["bad", "bad"], "label names ['bad', 'bad'] repeat ['bad']: give each class its own name"),
    (["negative", ""], "label names ['negative', ''] must be non-empty strings without surrounding spaces"),
    ([" negative", "positive"], "label names [' negative', 'positive'] must be non-empty strings without "
                                "surrounding spaces"),
])
def test_label_names_must_name_each_class_once(names, message):
    info = TextDataInfo(None, ("sentence",), (0, 1), False, ("validation",), {0: 0, 1: 1})
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        info.with_label_names(names)


def test_label_names_are_refused_for_regression_data():
    info = TextDataInfo(None, ("sentence1", "sentence2"), (), True, ("validation",))
    with pytest.raises(ValueError, match=re.escape(
            "label names ['low', 'high'] name classes, but the data is a regression task (float labels, one "
            "output): drop the label names")):
        info.with_label_names(["low", "high"])
