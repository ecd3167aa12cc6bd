"""The study report on a synthetic set of run folders whose tables are known in advance."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bert_accum.study.report import ReportInputs, build_report, distance_curves, load_runs, param_distance, summarise

# final accuracy per (arm, B, N, seed)
METRICS = {
    ("default", 32, 1): {1: 0.60, 2: 0.62, 3: 0.64},
    ("default", 8, 4): {1: 0.70, 2: 0.73, 3: 0.76},     # paired diffs 0.10, 0.11, 0.12
    ("controlled", 32, 1): {1: 0.60, 2: 0.61, 3: 0.59},
    ("controlled", 8, 4): {1: 0.60, 2: 0.61, 3: 0.59},  # identical to its reference
}
BUGS = {("default", 8, 4): {1: 0.80, 2: 0.82}, ("bug_clip_per_micro_batch", 8, 4): {1: 0.70, 2: 0.73}}


def _write_run(root: Path, task: str, arm: str, b: int, n: int, seed: int, metric: float, fps: dict[int, np.ndarray],
               steps: int = 4, lr: float = 1e-4) -> None:
    d = root / task / arm / f"B{b}_N{n}" / f"seed{seed}"
    (d / "fingerprints").mkdir(parents=True)
    derived = {"micro_batch_size": b, "accumulation_steps": n, "num_processes": 1, "effective_batch_size": b * n,
               "task": task, "total_optimizer_steps": steps, "train_examples": 128, "epochs": 1, "model_path": "/m/tiny"}
    (d / "config.json").write_text(json.dumps({"task_name": task, "seed": seed, "objective": "classification",
                                               "max_length": 64, "learning_rate": lr, "warmup_ratio": 0.0,
                                               "derived": derived}))
    (d / "final_metrics.json").write_text(json.dumps({
        "status": "completed", "main_metric": "accuracy", "eval": {"accuracy": metric}, "optimizer_steps": steps,
        "train_seconds": 10.0, "examples_per_second": 12.8, "device": "cpu"}))
    (d / "steps.jsonl").write_text("".join(json.dumps({"optimizer_step": s, "loss": 0.5, "grad_norm": 1.0 + s / 10,
                                                       "learning_rate": lr * (1 - s / steps)}) + "\n"
                                           for s in range(1, steps + 1)))
    for step, f in fps.items():
        np.save(d / "fingerprints" / f"step_{step:07d}.npy", f)


@pytest.fixture()
def study(tmp_path):
    """Fingerprints: the reference of seed s moves from 0 to s*[1, 0, ...] by step 4; (8, 4) default sits 0.5 away
    from it along another axis at every step, controlled (8, 4) coincides with its reference."""
    root = tmp_path / "runs" / "study"
    dim = 8
    for (arm, b, n), per_seed in METRICS.items():
        for seed, metric in per_seed.items():
            fps = {}
            for step in (0, 2, 4):
                f = np.zeros(dim)
                f[0] = seed * step / 4
                if arm == "default" and n > 1 and step > 0:
                    f[1] = 0.5 * seed
                fps[step] = f
            _write_run(root, "rte", arm, b, n, seed, metric, fps)
    bugs = tmp_path / "runs" / "study_bugs"
    for (arm, b, n), per_seed in BUGS.items():
        for seed, metric in per_seed.items():
            fps = {0: np.zeros(dim), 4: np.eye(dim)[0] * (2.0 if arm == "default" else 1.0)}
            _write_run(bugs, "sst2", arm, b, n, seed, metric, fps, steps=4 if arm == "default" else 5)
    probe = tmp_path / "probe" / "rte"
    probe.mkdir(parents=True)
    with (probe / "probe.csv").open("w") as fh:
        fh.write("# command: python scripts/probe.py | git_commit: abc\n")
        fh.write("task,objective,arm,micro_batch_size,accumulation_steps,effective_batch_size,rel_l2,cosine,max_group_rel,"
                 "max_group,seed_floor_rel_l2,ratio_to_floor\n")
        fh.write("rte,classification,controlled_dropout_standard,8,4,32,0.5,0.9,0.8,layer_0,0.5,1.0\n")
        fh.write("rte,classification,controlled,8,4,32,1e-7,1.0,2e-7,layer_0,0.5,2e-7\n")
    return tmp_path


def test_summary_tables_match_hand_computed_values(study):
    runs = load_runs([study / "runs/study", study / "runs/study_bugs"])
    assert len(runs) == 12 + 4
    rows = {(s.study, s.arm, s.micro_batch_size): s for s in summarise(runs)}
    d = rows[("study", "default", 8)]
    assert (d.n, d.n_pairs) == (3, 3)
    assert d.mean == pytest.approx(0.73) and d.std == pytest.approx(0.03)
    assert d.diff_mean == pytest.approx(0.11)
    # diffs 0.10, 0.11, 0.12: sd 0.01, t(0.975, 2) = 4.3027 -> half-width 4.3027 * 0.01 / sqrt(3) = 0.024841
    assert d.diff_lo == pytest.approx(0.11 - 0.024841, abs=1e-5) and d.diff_hi == pytest.approx(0.11 + 0.024841, abs=1e-5)
    assert d.seed_std == pytest.approx(0.02)  # the (32, 1) accuracies 0.60, 0.62, 0.64
    assert d.beyond_seed_noise == "yes" and d.reference == "default B32_N1"
    # distance 0.5*s from a reference that moved s: 0.5 for every seed
    assert d.rel_param_distance == pytest.approx(0.5) and d.rel_param_distance_std == pytest.approx(0.0)
    c = rows[("study", "controlled", 8)]
    assert c.diff_mean == pytest.approx(0.0) and c.beyond_seed_noise == "no" and c.rel_param_distance == 0.0
    ref = rows[("study", "default", 32)]
    assert ref.n_pairs == 0 and math.isnan(ref.diff_mean)
    bug = rows[("study_bugs", "bug_clip_per_micro_batch", 8)]
    # no (32, 1) in the bug study: compared with the correct loop at the same (B, N): diffs -0.10, -0.09
    assert bug.reference == "default B8_N4" and bug.diff_mean == pytest.approx(-0.095)
    # runs of different lengths compare their last fingerprints: |1 - 2| / 2
    assert bug.rel_param_distance == pytest.approx(0.5)


def test_distance_curves_and_seed_floor(study):
    runs = load_runs([study / "runs/study"])
    curves = distance_curves(runs)
    vs = [c for c in curves if c["kind"] == "vs_reference" and c["arm"] == "default" and c["seed"] == 2]
    assert [(c["optimizer_step"], c["rel_param_distance"]) for c in vs] == [(2, pytest.approx(1.0)), (4, pytest.approx(0.5))]
    floor = {(c["seed"], c["optimizer_step"]): c["rel_param_distance"] for c in curves
             if c["kind"] == "seed_floor" and c["arm"] == "default"}
    # seeds 1 and 3 at step 4: |1 - 3| / |3 - 0|
    assert floor[("1-3", 4)] == pytest.approx(2 / 3)
    a, b = [r for r in runs if r.arm == "default" and r.seed == 1 and r.accumulation_steps in (1, 4)]
    assert param_distance(b if b.accumulation_steps == 4 else a, a if a.accumulation_steps == 1 else b, 4) == pytest.approx(0.5)


def test_report_files_are_written_with_headers_and_numbers(study):
    out = study / "results"
    report = build_report(ReportInputs(runs_dirs=[str(study / "runs/study"), str(study / "runs/study_bugs")],
                                       probe_dir=str(study / "probe"), batchnorm_dir=None, output_dir=str(out),
                                       command="python scripts/report.py runs/study runs/study_bugs"))
    text = report.read_text()
    assert text.startswith("<!-- command: python scripts/report.py runs/study runs/study_bugs | git_commit: ")
    assert "leaves -16 in `.grad`" in text and "giving -20" in text and "from 1 to 1.2 accumulated and to 1.2 as" in text
    assert "| rte | default | 8 | 4 | accuracy | 3 | 0.7300 ± 0.0300 | 0.1100 | [0.0852, 0.1348] | 0.0200 | yes |" in text
    assert "Of 2 paired comparisons in `study`, 1 differ beyond seed noise" in text
    assert "clip_per_micro_batch" in text and "| 5 | 4 |" in text  # the bug's optimizer steps vs the correct loop's
    assert "rte: 1.000–1.000" in text  # probe ratio for dropout RNG
    for fig in ("paired_diff_study.png", "grad_norm_study_rte.png", "param_distance_study_rte.png"):
        path = out / "study/figures" / fig
        assert path.stat().st_size > 1000 and f"(study/figures/{fig})" in text
    with (out / "study/summary.csv").open() as fh:
        first = fh.readline()
        rows = list(csv.DictReader(fh))
    assert first.startswith("# command: python scripts/report.py") and len(rows) == 6
    runs_csv = (out / "study/runs.csv").read_text().splitlines()
    assert len(runs_csv) == 2 + 16


def test_a_missing_large_batch_run_leaves_its_seed_unpaired_and_diverged_runs_are_counted(study):
    import shutil

    root = study / "runs/study"
    shutil.rmtree(root / "rte/controlled/B32_N1/seed3")  # that seed's large-batch run is missing
    bad = root / "rte/default/B8_N4/seed2/final_metrics.json"
    final = json.loads(bad.read_text())
    final.update(status="non_finite_loss", eval={})
    bad.write_text(json.dumps(final))
    rows = {(s.arm, s.micro_batch_size): s for s in summarise(load_runs([root]))}
    ctl = rows[("controlled", 8)]
    assert ctl.n == 3 and ctl.n_pairs == 2 and ctl.reference == "controlled B32_N1"  # not mixed with `default`
    d = rows[("default", 8)]
    assert d.non_finite == 1 and d.n_pairs == 2 and d.diff_mean == pytest.approx(0.11)  # seeds 1 and 3: 0.10, 0.12
