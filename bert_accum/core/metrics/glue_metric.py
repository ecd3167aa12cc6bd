"""GLUE-style metrics as a local ``evaluate`` module (works offline).

This file is loaded by path with ``evaluate.load("<abs path>/glue_metric.py", config_name=<task>)``;
``evaluate`` copies it into its dynamic-modules cache and imports it from there, so it must stay a
self-contained script: no relative imports and no imports of ``bert_accum``.

The config name is the task: ``cola`` (Matthews correlation), ``mrpc``/``qqp`` (accuracy and F1 of
the positive class), ``stsb`` (Pearson and Spearman correlation), and ``sst2``, ``mnli`` (also
``mnli_matched``/``mnli_mismatched``), ``qnli``, ``rte``, ``wnli``, ``hans`` and ``synthetic``
(accuracy). Values are plain Python floats and match the Hub's ``glue`` metric.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = """\
Offline GLUE metrics for the bert_accum package, computed with scikit-learn and SciPy.
One configuration per task; 'synthetic' is bert_accum's own offline task, not part of GLUE.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: class indices (int) for classification tasks, scores (float) for stsb.
    references: gold class indices (int) for classification tasks, gold scores (float) for stsb.
Returns: a dict of floats whose keys depend on the configuration:
    cola: matthews_correlation; mrpc, qqp: accuracy, f1; stsb: pearson, spearmanr;
    every other task: accuracy.
"""

_ACCURACY_TASKS = (
    "sst2",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
    "hans",
    "synthetic",
)
_F1_TASKS = ("mrpc", "qqp")
_KNOWN = ("cola", "stsb") + _F1_TASKS + _ACCURACY_TASKS


def _accuracy(preds, labels):
    return float((np.asarray(preds) == np.asarray(labels)).mean())


def _pearson_spearman(preds, labels):
    preds = np.asarray(preds, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    return {
        "pearson": float(pearsonr(preds, labels)[0]),
        "spearmanr": float(spearmanr(preds, labels)[0]),
    }


class GlueMetric(evaluate.Metric):
    """Accuracy, F1, Matthews correlation or Pearson/Spearman, chosen by the task (config name)."""

    def _info(self):
        if self.config_name not in _KNOWN:
            raise KeyError(
                f"unknown GLUE metric configuration {self.config_name!r}; choose one of: {', '.join(_KNOWN)}"
            )
        value_type = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value(value_type),
                    "references": datasets.Value(value_type),
                }
            ),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return _pearson_spearman(predictions, references)
        if self.config_name in _F1_TASKS:
            return {
                "accuracy": _accuracy(predictions, references),
                "f1": float(f1_score(y_true=references, y_pred=predictions)),
            }
        return {"accuracy": _accuracy(predictions, references)}
