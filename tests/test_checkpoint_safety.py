"""Checkpoints are plain data: planted pickles never run, damaged checkpoints are named or skipped, and a resume
from the newest complete checkpoint writes the same per-step records as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bert_accum.core.checkpoint import checkpoint_problem, latest_checkpoint
from bert_accum.core.config import TrainConfig
from bert_accum.core.records import read_jsonl
from bert_accum.core.train import run

from conftest import Boom, plant_old_format

REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds"}


def _common(model_dir: str, glue_dir: str) -> dict:
    # Standard (RNG) dropout: the resumed records only match if the RNG states were restored too.
    return dict(task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_train_steps=6, max_length=32, learning_rate=1e-3,
                checkpointing_steps="2", disable_progress_bar=True)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, synthetic_glue_dir):
    """An uninterrupted run, and the same run killed during step 5 (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("ckpt")
    common = _common(tiny_model_dir, synthetic_glue_dir)
    run(TrainConfig(**common, output_dir=str(root / "full")))

    def kill_at_5(model, step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**common, output_dir=str(root / "cut")), before_optimizer_step=kill_at_5)
    assert [r["optimizer_step"] for r in read_jsonl(root / "cut" / "steps.jsonl")] == [1, 2, 3, 4]
    return {"root": root, "common": common, "full": root / "full", "cut": root / "cut"}


def _copy_cut(runs, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["cut"], out)
    return out


def _finetune(common: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = TrainConfig(**common, output_dir=str(out)).to_argv()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), *argv, *extra], capture_output=True,
                          text=True, timeout=300, env=env)


def test_planted_pickles_never_run_and_resume_works_from_the_plain_data(runs, tmp_path):
    out = _copy_cut(runs, tmp_path)
    marker = tmp_path / "pickle_ran.txt"
    newest = out / "checkpoints" / "step_0000004"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "scheduler.bin"):
        (newest / name).write_bytes(pickle.dumps(Boom(marker)))
    assert checkpoint_problem(newest) is None  # files the manifest does not list are never read

    proc = _finetune(runs["common"], out, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "resumed from" in proc.stdout and "step_0000004" in proc.stdout
    assert _strip(read_jsonl(out / "steps.jsonl")) == _strip(read_jsonl(runs["full"] / "steps.jsonl"))
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(runs["full"] / "eval.jsonl")


def test_a_forged_optimizer_pickle_with_a_matching_manifest_is_refused(runs, tmp_path):
    """Someone who can write the run folder can also rewrite the manifest: the weights-only loader still refuses."""
    import torch

    out = _copy_cut(runs, tmp_path)
    marker = tmp_path / "pickle_ran.txt"
    newest = out / "checkpoints" / "step_0000004"
    torch.save({"state": Boom(marker), "param_groups": []}, newest / "optimizer.pt")
    manifest = json.loads((newest / "manifest.json").read_text())
    data = (newest / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    before = (out / "steps.jsonl").read_bytes()

    proc = _finetune(runs["common"], out, "--resume_from_checkpoint", "latest")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "optimizer.pt" in errors[0] and "cannot be loaded" in errors[0]
    assert not marker.exists()
    assert (out / "steps.jsonl").read_bytes() == before


def test_an_old_format_checkpoint_is_refused_and_never_unpickled(runs, tmp_path):
    out = _copy_cut(runs, tmp_path)
    marker = tmp_path / "pickle_ran.txt"
    for step in (2, 4):
        plant_old_format(out / "checkpoints" / f"step_{step:07d}", marker)
    problem = checkpoint_problem(out / "checkpoints" / "step_0000004")
    assert problem and "old-format checkpoint" in problem
    with pytest.raises(Exception, match="no complete checkpoint"):
        latest_checkpoint(out, quiet=True)
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_and_strays_fall_back_to_the_previous_one(runs, tmp_path, capsys):
    """Truncated weights in step 4, an empty step_* folder and a step_* file: `latest` warns about each and
    resumes from step 2; the records still equal the uninterrupted run's."""
    out = _copy_cut(runs, tmp_path)
    weights = out / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "checkpoints" / "step_0000099").mkdir()
    (out / "checkpoints" / "step_notes").write_text("not a checkpoint\n")

    run(TrainConfig(**runs["common"], output_dir=str(out), resume_from_checkpoint="latest"))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 3, err
    assert any("step_0000004/model.safetensors is truncated" in w for w in warnings)
    assert any("step_0000099 is not a checkpoint" in w for w in warnings)
    assert any("step_notes" in w for w in warnings)
    assert _strip(read_jsonl(out / "steps.jsonl")) == _strip(read_jsonl(runs["full"] / "steps.jsonl"))
    # pruning and later saves leave the strays alone
    assert (out / "checkpoints" / "step_0000099").is_dir() and (out / "checkpoints" / "step_notes").is_file()
