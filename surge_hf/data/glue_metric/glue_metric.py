"""``evaluate`` metric module for the GLUE tasks, loaded offline with ``surge_hf.data.metrics.load_glue_metric``.

The config name is a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or ``classification`` /
``regression`` for local data. The numbers come from ``surge_hf.data.metrics.compute_metrics``; its docstring gives
the formulas.
"""

import datasets
import evaluate

from surge_hf.data.metrics import compute_metrics, is_regression_config, metric_names

_DESCRIPTION = (
    "GLUE metrics: accuracy; F1 (positive class 1) and accuracy for mrpc and qqp; Matthews correlation for cola; "
    "Pearson and Spearman correlations for stsb. Local data: accuracy (classification), Pearson and Spearman "
    "(regression)."
)

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_INPUTS = """
Args:
    predictions: predicted class ids (float scores for stsb / regression).
    references: true class ids (float scores for stsb / regression).
Returns:
    a dict with the task's metrics: accuracy, f1, matthews_correlation, pearson, spearmanr.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class GlueMetric(evaluate.Metric):
    """The official GLUE metric of the task named by ``config_name``."""

    def _info(self) -> evaluate.MetricInfo:
        metric_names(self.config_name)  # raises ValueError naming the valid configs
        dtype = "float64" if is_regression_config(self.config_name) else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return compute_metrics(self.config_name, predictions, references)
