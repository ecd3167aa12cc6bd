"""The probe's Trainer arms (`--trainer_arms`): the stock Trainer and ExactAccumulationTrainer beside the project's
loop, on a tiny BERT with dropout 0.1 and the synthetic task (E = 8)."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest

from bert_accum.study.probe import COLUMNS, TRAINER_ARMS, TRAINER_COLUMNS, ProbeConfig, run_probe
from test_probe import word_model_dir  # noqa: F401  (the module-scoped fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [(4, 2), (2, 4), (1, 8)]


def _probe(tmp_path, model_dir, glue_dir, **kw):
    cfg = ProbeConfig(task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, effective_batch_size=8,
                      micro_batch_sizes=[8, 4, 2, 1], max_length=48, seed=3, output_dir=str(tmp_path / "probe"),
                      quiet=True, command="test", **kw)
    return run_probe(cfg)


def _by_arm(result) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in result.trainer_rows:
        out.setdefault(r["arm"], []).append(r)
    for rows in out.values():
        assert [(r["micro_batch_size"], r["accumulation_steps"]) for r in rows] == CONFIGS
    return out


def _factor(rows) -> float:
    """The stock Trainer's measured factor, the same at every N: 1 (it divides by N) or N (it does not)."""
    ratios = [r["norm_ratio"] / r["accumulation_steps"] for r in rows]
    if all(x == pytest.approx(1.0, rel=1e-4) for x in ratios):
        return -1.0  # N times: the factor is N itself
    assert all(r["norm_ratio"] == pytest.approx(1.0, rel=1e-4) for r in rows)
    return 1.0


def test_trainer_arms_classification(tmp_path, word_model_dir, synthetic_glue_dir):  # noqa: F811
    result = _probe(tmp_path, word_model_dir, synthetic_glue_dir, trainer_arms=[])
    arms = _by_arm(result)
    assert list(arms) == list(TRAINER_ARMS)
    assert result.rows == [] and not (tmp_path / "probe" / "probe.csv").exists()  # only the Trainer arms ran
    stock = arms["trainer_dropout_off"]
    if _factor(stock) < 0:  # transformers 5.x: each micro-batch mean counted in full, g = N g_ref
        for r in stock:
            assert r["rel_l2"] == pytest.approx(r["accumulation_steps"] - 1, rel=1e-4)
            assert r["cosine"] == pytest.approx(1.0, abs=1e-6)
    for r in arms["exact_trainer"] + arms["loop_controlled"]:
        assert r["rel_l2"] < 1e-5 and r["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    for r in arms["exact_trainer_dropout_standard"] + arms["loop_default"]:
        assert 0.5 < r["norm_ratio"] < 1.5  # dropout noise, no factor N
    with open(tmp_path / "probe" / "probe_trainer.csv") as fh:
        lines = [line for line in fh if not line.startswith("#")]
    assert tuple(next(csv.reader(lines))) == TRAINER_COLUMNS
    md = (tmp_path / "probe" / "probe_trainer.md").read_text()
    assert "transformers" in md and "norm_ratio" in md


def test_trainer_arms_masked_lm(tmp_path, word_model_dir, synthetic_glue_dir):  # noqa: F811
    """Masked-LM: the exact trainer's token-level normalisation reproduces (E, 1); the stock Trainer's sum of
    per-micro-batch token means does not (about N times, not exactly: micro-batches predict different counts)."""
    result = _probe(tmp_path, word_model_dir, synthetic_glue_dir, objective="mlm",
                    trainer_arms=["trainer_dropout_off", "exact_trainer"])
    arms = _by_arm(result)
    for r in arms["exact_trainer"]:
        assert r["rel_l2"] < 1e-5
    for r in arms["trainer_dropout_off"]:
        assert r["norm_ratio"] > 0.5 * r["accumulation_steps"] or r["norm_ratio"] == pytest.approx(1.0, abs=0.3)


def test_cli_trainer_arms_beside_the_usual_arms(tmp_path, word_model_dir, synthetic_glue_dir, monkeypatch):  # noqa: F811
    out = tmp_path / "cli"
    argv = ["probe.py", "--task_name", "synthetic", "--glue_dir", synthetic_glue_dir, "--model_name_or_path",
            word_model_dir, "--effective_batch_size", "4", "--micro_batch_sizes", "4", "2", "--max_length", "48",
            "--arms", "controlled", "--trainer_arms", "exact_trainer", "--output_dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / "probe.py"), run_name="__main__")
    assert exit_info.value.code == 0
    for name, columns in (("probe.csv", COLUMNS), ("probe_trainer.csv", TRAINER_COLUMNS)):
        with open(out / name) as fh:
            rows = list(csv.reader(line for line in fh if not line.startswith("#")))
        assert tuple(rows[0]) == columns and len(rows) == 2  # header and the (2, 2) row
    assert (out / "probe_trainer.md").read_text().startswith("<!--")


def test_unknown_trainer_arm_is_refused():
    from bert_accum.errors import BertAccumError

    with pytest.raises(BertAccumError, match="unknown trainer arm"):
        ProbeConfig(task_name="rte", trainer_arms=["nope"]).validate()
