"""Known accumulation bugs as named modes: each changes what it should, and the correct loop does not."""

from __future__ import annotations

import pytest
import torch

from bert_accum.core.config import TrainConfig
from bert_accum.core.records import read_jsonl
from bert_accum.controls.loss import micro_loss_scale
from bert_accum.core.train import run
from bert_accum.core.windows import WindowPlan, window_examples


def _run(tmp_path, model_dir, glue_dir, name, b, n, **kw):
    out = tmp_path / name
    run(TrainConfig(task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, per_device_train_batch_size=b,
                    gradient_accumulation_steps=n, max_length=48, learning_rate=1e-3, output_dir=str(out),
                    disable_progress_bar=True, **kw))
    return read_jsonl(out / "steps.jsonl")


def test_step_mod_boundaries_steps_after_first_micro_batch():
    right = WindowPlan(num_examples=40, micro_batch_size=4, accumulation_steps=4, seed=0)
    buggy = WindowPlan(num_examples=40, micro_batch_size=4, accumulation_steps=4, seed=0, step_mod_boundaries=True)
    assert [len(w) for w in right.windows(0)] == [4, 4, 2]  # 40 = 16 + 16 + 8
    # micro-steps 0..9: step after 0, 4, 8 and the last one -> windows of 1, 4, 4, 1 micro-batches
    assert [len(w) for w in buggy.windows(0)] == [1, 4, 4, 1]
    assert sum(map(window_examples, buggy.windows(0)), []) == right.order(0).tolist()


def test_last_window_one_over_n_weight():
    # a short window of 5 examples in micro-batches [3, 2] with N = 4
    right = [micro_loss_scale(normalization="mean_of_means", micro_items=m, micro_examples=m, window_items=5,
                              window_examples=5, accumulation_steps=4, num_processes=1, one_over_n=False) * m for m in (3, 2)]
    buggy = [micro_loss_scale(normalization="mean_of_means", micro_items=m, micro_examples=m, window_items=5,
                              window_examples=5, accumulation_steps=4, num_processes=1, one_over_n=True) * m for m in (3, 2)]
    assert sum(right) == pytest.approx(1.0)  # each example weighs 1/5: a mean over the window
    # the bug: each micro-batch mean weighs 1/N = 1/4, so the window's total weight is 2/4, not 1
    assert buggy == [pytest.approx(0.25), pytest.approx(0.25)] and sum(buggy) == pytest.approx(0.5)


def test_bug_modes_in_training(tmp_path, tiny_model_dir, synthetic_glue_dir):
    common = dict(num_train_epochs=2, num_warmup_steps=0)
    right = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "right", 2, 4, **common)
    sched = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "sched", 2, 4, bug_modes=["schedule_sized_in_micro_batches"], **common)
    mod = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "mod", 2, 4, bug_modes=["step_mod_boundaries"], **common)
    last = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "last", 2, 4, bug_modes=["last_window_1_over_n"], **common)
    clip = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "clip", 2, 4, bug_modes=["clip_per_micro_batch"],
                max_grad_norm=1e-3, **common)
    right_clip = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "right_clip", 2, 4, max_grad_norm=1e-3, **common)

    # correct: 60 examples / 8 = 8 windows per epoch, the LR decays linearly to 0 over 16 optimizer steps
    lr = [r["learning_rate"] for r in right]
    assert len(right) == 16 and lr[0] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-3 / 16)
    # schedule sized in micro-steps (16 * 4): it ends at 3/4 of the peak instead of near 0
    lr_bug = [r["learning_rate"] for r in sched]
    assert len(sched) == 16 and lr_bug[-1] == pytest.approx(1e-3 * (64 - 15) / 64)
    # step % N == 0: 30 micro-batches per epoch -> windows of 1, 4 x 7, 1 = 9 optimizer steps per epoch
    assert len(mod) == 18 and mod[0]["examples"] == 2 and mod[0]["micro_steps"] == 1
    # the short last window (4 examples in 2 micro-batches of N=4) is weighted 2/4 instead of 1
    assert right[7]["examples"] == 4 and right[7]["micro_steps"] == 2
    assert last[7]["loss"] == pytest.approx(right[7]["loss"] * 0.5, rel=1e-5)
    assert [r["loss"] for r in last[:7]] == [r["loss"] for r in right[:7]]
    # clipping each micro-step vs the accumulated gradient: the first windows' gradients already differ
    assert clip[0]["grad_norm"] != pytest.approx(right_clip[0]["grad_norm"], rel=1e-3)
    assert right_clip[0]["grad_norm"] == pytest.approx(right[0]["grad_norm"])  # clipping happens after the record
    assert right_clip[0]["clipped"] is True


def test_correct_mode_is_invariant_to_b_and_n_in_lr_and_steps(tmp_path, tiny_model_dir, synthetic_glue_dir):
    a = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "a", 8, 1, num_train_epochs=1)
    b = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "b", 1, 8, num_train_epochs=1)
    assert [r["learning_rate"] for r in a] == [r["learning_rate"] for r in b]
    assert [r["examples"] for r in a] == [r["examples"] for r in b] == [8] * 7 + [4]
    assert torch.tensor([r["loss"] for r in a]).isfinite().all()


def test_scheduler_stepped_per_micro_batch_runs_the_schedule_n_times_too_fast(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Optimizer step k uses the LR of schedule position k*N - 1: with N=4 over 16 steps the linear schedule is
    spent after 4 steps and the LR stays at 0."""
    fast = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, "fast", 2, 4, bug_modes=["scheduler_stepped_per_micro_batch"],
                num_train_epochs=2, num_warmup_steps=0)
    lr = [r["learning_rate"] for r in fast]
    total, n = 16, 4
    assert len(lr) == total
    assert lr == [pytest.approx(1e-3 * max(0.0, (total - (k * n - 1)) / total), abs=1e-12) for k in range(1, total + 1)]
    assert lr[4:] == [0.0] * (total - 4)


def test_old_bug_name_is_still_accepted(tmp_path):
    from bert_accum.controls.bugs import BugModes

    assert BugModes.parse(["scheduler_in_micro_steps"]).schedule_sized_in_micro_batches
    assert TrainConfig.from_dict({"bug_modes": ["scheduler_in_micro_steps"]}).bug_modes == ["schedule_sized_in_micro_batches"]


def test_clipped_fraction_is_recorded_also_for_clipping_per_micro_batch(tmp_path, tiny_model_dir, synthetic_glue_dir):
    import json

    for name, extra in (("right", {}), ("clip", {"bug_modes": ["clip_per_micro_batch"]})):
        rows = _run(tmp_path, tiny_model_dir, synthetic_glue_dir, name, 2, 4, max_train_steps=3, max_grad_norm=1e-3, **extra)
        assert all(r["clipped"] for r in rows)  # a threshold of 1e-3 binds on every step
        final = json.loads((tmp_path / name / "final_metrics.json").read_text())
        assert final["clipped_fraction"] == 1.0
