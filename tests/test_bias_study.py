"""The bias study pairs each arm with its reference arm cell by cell and writes tables, figures and a section."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from bert_accum.core.data import load_eval_labels
from bert_accum.core.tasks import get_task
from bert_accum.errors import BertAccumError
from bert_accum.study.bias_study import judge, bias_of, holm, load_study, pair_rows, run_study, verdict
from bert_accum.core.train import run
from bert_accum.study.grid import GridSpec, expand


@pytest.fixture(scope="module")
def bug_grid(tmp_path_factory, tiny_model_dir, synthetic_glue_dir):
    root = tmp_path_factory.mktemp("bias")
    raw = {
        "name": "bugs", "runs_dir": str(root / "runs" / "bugs"), "tasks": ["synthetic"], "batches": [[2, 4]],
        "seeds": [1, 2, 3],
        "arms": {"correct": {}, "scheduler_stepped_per_micro_batch": {"bug_modes": ["scheduler_stepped_per_micro_batch"]},
                 "sgd_correct": {"optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 0},
                 "sgd_last_window_1_over_n": {"optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 0,
                                              "bug_modes": ["last_window_1_over_n"]}},
        "comparisons": {"scheduler_stepped_per_micro_batch": "correct", "sgd_last_window_1_over_n": "sgd_correct"},
        "reference_thresholds": {"synthetic": {"accuracy": 0.0}},
        "changes": ["2026-12-02, after seed 1: the SGD arms'\n learning rate went from 0.1 to 0.05."],
        "shared": {"glue_dir": synthetic_glue_dir, "model_name_or_path": tiny_model_dir, "max_length": 32,
                   "max_train_samples": 20, "num_train_epochs": 1, "warmup_ratio": 0.2, "learning_rate": 1e-3,
                   "eval_steps": 0.5, "per_device_eval_batch_size": 32,
                   "fingerprint_steps": [0, 3], "fingerprint_dim": 64},
    }
    grid = root / "bugs.yaml"
    grid.write_text(yaml.safe_dump(raw, sort_keys=False))
    # the grid's own cells, trained in this process (the grid runner's subprocesses are tested in test_grid.py)
    for cell in expand(GridSpec.load(grid))[:-1]:  # seed 3's last cell left unfinished
        run(cell.config)
    return root, grid


def bug_grid_glue(grid: Path) -> str:
    return yaml.safe_load(grid.read_text())["shared"]["glue_dir"]


def test_pairs_are_cells_of_the_same_seed_and_unfinished_ones_are_counted(bug_grid):
    root, grid = bug_grid
    study = load_study(root / "runs" / "bugs", grid)
    rows = {r["arm"]: r for r in pair_rows(study)}
    sched, sgd = rows["scheduler_stepped_per_micro_batch"], rows["sgd_last_window_1_over_n"]
    assert (sched["n"], sched["planned"], sgd["n"], sgd["planned"]) == (3, 3, 2, 3)
    by = {(r.arm, r.cell_seed): r.metric for r in study.runs}
    diffs = [by[("sgd_last_window_1_over_n", s)] - by[("sgd_correct", s)] for s in (1, 2)]
    assert sgd["mean_diff"] == pytest.approx(sum(diffs) / 2)
    assert sgd["bias"] == "last_window_1_over_n" and sched["bias"] == "scheduler_stepped_per_micro_batch"
    # 20 examples at E = 8: windows of 8, 8, 4; the schedule stepped per micro-batch ends at a lower LR
    assert sched["final_lr_arm"] < sched["final_lr_reference"]
    assert sgd["optimizer"] == "plain SGD" and sched["optimizer"] == "AdamW"
    assert sched["param_distance"] > 0  # another learning-rate sequence ends elsewhere


def test_outputs_are_headed_and_the_section_names_mechanism_and_fix(bug_grid, tmp_path):
    root, grid = bug_grid
    files = run_study([(root / "runs" / "bugs", grid)], tmp_path / "out", command="bias-study test")
    for key in ("pairs", "lr", "curves"):
        first = files[key].read_text().splitlines()[0]
        assert first.startswith("# command: bias-study test | git_commit:")
    with files["pairs"].open() as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert {r["bias"] for r in rows} == {"scheduler_stepped_per_micro_batch", "last_window_1_over_n"}
    with files["lr"].open() as fh:
        lr = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    # each LR row names its grid, so two grids at the same (B, N) are never drawn in one panel
    assert {(r["study"], r["arm"]) for r in lr} >= {("bugs", "correct"), ("bugs", "scheduler_stepped_per_micro_batch")}
    text = files["markdown"].read_text()
    assert text.startswith("<!-- command: bias-study test")
    assert "### `lr_scheduler.step()` on every micro-batch" in text and "**Fix.**" in text
    assert "11 of 12 planned runs finished" in text
    # the grid's line states the trivial baseline the reference runs must beat: here the majority class of the dev set
    labels = load_eval_labels(get_task("synthetic"), glue_dir=bug_grid_glue(grid))["validation"]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    assert (f"synthetic trivial baseline {majority:.4f} accuracy (the best constant predictor over the "
            f"{len(labels)} dev labels)") in text
    # how each reference arm trained, read from its runs: 20 examples at E = 8 are ceil(20 / 8) = 3 optimizer steps;
    # the clipping threshold is the default 1.0 for AdamW and none for the SGD arms (max_grad_norm 0)
    assert ("  - How `correct` was trained (3 runs): synthetic classification, the first 20 training examples (file "
            "order), 1 epoch: 3 optimizer steps at effective batch 8; AdamW") in text
    assert "learning rate 0.001, linear schedule after 1 warmup steps; gradient clipping at max_grad_norm 1.0;" in text
    assert ("Compared with it, each differing only in the settings named: `scheduler_stepped_per_micro_batch` "
            "(bug_modes scheduler_stepped_per_micro_batch).") in text
    # seed 3's sgd_correct ran, its sgd_last_window_1_over_n did not: the reference still has its 3 runs
    assert ("  - How `sgd_correct` was trained (3 runs): synthetic classification, the first 20 training examples "
            "(file order), 1 epoch: 3 optimizer steps at effective batch 8; plain SGD (`sgd`), learning rate 0.05, "
            "linear schedule after 1 warmup steps; no gradient clipping;") in text
    # the grid's record of design changes travels with its runs, folded onto one line
    assert ("  - Design change after runs had started (recorded in the grid file under `changes`): 2026-12-02, "
            "after seed 1: the SGD arms' learning rate went from 0.1 to 0.05.") in text
    # the answer first; the comparison short of its planned pairs gets no verdict and stays out of the Holm family
    rows = {r["arm"]: r for r in rows}
    assert rows["sgd_last_window_1_over_n"]["verdict"] == "not yet decidable (n = 2 of 3)"
    assert rows["sgd_last_window_1_over_n"]["p_holm"] == ""  # NaN: not tested
    # the family is the planned one from the start: the unfinished comparison counts as p = 1, so the finished one's
    # Holm p is twice its own (two comparisons), capped at 1
    sched = rows["scheduler_stepped_per_micro_batch"]
    assert float(sched["p_holm"]) == pytest.approx(min(1.0, 2 * float(sched["p_value"])))
    summary = text.split("## The real biases at the end of training")[1].strip().splitlines()[0]
    assert summary.startswith("**In short.** Of 2 comparisons of a bias with its fix, ")
    assert summary.endswith("1 waits for pairs (2 of 3 finished).")
    assert files["lr_figure"].stat().st_size > 0 and files["curves_figure"].stat().st_size > 0


def test_a_comparison_without_pairs_names_its_optimizer_from_the_plan(bug_grid):
    """Early in a grid an arm has no finished run: its row still says which optimizer it will use, and its bullet
    says it waits instead of printing an empty effect."""
    from bert_accum.study.bias_study import markdown

    root, grid = bug_grid
    study = load_study(root / "runs" / "bugs", grid)
    study.runs = [r for r in study.runs if not r.arm.startswith("sgd_")]
    rows = {r["arm"]: r for r in pair_rows(study)}
    sgd = rows["sgd_last_window_1_over_n"]
    assert (sgd["n"], sgd["optimizer"], sgd["verdict"]) == (0, "plain SGD", "not yet decidable (n = 0 of 3)")
    text = markdown([study], list(rows.values()), "head", {})
    assert "| last_window_1_over_n | plain SGD | synthetic | (2,4) | 0 of 3 | — | no pairs yet |" in text
    assert ("- plain SGD, synthetic (2,4): sgd_last_window_1_over_n − sgd_correct: not yet decidable (n = 0 of 3)."
            in text)


def test_a_comparison_whose_reference_missed_the_bar_claims_nothing(bug_grid):
    """The grid's reference bar says when a comparison is made at convergence. Seed 1's correct loop below it: every
    pair stays in the interval (dropping it would keep only the pairs where the arm alone failed), but the comparison
    claims nothing and stays in the Holm family as p = 1."""
    from bert_accum.study.bias_study import markdown

    root, grid = bug_grid
    study = load_study(root / "runs" / "bugs", grid)
    failed = next(r for r in study.runs if r.arm == "correct" and r.cell_seed == 1)
    failed.final = {**failed.final, "eval": {**failed.final["eval"], "accuracy": -1.0}}  # below the bar of 0.0
    rows = {r["arm"]: r for r in pair_rows(study)}
    sched = rows["scheduler_stepped_per_micro_batch"]
    assert (sched["n"], sched["planned"], sched["reference_below_bar"]) == (3, 3, 1)
    by = {(r.arm, r.cell_seed): r.metric for r in study.runs}
    diffs = [by[("scheduler_stepped_per_micro_batch", s)] - by[("correct", s)] for s in (1, 2, 3)]
    assert sched["mean_diff"] == pytest.approx(sum(diffs) / 3)
    assert sched["verdict"] == "not at convergence (reference below the bar in 1 of 3)" and math.isnan(sched["p_holm"])
    text = markdown([study], list(rows.values()), "head", {})
    assert "| 3 of 3 (reference below the bar in 1) |" in text
    assert ("1 is not at convergence, as their reference runs did not all reach the grid's bar: "
            "scheduler_stepped_per_micro_batch (AdamW, (2,4): 1 of 3).") in text


def test_a_pair_that_differs_in_another_setting_is_refused(bug_grid, tmp_path):
    root, grid = bug_grid
    study = load_study(root / "runs" / "bugs", grid)
    odd = next(r for r in study.runs if r.arm == "correct" and r.cell_seed == 1)
    odd.config = {**odd.config, "weight_decay": 0.5}
    with pytest.raises(BertAccumError, match="weight_decay"):
        pair_rows(study)


def test_verdict_holm_and_bias_names():
    assert verdict(5, 0.01) == "a bias" and verdict(5, 0.2) == "below the detection limit"
    assert verdict(1, math.nan) == "too few pairs"
    assert verdict(4, 0.001, planned=5) == "not yet decidable (n = 4 of 5)" and verdict(5, 0.001, planned=5) == "a bias"
    # Holm by hand: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04); NaN is no test
    assert holm([0.04, math.nan, 0.01, 0.02]) == pytest.approx([0.04, math.nan, 0.03, 0.04], nan_ok=True)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert bias_of({"bug_modes": ["scheduler_in_micro_steps"]}, {}) == "schedule_sized_in_micro_batches"
    assert bias_of({"objective": "mlm", "loss_normalization": "mean_of_means"},
                   {"objective": "mlm", "loss_normalization": "global"}) == "mean_of_means"
    with pytest.raises(BertAccumError):
        bias_of({"dropout": "invariant"}, {})


def test_an_unfinished_comparison_counts_in_the_holm_family_as_p_1():
    """Two planned comparisons, one finished (p 0.02) and one not (p 0.001 so far): the finished one is judged in a
    family of two, 2 x 0.02 = 0.04; the other waits; the Trainer check is no test."""
    rows = [{"bias": "a", "n": 5, "planned": 5, "p_value": 0.02},
            {"bias": "b", "n": 3, "planned": 5, "p_value": 0.001},
            {"bias": "trainer_vs_loop", "n": 3, "planned": 3, "p_value": math.nan}]
    judge(rows)
    assert rows[0]["p_holm"] == pytest.approx(0.04) and rows[0]["verdict"] == "a bias"
    assert math.isnan(rows[1]["p_holm"]) and rows[1]["verdict"] == "not yet decidable (n = 3 of 5)"
    assert rows[2]["verdict"] == "a check" and math.isnan(rows[2]["p_holm"])
    rows[1].update(n=5, p_value=0.03)  # once it finishes the first verdict can only strengthen: 0.02 x 2 stays 0.04
    judge(rows)
    assert rows[0]["p_holm"] == pytest.approx(0.04) and rows[1]["p_holm"] == pytest.approx(0.04)


def test_a_grid_without_comparisons_is_refused(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]]}))
    with pytest.raises(BertAccumError, match="no 'comparisons'"):
        load_study(tmp_path, grid)


def test_the_masked_lm_comparison_through_the_trainer_and_its_check_against_the_loop(
        tmp_path, tiny_model_dir, synthetic_glue_dir):
    """configs/study_mlm_converged.yaml's shape, tiny: global vs mean_of_means in the loop and through
    ExactAccumulationTrainer, and the Trainer's global arm against the loop's (a check, not a bias)."""
    from bert_accum.integrations.backend import run_trainer

    mlm = {"objective": "mlm", "dropout": "invariant", "padding": "window"}
    trainer = {**mlm, "backend": "exact_trainer", "batches": [[2, 4]]}
    raw = {
        "name": "mlm", "runs_dir": str(tmp_path / "runs"), "tasks": ["synthetic"], "batches": [[2, 4]], "seeds": [1, 2],
        "arms": {"global": {**mlm, "loss_normalization": "global"},
                 "mean_of_means": {**mlm, "loss_normalization": "mean_of_means"},
                 "trainer_global": {**trainer, "loss_normalization": "global"},
                 "trainer_mean_of_means": {**trainer, "loss_normalization": "mean_of_means"}},
        "comparisons": {"mean_of_means": "global", "trainer_mean_of_means": "trainer_global",
                        "trainer_global": "global"},
        "shared": {"glue_dir": synthetic_glue_dir, "model_name_or_path": tiny_model_dir, "max_length": 32,
                   "max_train_steps": 3, "learning_rate": 1e-3, "per_device_eval_batch_size": 32},
    }
    grid = tmp_path / "mlm.yaml"
    grid.write_text(yaml.safe_dump(raw, sort_keys=False))
    for cell in expand(GridSpec.load(grid)):
        (run_trainer if cell.config.backend == "exact_trainer" else run)(cell.config)
    rows = {r["arm"]: r for r in pair_rows(load_study(tmp_path / "runs", grid))}
    assert rows["mean_of_means"]["bias"] == rows["trainer_mean_of_means"]["bias"] == "mean_of_means"
    check = rows["trainer_global"]
    assert check["bias"] == "trainer_vs_loop" and check["verdict"] == "a check" and check["n"] == 2
    assert check["max_abs_diff"] < 1e-6 and math.isnan(check["p_value"])  # out of the Holm family
    # step by step: the Trainer's training losses stay within round-off of the loop's, and the leading steps counted
    # as identical are those whose losses are equal in every pair
    study = load_study(tmp_path / "runs", grid)
    by = {(r.arm, r.cell_seed): [s["loss"] for s in r.steps] for r in study.runs}
    leading = min(next((i for i, (x, y) in enumerate(zip(by[("trainer_global", s)], by[("global", s)])) if x != y), 3)
                  for s in (1, 2))
    assert check["steps_identical"] == leading
    assert check["pairs_identical"] == sum(by[("trainer_global", s)] == by[("global", s)] for s in (1, 2))
    assert check["max_loss_gap"] < 1e-5 and check["first_step_apart_1e2"] is None
    # through the Trainer the comparison is the loop's, seed by seed
    assert rows["trainer_mean_of_means"]["diffs"] == rows["mean_of_means"]["diffs"]
    text = run_study([(tmp_path / "runs", grid)], tmp_path / "out", command="t")["markdown"].read_text()
    assert "### The same loss through the Hugging Face Trainer (a check, not a bias)" in text
    assert "trainer_global − global = " in text and "a check: largest |difference|" in text
    same = check["pairs_identical"]
    assert ("training losses bit-identical at every optimizer step in "
            + ("every pair" if same == 2 else f"{same} of 2 pairs")) in text
    # the grid's line states the trivial baseline of masked accuracy, from the dev masks of both seeds
    assert "synthetic trivial baseline " in text and "with the dev masks of 2 seeds" in text


def test_a_comparison_with_every_difference_zero_reads_as_the_same_metric_not_a_zero_interval():
    from bert_accum.study.bias_study import _reading

    row = {"verdict": "below the detection limit", "max_abs_diff": 0.0, "metric": "accuracy", "n": 5,
           "detection_limit": 0.0, "p_holm": 1.0}
    assert _reading(row) == "below the detection limit: the same final accuracy in all 5 pairs"
    row.update(max_abs_diff=0.002, detection_limit=0.0068)
    assert _reading(row) == "below the detection limit: no effect beyond ±0.0068 (95% interval; Holm-adjusted p = 1)"


def test_the_masked_lm_section_says_when_clipping_acted_on_every_step_of_both_arms():
    """Clipping on every step gives both normalisations the same gradient norm: the section says the comparison is
    then one of token weighting; where clipping acted on fewer steps it says nothing of the kind."""
    from bert_accum.study.bias_study import PAIR_COLUMNS, markdown

    row = {c: math.nan for c in PAIR_COLUMNS}
    row.update(bias="mean_of_means", arm="mean_of_means", reference="global", optimizer="AdamW", task="sst2",
               micro_batch_size=2, accumulation_steps=16, metric="masked_accuracy", n=5, planned=5,
               reference_below_bar=0, reference_mean=0.24, mean_diff=-0.01, ci95_lo=-0.02, ci95_hi=0.0,
               detection_limit=0.02, max_abs_diff=0.015, p_holm=0.2, verdict="below the detection limit",
               clipped_fraction_arm=1.0, clipped_fraction_reference=0.995, items_per_micro_batch=4.0,
               items_cv_within_window=0.54)
    text = markdown([], [row], "command: t | git_commit: abc", {})
    assert ("Clipping acted on 100% / 100% of optimizer steps (arm / reference), so every step had the same gradient "
            "norm in both: the comparison is of how the window weights its tokens") in text
    row.update(clipped_fraction_reference=0.5)
    assert "Clipping acted on" not in markdown([], [row], "command: t | git_commit: abc", {})


def test_the_clipping_section_states_the_threshold_and_how_often_it_acted():
    """clip_per_micro_batch only acts where clipping binds: its bullet names the threshold and both arms' rate."""
    from bert_accum.study.bias_study import PAIR_COLUMNS, markdown

    row = {c: math.nan for c in PAIR_COLUMNS}
    row.update(bias="clip_per_micro_batch", arm="clip_per_micro_batch", reference="correct", optimizer="AdamW",
               task="sst2", micro_batch_size=8, accumulation_steps=4, metric="accuracy", n=5, planned=5,
               reference_below_bar=0, reference_mean=0.8, mean_diff=-0.004, ci95_lo=-0.011, ci95_hi=0.002,
               detection_limit=0.011, max_abs_diff=0.01, p_holm=1.0, verdict="below the detection limit",
               max_grad_norm=1.0, clipped_fraction_arm=0.755, clipped_fraction_reference=0.765)
    text = markdown([], [row], "command: t | git_commit: abc", {})
    assert ("Threshold max_grad_norm 1.0: the reference clipped its window's gradient on 76% of optimizer steps, the arm "
            "(clipping after every micro-batch) on 76%") in text


def test_the_masked_lm_trivial_baseline_is_the_score_of_a_model_that_always_predicts_the_most_frequent_token(
        tmp_path, synthetic_glue_dir):
    """mlm_eval_targets are the tokens the evaluation scores: a masked-LM head that predicts one token everywhere
    (transform zeroed, so every logit is the decoder bias) evaluates to exactly that token's share of them."""
    import shutil
    from collections import Counter

    import torch
    from transformers import BertForMaskedLM

    from bert_accum.core.config import TrainConfig
    from bert_accum.core.setup import load_model, load_splits
    from bert_accum.core.train import mlm_eval_targets
    from bert_accum.study.stats import majority_rate
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "bert", dropout=0.0)
    cfg = TrainConfig(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=folder, objective="mlm",
                      max_length=32, seed=3, max_train_steps=1, learning_rate=1e-12,
                      per_device_train_batch_size=4, per_device_eval_batch_size=5, output_dir=str(tmp_path / "run"))
    spec, tokenizer, _, _ = load_model(cfg)
    dev = load_splits(cfg, spec, tokenizer)[spec.eval_splits[0]]
    targets = mlm_eval_targets(cfg, tokenizer, dev)
    assert targets != mlm_eval_targets(TrainConfig(**{**cfg.to_dict(), "seed": 4}), tokenizer, dev)  # the seed's masks
    top = Counter(targets).most_common(1)[0][0]

    model = BertForMaskedLM.from_pretrained(folder)
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.zero_()
        model.cls.predictions.transform.LayerNorm.bias.zero_()
        model.cls.predictions.bias.fill_(-100.0)
        model.cls.predictions.bias[top] = 100.0
    constant = tmp_path / "constant"
    model.save_pretrained(constant)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (Path(folder) / name).is_file():
            shutil.copy(Path(folder) / name, constant / name)
    final = run(TrainConfig(**{**cfg.to_dict(), "model_name_or_path": str(constant)}))
    assert final["eval"]["masked_accuracy"] == pytest.approx(targets.count(top) / len(targets), abs=1e-12)
    assert majority_rate(targets) == targets.count(top) / len(targets) > 0
