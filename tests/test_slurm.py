"""SLURM scripts (scripts/slurm/): syntax, dry runs under a fake SLURM environment, and what they hand to
srun/sbatch, checked with stand-ins for `scontrol`, `srun`, `sbatch` and `accelerate` first on PATH.

The last test submits a real job array; it runs only where a SLURM controller answers `scontrol ping`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "scripts" / "slurm"
GRID_PY = REPO / "scripts" / "grid.py"
SCRIPTS = sorted(p for p in SLURM.iterdir() if p.suffix in (".sh", ".sbatch"))
NODELIST = "gpu-a[07-08]"
FINETUNE_ARGS = ["--task_name", "rte", "--glue_dir", "/data/glue", "--per_device_train_batch_size", "8",
                 "--effective_batch_size", "256", "--output_dir", "runs/rte W16"]  # a space survives quoting


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """scontrol that expands NODELIST; srun that runs its command once per node with SLURM_NODEID set;
    accelerate and sbatch that record their arguments (NUL-separated) under $RECORD."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", f"""\
        [[ "$1 $2 $3" == "show hostnames {NODELIST}" ]] || {{ echo "fake scontrol: unexpected $*" >&2; exit 1; }}
        printf 'gpu-a07\\ngpu-a08\\n'
        """)
    _fake(bin_dir, "srun", """\
        opts=()
        while [[ "$1" == --* ]]; do opts+=("$1"); shift; done
        printf '%s\\0' "${opts[@]}" > "$RECORD/srun"
        for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done
        """)
    _fake(bin_dir, "accelerate", 'printf \'%s\\0\' accelerate "$@" > "$RECORD/accelerate.$SLURM_NODEID"\n')
    _fake(bin_dir, "sbatch", 'printf \'%s\\0\' sbatch "$@" > "$RECORD/sbatch"; echo "$BERT_ACCUM_DIR" > "$RECORD/sbatch.dir"\n')
    (tmp_path / "record").mkdir()
    return bin_dir


def _env(tmp_path: Path, fake_bin: Path | None = None, **values: str) -> dict[str, str]:
    """The test's environment without the variables of a real SLURM job or the scripts' overrides, plus
    `values` (SLURM_CONF, where the client commands find the controller, is kept)."""
    skip = ("BERT_ACCUM_DIR", "GPUS_PER_NODE", "MAIN_PROCESS_PORT", "ACCELERATE_CONFIG", "DRY_RUN", "ARRAY_LIMIT")
    job = {k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"}
    env = {k: v for k, v in os.environ.items() if k not in job and k not in skip}
    if fake_bin is not None:
        env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env.update(RECORD=str(tmp_path / "record"), PYTHON=sys.executable, **values)
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _recorded(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_all_slurm_scripts_are_present():
    assert {p.name for p in SCRIPTS} >= {"multinode.sbatch", "grid_array.sbatch", "submit_grid.sh"}


# --- multi-node -----------------------------------------------------------------------------------
def _node_command(rank: int, nodes: int, processes: int, ip: str, port: int, launch: list[str]) -> list[str]:
    return ["accelerate", "launch", "--machine_rank", str(rank), "--num_machines", str(nodes),
            "--num_processes", str(processes), "--main_process_ip", ip, "--main_process_port", str(port),
            *launch, str(REPO / "scripts" / "finetune.py"), *FINETUNE_ARGS]


def _multinode_env(tmp_path, fake_bin, **extra):
    return _env(tmp_path, fake_bin, SLURM_NNODES="2", SLURM_JOB_NODELIST=NODELIST, SLURM_JOB_ID="4321",
                SLURM_SUBMIT_DIR=str(REPO), **extra)


def test_multinode_dry_run_prints_each_nodes_accelerate_command(tmp_path, fake_bin):
    env = _multinode_env(tmp_path, fake_bin, SLURM_GPUS_ON_NODE="4", DRY_RUN="1")
    out = _run(["bash", str(SLURM / "multinode.sbatch"), *FINETUNE_ARGS], env, tmp_path).stdout
    # 2 nodes x 4 GPUs = 8 processes; rank 0 on the first host; port 29500 + 4321 % 1000
    want = [_node_command(r, 2, 8, "gpu-a07", 29821, ["--multi_gpu"]) for r in (0, 1)]
    assert [shlex.split(line) for line in out.splitlines()] == want
    assert not (tmp_path / "record" / "srun").exists()


def test_multinode_reads_gpus_per_node_port_and_config_from_the_environment(tmp_path, fake_bin):
    env = _multinode_env(tmp_path, fake_bin, SLURM_GPUS_PER_NODE="a100:2", MAIN_PROCESS_PORT="31000", DRY_RUN="1",
                         ACCELERATE_CONFIG="configs/accelerate/multi_gpu.yaml")
    out = _run(["bash", str(SLURM / "multinode.sbatch"), *FINETUNE_ARGS], env, tmp_path).stdout
    want = [_node_command(r, 2, 4, "gpu-a07", 31000, ["--config_file", "configs/accelerate/multi_gpu.yaml"]) for r in (0, 1)]
    assert [shlex.split(line) for line in out.splitlines()] == want


def test_multinode_srun_gives_each_node_its_slurm_nodeid_as_machine_rank(tmp_path, fake_bin):
    env = _multinode_env(tmp_path, fake_bin, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    _run(["bash", str(SLURM / "multinode.sbatch"), *FINETUNE_ARGS], env, tmp_path)
    record = tmp_path / "record"
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05), so the script passes it on
    assert _recorded(record / "srun") == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=16"]
    for rank in (0, 1):
        assert _recorded(record / f"accelerate.{rank}") == _node_command(rank, 2, 8, "gpu-a07", 29821, ["--multi_gpu"])


@pytest.mark.parametrize("missing", ["allocation", "gpus"])
def test_multinode_refuses_to_guess(tmp_path, fake_bin, missing):
    if missing == "allocation":
        env, message = _env(tmp_path, fake_bin, DRY_RUN="1"), "not inside a SLURM allocation"
    else:  # no GPU count anywhere, and no nvidia-smi on this PATH
        env = _multinode_env(tmp_path, fake_bin, DRY_RUN="1", PATH=f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
        message = "cannot tell the GPUs per node"
        if shutil.which("nvidia-smi", path=env["PATH"]):
            pytest.skip("nvidia-smi is on the system PATH")
    proc = _run(["bash", str(SLURM / "multinode.sbatch"), *FINETUNE_ARGS], env, tmp_path, ok=False)
    assert proc.returncode != 0 and message in proc.stderr and proc.stdout == ""


# --- grid as a job array --------------------------------------------------------------------------
@pytest.fixture
def grid(tmp_path) -> tuple[Path, list[str]]:
    """A 4-cell grid (2 arms x 2 (B, N)) in tmp_path and the scripts/grid.py options used with it."""
    spec = {
        "name": "tiny", "runs_dir": str(tmp_path / "runs"), "tasks": ["synthetic"], "batches": [[4, 1], [2, 2]],
        "seeds": [1], "arms": {"default": {}, "controlled": {"dropout": "invariant", "padding": "window",
                                                              "loss_normalization": "global"}},
        "shared": {"model_name_or_path": str(tmp_path / "model"), "max_train_steps": 2, "max_length": 48},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, ["--glue_dir", str(tmp_path / "glue dir")]


def _grid_lines(grid_path: Path, grid_args: list[str], cwd: Path) -> list[str]:
    out = subprocess.run([sys.executable, str(GRID_PY), str(grid_path), "--dry-run", *grid_args], cwd=cwd,
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_grid_array_task_runs_its_own_cell(tmp_path, grid):
    grid_path, grid_args = grid
    cells = _grid_lines(grid_path, grid_args, tmp_path)
    assert len(cells) == 4
    for index, cell_line in enumerate(cells):
        env = _env(tmp_path, SLURM_ARRAY_TASK_ID=str(index), SLURM_SUBMIT_DIR=str(REPO), DRY_RUN="1")
        out = _run(["bash", str(SLURM / "grid_array.sbatch"), str(grid_path), *grid_args], env, tmp_path).stdout
        command, resolved = out.splitlines()
        assert shlex.split(command) == [sys.executable, str(GRID_PY), str(grid_path), "--cell", str(index), *grid_args]
        assert resolved == cell_line
        assert resolved.split("\t")[0] == str(index)


def test_grid_array_outside_an_array_fails(tmp_path, grid):
    grid_path, _ = grid
    proc = _run(["bash", str(SLURM / "grid_array.sbatch"), str(grid_path)], _env(tmp_path, DRY_RUN="1"), tmp_path, ok=False)
    assert proc.returncode != 0 and "SLURM_ARRAY_TASK_ID" in proc.stderr


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "fake-sbatch"])
def test_submit_grid_sizes_the_array_from_the_grid(tmp_path, fake_bin, grid, dry_run):
    grid_path, grid_args = grid
    extra = {"DRY_RUN": "1"} if dry_run else {}
    env = _env(tmp_path, fake_bin, ARRAY_LIMIT="2", **extra)
    cmd = ["bash", str(SLURM / "submit_grid.sh"), str(grid_path), "--time=00:10:00", "--gpus=1", "--", *grid_args]
    out = _run(cmd, env, tmp_path).stdout
    want = ["sbatch", "--array=0-3%2", "--time=00:10:00", "--gpus=1", str(SLURM / "grid_array.sbatch"),
            str(grid_path), *grid_args]
    if dry_run:
        assert shlex.split(out) == want
        assert not (tmp_path / "record" / "sbatch").exists()
    else:
        assert _recorded(tmp_path / "record" / "sbatch") == want
        # the array tasks find scripts/grid.py through BERT_ACCUM_DIR, whatever folder they start in
        assert (tmp_path / "record" / "sbatch.dir").read_text().strip() == str(REPO)


def test_submit_grid_submits_nothing_for_a_broken_grid(tmp_path, fake_bin):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [synthetic]\nseeds: [1]\nbatches: [[4, 1]]\nshared: {no_such_flag: 1}\n")
    proc = _run(["bash", str(SLURM / "submit_grid.sh"), str(bad)], _env(tmp_path, fake_bin), tmp_path, ok=False)
    assert proc.returncode != 0 and "no_such_flag" in proc.stderr
    assert not (tmp_path / "record" / "sbatch").exists()


# --- a real SLURM controller, where there is one ------------------------------------------------
def _slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.mark.skipif(not _slurm_answers(), reason="no SLURM controller answers `scontrol ping`")
def test_real_job_array_runs_every_cell(tmp_path):
    from bert_accum.core.synthetic import generate_synthetic_glue
    from conftest import build_tiny_model

    spec = {
        "name": "live", "runs_dir": str(tmp_path / "runs"), "tasks": ["synthetic"], "batches": [[4, 1], [2, 2]],
        "seeds": [1], "shared": {"model_name_or_path": build_tiny_model(tmp_path / "model"), "max_train_steps": 1,
                                 "max_train_samples": 8, "max_eval_samples": 8, "max_length": 48, "cpu": True},
    }
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(spec))
    glue = generate_synthetic_glue(str(tmp_path / "glue"), n_train=16, n_dev=8, seed=0)
    env = _env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("RECORD")
    cmd = ["bash", str(SLURM / "submit_grid.sh"), str(grid_path), "--wait", "--cpus-per-task=1",
           f"--output={tmp_path}/slurm-%A_%a.out", "--", "--glue_dir", glue]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("slurm-*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    assert len(list(tmp_path.glob("slurm-*_*.out"))) == 2  # one log per array task
    for cell in ("B4_N1", "B2_N2"):
        assert (tmp_path / "runs" / "synthetic" / "default" / cell / "seed1" / "final_metrics.json").exists(), logs
