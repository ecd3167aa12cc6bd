"""The grid runner: expansion, dry run, skip/resume without duplicated or lost rows; fingerprint determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bert_accum.core.config import TrainConfig, parse_args
from bert_accum.errors import BertAccumError
from bert_accum.core.fingerprint import Fingerprinter, fingerprint, load_fingerprints
from bert_accum.study.grid import GridSpec, cell_status, check_config_matches, describe, expand, grid_main
from bert_accum.core.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def _grid(tmp_path, model_dir, glue_dir, **extra) -> Path:
    raw = {
        "name": "t",
        "runs_dir": str(tmp_path / "runs"),
        "tasks": ["synthetic"],
        "effective_batch_size": 8,
        "micro_batch_sizes": [8, 2],
        "seeds": [1, 2],
        "arms": {"default": {}, "controlled": {"dropout": "invariant", "padding": "window", "loss_normalization": "global"}},
        "shared": {"glue_dir": glue_dir, "model_name_or_path": model_dir, "max_length": 32, "max_train_steps": 3,
                   "per_device_eval_batch_size": 32},
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_expansion_order_names_and_configs(tmp_path):
    spec = GridSpec.from_dict({
        "tasks": ["rte", "cola"], "effective_batch_size": 32, "micro_batch_sizes": [32, 8, 2], "seeds": [1, 2, 3],
        "arms": {"default": {}, "controlled": {"dropout": "invariant"}}, "shared": {"learning_rate": 1e-4},
        "task_overrides": {"cola": {"max_train_samples": 100}}, "runs_dir": str(tmp_path),
    })
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 3 * 3
    # seed-major: the first 12 cells are all of seed 1, so a grid cut short still holds whole seeds
    assert {c.seed for c in cells[:12]} == {1} and {c.seed for c in cells[12:24]} == {2}
    assert [(c.micro_batch_size, c.accumulation_steps) for c in cells[:3]] == [(32, 1), (8, 4), (2, 16)]
    assert [c.index for c in cells] == list(range(36))
    first = cells[0]
    assert first.name == "rte/default/B32_N1/seed1" and first.run_dir == tmp_path / first.name
    cola_ctrl = next(c for c in cells if c.task == "cola" and c.arm == "controlled")
    cfg = cola_ctrl.config
    assert (cfg.dropout, cfg.max_train_samples, cfg.learning_rate, cfg.effective_batch_size) == ("invariant", 100, 1e-4, None)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 32
    assert next(c for c in cells if c.task == "rte").config.max_train_samples is None
    explicit = expand(GridSpec.from_dict({"tasks": ["rte"], "batches": [[4, 2], [8, 1]], "seeds": [0]}))
    assert [(c.micro_batch_size, c.accumulation_steps) for c in explicit] == [(4, 2), (8, 1)]


@pytest.mark.parametrize("raw, message", [
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "bogus": 1}, "unknown grid key"),
    ({"tasks": ["rte"], "seeds": [1], "effective_batch_size": 32, "micro_batch_sizes": [5]}, "do not divide"),
    ({"tasks": ["rte"], "seeds": [1]}, "either 'batches'"),
    ({"tasks": [], "seeds": [1], "batches": [[8, 1]]}, "'tasks' must be"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "shared": {"seed": 3}}, "sets seed"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "task_overrides": {"cola": {}}}, "not in the grid"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "comparisons": {"bug": "default"}}, "arm.s. bug that"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "comparisons": {"default": "default"}}, "with itself"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "comparisons": ["default"]}, "must map arm names"),
    ({"tasks": ["rte"], "seeds": [1, 2], "batches": [[8, 1]], "arms": {"a": {}, "b": {"seeds": [1]}},
      "comparisons": {"a": "b"}}, "not planned for every seed of arm a"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "run_first": ["rte/defualt"]}, "run_first prefix"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "changes": "more seeds"}, "'changes' must be a list"),
    ({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "changes": ["more seeds", ""]}, "'changes' must be a list"),
])
def test_bad_grids_are_one_line_errors(raw, message):
    with pytest.raises(BertAccumError, match=message):
        GridSpec.from_dict(raw)


def test_a_typo_in_a_config_key_fails_before_anything_runs():
    spec = GridSpec.from_dict({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]], "shared": {"learning_rat": 1e-4}})
    with pytest.raises(BertAccumError, match="learning_rat"):
        expand(spec)


def test_command_line_round_trip_of_a_cell_config():
    cfg = TrainConfig(task_name="rte", glue_dir="/g", per_device_train_batch_size=8, gradient_accumulation_steps=4,
                      dropout="invariant", bug_modes=["clip_per_micro_batch"], fingerprint_steps=[0, 2],
                      max_grad_norm=0.5, disable_progress_bar=True, output_dir="/o", checkpointing_steps="5")
    back = parse_args(cfg.to_argv())
    assert back == cfg
    argv = TrainConfig(task_name="rte").to_argv()
    assert argv == ["--task_name", "rte", "--per_device_train_batch_size", "8", "--seed", "42"]


def test_dry_run_and_count_print_every_cell(tmp_path, tiny_model_dir, synthetic_glue_dir, capsys):
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir)
    assert grid_main([str(grid), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "8"
    assert grid_main([str(grid), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    index, run_dir, command = lines[5].split("\t")
    assert index == "5" and run_dir == str(tmp_path / "runs/synthetic/default/B2_N4/seed2")
    assert command.startswith("python -m bert_accum.cli ")
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 4" in command and "--seed 2" in command
    assert grid_main([str(grid), "--dry-run", "--cell", "5", "--set", "max_train_steps=7"]) == 0
    only = capsys.readouterr().out.strip().splitlines()
    assert len(only) == 1 and only[0].startswith("5\t") and "--max_train_steps 7" in only[0]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert grid_main([str(grid), "--cell", "8"]) == 2
    assert "cells 0..7" in capsys.readouterr().err


def _rows(run_dir: Path, name: str) -> list[int]:
    return [r["optimizer_step"] for r in read_jsonl(run_dir / name)]


def test_killed_grid_resumes_with_exactly_one_row_set_per_cell(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Run a grid, SIGKILL it in the middle of a cell (after a checkpoint), rerun: every cell ends complete,
    each optimizer step recorded once, and the resumed cell continues the same trajectory as an unbroken run."""
    steps = 30
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, seeds=[1], micro_batch_sizes=[8, 2],
                 arms={"default": {}})
    raw = yaml.safe_load(grid.read_text())
    raw["shared"].update(max_train_steps=steps, checkpointing_steps=3, checkpoints_total_limit=1,
                         fingerprint_steps=[0, 1, 15, 30], fingerprint_dim=64)
    grid.write_text(yaml.safe_dump(raw, sort_keys=False))
    cells = expand(GridSpec.load(grid))
    victim = cells[1]
    cmd = [sys.executable, str(REPO / "scripts/grid.py"), str(grid)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if len(_rows(victim.run_dir, "steps.jsonl")) >= 7 or proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert cell_status(cells[0]) == "finished"
    assert cell_status(victim) == "interrupted", "the kill should land mid-cell, after a checkpoint"
    before = _rows(victim.run_dir, "steps.jsonl")
    assert 7 <= len(before) < steps
    assert [p.name for p in (victim.run_dir / "checkpoints").glob("*")] and \
        len(list((victim.run_dir / "checkpoints").glob("step_*"))) == 1  # total limit 1

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 already finished, 1 to run" in out.stdout
    for cell in cells:
        assert cell_status(cell) == "finished"
        assert _rows(cell.run_dir, "steps.jsonl") == list(range(1, steps + 1))
        assert _rows(cell.run_dir, "eval.jsonl") == [*range(8, steps, 8), steps]  # 60 examples: 8 windows per epoch
        assert json.loads((cell.run_dir / "final_metrics.json").read_text())["status"] == "completed"
        assert not (cell.run_dir / "checkpoints").exists()  # removed once the cell finished
        assert sorted(load_fingerprints(cell.run_dir)) == [0, 1, 15, 30]
    log = (tmp_path / "runs/logs" / (victim.name.replace("/", "__") + ".log")).read_text()
    assert "(interrupted)" in log and "--resume_from_checkpoint latest" in log

    # Same cell run without interruption: identical per-step losses (the checkpoint restored RNG, data position).
    fresh = victim.config
    fresh_dir = tmp_path / "fresh"
    from bert_accum.core.train import run

    run(TrainConfig.from_dict({**fresh.to_dict(), "output_dir": str(fresh_dir), "checkpointing_steps": None}))
    resumed = read_jsonl(victim.run_dir / "steps.jsonl")
    unbroken = read_jsonl(fresh_dir / "steps.jsonl")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in unbroken], rel=1e-5)

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "2 already finished, 0 to run" in again.stdout


def test_an_edited_grid_does_not_mix_into_old_run_folders(tmp_path, tiny_model_dir, synthetic_glue_dir):
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, seeds=[1], micro_batch_sizes=[8], arms={"default": {}})
    assert grid_main([str(grid)]) == 0
    cell = expand(GridSpec.load(grid))[0]
    check_config_matches(cell)  # the folder agrees with the grid that made it
    (cell.run_dir / "final_metrics.json").unlink()  # pretend it was cut off, then the grid file was edited
    edited = expand(GridSpec.load(grid), set_values={"learning_rate": 1e-3})[0]
    with pytest.raises(BertAccumError, match="different settings.*learning_rate"):
        check_config_matches(edited)
    assert describe(edited).split("\t")[2].endswith("--overwrite_output_dir")  # stale: no checkpoint to resume


def test_fingerprints_are_deterministic_and_measure_distance():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64))
    cached = Fingerprinter(dim=1024)
    a = cached.project(model)
    assert np.array_equal(a, fingerprint(model, 1024))  # cache or not, same projection
    assert np.array_equal(a, cached.project(model))
    twin = BertModel(model.config)
    twin.load_state_dict(model.state_dict())
    assert np.array_equal(a, Fingerprinter(1024).project(twin))  # another run of the same weights
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    true = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), twin.parameters()))).item()
    est = float(np.linalg.norm(Fingerprinter(1024).project(twin) - a))
    # E||S(x-y)||^2 = ||x-y||^2 with relative spread sqrt(2/1024) = 4.4%: 20% is a 4.5-sigma bound
    assert est == pytest.approx(true, rel=0.2)


def test_yaml_numbers_written_as_text_become_numbers_and_no_clipping_round_trips():
    spec = GridSpec.from_dict({"tasks": ["rte"], "seeds": [1], "batches": [[8, 1]],
                               "shared": {"learning_rate": "2e-5", "max_grad_norm": None, "fingerprint_steps": ["0", "3"]}})
    cfg = expand(spec)[0].config
    assert cfg.learning_rate == 2e-5 and cfg.fingerprint_steps == [0, 3]
    back = parse_args(cfg.to_argv())
    assert back.learning_rate == 2e-5 and back.max_grad_norm == 0.0  # None and 0 both mean no clipping
    with pytest.raises(BertAccumError, match="learning_rate: expected a number"):
        TrainConfig.from_dict({"task_name": "rte", "learning_rate": "fast"})


def test_a_finished_folder_from_other_settings_is_not_counted_as_done(tmp_path, tiny_model_dir, synthetic_glue_dir):
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, seeds=[1], micro_batch_sizes=[8], arms={"default": {}})
    assert grid_main([str(grid), "--set", "max_train_steps=1"]) == 0  # a smoke test into the same runs_dir
    with pytest.raises(BertAccumError, match="different settings.*max_train_steps"):
        from bert_accum.study.grid import run_grid

        run_grid(expand(GridSpec.load(grid)), say=lambda *_: None)


def test_arms_restrict_seeds_and_batches_and_derive_seed_fields(tmp_path):
    """A floor arm runs only the (E, 1) reference of some seeds, with its dropout seed offset from the cell's seed."""
    from bert_accum.study.grid import GridSpec, expand

    spec = GridSpec.from_dict({
        "tasks": ["synthetic"], "batches": [[8, 1], [2, 4]], "seeds": [1, 2, 3], "runs_dir": str(tmp_path),
        "seed_offsets": {"dropout_seed": 0},
        "arms": {"default": {}, "floor": {"batches": [[8, 1]], "seeds": [1, 2], "seed_offsets": {"dropout_seed": 100}},
                 "init": {"batches": [[8, 1]], "seeds": [3], "seed_offsets": {"seed": 50, "data_seed": 0}}},
        "equivalence_margins": {"synthetic": {"accuracy": 0.01}},
        "reference_thresholds": {"synthetic": {"accuracy": 0.78}},
    })
    cells = expand(spec)
    names = [c.name for c in cells]
    assert names.count("synthetic/floor/B8_N1/seed1") == 1 and not any("floor/B2_N4" in n for n in names)
    assert len(cells) == 3 * 2 + 2 + 1
    by_name = {c.name: c.config for c in cells}
    assert by_name["synthetic/default/B2_N4/seed2"].dropout_seed == 2
    floor = by_name["synthetic/floor/B8_N1/seed2"]
    assert (floor.seed, floor.resolved_data_seed, floor.dropout_seed) == (2, 2, 102)
    init = by_name["synthetic/init/B8_N1/seed3"]
    assert (init.seed, init.data_seed, init.dropout_seed) == (53, 3, 3)
    assert spec.equivalence_margins == {"synthetic": {"accuracy": 0.01}}
    assert spec.reference_thresholds == {"synthetic": {"accuracy": 0.78}}


@pytest.mark.parametrize("arm", [{"seeds": [9]}, {"batches": [[4, 2]]}, {"seed_offsets": {"mlm_seed": 1}}])
def test_arm_restrictions_outside_the_grid_are_refused(arm):
    from bert_accum.study.grid import GridSpec

    with pytest.raises(BertAccumError):
        GridSpec.from_dict({"tasks": ["synthetic"], "batches": [[8, 1]], "seeds": [1], "arms": {"a": arm}})


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _one_cell_grid(tmp_path, model_dir, glue_dir, steps: int, **shared) -> Path:
    grid = _grid(tmp_path, model_dir, glue_dir, seeds=[1], micro_batch_sizes=[8], arms={"default": {}})
    raw = yaml.safe_load(grid.read_text())
    raw["shared"].update(max_train_steps=steps, **shared)
    grid.write_text(yaml.safe_dump(raw, sort_keys=False))
    return grid


def test_two_grid_processes_share_a_grid_and_run_every_cell_exactly_once(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Two grid processes started together on one grid: each cell is run by one of them (the other says it was
    taken), and every cell ends finished and verified with one row per step."""
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, seeds=[1], micro_batch_sizes=[8, 2], arms={"default": {}})
    cells = expand(GridSpec.load(grid))
    cmd = [sys.executable, str(REPO / "scripts/grid.py"), str(grid)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    both = "\n".join(outputs)
    for cell in cells:
        assert cell_status(cell) == "finished"
        assert _rows(cell.run_dir, "steps.jsonl") == [1, 2, 3]
        ran = [line for line in both.splitlines() if f"] {cell.name}: completed" in line]
        assert len(ran) == 1, both
        log = (tmp_path / "runs/logs" / (cell.name.replace("/", "__") + ".log")).read_text()
        assert log.count("\n# ") == 1, log  # one launch of the cell in all
    assert "taken by another process" in both or "already finished" in both


def test_a_locked_cell_is_left_to_its_holder(tmp_path, tiny_model_dir, synthetic_glue_dir):
    from bert_accum.study.grid import CellLock, run_cell

    grid = _one_cell_grid(tmp_path, tiny_model_dir, synthetic_glue_dir, steps=1)
    cell = expand(GridSpec.load(grid))[0]
    holder = CellLock(cell)
    assert holder.acquire()
    try:
        assert run_cell(cell) == f"taken by another process (pid {os.getpid()})"
        assert not cell.run_dir.exists()
        status = subprocess.run([sys.executable, str(REPO / "scripts/grid.py"), str(grid), "--status"],
                                capture_output=True, text=True, timeout=60)
        assert status.stdout.split("\t")[1] == "running", status.stdout
    finally:
        holder.release()


def test_killing_the_grid_process_also_ends_its_cell(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """SIGKILL to the grid process alone (not its group): the cell's process must not run on as an orphan."""
    grid = _one_cell_grid(tmp_path, tiny_model_dir, synthetic_glue_dir, steps=2000)
    cell = expand(GridSpec.load(grid))[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/grid.py"), str(grid)], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _rows(cell.run_dir, "steps.jsonl") and proc.poll() is None:
            time.sleep(0.1)
        children = _children(proc.pid)
        assert children, "the cell's process should be running"
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(c) for c in children):
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "the cell's process outlived the grid"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    from bert_accum.study.grid import CellLock

    deadline = time.time() + 10
    while time.time() < deadline and CellLock(cell).held_elsewhere():
        time.sleep(0.1)
    assert not CellLock(cell).held_elsewhere()  # the lock went with them


def test_final_metrics_with_missing_rows_is_damaged_and_rerun(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """A cell that says completed but holds 1 of 3 step rows is never reported finished: `--status` calls it
    damaged (naming the file), and the grid runs it again from scratch."""
    grid = _one_cell_grid(tmp_path, tiny_model_dir, synthetic_glue_dir, steps=3)
    cmd = [sys.executable, str(REPO / "scripts/grid.py"), str(grid)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    cell = expand(GridSpec.load(grid))[0]
    steps = cell.run_dir / "steps.jsonl"
    steps.write_text(steps.read_text().splitlines()[0] + "\n")
    assert cell_status(cell) == "damaged"
    status = subprocess.run([*cmd, "--status"], env=env, capture_output=True, text=True, timeout=60)
    _, state, name, why = status.stdout.strip().split("\t")
    assert (state, name) == ("damaged", cell.name) and "steps.jsonl" in why and "1 step rows" in why
    assert "--overwrite_output_dir" in describe(cell)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 already finished, 1 to run" in again.stdout
    assert cell_status(cell) == "finished" and _rows(cell.run_dir, "steps.jsonl") == [1, 2, 3]


def test_a_saved_config_without_newer_fields_still_matches(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Fields added since a folder was written count as their defaults when the folder's config is compared."""
    grid = _one_cell_grid(tmp_path, tiny_model_dir, synthetic_glue_dir, steps=1)
    cell = expand(GridSpec.load(grid))[0]
    cell.run_dir.mkdir(parents=True)
    saved = {k: v for k, v in cell.config.to_dict().items() if k not in ("data_seed", "dropout_seed", "max_train_examples")}
    (cell.run_dir / "config.json").write_text(json.dumps(saved))
    check_config_matches(cell)
    saved["learning_rate"] = 1.0
    (cell.run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(BertAccumError, match="learning_rate"):
        check_config_matches(cell)


def test_status_reports_a_changed_setting_as_stale(tmp_path, tiny_model_dir, synthetic_glue_dir, capsys):
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, seeds=[1], micro_batch_sizes=[8], arms={"default": {}})
    assert grid_main([str(grid)]) == 0
    capsys.readouterr()
    assert grid_main([str(grid), "--status"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == "finished"
    assert grid_main([str(grid), "--status", "--set", "learning_rate=0.001"]) == 0
    index, state, name, why = capsys.readouterr().out.rstrip("\n").split("\t")
    assert (index, state, name) == ("0", "stale", "synthetic/default/B8_N1/seed1") and "learning_rate" in why
    # the same runs with a second seed and a second shape planned: seed 2's B8 cell is estimated from seed 1's
    # finished one, the B2 cells have nothing of their shape to go by
    more = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, seeds=[1, 2], micro_batch_sizes=[8, 2], arms={"default": {}})
    assert grid_main([str(more), "--status", "--parallel", "2"]) == 0
    err = capsys.readouterr().err
    assert "4 cells: 1 finished, 3 new. Left: 3 cells, about 0.0 h of training time" in err
    assert ", 0.0 h with --parallel 2; 2 of them have no finished cell of their shape to go by." in err


def test_dry_run_into_a_closed_pipe_exits_quietly(tmp_path):
    """`grid.py --dry-run | head -n 1` on a grid whose listing overflows the pipe: no BrokenPipeError traceback."""
    grid = _grid(tmp_path, "/m", "/g", seeds=list(range(300)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "-c", f"{sys.executable} {REPO / 'scripts/grid.py'} {grid} --dry-run | head -n 1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("0\t") and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == "", proc.stderr


def test_shipped_grid_files_are_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from bert_accum.study.grid import find_grid_file, packaged_grid_files

    monkeypatch.chdir(tmp_path)
    names = {p.stem for p in packaged_grid_files()}
    assert {"study_main", "study_bugs", "study_mlm", "study_mlm_controlled"} <= names
    for spelling in ("configs/study_main.yaml", "study_main.yaml", "study_main"):
        assert find_grid_file(spelling).name == "study_main.yaml"
    assert grid_main(["study_main", "--count"]) == 0 and int(capsys.readouterr().out) > 0
    assert grid_main(["nope.yaml", "--count"]) == 2
    err = capsys.readouterr().err
    assert "grid file not found: nope.yaml" in err and "study_main" in err


def test_cells_state_their_precision_so_a_launcher_cannot_change_it(tmp_path):
    grid = _grid(tmp_path, "/m", "/g", seeds=[1], micro_batch_sizes=[8], arms={"default": {}})
    assert "--precision fp32" in describe(expand(GridSpec.load(grid))[0], "accelerate launch --mixed_precision bf16")


def test_run_first_orders_computation_without_changing_indices(tmp_path, tiny_model_dir, synthetic_glue_dir, capsys):
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, run_first=["synthetic/controlled/B2_N4"])
    assert grid_main([str(grid), "--dry-run"]) == 0
    order = [line.split("\t")[:2] for line in capsys.readouterr().out.strip().splitlines()]
    # grid order is seed, arm, (B, N): controlled (2,4) is cell 3 (seed 1) and 7 (seed 2); both run first
    assert [i for i, _ in order] == ["3", "7", "0", "1", "2", "4", "5", "6"]
    assert order[0][1].endswith("synthetic/controlled/B2_N4/seed1")
    assert grid_main([str(grid), "--dry-run", "--cell", "6", "0"]) == 0  # --cell keeps its own order
    assert [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()] == ["6", "0"]


@pytest.mark.parametrize("run_first, message", [
    (["synthetic/contrlled"], "matches no cell"),
    (["synthetic/controlled/B4_N2"], "matches no cell"),
    ("synthetic/default", "must be a list"),
    ([""], "must be a list"),
])
def test_a_bad_run_first_is_a_one_line_error(tmp_path, tiny_model_dir, synthetic_glue_dir, capsys, run_first, message):
    grid = _grid(tmp_path, tiny_model_dir, synthetic_glue_dir, run_first=run_first)
    assert grid_main([str(grid), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_status_estimates_the_training_time_left_from_finished_cells_of_the_same_shape(tmp_path, capsys):
    from bert_accum.study.grid import time_left

    grid = _grid(tmp_path, "/m", "/g", seeds=[1, 2, 3], arms={"default": {}})
    cells = expand(GridSpec.load(grid))   # seed-major: B8 and B2 of seed 1, then of seed 2, then of seed 3
    assert [(c.seed, c.micro_batch_size) for c in cells] == [(1, 8), (1, 2), (2, 8), (2, 2), (3, 8), (3, 2)]
    for cell, seconds in ((cells[0], 100.0), (cells[2], 300.0)):
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "final_metrics.json").write_text(json.dumps({"train_seconds": seconds}))
    states = ["finished", "new", "finished", "interrupted", "new", "new"]
    # the one B8 cell left counts the median of 100 and 300; no B2 cell has finished, so those three are not estimated
    assert time_left(cells, states) == (200.0, 3)
    cells[1].run_dir.mkdir(parents=True)
    (cells[1].run_dir / "final_metrics.json").write_text(json.dumps({"train_seconds": 50.0}))
    assert time_left(cells, ["finished", "finished", "finished", "interrupted", "new", "new"]) == (200.0 + 2 * 50.0, 0)
    # the CLI: stdout stays one line per cell, the summary goes to stderr
    assert grid_main([str(grid), "--status", "--parallel", "2"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 6
    assert "Left: 6 cells, no time estimate yet: none has a finished cell of its task and (B, N) to go by." in err
    assert " h of training time" not in err
