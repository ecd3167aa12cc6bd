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
    assert d.ci_excludes_zero and d.reference == "default B32_N1"
    # distance 0.5*s from a reference that moved s: 0.5 for every seed
    assert d.rel_param_distance == pytest.approx(0.5) and d.rel_param_distance_std == pytest.approx(0.0)
    c = rows[("study", "controlled", 8)]
    assert c.diff_mean == pytest.approx(0.0) and not c.ci_excludes_zero and c.rel_param_distance == 0.0
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
    # superseded: the "beyond seed noise" verdict; an early study now says only whether the interval excludes 0
    assert ("After 4 optimizer steps 1 of 2 paired (B, N) cells in `study` have a 95% interval of the paired "
            "difference that excludes 0 (n = 3 seeds per cell): rte.default.B8_N4.") in text
    assert "clip_per_micro_batch" in text and "| 5 | 4 |" in text  # the bug's optimizer steps vs the correct loop's
    # a range whose ends print the same prints once (was "rte: 1.000–1.000")
    assert "rte: 1.000 of the dropout-only floor" in text and "1.000–1.000" not in text
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


# ------------------------------------------------------------------------------------------ converged study
# A grid shaped like configs/study_converged.yaml, smaller: one effective batch (8) and its question pair (2, 4).
GRID = """
name: conv
runs_dir: runs/conv
tasks: [sst2, stsb]
batches: [[8, 1], [2, 4]]
seeds: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
seed_offsets: {dropout_seed: 0}
arms:
  default: {}
  controlled: {dropout: invariant, padding: window, loss_normalization: global, seeds: [1, 2, 3]}
  floor_dropout: {batches: [[8, 1]], seed_offsets: {dropout_seed: 1000}}
  floor_data: {batches: [[8, 1]], seeds: [1, 2, 3, 4, 5], seed_offsets: {data_seed: 1000}}
  floor_init: {batches: [[8, 1]], seeds: [1, 2, 3, 4, 5], seed_offsets: {seed: 1000, data_seed: 0}}
  floor_all: {batches: [[8, 1]], seeds: [1, 2, 3, 4, 5], seed_offsets: {seed: 1000, data_seed: 1000, dropout_seed: 1000}}
shared: {learning_rate: 1.0e-4, eval_steps: 0.5}
task_overrides:
  sst2: {max_train_samples: 64}
  stsb: {max_train_examples: 64}
equivalence_margins: {sst2: {accuracy: 0.01}, stsb: {pearson: 0.01}}
reference_thresholds: {sst2: {accuracy: 0.78}, stsb: {pearson: 0.70}}
changes: ["2026-12-01, after seed 1's (8,1) run: more training examples; that run was rerun."]
"""
# Paired differences (2, 4) - (8, 1) and dropout-only floor differences, by seed 1..10.
ACC_DIFFS = [0.002, -0.001, 0.003, 0.000, 0.001, 0.002, -0.001, 0.003, 0.000, 0.001]
FLOOR_DIFFS = [-0.002, 0.001, -0.003, 0.000, -0.001, 0.002, -0.001, 0.003, 0.000, 0.001]
DEV_LABELS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # majority class: 6 of 10


def _final_metric(task: str, arm: str, n: int, seed: int, diffs: list[float]) -> float:
    ref = (0.80 if task == "sst2" else 0.75) + 0.001 * seed
    if arm == "default" and n > 1:
        return ref + diffs[seed - 1]
    if arm == "floor_dropout":
        return ref + FLOOR_DIFFS[seed - 1]
    if arm == "floor_all" and seed == 5:
        return 0.55 if task == "sst2" else -0.02  # a failed run: at the majority baseline's side / below Pearson 0
    if arm in ("floor_data", "floor_init", "floor_all"):
        return ref + 0.004 * (-1) ** seed
    return ref  # (8, 1) references, and the exact controlled arm


def _predictions(task: str, arm: str, n: int, seed: int) -> list:
    if task == "stsb":
        base = [float(i) for i in range(10)]
        if arm == "default" and n > 1:
            base[0] += 0.3  # RMS difference sqrt(0.09 / 10)
        return base
    preds = list(DEV_LABELS)
    if arm == "default" and n > 1:
        preds[0] = 0  # 1 of 10 labelled differently
    if arm == "floor_dropout":
        preds[0], preds[9] = 0, 1  # 2 of 10
    return preds


def write_converged(tmp_path: Path, skip: set[str] = frozenset(), unfinished: set[str] = frozenset(),
                    diffs: list[float] = tuple(ACC_DIFFS)) -> tuple[Path, Path, Path]:
    """Run folders for every planned cell of GRID (except `skip`; `unfinished` ones without final metrics; the
    headline pairs' differences `diffs` by seed), a GLUE folder with the SST-2 dev labels, and the grid file;
    returns (runs root, grid file, GLUE folder)."""
    from bert_accum.core.data import write_glue_tsv
    from bert_accum.study.grid import GridSpec, expand

    glue = tmp_path / "glue"
    write_glue_tsv(glue / "SST-2" / "dev.tsv", ["sentence", "label"], [[f"s{i}", str(y)] for i, y in enumerate(DEV_LABELS)])
    grid = tmp_path / "conv.yaml"
    grid.write_text(GRID)
    root = tmp_path / "runs" / "conv"
    for cell in expand(GridSpec.load(grid), runs_dir=str(root), set_values={"glue_dir": str(glue)}):
        if cell.name in skip:
            continue
        cfg, b, n = cell.config, cell.micro_batch_size, cell.accumulation_steps
        d = cell.run_dir
        d.mkdir(parents=True)
        steps = 8
        derived = {"micro_batch_size": b, "accumulation_steps": n, "num_processes": 1, "effective_batch_size": b * n,
                   "task": cell.task, "total_optimizer_steps": steps, "train_examples": 64, "epochs": 1,
                   # stsb's runs stop half-way through their one epoch, as max_train_examples makes them do
                   "optimizer_steps_per_epoch": 16 if cell.task == "stsb" else 8, "num_warmup_steps": 0, "model_path": "/site-packages/tiny_model/model",
                   "seeds": {"seed": cfg.seed, "data_seed": cfg.resolved_data_seed, "dropout_seed": cfg.resolved_dropout_seed}}
        (d / "config.json").write_text(json.dumps({**cfg.to_dict(), "derived": derived}))
        (d / "environment.json").write_text(json.dumps({"device": "cpu", "device_name": "test-cpu", "git_commit": "abc123",
                                                        "python": "3.11", "torch_num_threads": 1,
                                                        "packages": {"torch": "2.13", "transformers": "5.24"}}))
        (d / "steps.jsonl").write_text("".join(json.dumps({"optimizer_step": s, "loss": 0.5, "grad_norm": 1.0,
                                                           "learning_rate": 1e-4}) + "\n" for s in range(1, steps + 1)))
        if cell.name in unfinished:
            continue
        metric_name = "accuracy" if cell.task == "sst2" else "pearson"
        m = _final_metric(cell.task, cell.arm, n, cell.seed, list(diffs))
        (d / "eval.jsonl").write_text(json.dumps({metric_name: m - 0.1, "optimizer_step": 4}) + "\n"
                                      + json.dumps({metric_name: m, "optimizer_step": steps}) + "\n")
        (d / "predictions.json").write_text(json.dumps({"optimizer_step": steps, "splits": {
            "validation": _predictions(cell.task, cell.arm, n, cell.seed)}}))
        (d / "final_metrics.json").write_text(json.dumps({
            "status": "completed", "main_metric": metric_name, "eval": {metric_name: m, "num_examples": 10},
            "optimizer_steps": steps, "train_seconds": 36.0, "examples_per_second": 2.0, "device": "cpu",
            "clipped_fraction": 0.25 * cell.seed % 1}))
    return root, grid, glue


@pytest.fixture()
def converged(tmp_path):
    return write_converged(tmp_path)


def _numbers(root: Path, grid: Path, glue_dir: str | None = None) -> dict:
    from bert_accum.study import numbers
    from bert_accum.study.report import load_converged

    return numbers.compute([load_converged(root, grid)], [], {}, None, "command: test | git_commit: x", glue_dir=glue_dir)


def test_converged_tost_floors_disagreement_and_failures_by_hand(converged):
    root, grid, _ = converged
    nums = _numbers(root, grid)
    p = "conv.sst2.e8.pair.default.B2_N4"
    # ACC_DIFFS: mean 0.001, sd sqrt(20e-6 / 9) = 0.00149071, se 0.000471405; t(0.95, 9) = 1.833113
    assert nums[f"{p}.n"] == 10 and nums[f"{p}.required"] == 10 and nums[f"{p}.headline"]
    assert nums[f"{p}.tost.mean"] == pytest.approx(0.001, abs=1e-9)
    assert nums[f"{p}.tost.ci90_low"] == pytest.approx(0.001 - 1.833113 * 0.000471405, abs=1e-8)
    assert nums[f"{p}.tost.ci90_high"] == pytest.approx(0.001 + 1.833113 * 0.000471405, abs=1e-8)
    assert nums[f"{p}.verdict"] == "equivalent" and nums[f"{p}.tost.margin"] == 0.01
    # the floors are found by which seeds their planned runs change against the default (8, 1) reference
    assert nums["conv.sst2.e8.floors"] == ["dropout", "data", "init", "all"]
    assert nums["conv.sst2.e8.floor.init.arm"] == "floor_init" and nums["conv.sst2.e8.floor.init.varied"] == ["seed"]
    assert nums["conv.sst2.e8.floor.all.varied"] == ["data_seed", "dropout_seed", "seed"]
    assert nums["conv.sst2.e8.floor.dropout.n"] == 10 and nums["conv.sst2.e8.floor.dropout.mean"] == pytest.approx(0.0, abs=1e-9)
    # floor_data: +-0.004 alternating over seeds 1..5 -> mean |diff| 0.004
    assert nums["conv.sst2.e8.floor.data.abs_mean"] == pytest.approx(0.004)
    # beside it, the dropout-only floor over the same seeds 1..5: |FLOOR_DIFFS[:5]| = .002 .001 .003 0 .001
    assert nums["conv.sst2.e8.floor.data.dropout_abs_mean_same_seeds"] == pytest.approx(0.0014)
    # equivalence bounds: the pair's 90% interval reaches 0.001 + 1.833113 * 0.000471405; FLOOR_DIFFS (sd
    # sqrt(30e-6 / 9), se 0.000577350) give the floor +-1.833113 * 0.000577350, equivalent at the same +-0.01
    assert nums[f"{p}.tost.bound"] == pytest.approx(0.001 + 1.833113 * 0.000471405, abs=1e-8)
    assert nums["conv.sst2.e8.floor.dropout.tost.bound"] == pytest.approx(1.833113 * 0.000577350, abs=1e-8)
    assert nums["conv.sst2.e8.floor.dropout.verdict"] == "equivalent"
    assert nums["answer.sst2.floor_bound"] == pytest.approx([1.833113 * 0.000577350] * 2, abs=1e-8)
    assert nums["answer.floor_equivalent"] == nums["answer.floor_decided"] >= 1
    # spread: ACC_DIFFS and FLOOR_DIFFS have sums of squares 20e-6 and 30e-6 about their means 0.001 and 0
    assert nums[f"{p}.spread.var_ratio"] == pytest.approx(20 / 30)
    assert nums[f"{p}.spread.reading"] == "the floor's spread and mean: a dropout re-seed (variance, not bias)"
    # against the floor run of the same seed: ACC_DIFFS - FLOOR_DIFFS = [.004, -.002, .006, 0, .002, 0 x 5] (x 1e-3
    # below): mean 0.001, sum of squares 50e-6, sd sqrt(50e-6 / 9), se 0.000745356; t(0.975, 9) = 2.262157
    assert nums[f"{p}.spread.vs_floor_n"] == 10 and nums[f"{p}.spread.vs_floor_mean"] == pytest.approx(0.001, abs=1e-9)
    assert nums[f"{p}.spread.vs_floor_ci95_low"] == pytest.approx(0.001 - 2.262157 * 0.000745356, abs=1e-8)
    assert nums[f"{p}.spread.vs_floor_ci95_high"] == pytest.approx(0.001 + 2.262157 * 0.000745356, abs=1e-8)
    # disagreement: 1 of 10 labels vs 2 of 10 for the dropout floor
    assert nums[f"{p}.disagreement.mean"] == pytest.approx(0.1) and nums[f"{p}.disagreement.floor_mean"] == pytest.approx(0.2)
    assert nums[f"{p}.disagreement.ratio"] == pytest.approx(0.5)
    assert nums["conv.stsb.e8.pair.default.B2_N4.disagreement.mean"] == pytest.approx(math.sqrt(0.09 / 10))
    # the exact arm: planned 3 seeds, all differences 0 -> equivalent at n = 3 of 3
    c = "conv.sst2.e8.pair.controlled.B2_N4"
    assert (nums[f"{c}.n"], nums[f"{c}.required"], nums[f"{c}.verdict"]) == (3, 3, "equivalent")
    # failures: majority class 0.6 from the dev labels; floor_all seed 5 at 0.55 fails, stays in the table
    assert nums["conv.sst2.baseline"] == pytest.approx(0.6) and nums["conv.sst2.baseline_rule"] == "majority"
    cell = "conv.sst2.e8.cell.floor_all.B8_N1"
    assert (nums[f"{cell}.finished"], nums[f"{cell}.failed"], nums[f"{cell}.failed_seeds"]) == (5, 1, [5])
    assert nums[f"{cell}.failure_rate"] == pytest.approx(0.2)
    # clipped fractions 0.25, 0.5, 0.75, 0, 0.25 for seeds 1..5
    assert nums[f"{cell}.clipped_fraction"] == pytest.approx(0.35)
    assert nums["conv.stsb.baseline"] == 0.0 and nums["conv.stsb.e8.cell.floor_all.B8_N1.failed"] == 1
    # the reference bar: every (8, 1) reference of sst2 is at 0.801..0.810 >= 0.78; stsb's 0.751..0.760 >= 0.70
    assert nums["conv.sst2.e8.cell.default.B8_N1.cleared"] == 10 and nums["conv.stsb.e8.cell.default.B8_N1.cleared"] == 10
    # the answer: all headline comparisons decided, variance not bias; the exact arm's switches from its configs
    assert nums["answer.state"] == "variance" and nums["answer.equivalent"] == 2
    assert nums["answer.exact_arm"] == "controlled"
    # line 2: what one run pair differs by, mean |diff|, beside the dropout floor's: |ACC_DIFFS| and |FLOOR_DIFFS|
    # both sum to 0.014 over 10 seeds
    assert nums["answer.sst2.abs_mean_by_pair"] == pytest.approx([0.0014])
    assert nums["answer.sst2.floor_abs_mean_by_pair"] == pytest.approx([0.0014])
    assert nums["answer.exact_tasks"] == ["sst2", "stsb"] and nums["answer.exact_metrics"] == ["accuracy", "pearson"]
    assert nums["answer.exact_decided"] and nums["answer.pending_runs"] == 0
    assert set(nums["answer.exact_switches"]) == {"--dropout invariant", "--padding window", "--loss_normalization global"}
    # how the runs were made: from config.json / environment.json
    assert nums["conv.sst2.setup.learning_rate"] == 1e-4 and nums["conv.sst2.setup.max_train_samples"] == 64
    assert nums["conv.stsb.setup.max_train_examples"] == 64 and nums["conv.setup.devices"] == "test-cpu"
    assert nums["conv.sst2.e8.setup.total_optimizer_steps"] == 8
    assert nums["conv.sst2.e8.setup.epochs_trained"] == 1.0 and nums["conv.stsb.e8.setup.epochs_trained"] == 0.5
    from bert_accum.study.templates import render

    text = render(nums, {})
    assert [l for l in text.splitlines() if l.startswith("| sst2 | 8 | floor_all | (8, 1) |")][0].endswith("| 35.0% |")
    # line 2: each comparison beside its own floor; sd ratio sqrt(20 / 30) = 0.82
    assert ("Mean |(B, N) − (E, 1)| over seeds, against the same for a dropout re-seed of (E, 1), and the ratio of their "
            "standard deviations: sst2 accuracy: (2, 4) at E = 8 0.0014 against 0.0014 (sd 0.82×); stsb pearson:") in text
    assert "sst2's paired runs label this fraction of examples differently: 0.1000 against 0.2000" in text
    # line 5: accumulating's cost against a re-seed's, as point estimates
    assert "could not be told from another dropout seed's (point estimates of the mean |difference| against a re-seed's: sst2 1.00×" in text
    # the headline arm shares its (E, 1) runs with the floor: Pitman-Morgan, i.e. the correlation of x + y and x - y
    from scipy import stats as sps

    x, y = ACC_DIFFS, FLOOR_DIFFS
    pm = float(sps.pearsonr([a + b for a, b in zip(x, y)], [a - b for a, b in zip(x, y)]).pvalue)
    assert nums[f"{p}.spread.paired"] and nums[f"{p}.spread.equal_spread_p"] == pytest.approx(pm)
    assert f"| PM {pm:.3f} |" in row_of(text, "| sst2 | 8 | default | (2, 4) | 10 |")
    # the controlled arm has its own (E, 1) runs: an independent sample, Brown-Forsythe, its mean read against 0
    c8 = "conv.sst2.e8.pair.controlled.B2_N4"
    assert not nums[f"{c8}.spread.paired"] and math.isnan(nums[f"{c8}.spread.vs_floor_mean"])
    assert ("its first steps match (E, 1) to fp32 round-off; largest |paired difference| at the end sst2 0.0000 accuracy "
            "(0.00× the dropout-only floor's sd), stsb 0.0000 pearson (0.00× the dropout-only floor's sd) over 6 pairs)."
            ) in text
    assert "Arms with runs still to come" not in text
    row = [l for l in text.splitlines() if l.startswith("| sst2 | 8 | default | (2, 4) | 10 | 0.0015 |")][0]
    assert "| +0.0010 [-6.86e-04, 0.0027] |" in row and row.endswith(
        "| the floor's spread and mean: a dropout re-seed (variance, not bias) |")
    assert "E = 8: 8 optimizer steps (0 warmup) over 64 training examples: 0.5 epochs." in text
    assert "E = 8: 8 optimizer steps (0 warmup) over 64 training examples: 1 epoch." in text
    assert ("The same test on the dropout-only floor (two dropout seeds of (E, 1)): 2 of 2 equivalent. Smallest margin "
            "the runs show: sst2: (B, N) ±0.0019, a dropout re-seed ±0.0011 accuracy;") in text
    assert nums["conv.sst2.e8.cell.default.B8_N1.curve.steps"] == [4, 8]
    assert nums["conv.sst2.setup.arm.floor_init.seeds"] == [1, 2, 3, 4, 5]
    assert nums["conv.sst2.setup.arm.floor_init.seed_offsets"] == ["seed +1000", "data_seed +0", "dropout_seed +0"]


def row_of(text: str, start: str) -> str:
    """The one line of `text` that starts with `start`."""
    return next(line for line in text.splitlines() if line.startswith(start))


def test_a_mean_shift_the_floor_shares_is_named_in_line_1(tmp_path):
    """A headline pair read as a dropout re-seed whose own mean is nonetheless not 0 (one-sample t p < 0.05): line 1
    says so and names the floor's shift beside it instead of letting 'variance, not bias' hide it."""
    from bert_accum.study import numbers
    from bert_accum.study.templates import render

    root, grid, _ = write_converged(tmp_path)
    nums = _numbers(root, grid)
    p = "conv.sst2.e8.pair.default.B2_N4"
    assert nums["answer.shifted"] == []
    nums[f"{p}.spread.t_p"] = 0.01
    numbers._answer(nums)
    assert nums["answer.shifted"] == [p]
    line1 = row_of(render(nums, {}), "1. ")
    assert line1.endswith(" sst2 default (2, 4) vs (8, 1): its mean paired difference is not 0 (+0.0010, t p 0.010), "
                          "but a dropout re-seed of the same (E, 1) runs shifts the metric as much (+0.0000): the shift "
                          "belongs to those reference runs' draw, not to accumulating.")


def test_a_shifted_headline_pair_is_read_as_a_bias(tmp_path):
    root, grid, _ = write_converged(tmp_path, diffs=[0.02 + d for d in ACC_DIFFS])
    nums = _numbers(root, grid)
    p = "conv.sst2.e8.pair.default.B2_N4"
    # mean 0.021, 90% CI 0.021 +- 0.000864 lies beyond the 0.01 margin; the 95% interval excludes 0
    assert nums[f"{p}.tost.ci90_low"] > 0.01 and nums[f"{p}.verdict"] == "different"
    assert nums[f"{p}.spread.reading"] == "nonzero mean against the dropout floor's (bias)"
    assert nums[f"{p}.spread.t_p"] < 1e-6 and nums[f"{p}.spread.vs_floor_t_p"] < 1e-6
    assert nums["answer.state"] == "bias" and nums["answer.different"] == 2 and len(nums["answer.biased"]) == 2
    from bert_accum.study.templates import render

    assert ("1. **A bias in every headline comparison** (sst2 default (2, 4) vs (8, 1), stsb default (2, 4) vs (8, 1))"
            in render(nums, {}))


def test_a_partial_grid_states_n_and_never_claims_equivalence_below_ten_pairs(tmp_path):
    skip = {"sst2/default/B2_N4/seed9", "sst2/default/B2_N4/seed10", "stsb/floor_dropout/B8_N1/seed3"}
    root, grid, _ = write_converged(tmp_path, skip=skip, unfinished={"sst2/default/B8_N1/seed8"})
    nums = _numbers(root, grid)
    p = "conv.sst2.e8.pair.default.B2_N4"
    # seeds 8 (reference unfinished), 9 and 10 (not started) are missing: 7 pairs, whatever their TOST says
    assert nums[f"{p}.n"] == 7 and nums[f"{p}.missing_seeds"] == [8, 9, 10]
    assert nums[f"{p}.tost.verdict"] == "equivalent" and nums[f"{p}.verdict"] == "not yet decidable (n = 7 of 10)"
    assert nums[f"{p}.spread.reading"] == "not yet decidable (n = 7 of 10)"
    # 2 tasks x (20 default + 6 controlled + 10 + 3 x 5 floor runs) = 102 planned
    assert (nums["conv.planned"], nums["conv.finished"], nums["conv.unfinished"], nums["conv.missing"]) == (102, 98, 1, 3)
    assert nums["conv.unfinished_names"] == ["sst2/default/B8_N1/seed8"]
    cell = "conv.sst2.e8.cell.default.B8_N1"
    assert nums[f"{cell}.unfinished_seeds"] == [8] and nums[f"{cell}.missing_seeds"] == []
    assert nums["conv.stsb.e8.floor.dropout.n"] == 9
    # the decided stsb pair is stated, the sst2 pair waits (its TOST result is not claimed)
    assert nums["answer.state"] == "partial" and nums["answer.undecided"] == 1 and nums["answer.equivalent"] == 1
    assert nums["answer.waiting_pairs"] == [p] and p not in nums["answer.decided_pairs"]


def _build(root: Path, grid: Path, out: Path, **kw):
    return build_report(ReportInputs(runs_dirs=[str(root)], grids=[str(grid)], probe_dir=kw.pop("probe_dir", None),
                                     batchnorm_dir=None, output_dir=str(out), command="python scripts/report.py x", **kw))


def test_the_report_opens_with_the_answer_and_every_number_is_in_numbers_json(tmp_path):
    import re

    root, grid, _ = write_converged(tmp_path, skip={"sst2/default/B2_N4/seed10"})
    for task, ratio in (("sst2", 0.95), ("rte", 0.5)):
        (tmp_path / "probe" / task).mkdir(parents=True)
        (tmp_path / "probe" / task / "probe.csv").write_text(
            "# command: python scripts/probe.py | git_commit: abc\ntask,objective,arm,micro_batch_size,accumulation_steps,"
            f"rel_l2,ratio_to_floor\n{task},classification,controlled_dropout_standard,2,4,0.4,{ratio}\n"
            f"{task},classification,controlled,2,4,1e-7,2e-7\n")
    report = _build(root, grid, tmp_path / "out", probe_dir=str(tmp_path / "probe"))
    text = report.read_text()
    nums = json.loads((tmp_path / "out" / "numbers.json").read_text())
    assert nums["provenance"].startswith("command: python scripts/report.py x | git_commit: ")
    answer = text.index("## The answer")
    assert answer < text.index("## How the runs were made") < text.index("## 1. The converged study `conv`")
    lines = text[answer:text.index("## How the runs were made")].strip().splitlines()[2:]
    assert len(lines) == 5 and [ln[:2] for ln in lines] == ["1.", "2.", "3.", "4.", "5."]
    # sst2's headline pair has 9 of 10: nothing claimed for it; stsb's 10 of 10 is equivalent
    # the spread the one decided comparison leaves possible: the top of its variance ratio's 95% interval
    top = nums["conv.stsb.e8.pair.default.B2_N4.spread.var_ratio_high"]
    assert nums["answer.var_ratio_high"] == top and 1 < top < 100
    assert ("1. **Decided for 1 of 2 headline comparisons (stsb default (2, 4) vs (8, 1)): variance, not bias: "
            "the paired differences cannot be told from the dropout-only floor's, in spread or in mean; a variance up "
            f"to {top:.2f}× the floor's is not ruled out, as if dropout had been re-seeded.**") in text
    assert "Still waiting: sst2 default (2, 4) vs (8, 1) (n = 9 of 10 pairs so far, no verdict yet)." in text
    assert "| sst2 | 8 | default | (2, 4) vs (8, 1) | 9 of 10 |" in text and "not yet decidable (n = 9 of 10) |" in text
    assert nums["conv.sst2.e8.pair.default.B2_N4.verdict"] == "not yet decidable (n = 9 of 10)"
    # an undecided comparison shows no bound and no test results, which would read as verdicts
    tost_row, spread_row = [ln for ln in text.splitlines() if ln.startswith("| sst2 | 8 | default | (2, 4)")][:2]
    assert tost_row.endswith("| not yet decidable (n = 9 of 10) | — |")
    assert spread_row.endswith("| — | — | — | — | — | not yet decidable (n = 9 of 10) |")
    assert "| stsb | 8 | default | (2, 4) vs (8, 1) | 10 of 10 | +0.0010 |" in text
    # a task is shown its own probe table only
    assert ("- sst2, one step (probe `sst2` of this task; the relative L2 distance of the first accumulated gradient "
            "from (E, 1)'s, as a ratio to that of a dropout re-seed of (E, 1)): standard dropout alone 0.950,") in text
    assert "- stsb: no probe table of this task and objective" in text
    # how the runs were made comes from config.json / environment.json, not from prose
    assert "learning rate 0.0001 (linear" in text and "on test-cpu at commit abc123 with" in text
    assert "3.11, 1 torch thread; the" in text and "optimizer adamw_torch" in text
    # the grid file's record of design changes, printed where the report says how the runs were made
    assert nums["conv.changes"] == ["2026-12-01, after seed 1's (8,1) run: more training examples; that run was rerun."]
    setup = text[text.index("## How the runs were made"):text.index("## 1. ")]
    assert "(recorded in `" in setup and "- 2026-12-01, after seed 1's (8,1) run: more training examples" in setup
    assert "the first 64 training examples of the file (max_train_samples)" in text
    assert "training stops after 64 examples of each seed's shuffled order (max_train_examples)" in text
    # seed 10's (2, 4) run was never made: the setup says which arm waits and that the answer may change
    assert ("Arms with runs still to come: default. Some of them are headline arms or dropout-only floors: lines 1–3 "
            "of the answer may change.") in text
    assert "missing seeds" in text and "| sst2 | 8 | default | (2, 4) | 10 | 9 | none | 10 |" in text
    assert "- sst2: trivial baseline 0.6000 (accuracy of the majority class over the 10 dev labels" in text
    # no range whose two ends print the same, no unfilled field
    assert not re.search(r"(?<![\w.])(-?[\d.e+-]+)–\1(?![\w.])", text) and "{" not in text
    for fig in ("forest_conv.png", "scatter_conv.png", "curves_conv.png"):
        assert (tmp_path / "out/study/figures" / fig).stat().st_size > 1000 and f"(study/figures/{fig})" in text
    tost = (tmp_path / "out/study/conv_tost.csv").read_text().splitlines()
    assert tost[0].startswith("# command: python scripts/report.py x | git_commit: ") and len(tost) == 2 + 4


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "steps.jsonl").write_text('{"optimizer_step": 1}\n{"optimizer_step": 2\n{"optimizer_step": 3}\n'),
     "steps.jsonl line 2: not a JSON object"),
    (lambda d: (d / "config.json").unlink(), "final_metrics.json without config.json"),
    (lambda d: (d / "predictions.json").write_text('{"optimizer_step": 8,\n "splits": }'), "predictions.json line 2: invalid JSON"),
    (lambda d: (d / "eval.jsonl").write_text('{"accuracy": 0.8}\n\n'), "eval.jsonl line 2: not a JSON object"),
])
def test_a_malformed_run_folder_is_refused_before_anything_is_written(converged, tmp_path, damage, message):
    from bert_accum.errors import BertAccumError

    root, grid, _ = converged
    damage(root / "sst2/default/B2_N4/seed3")
    with pytest.raises(BertAccumError, match=message) as err:
        _build(root, grid, tmp_path / "out")
    assert "\n" not in str(err.value) and "sst2/default/B2_N4/seed3" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_runs_that_differ_beyond_the_compared_factor_are_never_paired(study, converged, tmp_path):
    from bert_accum.errors import BertAccumError

    # early-training study (no grid): the (8, 4) run of seed 2 was made with another learning rate than its cell ...
    def set_lr(seed: int) -> None:
        path = study / f"runs/study/rte/default/B8_N4/seed{seed}/config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "learning_rate": 5e-5}))

    set_lr(2)
    with pytest.raises(BertAccumError, match=r"refusing to pair .*B8_N4/seed2 with .*B8_N4/seed1: besides "
                                             r"data_seed, dropout_seed, seed they differ in learning_rate"):
        summarise(load_runs([study / "runs/study"]))
    # ... and the whole (8, 4) cell with another one than its (32, 1) reference
    set_lr(1)
    set_lr(3)
    with pytest.raises(BertAccumError, match=r"refusing to pair .*B8_N4/seed1 with .*B32_N1/seed1: besides "
                                             r"accumulation_steps, micro_batch_size they differ in learning_rate"):
        summarise(load_runs([study / "runs/study"]))
    # converged study: a run whose settings are not its grid cell's (another data source size)
    root, grid, _ = converged
    path = root / "stsb/floor_data/B8_N1/seed2/config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "max_train_examples": 128}))
    with pytest.raises(BertAccumError, match="other settings than its cell .*max_train_examples"):
        _build(root, grid, tmp_path / "out")


def test_figures_are_moved_into_place_whole_or_not_at_all(converged, tmp_path, monkeypatch):
    from bert_accum.study import figures

    root, grid, _ = converged
    out = tmp_path / "out"
    _build(root, grid, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "study/figures").iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib fell over")

    monkeypatch.setattr(figures, "curves", broken)
    with pytest.raises(RuntimeError):
        _build(root, grid, out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "study/figures").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(RuntimeError):
        _build(root, grid, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_default_output_is_a_new_folder_under_reports(converged, tmp_path, monkeypatch):
    root, grid, _ = converged
    monkeypatch.chdir(tmp_path)
    report = build_report(ReportInputs(runs_dirs=[str(root)], grids=[str(grid)], probe_dir=None, batchnorm_dir=None,
                                       command="x"))
    assert report.parent.parent == Path("reports") and report.is_file()


def test_cli_help_exits_zero():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--output_dir" in done.stdout and "--grid" in done.stdout


def test_a_probe_table_holds_one_task(tmp_path):
    from bert_accum.errors import BertAccumError
    from bert_accum.study.report import read_probe

    path = tmp_path / "probe.csv"
    path.write_text("task,objective,arm,rel_l2,ratio_to_floor\nrte,classification,default,0.5,1.0\n"
                    "sst2,classification,default,0.4,0.9\n")
    with pytest.raises(BertAccumError, match="one probe table per task"):
        read_probe(path)


def test_the_committed_early_tables_are_read_back():
    from bert_accum.study.report import read_early_tables

    root = Path(__file__).resolve().parents[1] / "results" / "study"
    studies = {s.name: s for s in read_early_tables(root)}
    assert sorted(studies) == ["study", "study_bugs"]
    bug = next(s for s in studies["study_bugs"].summaries if s.arm == "bug_scheduler_in_micro_steps")
    assert bug.n_pairs == 3 and bug.diff_mean == pytest.approx(0.0745, abs=1e-4) and bug.ci_excludes_zero
    assert len(studies["study"].runs) == 108 and {r["optimizer_steps"] for r in studies["study"].runs} == {20}
    from bert_accum.study import numbers

    nums = numbers.compute([], list(studies.values()), {}, None, "command: test | git_commit: x")
    # the bug recorded under its old name is reported under today's, in the table and in the answer alike
    k = "early.study_bugs.cell.sst2.bug_scheduler_in_micro_steps.B8_N4"
    assert nums[f"{k}.bug"] == "schedule_sized_in_micro_batches" and nums[f"{k}.arm"] == "bug_schedule_sized_in_micro_batches"
    assert "bug_schedule_sized_in_micro_batches" in nums["early.study_bugs.arms"]
    # CoLA's MCC is 0 in every 20-step classification run: those cells cannot show a difference and are named as such
    constant = nums["early.study.constant"]
    assert constant and all(nums[f"early.study.cell.{c}.std"] == 0 == nums[f"early.study.cell.{c}.seed_std"] for c in constant)
    cola = {c for c in nums["early.study.cells"] if c.startswith("cola.") and nums[f"early.study.cell.{c}.metric"] == "matthews_correlation"
            and nums[f"early.study.cell.{c}.n_pairs"] > 1}
    assert cola and cola <= set(constant)
    # an early arm's |paired difference| is given per task, in that task's metric, never averaged across metrics
    arm = "early.arm.default"
    assert nums[f"{arm}.absdiff_tasks"] == ["cola", "mrpc", "rte", "sst2", "stsb"]
    assert nums[f"{arm}.absdiff_metrics"] == ["matthews_correlation", "f1", "accuracy", "accuracy", "pearson"]
    sst2 = [abs(s.diff_mean) for s in studies["study"].summaries if s.task == "sst2" and s.arm == "default" and s.n_pairs]
    assert nums[f"{arm}.absdiff_by_task"][3] == pytest.approx(sum(sst2) / len(sst2)) and nums[f"{arm}.absdiff_by_task"][0] == 0


def test_a_section_of_another_study_script_is_included_with_its_provenance(converged, tmp_path):
    from bert_accum.errors import BertAccumError

    root, grid, _ = converged
    section = tmp_path / "trainer.md"
    section.write_text("<!-- command: python scripts/trainer_study.py | git_commit: abc -->\n## The Hugging Face Trainer\n\n"
                       "The stock Trainer's (2,4) gradient was 4.000x the (8,1) one.\n\n![norms](grad_norms.png) "
                       "[upstream](https://github.com/huggingface/transformers)\n\n## Its own second heading\n")
    text = _build(root, grid, tmp_path / "out", sections=[str(section)]).read_text()
    assert "\n## Its own second heading\n" in text  # only an included section's first heading is numbered
    body = text.index("## 2. The Hugging Face Trainer")
    # the evidence sections are numbered in the order they appear, the included one among them
    numbers = [ln.split(".")[0] for ln in text.splitlines() if ln.startswith("## ") and ln[3].isdigit()]
    assert len(numbers) >= 3 and numbers == [f"## {i}" for i in range(1, len(numbers) + 1)]
    assert text.index("## 1. The converged study") < body < text.index("## 3. Why accumulation drifts")
    assert "4.000x" in text and text.index("command: python scripts/trainer_study.py | git_commit: abc", body) > body
    # the section's own files are linked from where REPORT.md is, not from where the section was written
    assert "![norms](../grad_norms.png)" in text and "(https://github.com/huggingface/transformers)" in text
    unheaded = tmp_path / "plain.md"
    unheaded.write_text("## Typed by hand\n")
    with pytest.raises(BertAccumError, match="provenance"):
        _build(root, grid, tmp_path / "out2", sections=[str(unheaded)])
    assert not (tmp_path / "out2").exists()


def test_the_bias_study_answers_line_4_and_is_the_first_included_section(converged, tmp_path):
    """--biases DIR: the bias study's verdicts at the end of training close the answer's line 4 (a check of a backend
    against the loop is no test of a bias and stays out), and its biases.md comes right after the converged study."""
    import json

    from bert_accum.errors import BertAccumError
    from bert_accum.study.bias_study import PAIR_COLUMNS
    from bert_accum.study.plumbing import write_csv

    root, grid, _ = converged
    nan = float("nan")

    def row(bias, optimizer, b, n_acc, metric, n, planned, diff, lo, hi, limit, p_holm, verdict):
        return {"bias": bias, "arm": bias, "reference": "correct", "optimizer": optimizer, "task": "sst2",
                "micro_batch_size": b, "accumulation_steps": n_acc, "metric": metric, "n": n,
                "reference_below_bar": 0, "planned": planned,
                "reference_mean": 0.8, "mean_diff": diff, "ci95_lo": lo, "ci95_hi": hi, "detection_limit": limit,
                "max_abs_diff": abs(diff), "p_value": p_holm, "p_holm": p_holm, "verdict": verdict}

    rows = [row("mean_of_means", "AdamW", 2, 16, "masked_accuracy", 5, 5, -0.012, -0.02, -0.004, 0.02, 0.01, "a bias"),
            row("clip_per_micro_batch", "AdamW", 8, 4, "accuracy", 5, 5, 0.001, -0.005, 0.006, 0.006, 1.0,
                "below the detection limit"),
            row("clip_per_micro_batch", "AdamW", 2, 16, "accuracy", 5, 5, -0.002, -0.009, 0.005, 0.009, 1.0,
                "below the detection limit"),
            row("last_window_1_over_n", "plain SGD", 2, 16, "accuracy", 3, 5, 0.0, nan, nan, nan, nan,
                "not yet decidable (n = 3 of 5)"),
            row("trainer_vs_loop", "AdamW", 2, 16, "masked_accuracy", 3, 3, 0.0, nan, nan, nan, nan, "a check")]
    rows.append(row("step_mod_boundaries", "plain SGD", 2, 16, "accuracy", 5, 5, -0.2, -0.4, 0.0, 0.4, nan,
                    "not at convergence (reference below the bar in 2 of 5)"))
    rows[-1]["reference_below_bar"] = 2
    biases = tmp_path / "biases"
    biases.mkdir()
    write_csv(biases / "paired.csv", rows, "command: bias-study x | git_commit: abc", PAIR_COLUMNS)
    (biases / "biases.md").write_text("<!-- command: bias-study x | git_commit: abc -->\n"
                                      "## The real biases at the end of training\n\nTable.\n")
    trainer = tmp_path / "trainer.md"
    trainer.write_text("<!-- command: trainer_study | git_commit: abc -->\n## The Hugging Face Trainer\n")
    out = _build(root, grid, tmp_path / "out", biases=str(biases), sections=[str(trainer)])
    text = out.read_text()
    line4 = next(ln for ln in text.splitlines() if ln.startswith("4. "))
    assert line4.endswith(
        " At the end of training (the bias study: each bias against its fix, paired by seed, Holm-adjusted over 5 "
        "comparisons): a bias: mean_of_means (AdamW, (2,16), n = 5: -0.0120 [-0.0200, -0.0040] masked_accuracy); "
        "below the detection limit: clip_per_micro_batch (no effect beyond ±0.0060–0.0090 accuracy); "
        "1 not at convergence (their correct runs did not all reach the grid's reference bar: step_mod_boundaries "
        "(plain SGD, (2,16)) 2 of 5); "
        "1 not yet decidable (3 of 5 pairs finished).")
    # line 5 closes with the fix of each bias shown, next to its effect
    line5 = next(ln for ln in text.splitlines() if ln.startswith("5. "))
    assert line5.endswith(
        " Where the bias study shows a bias at the end of training (section 2), fix it: mean_of_means (-0.0120 at "
        "(2,16) masked_accuracy): with a per-token loss, divide the window's token-loss sum by its token count "
        "(`--loss_normalization global`), not each micro-batch's mean by N.")
    assert (text.index("## 1. The converged study") < text.index("## 2. The real biases at the end of training")
            < text.index("## 3. The Hugging Face Trainer"))
    nums = json.loads((out.parent / "numbers.json").read_text())
    assert nums["biases.comparisons"] == 5 and nums["biases.waiting"] == 1
    assert nums["biases.below"] == [{"bias": "clip_per_micro_batch", "metric": "accuracy", "limit": [0.006, 0.009],
                                     "comparisons": 2, "identical": 0}]
    (biases / "paired.csv").unlink()
    with pytest.raises(BertAccumError, match="paired.csv"):
        _build(root, grid, tmp_path / "out2", biases=str(biases))


def test_comparisons_whose_pairs_all_ended_identical_are_counted_apart_from_detection_limits(converged, tmp_path):
    """A comparison where every pair ended on the same final metric has no interval (its limit is 0): line 4 says
    so in words and keeps it out of the ± range, instead of printing "±0.0000–0.0086"."""
    import json

    from bert_accum.study.bias_study import PAIR_COLUMNS
    from bert_accum.study.plumbing import write_csv

    root, grid, _ = converged

    def row(bias, optimizer, b, n_acc, diff, limit, max_abs):
        return {"bias": bias, "arm": bias, "reference": "correct", "optimizer": optimizer, "task": "sst2",
                "micro_batch_size": b, "accumulation_steps": n_acc, "metric": "accuracy", "n": 5,
                "reference_below_bar": 0, "planned": 5, "reference_mean": 0.8, "mean_diff": diff,
                "ci95_lo": diff - limit, "ci95_hi": diff + limit, "detection_limit": limit, "max_abs_diff": max_abs,
                "p_value": 1.0, "p_holm": 1.0, "verdict": "below the detection limit"}

    rows = [row("last_window_1_over_n", "AdamW", 2, 16, 0.0, 0.0, 0.0),
            row("last_window_1_over_n", "AdamW", 8, 4, 0.0, 0.0, 0.0),
            row("last_window_1_over_n", "plain SGD", 2, 16, -0.003, 0.0086, 0.0103),
            row("schedule_sized_in_micro_batches", "AdamW", 2, 16, 0.0, 0.0, 0.0)]
    biases = tmp_path / "biases"
    biases.mkdir()
    write_csv(biases / "paired.csv", rows, "command: bias-study x | git_commit: abc", PAIR_COLUMNS)
    (biases / "biases.md").write_text("<!-- command: bias-study x | git_commit: abc -->\n## Biases\n\nTable.\n")
    out = _build(root, grid, tmp_path / "out", biases=str(biases))
    line4 = next(ln for ln in out.read_text().splitlines() if ln.startswith("4. "))
    assert line4.endswith(
        "comparisons): none shown; below the detection limit: last_window_1_over_n (no effect beyond ±0.0086 "
        "accuracy; the same final accuracy in every pair of 2 of its 3 comparisons), schedule_sized_in_micro_batches "
        "(the same final accuracy in every pair of its one comparison).")
    assert "0.0000" not in line4
    nums = json.loads((out.parent / "numbers.json").read_text())
    assert nums["biases.below"] == [
        {"bias": "last_window_1_over_n", "metric": "accuracy", "limit": [0.0086, 0.0086], "comparisons": 3,
         "identical": 2},
        {"bias": "schedule_sized_in_micro_batches", "metric": "accuracy", "limit": None, "comparisons": 1,
         "identical": 1}]


def test_rebase_links_moves_relative_targets_only():
    from bert_accum.study.report import rebase_links

    body = ('![a](f.png) [t](lr.png "title") [![i](i.png)](big.png) [u](HTTPS://x.org) [h](#part) [p](/abs/x) '
            '`x[0](1)`\n```\n[c](code.png)\n```')
    got = rebase_links(body, Path("results/biases"), Path("results"))
    assert got == ('![a](biases/f.png) [t](biases/lr.png "title") [![i](biases/i.png)](biases/big.png) '
                   '[u](HTTPS://x.org) [h](#part) [p](/abs/x) `x[0](1)`\n```\n[c](code.png)\n```')


def test_regenerating_into_the_early_tables_folder_keeps_them(converged, tmp_path):
    """--early_csv results/study with --output_dir results: the converged study's tables get their own names, so
    the committed early tables the report reads back are not replaced by it."""
    root, grid, _ = converged
    out = tmp_path / "out"
    _build(root, grid, out)
    early = out / "study"
    (early / "runs.csv").write_text("# early\nstudy,task\nstudy,rte\n")
    _build(root, grid, out)
    assert (early / "runs.csv").read_text() == "# early\nstudy,task\nstudy,rte\n"
    assert (early / "conv_runs.csv").read_text().startswith("# command: ")


def test_the_per_seed_scatter_spans_the_runs_and_threshold_not_a_far_away_baseline():
    from bert_accum.study.figures import scatter_limits

    # SST-2-like: runs at 0.80-0.85, threshold 0.78; the 0.509 majority baseline is not allowed to stretch the axes
    lo, hi = scatter_limits([0.81, 0.85, float("nan"), 0.80], 0.78)
    assert (lo, hi) == pytest.approx((0.78 - 0.0035, 0.85 + 0.0035)) and lo > 0.509
    # no finished run: a unit square, not a range collapsed onto the threshold
    assert scatter_limits([], 0.7) == pytest.approx((-0.05, 1.05))


def test_the_forest_plot_shows_each_pair_beside_the_dropout_only_floor_of_its_e(converged):
    from bert_accum.study.figures import forest_rows

    root, grid, _ = converged
    nums = _numbers(root, grid)
    rows = forest_rows(nums, "conv", "sst2")
    assert [(r["kind"], r["label"]) for r in rows] == [
        ("headline", "default (B=2, N=4) vs (B=8, N=1)"), ("other", "controlled (B=2, N=4) vs (B=8, N=1)"),
        ("floor", "dropout-only floor: floor_dropout (B=8, N=1) vs default")]
    floor = rows[-1]
    # FLOOR_DIFFS: mean 0, 90% interval +-1.833113 * 0.000577350, judged at the pairs' margin
    assert (floor["n"], floor["verdict"]) == (10, "equivalent") and floor["mean"] == pytest.approx(0.0, abs=1e-9)
    assert floor["ci90_high"] == pytest.approx(1.833113 * 0.000577350, abs=1e-8)
    assert rows[0]["ci90_low"] == pytest.approx(0.001 - 1.833113 * 0.000471405, abs=1e-8)


def test_not_shown_equivalent_beside_a_floor_that_fails_too_is_read_as_too_few_seeds(tmp_path, monkeypatch):
    import sys

    from bert_accum.study.templates import render

    # ten times the noise: the pairs' 90% interval reaches 0.01 + 1.833113 * 0.00471405 = 0.0186 and the floor's
    # +-1.833113 * 0.00577350 = 0.0106, both past the +-0.01 margin
    monkeypatch.setattr(sys.modules[__name__], "FLOOR_DIFFS", [10 * d for d in FLOOR_DIFFS])
    root, grid, _ = write_converged(tmp_path, diffs=[10 * d for d in ACC_DIFFS])
    nums = _numbers(root, grid)
    p = "conv.sst2.e8.pair.default.B2_N4"
    assert nums[f"{p}.verdict"] == "not shown equivalent" and nums[f"{p}.tost.bound"] == pytest.approx(0.0186, abs=1e-4)
    assert nums["conv.sst2.e8.floor.dropout.verdict"] == "not shown equivalent"
    assert nums["answer.unresolved"] == [p, "conv.stsb.e8.pair.default.B2_N4"]
    assert ("For sst2 default (2, 4) vs (8, 1), stsb default (2, 4) vs (8, 1) the dropout-only floor is not shown "
            "equivalent either: ±margin is finer than 10 seeds can resolve") in render(nums, {})


def test_not_shown_equivalent_beside_an_equivalent_floor_is_not_excused(tmp_path):
    root, grid, _ = write_converged(tmp_path, diffs=[10 * d for d in ACC_DIFFS])
    nums = _numbers(root, grid)
    assert nums["conv.sst2.e8.pair.default.B2_N4.verdict"] == "not shown equivalent"
    assert nums["conv.sst2.e8.floor.dropout.verdict"] == "equivalent" and nums["answer.unresolved"] == []


def test_the_step_at_which_paired_runs_part_is_read_from_their_training_losses(tmp_path):
    """A controlled pair whose per-step loss gap grows tenfold a step (3e-7 ... 3 relative): it leaves 1e-4 at step
    4 and 1e-2 at step 6; the answer names the first parting and the final difference against the floor's sd."""
    root, grid, _ = write_converged(tmp_path)
    run = root / "sst2" / "controlled" / "B2_N4" / "seed1"
    (run / "steps.jsonl").write_text("".join(
        json.dumps({"optimizer_step": s, "loss": 0.5 * (1 + 3 * 10.0 ** (s - 8)), "grad_norm": 1.0, "learning_rate": 1e-4})
        + "\n" for s in range(1, 9)))
    nums = _numbers(root, grid)
    t = "conv.sst2.e8.pair.controlled.B2_N4.trajectory"
    assert nums[f"{t}.steps"] == [8, 8, 8] and nums[f"{t}.apart_1e4"] == [4, None, None]
    assert nums[f"{t}.apart_1e2"] == [6, None, None] and nums[f"{t}.max_rel"][0] == pytest.approx(3.0)
    assert nums[f"{t}.max_rel"][1] == 0.0
    # the headline pair's losses are equal at every step in these folders: never apart
    assert nums["conv.sst2.e8.pair.default.B2_N4.trajectory.apart_1e4"] == [None] * 10
    assert (nums["answer.exact_parted"], nums["answer.exact_parted_steps"], nums["answer.exact_parted_where"]) == (
        1, [6, 6], ["sst2 E = 8 (8 steps)"])
    from bert_accum.study.numbers import converged_tables

    row = next(r for r in converged_tables(nums, "conv")["trajectory"] if r["cell"] == "controlled.B2_N4" and r["seed"] == 1)
    assert (row["task"], row["apart_1e4"], row["apart_1e2"]) == ("sst2", 4, 6) and row["first_rel"] == pytest.approx(3e-7)
    from bert_accum.study.templates import render

    text = render(nums, {})
    assert "its first steps match (E, 1) to fp32 round-off;" in text
    assert ("over a run the gap can still grow until pairs part: the training losses of 1 of its 6 pairs differ by 1% "
            "from step 6 on, in sst2 E = 8 (8 steps))." in text)
    assert "| sst2 | 8 | controlled | (2, 4) vs (8, 1) | 1 | 8 | 4 | 6 | 3.00 | +0.0000 | 0.00 |" in text
    # the mechanism section's whole-run line for fp32 order: 1 of the arm's 6 seed pairs parts
    assert ("- Over whole runs (arm `controlled` of the converged study, whose first steps match to round-off): 1 of 6 "
            "pairs part, in sst2 E = 8 (8 steps): their training losses are 1% apart from step 6 on,") in text
    assert "| sst2 | 8 | default | (2, 4) vs (8, 1) | median of 10 | 8 | none of 10 | none of 10 | 0.00 |" in text
    # a pair 0.2% apart from its first step does not start at round-off: the arm is only the closest one
    run2 = root / "sst2" / "controlled" / "B2_N4" / "seed2"
    (run2 / "steps.jsonl").write_text("".join(
        json.dumps({"optimizer_step": s, "loss": 0.501, "grad_norm": 1.0, "learning_rate": 1e-4}) + "\n" for s in range(1, 9)))
    nums = _numbers(root, grid)
    assert not nums["answer.exact_roundoff"] and nums["answer.exact_first_gap"] == pytest.approx(0.002)
    assert "(arm `controlled`: the closest arm, though its first steps differ from (E, 1)'s by up to 0.002" in render(nums, {})
