"""Checkpoints of a run as plain data: atomic saves into `checkpoints/step_*`, verified loads, pruning, `latest`.

A checkpoint folder holds nothing that is unpickled on load, so resuming a run folder someone else wrote
(or one the grid runner resumes on its own) cannot run code::

    checkpoints/step_0000040/
      model.safetensors   the unwrapped model's weights (safetensors; tied weights stored once)
      optimizer.pt        the optimizer's state dict, read back with torch.load(weights_only=True)
      scheduler.json      the LR scheduler's state dict
      progress.json       TrainingProgress: optimizer step, examples and tokens seen, train seconds
      scaler.json         the fp16 loss scaler's state (only with --precision fp16)
      config.json         the run folder's config.json when the checkpoint was taken
      rng_rank<r>.json    python, numpy, torch CPU (and CUDA) RNG states of process r
      manifest.json       format, step, process count, and every file's size and sha256, written last

Every file is checked against the manifest before it is read, so a truncated or damaged file is named
rather than half-loaded; `latest` skips such checkpoints (and `step_*` entries that are not checkpoints)
with a warning and takes the newest complete one. Old checkpoints written by accelerate's `save_state`
(pickles) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import BertAccumError

FORMAT = "bert_accum-checkpoint-1"
MANIFEST = "manifest.json"
SHARED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.json", "progress.json")
_STEP_NAME = re.compile(r"step_(\d+)$")
# What accelerate's save_state wrote; their presence without a manifest marks an old-format checkpoint.
_OLD_FORMAT = ("*.pkl", "*.bin", "random_states_*")


_PROGRESS_TYPES = {"optimizer_step": int, "micro_step": int, "clipped_steps": int, "examples_seen": int,
                   "real_tokens_seen": int, "train_seconds": float}


class TrainingProgress:
    """Position in training, saved in every checkpoint so a resumed run continues at the next window."""

    def __init__(self) -> None:
        self.optimizer_step = 0
        self.micro_step = 0
        self.clipped_steps = 0
        self.examples_seen = 0
        self.real_tokens_seen = 0
        self.train_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The position as plain JSON values."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint; anything but its counters, of the right types, is refused."""
        if not isinstance(state, dict) or set(state) != set(_PROGRESS_TYPES):
            raise ValueError(f"expected the keys {', '.join(sorted(_PROGRESS_TYPES))}")
        for key, typ in _PROGRESS_TYPES.items():
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
            if typ is int and not float(value).is_integer():
                raise ValueError(f"{key} must be a whole number, got {value!r}")
            setattr(self, key, typ(value))


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, folder: Path, step: int, model, optimizer, scheduler, progress: TrainingProgress) -> Path:
    """Write the checkpoint of `step` into a scratch folder renamed into place, so a kill mid-save never leaves
    a half-written `step_*` checkpoint for `--resume_from_checkpoint latest` to pick.

    Process 0 writes the shared files (weights, optimizer, scheduler, progress, config) and, once every process
    has written its RNG file, the manifest; then it renames the folder. Returns the checkpoint folder.
    """
    import torch
    from safetensors.torch import save_model

    final = folder / f"step_{step:07d}"
    scratch = folder / f"partial_step_{step:07d}"
    main = accelerator.is_main_process
    if main:
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _write_json(scratch / f"rng_rank{accelerator.process_index}.json", _rng_state())
    if main:
        save_model(accelerator.unwrap_model(model), str(scratch / "model.safetensors"))
        torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
        _write_json(scratch / "scheduler.json", scheduler.state_dict())
        _write_json(scratch / "progress.json", progress.state_dict())
        if accelerator.scaler is not None:
            _write_json(scratch / "scaler.json", accelerator.scaler.state_dict())
        run_config = folder.parent / "config.json"
        if run_config.is_file():
            shutil.copyfile(run_config, scratch / "config.json")
    accelerator.wait_for_everyone()
    if main:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p.read_bytes())} for p in sorted(scratch.iterdir())}
        manifest = {"format": FORMAT, "step": step, "num_processes": accelerator.num_processes, "files": files}
        _write_json(scratch / MANIFEST, manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (each one holds weights plus AdamW state: 3x the model).

    Only folders with a manifest count; anything else under `checkpoints/` is not ours to delete.
    """
    ours = [p for _, p in _step_folders(output_dir / "checkpoints")[0] if (p / MANIFEST).is_file()]
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding and checking
# ----------------------------------------------------------------------------------------------
def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (one phrase naming the file), or None when it is one.

    Reads every file listed in the manifest and compares its size and sha256.
    """
    try:
        manifest = _manifest(path)
    except BertAccumError as exc:
        return str(exc)
    for name, entry in manifest["files"].items():
        problem = _file_problem(path / name, entry)
        if problem:
            return problem
    return None


def has_checkpoint(output_dir: Path) -> bool:
    """Whether the run folder holds at least one checkpoint with a manifest (not verified byte by byte)."""
    return any((p / MANIFEST).is_file() for _, p in _step_folders(Path(output_dir) / "checkpoints")[0])


def latest_checkpoint(output_dir: Path, quiet: bool = False) -> Path:
    """The newest complete `checkpoints/step_*` folder of a run folder.

    Incomplete or damaged checkpoints and `step_*` entries that are not checkpoints are skipped with a
    ``warning:`` line on stderr (unless `quiet`), so a damaged newest checkpoint falls back to the one before.
    """
    folder = Path(output_dir) / "checkpoints"
    found, strays = _step_folders(folder)
    skipped = []
    for stray in strays:
        skipped.append(f"{stray}: not a checkpoint (expected step_<number>)")
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            _warn(skipped, quiet)
            return path
        skipped.append(problem)
    _warn(skipped, quiet)
    note = f" ({len(skipped)} skipped: {skipped[0]}{'; ...' if len(skipped) > 1 else ''})" if skipped else ""
    raise BertAccumError(f"--resume_from_checkpoint latest: no complete checkpoint in {folder}{note}")


def resolve_checkpoint(output_dir: Path, spec: str, quiet: bool = False) -> Path:
    """The checkpoint that `--resume_from_checkpoint spec` names: 'latest' (see `latest_checkpoint`) or a folder,
    which must be a complete checkpoint (otherwise a one-line error naming the file at fault)."""
    if spec == "latest":
        return latest_checkpoint(output_dir, quiet)
    path = Path(spec)
    if not path.is_dir():
        raise BertAccumError(f"checkpoint folder not found: {path}")
    problem = checkpoint_problem(path)
    if problem:
        raise BertAccumError(f"--resume_from_checkpoint {path}: {problem}")
    return path


def check_resume_config(output_dir: Path, checkpoint: Path, cfg, num_processes: int | None = None) -> None:
    """Refuse to resume with settings other than those the run (and the checkpoint) was made with.

    A resumed run appends to the same steps.jsonl, so other settings would mix two configurations in one
    record. Compares `cfg` with the run folder's config.json and the checkpoint's copy (keys a file lacks count
    as defaults), and the process count, where given, with the checkpoint's.
    """
    for source in (Path(output_dir) / "config.json", checkpoint / "config.json"):
        if not source.is_file():
            continue
        try:
            saved = json.loads(source.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BertAccumError(f"{source}: unreadable ({exc})") from None
        if not isinstance(saved, dict):
            raise BertAccumError(f"{source}: not a JSON object")
        diff = cfg.differences(saved)
        if diff:
            shown = ", ".join(f"{k} ({saved.get(k)!r} -> {getattr(cfg, k, None)!r})" for k in diff)
            raise BertAccumError(
                f"cannot resume {output_dir} with other settings than it was made with: {shown}; "
                "give the original values or use a new --output_dir"
            )
    made_with = _manifest(checkpoint)["num_processes"]
    if num_processes is not None and made_with != num_processes:
        raise BertAccumError(f"checkpoint {checkpoint} was written by {made_with} process(es); this run has {num_processes}")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler, progress: TrainingProgress) -> None:
    """Restore weights, optimizer, scheduler, progress, loss scaler and this process's RNG states from `path`.

    Each file is verified against the manifest as it is read; nothing is unpickled (the optimizer state goes
    through torch's weights-only loader). A problem is a one-line BertAccumError naming the file.
    """
    import torch
    from safetensors.torch import load_model

    manifest = _manifest(path)
    if manifest["num_processes"] != accelerator.num_processes:
        raise BertAccumError(f"checkpoint {path} was written by {manifest['num_processes']} process(es); "
                             f"this run has {accelerator.num_processes}")
    rank_file = f"rng_rank{accelerator.process_index}.json"
    if rank_file not in manifest["files"]:
        raise BertAccumError(f"checkpoint {path}: {MANIFEST} lists no {rank_file}")

    def load(name: str, apply) -> None:
        data, problem = _verified_bytes(path / name, manifest["files"][name])
        if problem:
            raise BertAccumError(f"checkpoint {problem}")
        try:
            apply(data)
        except BertAccumError:
            raise
        except Exception as exc:  # a file that passed the checksum but holds the wrong content: name it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BertAccumError(f"checkpoint {path / name}: cannot be loaded ({first})") from None

    def weights(_data: bytes) -> None:
        # load_model re-reads the verified file; it restores tied weights that save_model stored once.
        load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), strict=True)

    load("model.safetensors", weights)
    load("optimizer.pt", lambda d: optimizer.load_state_dict(torch.load(io.BytesIO(d), map_location="cpu", weights_only=True)))
    load("scheduler.json", lambda d: scheduler.load_state_dict(_json_object(d)))
    load("progress.json", lambda d: progress.load_state_dict(_json_object(d)))
    if accelerator.scaler is not None:
        if "scaler.json" not in manifest["files"]:
            raise BertAccumError(f"checkpoint {path}: no scaler.json (written without fp16?)")
        load("scaler.json", lambda d: accelerator.scaler.load_state_dict(_json_object(d)))
    load(rank_file, lambda d: _set_rng_state(_json_object(d)))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _step_folders(folder: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(step, path) of the `step_<number>` entries of `folder`, oldest first, and the other `step_*` entries."""
    found, strays = [], []
    if folder.is_dir():
        for p in folder.glob("step_*"):
            m = _STEP_NAME.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
            else:
                strays.append(p)
    return sorted(found), sorted(strays)


def _manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of checkpoint folder `path`; a BertAccumError says why there is none."""
    file = path / MANIFEST
    if not file.is_file():
        if any(any(path.glob(pattern)) for pattern in _OLD_FORMAT):
            raise BertAccumError(
                f"{path} is an old-format checkpoint (accelerate pickles), which is never unpickled; "
                "start the run again with --overwrite_output_dir"
            )
        raise BertAccumError(f"{path} is not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_bytes())
        files = manifest["files"]
        ok = (manifest["format"] == FORMAT and isinstance(manifest["step"], int)
              and isinstance(manifest["num_processes"], int) and manifest["num_processes"] >= 1
              and isinstance(files, dict)
              and all(_plain_name(n) and isinstance(e, dict) and isinstance(e.get("bytes"), int)
                      and isinstance(e.get("sha256"), str) for n, e in files.items()))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise BertAccumError(f"{file} is damaged or not a {FORMAT} manifest")
    needed = [*SHARED_FILES, *(f"rng_rank{r}.json" for r in range(manifest["num_processes"]))]
    missing = [n for n in needed if n not in files]
    if missing:
        raise BertAccumError(f"{file} lists no {missing[0]}")
    return manifest


def _plain_name(name: str) -> bool:
    """A file name inside the checkpoint folder (no path separators, no '..'), so a manifest cannot point outside."""
    return bool(name) and name not in (".", "..", MANIFEST) and "/" not in name and "\\" not in name


def _file_problem(target: Path, entry: dict[str, Any]) -> str | None:
    """Why `target` does not match its manifest entry, naming the file; None when size and sha256 match."""
    return _verified_bytes(target, entry)[1]


def _verified_bytes(target: Path, entry: dict[str, Any]) -> tuple[bytes, str | None]:
    """The content of `target` and None, or (b"", why it does not match its manifest entry, naming the file)."""
    if not target.is_file():
        return b"", f"{target} is missing"
    data = target.read_bytes()
    if len(data) != entry["bytes"]:
        return b"", f"{target} is truncated or damaged ({len(data)} bytes, {MANIFEST} says {entry['bytes']})"
    if _sha256(data) != entry["sha256"]:
        return b"", f"{target} is damaged (its sha256 differs from {MANIFEST})"
    return data, None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: a NaN would write JSON that strict readers reject; the states hold none.
    path.write_text(json.dumps(obj, allow_nan=False))


def _json_object(data: bytes) -> dict[str, Any]:
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def _warn(lines: list[str], quiet: bool) -> None:
    if not quiet:
        for line in lines:
            print(f"warning: skipping {line}", file=sys.stderr)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON values (what accelerate's save_state kept, without pickle)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states `_rng_state` saved."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
