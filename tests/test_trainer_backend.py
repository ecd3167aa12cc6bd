"""`--backend trainer|exact_trainer` (bert_accum.integrations.backend) against this project's loop, on a tiny BERT.

Every run trains the synthetic task (60 examples) for a few optimizer steps; runs are cached per configuration
so each is trained once. The run folders sit in <tmp>/runs/<backend or label>/B<B>_N<N>/seed1, the grid's layout,
so the report's `load_runs` reads them as it reads a grid.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from bert_accum.cli import finetune_main
from bert_accum.core.records import read_jsonl

BACKENDS = ("bert_accum", "trainer", "exact_trainer")


@pytest.fixture(scope="module")
def train(tiny_model_dir, synthetic_glue_dir, tmp_path_factory):
    """train(backend, B, N, dropout, steps, label) -> the run folder (trained once per argument tuple);
    `train.root` is the folder holding them all."""
    root = tmp_path_factory.mktemp("trainer_backend") / "runs"

    @functools.lru_cache(maxsize=None)
    def run(backend: str, b: int, n: int, dropout: str = "off", steps: int = 3, label: str = "",
            extra: tuple[str, ...] = ()) -> Path:
        out = root / (label or f"{backend}-{dropout}") / f"B{b}_N{n}" / "seed1"
        argv = ["--task_name", "synthetic", "--glue_dir", synthetic_glue_dir, "--model_name_or_path", tiny_model_dir,
                "--max_length", "32", "--per_device_train_batch_size", str(b), "--gradient_accumulation_steps",
                str(n), "--max_train_steps", str(steps), "--seed", "1", "--dropout", dropout, "--learning_rate",
                "1e-3", "--backend", backend, "--output_dir", str(out), "--disable_progress_bar",
                "--per_device_eval_batch_size", "32", *extra]
        assert finetune_main(argv) == 0
        return out

    run.root = root
    return run


def _steps(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "steps.jsonl")


def _json(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def test_three_backends_write_run_folders_the_report_reads(train):
    from bert_accum.study.report import load_runs

    dirs = {be: train(be, 2, 4) for be in BACKENDS}
    reference = dirs["bert_accum"]
    for backend, d in dirs.items():
        for name in ("config.json", "environment.json", "steps.jsonl", "eval.jsonl", "predictions.json",
                     "final_metrics.json"):
            assert (d / name).is_file(), f"{backend}: {name} missing"
        steps = _steps(d)
        assert [r["optimizer_step"] for r in steps] == [1, 2, 3]  # one row per optimizer step
        assert set(_steps(reference)[0]) <= set(steps[0]), f"{backend}: step rows lack keys of the project's"
        assert set(_json(reference, "final_metrics.json")) <= set(_json(d, "final_metrics.json"))
        assert all(r["micro_steps"] == 4 and r["examples"] == 8 for r in steps)
        assert all(r["micro_items"] == [2, 2, 2, 2] for r in steps)
        assert _json(d, "config.json")["backend"] == backend
        derived = _json(d, "config.json")["derived"]
        assert (derived["micro_batch_size"], derived["accumulation_steps"], derived["effective_batch_size"]) == (2, 4, 8)
    for backend in ("trainer", "exact_trainer"):
        env = _json(dirs[backend], "environment.json")
        import transformers

        assert env["trainer"]["transformers"] == transformers.__version__
        assert env["trainer"]["backend"] == backend
    runs = load_runs([train.root])
    arms = {(r.arm, r.micro_batch_size, r.accumulation_steps) for r in runs}
    assert {(f"{be}-off", 2, 4) for be in BACKENDS} <= arms


def test_same_data_order_dropout_stream_and_numerics_across_backends(train):
    """(8,1), standard dropout, 10 steps over two epochs of 60 examples (a 4-example last window): the three
    backends see the same micro-batches in the same order with the same dropout masks, so every step's loss,
    gradient norm, learning rate and example count agree (to float rounding: the stock Trainer's loss is
    BERT's mean, the others a scaled sum)."""
    dirs = {be: train(be, 8, 1, "standard", 10) for be in BACKENDS}
    ref = _steps(dirs["bert_accum"])
    assert [r["examples"] for r in ref][6:9] == [8, 4, 8]  # the epoch boundary and its short window
    assert [r["epoch"] for r in ref] == [0] * 8 + [1] * 2
    for backend in ("trainer", "exact_trainer"):
        rows = _steps(dirs[backend])
        assert [(r["examples"], r["epoch"], r["window_in_epoch"]) for r in rows] == \
            [(r["examples"], r["epoch"], r["window_in_epoch"]) for r in ref]
        for a, b in zip(rows, ref):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-12)
        preds = _json(dirs[backend], "predictions.json")["splits"]
        assert preds == _json(dirs["bert_accum"], "predictions.json")["splits"]


def test_exact_trainer_backend_reproduces_the_project_loop_at_2x4(train):
    """Dropout off, (2,4): ExactAccumulationTrainer computes the project's window loss, step after step."""
    ref, exact = _steps(train("bert_accum", 2, 4)), _steps(train("exact_trainer", 2, 4))
    for a, b in zip(exact, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss_factor"] == pytest.approx(1.0, rel=1e-6)


def test_stock_trainer_factor_is_measured_and_recorded(train):
    """Dropout off: the first window's loss and pre-clip gradient norm of the stock Trainer at (2,4) against
    (8,1) (same examples, same weights). The installed transformers either divides by N (ratio 1) or not
    (ratio N; 5.x with BERT heads); whichever it is, the run folder says so and the ratio matches it."""
    n = 4
    big, small = _steps(train("trainer", 8, 1))[0], _steps(train("trainer", 2, n))[0]
    loss_ratio = small["loss"] / big["loss"]
    norm_ratio = small["grad_norm"] / big["grad_norm"]
    measured = _json(train("trainer", 2, n), "final_metrics.json")["trainer"]
    factor = measured["loss_factor_first_window"]
    assert factor == pytest.approx(n, rel=1e-5) or factor == pytest.approx(1.0, rel=1e-5)
    assert loss_ratio == pytest.approx(factor, rel=1e-5)
    assert norm_ratio == pytest.approx(factor, rel=1e-4)
    assert measured["divides_loss_by_accumulation_steps"] == (factor == pytest.approx(1.0, rel=1e-5))
    assert small["window_mean_loss"] == pytest.approx(big["window_mean_loss"], rel=1e-6)
    exact = _json(train("exact_trainer", 2, n), "final_metrics.json")["trainer"]
    assert exact["loss_factor_first_window"] == pytest.approx(1.0, rel=1e-6)
    assert not exact["divides_loss_by_accumulation_steps"]  # it scales the loss itself


@pytest.mark.parametrize("normalization", ["global", "mean_of_means"])
def test_exact_trainer_backend_reproduces_the_project_loop_on_masked_lm(train, normalization):
    """Masked-LM at (2,4), invariant dropout, window padding: the exact trainer scores the same predicted tokens
    of the same masks as the project's loop, under either normalisation, so every step is the loop's."""
    flags = ("--objective", "mlm", "--padding", "window", "--loss_normalization", normalization)
    ref = _steps(train("bert_accum", 2, 4, "invariant", 3, f"mlm-loop-{normalization}", flags))
    exact_dir = train("exact_trainer", 2, 4, "invariant", 3, f"mlm-exact-{normalization}", flags)
    rows = _steps(exact_dir)
    assert [r["micro_items"] for r in rows] == [r["micro_items"] for r in ref]
    assert len({n for r in ref for n in r["micro_items"]}) > 1  # micro-batches hold different token counts
    for a, b in zip(rows, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        # the window's token mean: what global backpropagates, and what mean_of_means misweights
        assert a["loss_factor"] == pytest.approx(1.0, rel=1e-6) if normalization == "global" else a["loss_factor"] != 1.0
    final = _json(exact_dir, "final_metrics.json")["eval"]
    assert final["masked_accuracy"] == _json(train.root / f"mlm-loop-{normalization}" / "B2_N4" / "seed1",
                                             "final_metrics.json")["eval"]["masked_accuracy"]


def test_stock_trainer_on_masked_lm_sums_n_token_means(train):
    """Dropout off, first window (same weights): the stock Trainer backpropagates BERT's token mean of each
    micro-batch, N of them summed, i.e. N x the loop's mean_of_means window loss; against the window's token
    mean (global) that is the recorded loss factor."""
    flags = ("--objective", "mlm", "--loss_normalization", "mean_of_means")
    stock = _steps(train("trainer", 2, 4, "off", 1, "mlm-stock", flags))[0]
    mom = _steps(train("bert_accum", 2, 4, "off", 1, "mlm-loop-mom-off", flags))[0]
    glob = _steps(train("bert_accum", 2, 4, "off", 1, "mlm-loop-global-off",
                        ("--objective", "mlm", "--loss_normalization", "global")))[0]
    assert stock["loss"] == pytest.approx(4 * mom["loss"], rel=1e-5)
    assert stock["window_mean_loss"] == pytest.approx(glob["loss"], rel=1e-5)
    assert stock["loss_factor"] == pytest.approx(4 * mom["loss"] / glob["loss"], rel=1e-5)
    assert stock["loss_factor"] != pytest.approx(4.0, rel=1e-6)  # N x a mean of means, not N x the token mean


def test_clipping_is_measured_before_it_acts(train):
    """max_grad_norm below every norm: each row is clipped and records the norm before clipping."""
    d = train("trainer", 2, 4, "off", 3, "clip", ("--max_grad_norm", "1e-6"))
    rows = _steps(d)
    assert all(r["clipped"] and r["grad_norm"] > 1e-6 for r in rows)
    assert set(rows[0]["grad_norm_groups"]) >= {"embeddings", "head"}


def test_sgd_in_the_project_loop_steps_minus_lr_times_gradient(tiny_model_dir, synthetic_glue_dir, tmp_path):
    """--optim sgd: one step moves every parameter by exactly -lr x its (clipped) accumulated gradient."""
    from transformers import AutoModelForSequenceClassification

    from bert_accum.core.config import TrainConfig
    from bert_accum.core.train import run

    cfg = TrainConfig(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir,
                      max_length=32, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=1,
                      learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", weight_decay=0.01, seed=1,
                      dropout="off", output_dir=str(tmp_path / "run"), save_final_model=True,
                      disable_progress_bar=True)
    seen = {}

    def grab(model, step):
        seen.update({n: (p.detach().clone(), p.grad.detach().clone()) for n, p in model.named_parameters()})

    run(cfg, before_optimizer_step=grab)
    after = dict(AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").named_parameters())
    decayed = 0
    for name, (before, grad) in seen.items():
        decay = 0.0 if ("bias" in name or "LayerNorm" in name) else 0.01
        decayed += decay > 0
        expected = before - 0.5 * grad - 0.5 * decay * before
        torch.testing.assert_close(after[name].detach(), expected, rtol=1e-6, atol=1e-7)
    assert decayed > 0


@pytest.mark.parametrize("backend, flags, needle", [
    ("trainer", ("--dropout", "invariant"), "--dropout invariant"),
    ("trainer", ("--padding", "window"), "--padding window"),
    ("trainer", ("--objective", "mlm", "--loss_normalization", "global"), "--loss_normalization global"),
    ("exact_trainer", ("--checkpointing_steps", "2"), "checkpoints"),
])
def test_unsupported_settings_are_refused_before_anything_runs(backend, flags, needle, tmp_path, capsys):
    argv = ["--task_name", "synthetic", "--backend", backend, "--output_dir", str(tmp_path / "x"), *flags]
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err
    assert f"--backend {backend} does not support" in err and needle in err
    assert not (tmp_path / "x").exists()


def test_backend_and_optim_are_config_fields():
    from bert_accum.core.config import TrainConfig, parse_args

    cfg = parse_args(["--task_name", "rte", "--backend", "exact_trainer", "--optim", "sgd"])
    assert (cfg.backend, cfg.optim) == ("exact_trainer", "sgd")
    assert TrainConfig.from_dict({"task_name": "rte", "backend": "trainer"}).backend == "trainer"
    assert "--backend" in TrainConfig(task_name="rte", backend="trainer").to_argv()
