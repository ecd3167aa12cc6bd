"""What each task is: text columns, label set, metrics, evaluation splits.

The nine GLUE tasks plus ``synthetic``, this project's own offline task (see ``bert_accum.core.synthetic``).
Column names are normalised for every data source: ``sentence1`` (and ``sentence2`` for pair tasks),
``label`` (class index, or float for regression) and ``idx`` (the row's position in its split; the
stable example identity used for data order, dropout masks and MLM masking).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BertAccumError


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one sequence-classification/regression task."""

    name: str
    is_pair: bool
    label_names: tuple[str, ...] | None  # None for regression (STS-B)
    metrics: tuple[str, ...]  # keys the local GLUE metric module reports for this task
    main_metric: str  # the one headline number per run
    eval_splits: tuple[str, ...] = ("validation",)
    from_data: bool = False  # labels inferred from the user's training file (`custom`), not a fixed label set

    @property
    def metric_config(self) -> str:
        """Configuration of the packaged metric module: the task's own, or for a task inferred from data the
        one with the same metrics (accuracy for classes, Pearson/Spearman for scores)."""
        if not self.from_data:
            return self.name
        return "stsb" if self.is_regression else "sst2"

    @property
    def is_regression(self) -> bool:
        """True for STS-B-style float targets."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Width of the classifier head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", False, ("unacceptable", "acceptable"), ("matthews_correlation",), "matthews_correlation"),
    "sst2": TaskSpec("sst2", False, ("negative", "positive"), ("accuracy",), "accuracy"),
    "mrpc": TaskSpec("mrpc", True, ("not_equivalent", "equivalent"), ("accuracy", "f1"), "f1"),
    "qqp": TaskSpec("qqp", True, ("not_duplicate", "duplicate"), ("accuracy", "f1"), "f1"),
    "stsb": TaskSpec("stsb", True, None, ("pearson", "spearmanr"), "pearson"),
    "mnli": TaskSpec(
        "mnli",
        True,
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "accuracy",
        ("validation_matched", "validation_mismatched"),
    ),
    "qnli": TaskSpec("qnli", True, ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    "rte": TaskSpec("rte", True, ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    "wnli": TaskSpec("wnli", True, ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
    "synthetic": TaskSpec("synthetic", False, ("negative", "positive"), ("accuracy",), "accuracy"),
}

# Accept the spellings users know from the GLUE folders and the Hub ("SST-2", "STS-B", "sts-b").
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}

CUSTOM_TASK = "custom"
"""The task of a user's own --train_file/--validation_file: its label set (or regression) and its one or two
text columns come from the training file (`bert_accum.core.data.infer_task`), as in the HF GLUE example."""


def custom_task(label_names: tuple[str, ...] | None, is_pair: bool) -> TaskSpec:
    """The `custom` task for a label set (None: regression) and a single- or pair-text layout."""
    if label_names is None:
        return TaskSpec(CUSTOM_TASK, is_pair, None, ("pearson", "spearmanr"), "pearson", from_data=True)
    return TaskSpec(CUSTOM_TASK, is_pair, tuple(label_names), ("accuracy",), "accuracy", from_data=True)


def is_custom(name: str | None) -> bool:
    """True when `name` asks for the labels to be inferred from the training file (omitted, or 'custom')."""
    return name is None or name.strip().lower() == CUSTOM_TASK


def get_task(name: str) -> TaskSpec:
    """Look a task up by any common spelling; raise a one-line error for an unknown one.

    'custom' has no fixed label set: it gives a placeholder whose labels `setup.load_model` fills in from the
    training file (through `data.infer_task`)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key == CUSTOM_TASK:
        return custom_task((), False)
    if key not in TASKS:
        raise BertAccumError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]
