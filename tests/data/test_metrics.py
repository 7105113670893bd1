"""GLUE task table and metrics: exact values, checked against scikit-learn and scipy, and the evaluate module."""

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from surge_hf.data.metrics import (
    GLUE_TASKS,
    compute_metrics,
    get_glue_task,
    is_regression_config,
    load_glue_metric,
    metric_config_name,
    metric_names,
)

# Binary case: TP = 4 (0, 2, 5, 8), FP = 2 (1, 7), FN = 2 (4, 9), TN = 2 (3, 6).
BINARY_PREDS = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]
BINARY_REFS = [1, 0, 1, 0, 1, 1, 0, 0, 1, 1]
BINARY_ACCURACY = 6 / 10
BINARY_F1 = 2 * 4 / (2 * 4 + 2 + 2)
BINARY_MCC = (4 * 2 - 2 * 2) / math.sqrt((4 + 2) * (4 + 2) * (2 + 2) * (2 + 2))

# Three classes: s = 6 samples, c = 4 correct, reference counts t = (1, 3, 2), prediction counts p = (2, 2, 2).
MULTI_PREDS = [0, 1, 2, 2, 1, 0]
MULTI_REFS = [0, 1, 2, 1, 1, 2]
MULTI_MCC = (4 * 6 - 12) / math.sqrt((36 - 12) * (36 - 14))

# Scores: Pearson = 6 / sqrt(10 * 6); the ranks of y are (1, 2.5, 4.5, 2.5, 4.5), so Spearman = 7 / sqrt(10 * 9).
SCORES_X = [1.0, 2.0, 3.0, 4.0, 5.0]
SCORES_Y = [2.0, 4.0, 5.0, 4.0, 5.0]
PEARSON = 6 / math.sqrt(60)
SPEARMAN = 7 / math.sqrt(90)

EXPECTED_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "classification": ("accuracy",),
    "regression": ("pearson", "spearmanr"),
}


def test_task_table():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert {name: task.num_labels for name, task in GLUE_TASKS.items()} == {
        "cola": 2, "sst2": 2, "mrpc": 2, "stsb": 1, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2,
    }
    assert [name for name, task in GLUE_TASKS.items() if task.is_regression] == ["stsb"]
    assert {name: task.sentence_keys for name, task in GLUE_TASKS.items()} == {
        "cola": ("sentence",),
        "sst2": ("sentence",),
        "mrpc": ("sentence1", "sentence2"),
        "stsb": ("sentence1", "sentence2"),
        "qqp": ("question1", "question2"),
        "mnli": ("premise", "hypothesis"),
        "qnli": ("question", "sentence"),
        "rte": ("sentence1", "sentence2"),
        "wnli": ("sentence1", "sentence2"),
    }
    assert get_glue_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_glue_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_glue_task("sst2").eval_splits == ("validation",)
    assert get_glue_task("stsb").label_names == ()


def test_unknown_task_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"^unknown GLUE task 'sst3'; valid task names: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli$",
    ):
        get_glue_task("sst3")
    with pytest.raises(ValueError, match=r"unknown GLUE task or metric config 'sst3'; valid names: cola, .*, wnli, "
                                         r"classification, regression$"):
        compute_metrics("sst3", [1], [1])
    with pytest.raises(ValueError, match="unknown GLUE task or metric config 'sst3'"):
        load_glue_metric("sst3")


@pytest.mark.parametrize("name", list(EXPECTED_METRICS))
def test_metric_names(name):
    assert metric_names(name) == EXPECTED_METRICS[name]
    assert is_regression_config(name) == (name in ("stsb", "regression"))


def test_metric_config_name():
    assert metric_config_name("mrpc", is_regression=False) == "mrpc"
    assert metric_config_name(None, is_regression=False) == "classification"
    assert metric_config_name(None, is_regression=True) == "regression"
    with pytest.raises(ValueError, match="unknown GLUE task 'foo'"):
        metric_config_name("foo", is_regression=False)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    result = compute_metrics(task, BINARY_PREDS, BINARY_REFS)
    assert result == pytest.approx({"accuracy": BINARY_ACCURACY, "f1": BINARY_F1}, rel=1e-15)
    assert result["accuracy"] == accuracy_score(BINARY_REFS, BINARY_PREDS)
    assert result["f1"] == pytest.approx(f1_score(BINARY_REFS, BINARY_PREDS), rel=1e-15)
    assert all(type(value) is float for value in result.values())


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli", "classification"])
def test_accuracy(task):
    assert compute_metrics(task, BINARY_PREDS, BINARY_REFS) == {"accuracy": 0.6}


def test_accuracy_three_classes():
    result = compute_metrics("mnli", MULTI_PREDS, MULTI_REFS)
    assert result == {"accuracy": pytest.approx(4 / 6, rel=1e-15)}
    assert result["accuracy"] == accuracy_score(MULTI_REFS, MULTI_PREDS)


def test_matthews_correlation():
    result = compute_metrics("cola", BINARY_PREDS, BINARY_REFS)
    assert BINARY_MCC == pytest.approx(1 / 6, rel=1e-15)
    assert result == {"matthews_correlation": pytest.approx(BINARY_MCC, rel=1e-12)}
    assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(BINARY_REFS, BINARY_PREDS), rel=1e-12)


def test_matthews_correlation_multiclass_formula():
    result = compute_metrics("cola", MULTI_PREDS, MULTI_REFS)["matthews_correlation"]
    assert result == pytest.approx(MULTI_MCC, rel=1e-12)
    assert result == pytest.approx(matthews_corrcoef(MULTI_REFS, MULTI_PREDS), rel=1e-12)


def test_degenerate_inputs_give_zero_like_sklearn():
    all_negative = [0, 0, 0, 0]
    assert compute_metrics("mrpc", all_negative, all_negative) == {"accuracy": 1.0, "f1": 0.0}
    assert f1_score(all_negative, all_negative, zero_division=0.0) == 0.0
    constant_preds, refs = [1, 1, 1, 1], [0, 1, 0, 1]
    assert compute_metrics("cola", constant_preds, refs) == {"matthews_correlation": 0.0}
    assert matthews_corrcoef(refs, constant_preds) == 0.0


@pytest.mark.parametrize("task", ["stsb", "regression"])
def test_pearson_and_spearman(task):
    result = compute_metrics(task, SCORES_X, SCORES_Y)
    assert result == {"pearson": pytest.approx(PEARSON, rel=1e-12), "spearmanr": pytest.approx(SPEARMAN, rel=1e-12)}
    assert result["pearson"] == pytest.approx(pearsonr(SCORES_X, SCORES_Y).statistic, rel=1e-12)
    assert result["spearmanr"] == pytest.approx(spearmanr(SCORES_X, SCORES_Y).statistic, rel=1e-12)


def test_spearman_with_ties_on_both_sides_matches_scipy():
    x = [0.5, 3.0, 3.0, 1.25, 4.0, 0.5, 2.0]
    y = [1.0, 2.0, 2.0, 2.0, 5.0, 0.0, 3.5]
    result = compute_metrics("stsb", x, y)
    assert result["pearson"] == pytest.approx(pearsonr(x, y).statistic, rel=1e-12)
    assert result["spearmanr"] == pytest.approx(spearmanr(x, y).statistic, rel=1e-12)


def test_constant_scores_give_nan_like_scipy():
    result = compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(result["pearson"]) and math.isnan(result["spearmanr"])


def test_numpy_and_tuple_inputs():
    preds = np.array(BINARY_PREDS, dtype=np.int64)
    assert compute_metrics("sst2", preds, tuple(BINARY_REFS)) == {"accuracy": 0.6}


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"^predictions has 2 values but references has 3; pass one prediction per"):
        compute_metrics("sst2", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match=r"^predictions and references are empty; evaluate on at least one example$"):
        compute_metrics("sst2", [], [])
    with pytest.raises(ValueError, match=r"must be 1-D, got shapes \(2, 2\) and \(2,\); .*logits.argmax\(-1\)"):
        compute_metrics("sst2", [[0.1, 0.9], [0.8, 0.2]], [1, 0])


@pytest.mark.parametrize("name", list(EXPECTED_METRICS))
def test_evaluate_module_matches_compute_metrics(name):
    if is_regression_config(name):
        preds, refs = [0.5, 3.0, 3.0, 1.25, 4.0, 0.5, 2.0], [1.0, 2.0, 2.0, 2.0, 5.0, 0.0, 3.5]
    else:
        preds, refs = BINARY_PREDS, BINARY_REFS
    metric = load_glue_metric(name, keep_in_memory=True)
    assert metric.config_name == name
    metric.add_batch(predictions=preds[:4], references=refs[:4])
    metric.add_batch(predictions=preds[4:], references=refs[4:])
    assert metric.compute() == compute_metrics(name, preds, refs)
