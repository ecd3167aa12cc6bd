"""The BatchNorm study (bert_accum.study.normstudy, scripts/norm_study.py): BatchNorm is the only variant whose
accumulated gradient and running statistics depend on how a window is split into micro-batches."""

from __future__ import annotations

import csv
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from bert_accum.cli import guarded
from bert_accum.study.normstudy import (COLUMNS, VARIANTS, NormStudyConfig, build_model, make_data, run_norm_study,
                                  running_stats, study_rows)

REPO = Path(__file__).resolve().parents[1]
PER_EXAMPLE = ("layernorm", "groupnorm", "none")


@pytest.fixture(scope="module")
def fp64_rows():
    """Gradient and running statistics of one window, E = 32, B = 32 16 8 4 2, fp64, one seed, no training."""
    cfg = NormStudyConfig(precisions=["fp64"], seeds=[0], steps=0, n_train=64, n_heldout=8)
    return {(r["variant"], r["micro_batch_size"]): r for r in study_rows(cfg)}


def test_every_variant_starts_from_the_same_linear_weights():
    models = {v: build_model(v, seed=3) for v in VARIANTS}
    reference = [m.weight for m in models["none"] if isinstance(m, torch.nn.Linear)]
    for variant, model in models.items():
        linears = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 3
        assert all(torch.equal(a, b) for a, b in zip(linears, reference)), variant
    assert not torch.equal(build_model("none", seed=4)[0].weight, reference[0])


def test_per_example_normalisation_accumulates_exactly_in_fp64(fp64_rows):
    for variant in PER_EXAMPLE:
        for b in (32, 16, 8, 4, 2):
            row = fp64_rows[(variant, b)]
            assert row["accumulation_steps"] == 32 // b
            assert row["grad_rel_l2"] < 1e-12, (variant, b, row["grad_rel_l2"])
            assert row["grad_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_batchnorm_gradient_differs_and_grows_as_b_shrinks(fp64_rows):
    rel = {b: fp64_rows[("batchnorm", b)]["grad_rel_l2"] for b in (32, 16, 8, 4, 2)}
    assert rel[32] == 0.0  # the (E, 1) reference against itself
    assert all(rel[b] > 1e-3 for b in (16, 8, 4, 2)), rel
    assert rel[2] > rel[16], rel


def test_running_statistics_differ_for_batchnorm_only(fp64_rows):
    for b in (16, 8, 4, 2):
        row = fp64_rows[("batchnorm", b)]
        assert row["running_mean_rel"] > 1e-3 and row["running_var_rel"] > 1e-3, (b, row)
    assert fp64_rows[("batchnorm", 32)]["running_mean_rel"] == 0.0
    for variant in PER_EXAMPLE:
        assert running_stats(build_model(variant, seed=0)) == {}
        assert math.isnan(fp64_rows[(variant, 2)]["running_mean_rel"])
    assert set(running_stats(build_model("batchnorm", seed=0))) == {"running_mean", "running_var"}


def test_synthetic_data_is_deterministic_and_uses_every_class():
    a, b = make_data(40, 10, 16, 4, seed=5), make_data(40, 10, 16, 4, seed=5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_heldout, b.y_heldout)
    assert a.x_train.shape == (40, 16) and a.x_heldout.shape == (10, 16)
    assert set(torch.cat([a.y_train, a.y_heldout]).tolist()) == {0, 1, 2, 3}


def _read_csv(path):
    lines = path.read_text().splitlines()
    return lines[0], list(csv.DictReader(lines[1:]))


def test_script_writes_header_and_every_row(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # --no_plot: importing matplotlib adds ~2 s here; the committed run (results/batchnorm) draws the plot
    argv = ["norm_study.py", "--effective_batch_size", "8", "--seeds", "0", "1", "--steps", "3", "--n_train", "32",
            "--n_heldout", "16", "--hidden_dim", "16", "--num_groups", "4", "--output_dir", str(out), "--no_plot"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "scripts" / "norm_study.py"), run_name="__main__")
    assert exc.value.code == 0
    assert "total wall time" in capsys.readouterr().out

    header, rows = _read_csv(out / "norm_study.csv")
    assert header.startswith("# command: python ") and "--effective_batch_size 8" in header and "git_commit: " in header
    assert list(rows[0]) == list(COLUMNS)
    # default B for E = 8: 8 4 2; every (variant, precision, seed, B) once
    assert sorted((r["variant"], r["precision"], r["seed"], r["micro_batch_size"]) for r in rows) == sorted(
        (v, p, s, b) for v in VARIANTS for p in ("fp64", "fp32") for s in ("0", "1") for b in ("8", "4", "2"))
    for r in rows:
        assert 0 <= float(r["heldout_accuracy"]) <= 1
        if r["precision"] == "fp64" and r["variant"] != "batchnorm":
            assert float(r["param_rel_distance"]) < 1e-12  # training is exact too
        if r["variant"] == "batchnorm" and r["micro_batch_size"] == "2":
            assert float(r["param_rel_distance"]) > 1e-3

    md = (out / "norm_study.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("<!-- command: python ") and "git_commit: " in lines[0] and lines[0].endswith("-->")
    assert "nan" not in md
    for v in VARIANTS:
        for p in ("fp64", "fp32"):
            assert f"| {v} | {p} | 2 | 4 |" in md and f"| {v} | {p} | 8 | 1 |" in md
    assert "## Interpretation" in md and "With BatchNorm, (B, N) computes a different function" in md
    assert sorted(p.name for p in out.iterdir()) == ["norm_study.csv", "norm_study.md"]


@pytest.mark.parametrize("cfg,message", [
    (NormStudyConfig(micro_batch_sizes=[3]), "does not divide the effective batch size 32"),
    (NormStudyConfig(micro_batch_sizes=[1]), "undefined for batchnorm"),
    (NormStudyConfig(num_groups=5), "must divide --hidden_dim"),
    (NormStudyConfig(n_train=16), "at least one window of 32"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, cfg, message):
    cfg.output_dir = str(tmp_path / "o")
    assert guarded(lambda: run_norm_study(cfg)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()
