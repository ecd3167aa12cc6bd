"""Two real processes on the CPU: torchrun starts two gloo ranks, and W=2 reproduces W=1 of one effective batch.

`accelerate launch --cpu --num_processes 2` starts only ONE process on the CPU, so the W=2 runs are
launched with `torchrun --nproc_per_node 2` and ACCELERATE_USE_CPU=1 (two gloo ranks). The worker,
`python -m bert_accum.study.distcheck`, trains each configuration with `train.run` and records what every
rank saw. The W=1 runs go through the same worker in a plain subprocess (started alongside torchrun), so
the comparison never depends on the accelerate state that other tests left inside the pytest process.

Effective batch 8 throughout: (W=2, B=2, N=2), (W=1, B=4, N=2), (W=1, B=8, N=1), dropout p=0.1 on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bert_accum.core.config import TrainConfig
from bert_accum.study.distcheck import relative_l2
from bert_accum.core.synthetic import generate_synthetic_glue

from conftest import build_tiny_model

N_TRAIN, N_DEV = 40, 23
EVAL_BATCH = 5  # 23 dev examples in 5 batches: rank 1 gets a padded (duplicated) last batch to drop
STEPS = 2
ARMS = {
    "cls_global": {"objective": "classification", "loss_normalization": "global"},
    "mlm_mean_of_means": {"objective": "mlm", "loss_normalization": "mean_of_means"},
    "mlm_global": {"objective": "mlm", "loss_normalization": "global"},
}
SINGLE = [(4, 2), (8, 1)]  # (B, N) of the W=1 runs
SAME_SLICES = (2, 4)  # W=1 with the W=2 run's 2-example slices, in the same order (mean_of_means only)
EXACT = 1e-5  # fp32 round-off bound for gradients that should be equal
DRIFT = 1e-3  # a real difference is at least this far above it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, model_dir: str, glue_dir: str, name: str, b: int, n: int, w: int) -> dict:
    return TrainConfig(
        task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, max_length=48, seed=7,
        per_device_train_batch_size=b, gradient_accumulation_steps=n, max_train_steps=STEPS, learning_rate=1e-3,
        dropout="invariant", padding="window", per_device_eval_batch_size=EVAL_BATCH, cpu=True,
        disable_progress_bar=True, output_dir=str(root / f"W{w}B{b}N{n}" / name), **ARMS[name],
    ).to_dict()


def _env() -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Launch the W=2 runs (torchrun, two ranks) and the W=1 runs (one process) at the same time."""
    root = tmp_path_factory.mktemp("distributed")
    model_dir = build_tiny_model(root / "tiny", dropout=0.1)
    glue_dir = generate_synthetic_glue(str(root / "glue"), n_train=N_TRAIN, n_dev=N_DEV, seed=0)
    spec2 = {name: _config(root, model_dir, glue_dir, name, 2, 2, 2) for name in ARMS}
    spec1 = {f"{name}.B{b}N{n}": _config(root, model_dir, glue_dir, name, b, n, 1) for name in ARMS for b, n in SINGLE}
    b, n = SAME_SLICES
    spec1[f"mlm_mean_of_means.B{b}N{n}"] = _config(root, model_dir, glue_dir, "mlm_mean_of_means", b, n, 1)
    (root / "spec2.json").write_text(json.dumps(spec2))
    (root / "spec1.json").write_text(json.dumps(spec1))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    worker = ["-m", "bert_accum.study.distcheck", "--spec"]
    procs = {
        "W2": subprocess.Popen([*torchrun, *worker, str(root / "spec2.json"), "--record_dir", str(root / "rec2")],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "W1": subprocess.Popen([sys.executable, *worker, str(root / "spec1.json"), "--record_dir", str(root / "rec1")],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    }
    for key, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{key} launch did not finish in 240 s")
        assert proc.returncode == 0, f"{key} launch failed:\n{output[-4000:]}"
    return root


def _grad(root: Path, record: str, name: str) -> dict[str, torch.Tensor]:
    return torch.load(root / record / f"{name}.grad.pt")


def _ranks(root: Path, record: str, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / record).glob(f"{name}.rank*.json"))]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", list(ARMS))
def test_two_distinct_gloo_ranks_hold_the_same_all_reduced_gradient(launched, name):
    ranks = _ranks(launched, "rec2", name)
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sorted(r["torch_distributed_rank"] for r in ranks) == [0, 1]
    assert all(r["world_size"] == 2 and r["torch_distributed_world_size"] == 2 for r in ranks)
    assert all(r["backend"] == "gloo" and r["device"].startswith("cpu") for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    # each rank back-propagated only its own half of every micro-step; equal gradients mean DDP all-reduced them
    assert ranks[0]["grad_sum"] == ranks[1]["grad_sum"] and ranks[0]["grad_norm"] == ranks[1]["grad_norm"] > 0
    single = _ranks(launched, "rec1", f"{name}.B4N2")
    assert [(r["rank"], r["world_size"], r["backend"]) for r in single] == [(0, 1, None)]


@pytest.mark.parametrize("name", ["cls_global", "mlm_global"])
def test_global_normalisation_matches_across_w_b_n(launched, name):
    """All controls on (invariant dropout, window padding, global loss): (2,2,2) = (1,4,2) = (1,8,1)."""
    ref = _grad(launched, "rec1", f"{name}.B8N1")
    assert relative_l2(_grad(launched, "rec2", name), ref) < EXACT
    assert relative_l2(_grad(launched, "rec1", f"{name}.B4N2"), ref) < EXACT


def test_mlm_mean_of_means_drifts_with_the_micro_batch_split(launched):
    """Per-token MLM loss averaged per micro-batch weights tokens by how the window is split: no match."""
    ref = _grad(launched, "rec1", "mlm_mean_of_means.B8N1")
    w2 = _grad(launched, "rec2", "mlm_mean_of_means")
    b4 = _grad(launched, "rec1", "mlm_mean_of_means.B4N2")
    assert relative_l2(w2, ref) > DRIFT
    assert relative_l2(b4, ref) > DRIFT
    # W=2 averages per (process, micro-step) slice of 2 examples, W=1 B=4 per micro-batch of 4: different again
    assert relative_l2(w2, b4) > DRIFT
    # ...but W=1 with B=2, N=4 averages over the very same slices (micro-step j, rank r = slice 2j+r): equal
    assert relative_l2(w2, _grad(launched, "rec1", "mlm_mean_of_means.B2N4")) < EXACT
    # the same arm with global normalisation is exact, so the drift is the normalisation, not the launch
    assert relative_l2(_grad(launched, "rec2", "mlm_global"), _grad(launched, "rec1", "mlm_global.B8N1")) < EXACT


def test_two_process_run_folder_is_written_once(launched):
    run2 = launched / "W2B2N2" / "cls_global"
    run1 = launched / "W1B4N2" / "cls_global"
    derived = json.loads((run2 / "config.json").read_text())["derived"]
    assert {k: derived[k] for k in ("micro_batch_size", "accumulation_steps", "num_processes", "effective_batch_size")} == {
        "micro_batch_size": 2, "accumulation_steps": 2, "num_processes": 2, "effective_batch_size": 8}
    assert json.loads((run2 / "environment.json").read_text())["num_processes"] == 2

    steps = _rows(run2 / "steps.jsonl")
    assert [r["optimizer_step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["num_processes"] == 2 and r["examples"] == 8 and r["micro_steps"] == 2 for r in steps)
    single = _rows(run1 / "steps.jsonl")[0]
    # window loss and gradient norm are all-reduced statistics: the W=2 row equals the W=1 row
    assert steps[0]["loss"] == pytest.approx(single["loss"], rel=EXACT)
    assert steps[0]["grad_norm"] == pytest.approx(single["grad_norm"], rel=EXACT)
    assert steps[0]["real_tokens"] == single["real_tokens"] and steps[0]["padded_tokens"] == single["padded_tokens"]

    evals = _rows(run2 / "eval.jsonl")
    assert [e["optimizer_step"] for e in evals] == [STEPS]
    assert evals[0]["num_examples"] == N_DEV  # gather_for_metrics dropped rank 1's padded duplicates
    final = json.loads((run2 / "final_metrics.json").read_text())
    assert final["examples_seen"] == 8 * STEPS and final["eval"]["num_examples"] == N_DEV
    mlm_evals = _rows(launched / "W2B2N2" / "mlm_global" / "eval.jsonl")
    assert [e["num_examples"] for e in mlm_evals] == [N_DEV]


def test_processes_that_found_no_process_group_are_refused(tmp_path, monkeypatch, tiny_model_dir, synthetic_glue_dir):
    """torchrun on a CPU-only machine without cpu=True: accelerate sees W=1 in each process; the run must stop."""
    from bert_accum.errors import BertAccumError
    from bert_accum.core.train import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    cfg = TrainConfig(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir,
                      max_train_steps=1, output_dir=str(out), disable_progress_bar=True)
    with pytest.raises(BertAccumError, match="ACCELERATE_USE_CPU"):
        run(cfg)
    assert not out.exists()


def test_multi_gpu_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "multi_gpu.yaml"))
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert (cfg.num_machines, cfg.machine_rank, cfg.use_cpu) == (1, 0, False) and cfg.num_processes > 1


def test_two_process_checkpoint_resumes_with_the_records_of_an_unbroken_run(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """W=2 under torchrun: rank 0 writes the shared checkpoint files and each rank its RNG state; a resume from
    the step-2 checkpoint (standard dropout on) writes the same step rows as the run that was never cut."""
    import shutil

    full, cut = tmp_path / "full", tmp_path / "cut"
    argv = TrainConfig(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir,
                       max_length=32, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=4,
                       checkpointing_steps="2", learning_rate=1e-3, cpu=True, disable_progress_bar=True).to_argv()

    def launch(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "bert_accum.cli", *argv, "--output_dir", str(out), *extra]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    launch(full)
    checkpoint = full / "checkpoints" / "step_0000002"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and {"rng_rank0.json", "rng_rank1.json"} <= set(manifest["files"])
    assert not list(checkpoint.glob("*.pkl"))
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000004")
    (cut / "final_metrics.json").unlink()
    launch(cut, "--resume_from_checkpoint", "latest")
    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert untimed(_rows(cut / "steps.jsonl")) == untimed(_rows(full / "steps.jsonl"))
    assert [r["optimizer_step"] for r in _rows(cut / "steps.jsonl")] == [1, 2, 3, 4]
