"""Task metrics, computed offline by the packaged ``glue_metric.py`` evaluate module.

``evaluate.load("glue", ...)`` needs the Hugging Face Hub; this package ships its own metric
script and always loads it by absolute path, so metrics work with no network, from any current
directory, with ``HF_HUB_OFFLINE``/``HF_EVALUATE_OFFLINE`` set or not. ``evaluate`` copies the
script into its modules cache (``$HF_MODULES_CACHE``, default ``~/.cache/huggingface/modules``)
under ``evaluate_modules/metrics/glue_metric/<content hash>/`` and imports it from there. The
module is created with ``keep_in_memory=True`` so computing writes no prediction cache files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import BertAccumError
from ..tasks import TaskSpec

GLUE_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue_metric.py")

_LOADED: dict[str, Any] = {}


def load_metric(task: TaskSpec):
    """Return the ``evaluate.EvaluationModule`` for ``task`` (config `task.metric_config`), loaded offline."""
    import evaluate  # heavy import; keep ``import bert_accum.core.metrics`` cheap

    return evaluate.load(GLUE_METRIC_PATH, config_name=task.metric_config, keep_in_memory=True)


def _as_1d(values: Any, what: str, task: TaskSpec) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        hint = " (pass class indices, e.g. logits.argmax(-1), not logits)" if arr.ndim == 2 else ""
        raise BertAccumError(f"{task.name}: {what} must be one value per example, got shape {arr.shape}{hint}")
    return arr


def _check_classes(arr: np.ndarray, what: str, task: TaskSpec) -> np.ndarray:
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise BertAccumError(f"{task.name}: {what} must be class indices (integers), got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= task.num_labels):
        raise BertAccumError(
            f"{task.name}: {what} must lie in 0..{task.num_labels - 1}, got values {int(arr.min())}..{int(arr.max())}"
        )
    return arr


def compute_metrics(task: TaskSpec, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """Score ``predictions`` against ``references`` for ``task``; keys are exactly ``task.metrics``.

    Predictions are class indices for classification tasks and floats for regression (STS-B).
    Lists, NumPy arrays and torch tensors are accepted. Raises ``BertAccumError`` for empty or
    mismatched inputs, logits instead of indices, or class indices out of range.
    """
    preds = _as_1d(predictions, "predictions", task)
    refs = _as_1d(references, "references", task)
    if len(preds) != len(refs):
        raise BertAccumError(f"{task.name}: {len(preds)} predictions but {len(refs)} references")
    if len(preds) == 0:
        raise BertAccumError(f"{task.name}: no predictions to score")
    if task.is_regression:
        preds = preds.astype(np.float64)
        refs = refs.astype(np.float64)
    else:
        preds = _check_classes(preds, "predictions", task)
        refs = _check_classes(refs, "references", task)
    metric = _LOADED.get(task.metric_config)
    if metric is None:
        metric = _LOADED[task.metric_config] = load_metric(task)
    result = metric.compute(predictions=preds.tolist(), references=refs.tolist())
    out = {key: float(result[key]) for key in task.metrics}
    return out


__all__ = ["GLUE_METRIC_PATH", "compute_metrics", "load_metric"]
