"""The packaged offline GLUE metric module: hand-checkable values for every task, no network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bert_accum.errors import BertAccumError
from bert_accum.core.metrics import GLUE_METRIC_PATH, compute_metrics, load_metric
from bert_accum.core.tasks import TASKS, get_task

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Hub access switched off, and any socket connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def _pairs(counts: dict[tuple[int, int], int]) -> tuple[list[int], list[int]]:
    """Build (predictions, references) from a confusion matrix {(pred, ref): count}."""
    preds, refs = [], []
    for (p, r), n in sorted(counts.items()):
        preds += [p] * n
        refs += [r] * n
    return preds, refs


def test_cola_matthews_from_confusion_matrix():
    # TP=2 TN=2 FP=1 FN=0: (2*2 - 1*0) / sqrt((2+1)(2+0)(2+1)(2+0)) = 4/6
    preds, refs = _pairs({(1, 1): 2, (0, 0): 2, (1, 0): 1})
    assert compute_metrics(TASKS["cola"], preds, refs) == {"matthews_correlation": pytest.approx(2 / 3)}
    # TP=3 TN=1 FP=1 FN=1: (3*1 - 1*1) / sqrt(4*4*2*2) = 2/8
    preds, refs = _pairs({(1, 1): 3, (0, 0): 1, (1, 0): 1, (0, 1): 1})
    assert compute_metrics(TASKS["cola"], preds, refs)["matthews_correlation"] == pytest.approx(0.25)
    # Constant predictions: MCC is defined as 0, not NaN.
    assert compute_metrics(TASKS["cola"], [1, 1, 1, 1], [0, 1, 0, 1])["matthews_correlation"] == 0.0


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_accuracy_and_f1(name):
    # TP=2 FP=1 FN=1 TN=2: precision = recall = 2/3, F1 = 2/3; accuracy 4/6
    preds, refs = _pairs({(1, 1): 2, (1, 0): 1, (0, 1): 1, (0, 0): 2})
    out = compute_metrics(TASKS[name], preds, refs)
    assert out == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(2 / 3)}
    # TP=1 FP=0 FN=3 TN=4: precision 1, recall 1/4, F1 = 2*1*0.25/1.25 = 0.4
    preds, refs = _pairs({(1, 1): 1, (0, 1): 3, (0, 0): 4})
    assert compute_metrics(TASKS[name], preds, refs) == {"accuracy": pytest.approx(5 / 8), "f1": pytest.approx(0.4)}


def test_stsb_pearson_and_spearman():
    task = TASKS["stsb"]
    refs = [0.0, 1.0, 2.5, 4.0, 5.0]
    assert compute_metrics(task, [2 * x + 1 for x in refs], refs) == {
        "pearson": pytest.approx(1.0),
        "spearmanr": pytest.approx(1.0),
    }
    assert compute_metrics(task, [-x for x in refs], refs) == {
        "pearson": pytest.approx(-1.0),
        "spearmanr": pytest.approx(-1.0),
    }
    # Monotonic but not linear: rank correlation 1, linear correlation below 1.
    out = compute_metrics(task, [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert out["spearmanr"] == pytest.approx(1.0)
    assert 0.9 < out["pearson"] < 1.0
    # By hand: dx = [-1, 0, 1], dy = [-1, 1, 0]; r = sum(dx*dy) / sqrt(sum(dx^2) * sum(dy^2)) = 1/2
    assert compute_metrics(task, [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])["pearson"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["sst2", "qnli", "rte", "wnli", "synthetic"])
def test_binary_accuracy(name):
    assert compute_metrics(TASKS[name], [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}


def test_mnli_three_classes():
    assert compute_metrics(TASKS["mnli"], [0, 1, 2, 2, 1], [0, 1, 2, 0, 0]) == {"accuracy": pytest.approx(0.6)}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_keys_match_task_spec_and_are_floats(name):
    task = TASKS[name]
    preds = [0.5, 1.5, 2.0, 3.5] if task.is_regression else [0, 1, 1, 0]
    refs = [0.0, 2.0, 2.5, 3.0] if task.is_regression else [0, 1, 0, 1]
    out = compute_metrics(task, preds, refs)
    assert tuple(out) == task.metrics
    assert task.main_metric in out
    assert all(type(v) is float for v in out.values())


def test_numpy_and_torch_inputs():
    torch = pytest.importorskip("torch")
    task = get_task("SST-2")
    expected = {"accuracy": 0.75}
    assert compute_metrics(task, np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == expected
    assert compute_metrics(task, torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])) == expected
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [-1.0, 1.0], [5.0, 4.0]])
    assert compute_metrics(task, logits.argmax(-1), [0, 1, 0, 0]) == expected
    out = compute_metrics(get_task("sts-b"), torch.tensor([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 6.0]))
    assert out["pearson"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name, preds, refs, fragment",
    [
        ("sst2", [0, 1], [0], "2 predictions but 1 references"),
        ("sst2", [], [], "no predictions"),
        ("sst2", [[0.1, 0.9], [0.8, 0.2]], [1, 0], "not logits"),
        ("sst2", [0, 2], [0, 1], "0..1"),
        ("mnli", [0, 1], [0, 3], "0..2"),
        ("cola", [0.2, 0.9], [0, 1], "class indices"),
    ],
)
def test_bad_inputs_raise_one_line_errors(name, preds, refs, fragment):
    with pytest.raises(BertAccumError, match=fragment):
        compute_metrics(TASKS[name], preds, refs)


def test_load_metric_returns_local_evaluate_module():
    import evaluate

    metric = load_metric(TASKS["mrpc"])
    assert isinstance(metric, evaluate.EvaluationModule)
    assert metric.config_name == "mrpc"
    metric.add_batch(predictions=[1, 0], references=[1, 1])
    metric.add_batch(predictions=[0, 0], references=[0, 0])
    assert metric.compute() == {"accuracy": pytest.approx(0.75), "f1": pytest.approx(2 / 3)}
    assert os.path.isabs(GLUE_METRIC_PATH) and os.path.isfile(GLUE_METRIC_PATH)


def test_unknown_config_is_rejected():
    import evaluate

    with pytest.raises(KeyError, match="unknown GLUE metric configuration"):
        evaluate.load(GLUE_METRIC_PATH, config_name="squad", keep_in_memory=True)


def test_fresh_process_offline_from_another_directory(tmp_path):
    """A new interpreter, another cwd, an empty modules cache, offline envs and sockets blocked."""
    code = textwrap.dedent(
        """
        import json, socket
        def no_network(*a, **k):
            raise OSError("network access attempted")
        socket.socket.connect = no_network
        from bert_accum.core.metrics import compute_metrics
        from bert_accum.core.tasks import TASKS
        print(json.dumps({
            "cola": compute_metrics(TASKS["cola"], [1, 1, 0, 0, 1], [1, 1, 0, 0, 0]),
            "stsb": compute_metrics(TASKS["stsb"], [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]),
        }))
        """
    )
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cola"]["matthews_correlation"] == pytest.approx(2 / 3)
    assert out["stsb"] == {"pearson": pytest.approx(1.0), "spearmanr": pytest.approx(1.0)}
    # The script was copied into the fresh cache, named after the file.
    assert list((tmp_path / "modules").rglob("glue_metric.py"))
