"""Bad input through the real entry points: each case runs `python scripts/<script>.py ...` in a subprocess and
must exit non-zero with exactly one ``error:`` line naming the problem, no traceback, and its output location
(run folder, runs folder, report folder, or the file given in its place) unchanged, or still absent.

Most cases fail in validation before torch is imported (a fraction of a second each); the resume cases work
on copies of one tiny run with checkpoints trained once for the module. Cases about permissions run the
child without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, since the tests may run as root, who otherwise
reads and writes anything.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import plant_old_format

REPO = Path(__file__).resolve().parents[1]
MARKER_NAME = "pickle_ran.txt"  # a planted pickle would create it


# ----------------------------------------------------------------------------------------------
# Shared inputs
# ----------------------------------------------------------------------------------------------
TRAINED = ["--task_name", "synthetic", "--glue_dir", "{glue}", "--model_name_or_path", "{model}", "--max_length", "32",
           "--per_device_train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "2",
           "--disable_progress_bar"]
"""Flags of the module's trained run (checkpoints at steps 2 and 4); the resume cases repeat them."""
FT = [*TRAINED, "--output_dir", "{out}"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, synthetic_glue_dir) -> Path:
    """A finished tiny run with the checkpoints of steps 2 and 4 kept."""
    from bert_accum.cli import finetune_main

    out = tmp_path_factory.mktemp("trained") / "run"
    argv = [a.format(glue=synthetic_glue_dir, model=tiny_model_dir) for a in TRAINED]
    assert finetune_main([*argv, "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    return out


# ----------------------------------------------------------------------------------------------
# Setups: each prepares a case's files in its tmp folder (ctx: tmp, out, glue, model, trained)
# ----------------------------------------------------------------------------------------------
def _copy_run(ctx: dict) -> Path:
    shutil.copytree(ctx["trained"], ctx["out"])
    return Path(ctx["out"])


def resume_setup(damage: Callable[[Path, dict], None] | None = None):
    """Copy the trained run to {out}, then apply `damage(run_dir, ctx)`."""

    def setup(ctx: dict) -> None:
        run = _copy_run(ctx)
        if damage is not None:
            damage(run, ctx)

    return setup


def _truncate(name: str, step: int = 4):
    def damage(run: Path, ctx: dict) -> None:
        f = run / "checkpoints" / f"step_{step:07d}" / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    return damage


def _flip_byte(name: str):
    def damage(run: Path, ctx: dict) -> None:
        f = run / "checkpoints" / "step_0000004" / name
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    return damage


def _damage_all(run: Path, ctx: dict) -> None:
    for step in (2, 4):
        _truncate("optimizer.pt", step)(run, ctx)


def _old_format_only(run: Path, ctx: dict) -> None:
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    plant_old_format(run / "checkpoints" / "step_0000004", Path(ctx["tmp"]) / MARKER_NAME)


def _stray(run: Path, ctx: dict) -> None:
    (run / "checkpoints" / "step_0000009").mkdir()


def _no_checkpoints(run: Path, ctx: dict) -> None:
    shutil.rmtree(run / "checkpoints")


def _damaged_manifest(run: Path, ctx: dict) -> None:
    (run / "checkpoints" / "step_0000004" / "manifest.json").write_text('{"format": "bert_accum-checkpoint-1", "fi')


def file_at_out(ctx: dict) -> None:
    Path(ctx["out"]).write_text("a file where the output folder should go\n")


def nonempty_out(ctx: dict) -> None:
    Path(ctx["out"]).mkdir()
    (Path(ctx["out"]) / "keep.txt").write_text("user data\n")


def readonly_parent(ctx: dict) -> None:
    parent = Path(ctx["tmp"]) / "locked"
    parent.mkdir()
    parent.chmod(0o500)


def unreadable_train_file(ctx: dict) -> None:
    tmp = Path(ctx["tmp"])
    (tmp / "train.csv").write_text("sentence,label\nfine,1\n")
    (tmp / "dev.csv").write_text("sentence,label\nfine,1\n")
    (tmp / "train.csv").chmod(0o000)


def grid_file(**changes):
    """A one-cell grid file at {tmp}/grid.yaml with `changes` applied (None deletes a key); runs go to {out}."""

    def setup(ctx: dict) -> None:
        raw = {"tasks": ["synthetic"], "seeds": [1], "batches": [[4, 1]], "runs_dir": ctx["out"],
               "shared": {"glue_dir": ctx["glue"], "model_name_or_path": ctx["model"], "max_length": 32,
                          "max_train_steps": 1}}
        for key, value in changes.items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value
        Path(ctx["tmp"], "grid.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    return setup


def raw_file(name: str, text: str):
    def setup(ctx: dict) -> None:
        Path(ctx["tmp"], name).write_text(text)

    return setup


def report_runs(damage: Callable[[Path], None]):
    """A finished run folder at {tmp}/runs/study/rte/default/B8_N1/seed1 (3 steps), then `damage(run_dir)`."""

    def setup(ctx: dict) -> None:
        d = Path(ctx["tmp"]) / "runs" / "study" / "rte" / "default" / "B8_N1" / "seed1"
        d.mkdir(parents=True)
        derived = {"micro_batch_size": 8, "accumulation_steps": 1, "num_processes": 1, "effective_batch_size": 8,
                   "task": "rte", "total_optimizer_steps": 3}
        (d / "config.json").write_text(json.dumps({"task_name": "rte", "seed": 1, "derived": derived}))
        (d / "final_metrics.json").write_text(json.dumps({"status": "completed", "optimizer_steps": 3,
                                                          "main_metric": "accuracy", "eval": {"accuracy": 0.5}}))
        (d / "steps.jsonl").write_text("".join(json.dumps({"optimizer_step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)))
        damage(d)

    return setup


def _rewrite(name: str, text: str):
    return lambda d: (d / name).write_text(text)


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input: the script, its argv ({tmp}, {out}, {glue}, {model} filled in), the text the error line must
    contain, an optional setup, and whether the child runs without the permission-override capabilities."""

    id: str
    script: str
    argv: list[str]
    expect: list[str]
    setup: Callable[[dict], None] | None = None
    watch: str = "{out}"
    drop_caps: bool = False


def ft(id_, flags, *expect, **kw) -> Case:
    return Case(id_, "finetune", [*FT, *flags], list(expect), **kw)


def resume(id_, flags, *expect, damage=None) -> Case:
    return Case(id_, "finetune", [*FT, *flags], list(expect), setup=resume_setup(damage))


def grid(id_, *expect, argv=("{tmp}/grid.yaml",), **changes) -> Case:
    return Case(id_, "grid", list(argv), list(expect), setup=grid_file(**changes))


def report(id_, damage, *expect) -> Case:
    return Case(id_, "report", ["{tmp}/runs/study", "--output_dir", "{out}", "--probe_dir", "", "--batchnorm_dir", ""],
                list(expect), setup=report_runs(damage))


def probe(id_, flags, *expect, **kw) -> Case:
    return Case(id_, "probe", ["--task_name", "synthetic", "--glue_dir", "{glue}", "--model_name_or_path", "{model}",
                               "--output_dir", "{out}", *flags], list(expect), **kw)


CASES = [
    # --- finetune: values validation refuses before anything is loaded
    ft("lr_nan", ["--learning_rate", "nan"], "--learning_rate"),
    ft("lr_negative", ["--learning_rate", "-1"], "--learning_rate"),
    ft("lr_inf", ["--learning_rate", "inf"], "--learning_rate"),
    ft("adam_epsilon_negative", ["--adam_epsilon", "-1"], "--adam_epsilon"),
    ft("weight_decay_negative", ["--weight_decay", "-0.01"], "--weight_decay"),
    ft("warmup_steps_negative", ["--num_warmup_steps", "-1"], "--num_warmup_steps"),
    ft("warmup_ratio_nan", ["--warmup_ratio", "nan"], "--warmup_ratio"),
    ft("max_grad_norm_nan", ["--max_grad_norm", "nan"], "--max_grad_norm"),
    ft("seed_negative", ["--seed", "-1"], "--seed"),
    ft("seed_too_large", ["--seed", str(2**32)], "--seed"),
    ft("data_seed_negative", ["--data_seed", "-1"], "--data_seed"),
    ft("dropout_seed_negative", ["--dropout_seed", "-1"], "--dropout_seed"),
    ft("eval_batch_zero", ["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    ft("scheduler_bogus", ["--lr_scheduler_type", "bogus"], "--lr_scheduler_type", "bogus", "constant_with_warmup"),
    ft("fingerprint_dim_zero", ["--fingerprint_steps", "0", "--fingerprint_dim", "0"], "--fingerprint_dim"),
    ft("fingerprint_step_negative", ["--fingerprint_steps", "-1"], "--fingerprint_steps"),
    ft("max_train_samples_negative", ["--max_train_samples", "-5"], "--max_train_samples"),
    ft("max_eval_samples_zero", ["--max_eval_samples", "0"], "--max_eval_samples"),
    ft("eval_steps_negative", ["--eval_steps", "-2"], "--eval_steps"),
    ft("batch_size_not_a_number", ["--per_device_train_batch_size", "abc"], "--per_device_train_batch_size"),
    ft("unknown_flag", ["--learning_speed", "1e-4"], "unrecognized arguments: --learning_speed"),
    ft("mixed_precision_bogus", ["--mixed_precision", "fp8"], "--mixed_precision"),
    ft("unknown_task", ["--task_name", "nope"], "unknown task 'nope'"),
    # --- finetune: the file system
    ft("output_dir_is_a_file", [], "--output_dir", "not a folder", setup=file_at_out),
    ft("output_dir_not_empty", [], "--output_dir", "not empty", setup=nonempty_out),
    ft("output_dir_no_permission", ["--output_dir", "{tmp}/locked/run"], "no permission", "locked",
       setup=readonly_parent, watch="{tmp}/locked", drop_caps=True),
    Case("train_file_no_permission", "finetune", ["--task_name", "sst2", "--train_file", "{tmp}/train.csv",
                                                  "--validation_file", "{tmp}/dev.csv", "--model_name_or_path", "{model}",
                                                  "--output_dir", "{out}"], ["--train_file", "train.csv"],
         setup=unreadable_train_file, drop_caps=True),
    # --- finetune: resume
    resume("resume_not_a_checkpoint", ["--resume_from_checkpoint", "{glue}"], "not a checkpoint", "manifest.json"),
    resume("resume_missing_folder", ["--resume_from_checkpoint", "{tmp}/nowhere"], "checkpoint folder not found"),
    resume("resume_other_settings", ["--resume_from_checkpoint", "latest", "--learning_rate", "1e-3",
                                     "--per_device_train_batch_size", "2"],
           "other settings", "learning_rate", "per_device_train_batch_size"),
    resume("resume_truncated_optimizer", ["--resume_from_checkpoint", "{out}/checkpoints/step_0000004"],
           "optimizer.pt", "truncated", damage=_truncate("optimizer.pt")),
    resume("resume_truncated_rng_state", ["--resume_from_checkpoint", "{out}/checkpoints/step_0000004"],
           "rng_rank0.json", "truncated", damage=_truncate("rng_rank0.json")),
    resume("resume_corrupt_weights", ["--resume_from_checkpoint", "{out}/checkpoints/step_0000004"],
           "model.safetensors", "sha256", damage=_flip_byte("model.safetensors")),
    resume("resume_damaged_manifest", ["--resume_from_checkpoint", "{out}/checkpoints/step_0000004"],
           "manifest.json", damage=_damaged_manifest),
    resume("resume_latest_all_damaged", ["--resume_from_checkpoint", "latest"], "no complete checkpoint",
           "optimizer.pt", damage=_damage_all),
    resume("resume_latest_no_checkpoints", ["--resume_from_checkpoint", "latest"], "no complete checkpoint",
           damage=_no_checkpoints),
    resume("resume_old_format_pickles", ["--resume_from_checkpoint", "latest"], "old-format checkpoint",
           damage=_old_format_only),
    resume("resume_stray_step_folder_named", ["--resume_from_checkpoint", "{out}/checkpoints/step_0000009"],
           "step_0000009", "not a checkpoint", damage=_stray),
    # --- grid files
    grid("grid_seeds_scalar", "'seeds'", seeds=1),
    grid("grid_seeds_text", "'seeds'", seeds="abc"),
    grid("grid_effective_batch_text", "'effective_batch_size'", batches=None, effective_batch_size="32",
         micro_batch_sizes=[8]),
    grid("grid_batches_not_pairs", "batches", batches=[[4]]),
    grid("grid_micro_batch_zero", "micro_batch_sizes", batches=None, effective_batch_size=8, micro_batch_sizes=[0]),
    grid("grid_batches_empty", "batches", batches=[]),
    grid("grid_micro_batches_empty", "micro_batch_sizes", batches=None, effective_batch_size=8, micro_batch_sizes=[]),
    grid("grid_tasks_text", "'tasks'", tasks="synthetic"),
    grid("grid_arms_list", "'arms'", arms=["default"]),
    grid("grid_cell_lr_nan", "learning_rate", shared={"learning_rate": float("nan")}),
    grid("grid_parallel_zero", "--parallel", argv=("{tmp}/grid.yaml", "--parallel", "0")),
    grid("grid_file_missing", "grid file not found", argv=("{tmp}/nope.yaml",)),
    Case("grid_not_yaml", "grid", ["{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML"],
         setup=raw_file("bad.yaml", "tasks: [rte\nseeds: {\n")),
    # --- report
    report("report_malformed_final_metrics", _rewrite("final_metrics.json", '{"status": "completed",\n'),
           "final_metrics.json line", "invalid JSON"),
    report("report_missing_config", lambda d: (d / "config.json").unlink(), "without config.json"),
    report("report_malformed_steps_line", _rewrite("steps.jsonl", '{"optimizer_step": 1}\n{"optimizer_st\n'
                                                   '{"optimizer_step": 3}\n'), "steps.jsonl line 2"),
    report("report_missing_step_rows", _rewrite("steps.jsonl", '{"optimizer_step": 1}\n'), "steps.jsonl",
           "1 step rows", "1..3"),
    report("report_torn_last_line", _rewrite("steps.jsonl", '{"optimizer_step": 1}\n{"optimizer_step": 2}\n{"opt'),
           "steps.jsonl line 3"),
    Case("report_runs_dir_missing", "report", ["{tmp}/none", "--output_dir", "{out}"], ["runs folder not found"]),
    Case("report_output_is_a_file", "report", ["{tmp}/runs/study", "--output_dir", "{out}", "--probe_dir", ""],
         ["--output_dir", "not a folder"], setup=lambda ctx: (report_runs(lambda d: None)(ctx), file_at_out(ctx))),
    # --- probe: refused before the probe computes anything
    probe("probe_lr_nan", ["--learning_rate", "nan"], "--learning_rate"),
    probe("probe_output_is_a_file", [], "--output_dir", "not a folder", setup=file_at_out),
    # --- small scripts
    Case("make_synthetic_n_train", "make_synthetic", ["--output_dir", "{out}", "--n_train", "-1"], ["n_train"]),
    Case("demo_n_train", "demo", ["--output_dir", "{out}", "--n_train", "0"], ["n_train"]),
]


def _snapshot(path: Path):
    """Everything about `path` a failed command must not change: None if absent, else contents and times."""
    if not path.exists():
        return None
    if path.is_file():
        return ("file", path.read_bytes(), path.stat().st_mtime_ns)
    return {str(p.relative_to(path)): (p.is_dir(), None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))} | {".": path.stat().st_mtime_ns}


def _drop_permission_override() -> None:
    """In the child, before exec: remove CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) from the bounding set,
    so even root gets 'permission denied' on files its mode bits forbid."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in (1, 2):
        if prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def _can_drop_capabilities() -> bool:
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_permission_override)
    return probe.returncode == 0


def test_at_least_forty_cases_and_every_listed_one():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_the_output_alone(case, tmp_path, tiny_model_dir, synthetic_glue_dir,
                                                                  trained_run):
    if case.drop_caps and not _can_drop_capabilities():
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so a permission error cannot be produced")
    ctx = {"tmp": str(tmp_path), "out": str(tmp_path / "out"), "glue": synthetic_glue_dir, "model": tiny_model_dir,
           "trained": str(trained_run)}
    if case.setup is not None:
        case.setup(ctx)
    watched = Path(case.watch.format(**ctx))
    before = _snapshot(watched)
    argv = [a.format(**ctx) for a in case.argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / f"{case.script}.py"), *argv], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path,
                          preexec_fn=_drop_permission_override if case.drop_caps else None)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    for text in case.expect:
        assert text in errors[0], errors[0]
    assert _snapshot(watched) == before, f"{watched} changed"
    assert not (tmp_path / MARKER_NAME).exists(), "a pickle from the run folder was executed"


def test_scheduler_choices_are_the_transformers_types_the_loop_can_drive():
    """--lr_scheduler_type offers every transformers SchedulerType that builds from (warmup, total) and steps
    without a metric, and only those."""
    import torch
    from transformers import SchedulerType, get_scheduler

    from bert_accum.core.config import LR_SCHEDULER_TYPES

    usable = []
    for kind in SchedulerType:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        try:
            scheduler = get_scheduler(kind.value, optimizer=optimizer, num_warmup_steps=1, num_training_steps=4)
            optimizer.step()
            scheduler.step()
            json.dumps(scheduler.state_dict())  # checkpoints keep it as JSON
        except (TypeError, ValueError):
            continue
        usable.append(kind.value)
    assert list(LR_SCHEDULER_TYPES) == usable
