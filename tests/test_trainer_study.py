"""scripts/trainer_study.py (bert_accum.study.trainer_study) on hand-made run folders with known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bert_accum.study.trainer_study import COMPARISONS, run_study

# (optimizer, backend, B, N) -> final dev accuracy per seed; the stock (2,4) SGD runs are 0.05 worse than (8,1)
ACCURACY = {
    ("sgd", "trainer", 8, 1): {1: 0.80, 2: 0.82, 3: 0.81},
    ("sgd", "trainer", 2, 4): {1: 0.75, 2: 0.77, 3: 0.76},
    ("sgd", "exact_trainer", 2, 4): {1: 0.80, 2: 0.83, 3: 0.80},
    ("sgd", "exact_trainer", 8, 1): {1: 0.80},
    ("adamw_torch", "trainer", 8, 1): {1: 0.85, 2: 0.86},
    ("adamw_torch", "trainer", 2, 4): {1: 0.85, 2: 0.87},
    ("adamw_torch", "exact_trainer", 2, 4): {1: 0.84, 2: 0.86},
    ("sgd_noclip", "trainer", 8, 1): {1: 0.80, 2: 0.81},
    ("sgd_noclip", "trainer", 2, 4): {1: 0.60, 2: 0.62},
    ("sgd_noclip", "exact_trainer", 2, 4): {1: 0.80, 2: 0.80},
}


def _write(root: Path, optim: str, backend: str, b: int, n: int, seed: int, acc: float) -> None:
    factor = n if backend == "trainer" else 1.0
    clip = 0.0 if optim.endswith("_noclip") else 1.0
    optim = optim.removesuffix("_noclip")
    d = root / "sst2" / f"{backend}_{optim}_{clip}" / f"B{b}_N{n}" / f"seed{seed}"
    d.mkdir(parents=True)
    derived = {"task": "sst2", "micro_batch_size": b, "accumulation_steps": n, "num_processes": 1,
               "effective_batch_size": b * n, "total_optimizer_steps": 4}
    (d / "config.json").write_text(json.dumps({
        "task_name": "sst2", "seed": seed, "backend": backend, "optim": optim, "learning_rate": 0.1,
        "max_train_samples": 32, "max_length": 128, "warmup_ratio": 0.1, "lr_scheduler_type": "linear",
        "max_grad_norm": clip, "derived": derived}))
    (d / "environment.json").write_text(json.dumps({"packages": {"transformers": "5.x", "torch": "2.x"},
                                                    "trainer": {"transformers": "5.x"}, "device": "cpu"}))
    steps = [{"optimizer_step": k + 1, "loss": 0.5 * factor, "window_mean_loss": 0.5, "grad_norm": 0.8 * factor,
              "clipped": bool(clip) and 0.8 * factor > clip} for k in range(4)]
    (d / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    wrong = round((1 - acc) * 100)
    (d / "predictions.json").write_text(json.dumps({"splits": {"validation": [0] * wrong + [1] * (100 - wrong)}}))
    (d / "final_metrics.json").write_text(json.dumps({
        "status": "completed", "main_metric": "accuracy", "total_optimizer_steps": 4,
        "eval": {"accuracy": acc, "num_examples": 100},
        "trainer": {"loss_factor_first_window": factor, "model_accepts_loss_kwargs": True,
                    "divides_loss_by_accumulation_steps": False}}))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trainer_study")
    runs = tmp_path / "runs"
    for (optim, backend, b, n), seeds in ACCURACY.items():
        for seed, acc in seeds.items():
            _write(runs, optim, backend, b, n, seed, acc)
    files = run_study(runs, tmp_path / "out", tmp_path / "no_probe", command="python scripts/trainer_study.py")
    return files


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        first = fh.readline()
        assert first.startswith("# command: python scripts/trainer_study.py | git_commit: ")
        return list(csv.DictReader(fh))


def test_paired_differences_and_intervals(study):
    rows = {(r["optimizer"], r["comparison"]): r for r in _csv(study["pairs"])}
    stock = rows[("sgd", COMPARISONS[0][0])]
    assert int(stock["n"]) == 3 and float(stock["mean_diff"]) == pytest.approx(-0.05)
    assert float(stock["ci95_lo"]) == pytest.approx(-0.05) == pytest.approx(float(stock["ci95_hi"]))  # no spread
    assert float(stock["mean_disagreements"]) == pytest.approx(5.0)
    exact = rows[("sgd", COMPARISONS[1][0])]
    assert float(exact["mean_diff"]) == pytest.approx(0.0, abs=1e-12)
    assert float(exact["ci95_lo"]) < 0 < float(exact["ci95_hi"])
    check = rows[("sgd", COMPARISONS[3][0])]
    assert int(check["n"]) == 1 and float(check["mean_diff"]) == pytest.approx(0.0)
    assert ("adamw_torch", COMPARISONS[3][0]) not in rows  # no exact (8,1) run for AdamW


def test_final_table_clipping_and_factor(study):
    rows = {(r["optimizer"], r["backend"], r["micro_batch_size"], r["accumulation_steps"]): r
            for r in _csv(study["final"])}
    stock = rows[("sgd", "trainer", "2", "4")]
    assert float(stock["fraction_clipped"]) == 1.0 and float(stock["loss_factor_first_window"]) == 4.0
    assert float(rows[("sgd", "trainer", "8", "1")]["fraction_clipped"]) == 0.0
    assert float(stock["accuracy_mean"]) == pytest.approx(0.76)
    assert float(rows[("sgd_noclip", "trainer", "2", "4")]["fraction_clipped"]) == 0.0
    assert float(rows[("sgd_noclip", "trainer", "2", "4")]["max_grad_norm"]) == 0.0
    norms = _csv(study["norms"])
    assert {r["optimizer_step"] for r in norms} == {"1", "2", "3", "4"}


def test_markdown_section_and_figure(study):
    md = study["markdown"].read_text()
    assert md.startswith("<!-- command: python scripts/trainer_study.py | git_commit: ")
    assert "## The Hugging Face Trainer" in md and "transformers 5.x" in md
    assert "stock transformers.Trainer" in md and "ExactAccumulationTrainer" in md
    sgd = md.split("- plain SGD: ")[1]
    assert sgd.startswith("the stock Trainer's (2,4) ends at -0.0500") and "the 95% interval excludes 0" in sgd
    assert "trainer's (2,4) at +0.0000 [" in sgd and "the 95% interval includes 0" in sgd
    assert "N = 1 check (seed 1): exact (8,1) - stock (8,1) = +0.0000" in sgd
    noclip = md.split("- plain SGD, no clipping: ")[1]
    assert noclip.startswith("the stock Trainer's (2,4) ends at -0.1950 [") and "Without clipping" in noclip
    # the one-seed N = 1 check has no spread and no range to print; the others have both
    assert "| plain SGD | ExactAccumulationTrainer | (8,1) | 1 | 0.8000 | — |" in md and "± —" not in md
    assert "| plain SGD | stock transformers.Trainer | (8,1) | 3 | 0.8100 ± 0.0100 | 0.8000–0.8200 |" in md
    assert "| plain SGD, no clipping | ExactAccumulationTrainer | (2,4) | 2 | 0.8000 ± 0.0000 | 0.8000 |" in md
    assert "can change that step's update only on at most the other" in md
    assert md.split("- plain SGD: ")[1].split("\n")[0].count("moment estimates") == 0
    assert study["figure"].stat().st_size > 10_000
