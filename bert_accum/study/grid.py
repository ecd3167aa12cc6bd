"""Grid runner: a YAML grid of (task, arm, B, N, seed) cells, each one `TrainConfig` and one run folder.

A grid file (see ``configs/``)::

    name: study                      # label only
    runs_dir: runs/study             # run folders go to <runs_dir>/<task>/<arm>/B<B>_N<N>/seed<seed>
    tasks: [rte, mrpc]
    effective_batch_size: 32         # with micro_batch_sizes: N = E / B for each B ...
    micro_batch_sizes: [32, 8, 2]
    # batches: [[32, 1], [8, 4]]     # ... or explicit (B, N) pairs
    seeds: [1, 2, 3]
    arms:                            # name -> TrainConfig fields that differ from `shared`
      default: {}
      controlled: {dropout: invariant, padding: window, loss_normalization: global}
    shared: {max_length: 128, learning_rate: 5.0e-5, max_train_steps: 30}
    task_overrides: {sst2: {max_train_samples: 960}}

Three keys inside an arm belong to the grid, not to `TrainConfig`: ``seeds`` and ``batches`` restrict the arm
to some of the grid's seeds and (B, N) pairs (a noise floor needs only the (E, 1) reference), and
``seed_offsets`` (also a top-level key, the default of every arm) sets `seed`, `data_seed` or `dropout_seed`
to the cell's seed plus an offset, e.g. ``{dropout_seed: 100}`` for a dropout-only floor.
``equivalence_margins`` ({task: {metric: margin}}) states the equivalence margins of the study before it runs;
``reference_thresholds`` ({task: {metric: value}}) the final metric the (E, 1) reference must reach for the study to
count as converged; the grid only records both, the report reads them.
``run_first`` (a list; each entry one or more cell-name prefixes separated by spaces, e.g.
``"sst2/default sst2/floor_dropout"``) sets the order of computation when the grid is run without ``--cell``:
the cells of the first entry (seed-major among themselves), then those of the next, then every other cell. It
spends a limited CPU budget on the comparisons that matter most first; cell indices do not change.
``comparisons`` ({arm: reference arm}) declares which arm each arm is judged against, cell by cell (same task,
(B, N) and seed): e.g. every bug arm against the correct loop (`bert-accum bias-study` reads it).
``changes`` (a list of sentences) records each change of the design made after runs had started: when, after
which runs, what changed and why, and what became of the runs made before it. The grid does not read it; the
report prints it where it says how the runs were made.

Every cell becomes a `TrainConfig` through `TrainConfig.from_dict` (so a typo in a key is an error before
anything runs) and is launched as ``python -m bert_accum.cli <flags>`` in its own process, optionally
behind a launcher such as ``accelerate launch``. Cells are ordered seed-major (all cells of the first seed,
then the next seed), so a grid cut off part-way still holds complete paired comparisons for its first seeds.

Resumption, per cell, from what its run folder holds:

* ``final_metrics.json`` present and verified (``steps.jsonl`` holds one row per optimizer step, 1..the last):
  finished (completed, or stopped on a non-finite loss), skipped;
* ``final_metrics.json`` present but the records incomplete or unreadable: damaged, run again from scratch;
* a checkpoint (``checkpoints/step_*`` with a manifest): interrupted, resumed with
  ``--resume_from_checkpoint latest``; the run truncates ``steps.jsonl``/``eval.jsonl`` to the checkpoint's
  step, so no row is duplicated or lost;
* anything else (killed before its first checkpoint): stale, started again from scratch.

A folder whose ``config.json`` disagrees with the cell (the grid file was edited) is an error, never
silently mixed into the results. Checkpoints are deleted once a cell finishes (``keep_checkpoints: true``
keeps them).

Several grid processes may work on one runs folder (two shells, a SLURM array, ``--parallel`` in each):
a cell is run under an exclusive lock, ``<runs_dir>/.locks/<cell>.lock`` (``fcntl.flock``, held by the grid
process and inherited by the cell's process). A grid process that finds a cell locked does not wait: it
skips the cell, says so (``taken by another process``) and goes on with the next; ``--status`` shows such
a cell as ``running``. The cell's process dies with the grid process that started it (``PR_SET_PDEATHSIG``
on Linux), so killing a grid never leaves a cell running on, unlocked, as an orphan.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.checkpoint import has_checkpoint
from ..core.config import TrainConfig, canonical_keys
from ..core.records import run_problem
from ..errors import BertAccumError

GRID_KEYS = {
    "name", "runs_dir", "tasks", "effective_batch_size", "micro_batch_sizes", "batches", "seeds", "arms", "shared",
    "task_overrides", "keep_checkpoints", "seed_offsets", "equivalence_margins", "reference_thresholds",
    "run_first", "comparisons", "changes",
}
# Keys of an arm that restrict or derive the arm's cells instead of setting a TrainConfig field.
ARM_GRID_KEYS = ("seeds", "batches", "seed_offsets")
SEED_FIELDS = ("seed", "data_seed", "dropout_seed")
# Set by the grid for every cell; a grid file that sets them itself would contradict its own layout.
_CELL_KEYS = ("task_name", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "output_dir")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its index in grid order, its name (= path below runs_dir) and its config."""

    index: int
    name: str
    task: str
    arm: str
    micro_batch_size: int
    accumulation_steps: int
    seed: int
    config: TrainConfig = field(compare=False)

    @property
    def run_dir(self) -> Path:
        """The cell's run folder."""
        return Path(self.config.output_dir)


@dataclass
class GridSpec:
    """A parsed grid file (see the module docstring for the format)."""

    name: str
    runs_dir: str
    tasks: list[str]
    batches: list[tuple[int, int]]
    seeds: list[int]
    arms: dict[str, dict[str, Any]]
    shared: dict[str, Any]
    task_overrides: dict[str, dict[str, Any]]
    keep_checkpoints: bool = False
    arm_seeds: dict[str, list[int]] = field(default_factory=dict)
    arm_batches: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    seed_offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per arm: {seed field: offset added to the cell's seed}."""
    equivalence_margins: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per task: {metric: the final value the (E, 1) reference must reach}."""
    run_first: list[list[str]] = field(default_factory=list)
    """Groups of cell-name prefixes computed before the other cells, in this order."""
    comparisons: dict[str, str] = field(default_factory=dict)
    """{arm: the arm it is compared with at the same task, (B, N) and seed}."""
    changes: list[str] = field(default_factory=list)
    """Changes of the design made after runs had started, one sentence each (for the report)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "grid") -> "GridSpec":
        """Validate the grid's own keys; the TrainConfig keys are validated per cell in `expand`."""
        unknown = sorted(set(raw) - GRID_KEYS)
        if unknown:
            raise BertAccumError(f"{source}: unknown grid key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(GRID_KEYS))}")
        _check_types(raw, source)
        if ("batches" in raw) == ("micro_batch_sizes" in raw):
            raise BertAccumError(f"{source}: give either 'batches' ([[B, N], ...]) or 'micro_batch_sizes' with 'effective_batch_size'")
        if "batches" in raw:
            batches = _batch_pairs(raw["batches"], f"{source}: batches")
        else:
            e = raw.get("effective_batch_size")
            if e is None:
                raise BertAccumError(f"{source}: 'micro_batch_sizes' needs 'effective_batch_size'")
            sizes = _int_list(raw["micro_batch_sizes"], f"{source}: micro_batch_sizes", minimum=1)
            bad = [b for b in sizes if e % b]
            if bad:
                raise BertAccumError(f"{source}: micro batch size(s) {bad} do not divide effective_batch_size {e}")
            batches = [(b, e // b) for b in sizes]
        arms = {a: dict(v or {}) for a, v in (raw.get("arms") or {"default": {}}).items()}
        seeds = _int_list(raw["seeds"], f"{source}: seeds", minimum=0)
        default_offsets = _seed_offsets(raw.get("seed_offsets") or {}, f"{source}: seed_offsets")
        arm_seeds, arm_batches, offsets = {}, {}, {}
        for a, values in arms.items():
            if "seeds" in values:
                arm_seeds[a] = _int_list(values.pop("seeds"), f"{source}: arms.{a}.seeds", minimum=0)
                stray = sorted(set(arm_seeds[a]) - set(seeds))
                if stray:
                    raise BertAccumError(f"{source}: arms.{a}.seeds {stray} are not among the grid's seeds")
            if "batches" in values:
                arm_batches[a] = _batch_pairs(values.pop("batches"), f"{source}: arms.{a}.batches")
                stray = sorted(set(arm_batches[a]) - set(batches))
                if stray:
                    raise BertAccumError(f"{source}: arms.{a}.batches {stray} are not among the grid's batches")
            offsets[a] = {**default_offsets, **_seed_offsets(values.pop("seed_offsets", {}), f"{source}: arms.{a}.seed_offsets")}
        shared = dict(raw.get("shared") or {})
        overrides = raw.get("task_overrides") or {}
        for where, values in [("shared", shared), *((f"arms.{a}", v or {}) for a, v in arms.items()),
                              *((f"task_overrides.{t}", v or {}) for t, v in overrides.items())]:
            clash = sorted(set(canonical_keys(values, f"{source}: {where}")) & set(_CELL_KEYS))
            if clash:
                raise BertAccumError(f"{source}: {where} sets {', '.join(clash)}, which the grid sets per cell")
        stray = sorted(set(overrides) - set(raw["tasks"]))
        if stray:
            raise BertAccumError(f"{source}: task_overrides for task(s) not in the grid: {', '.join(stray)}")
        return cls(
            name=str(raw.get("name", "grid")), runs_dir=str(raw.get("runs_dir", "runs")), tasks=list(raw["tasks"]),
            batches=batches, seeds=seeds, arms=arms,
            shared=shared, task_overrides={t: dict(v or {}) for t, v in overrides.items()},
            keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
            arm_seeds=arm_seeds, arm_batches=arm_batches, seed_offsets=offsets,
            equivalence_margins=_task_metric_values(raw.get("equivalence_margins"), f"{source}: equivalence_margins"),
            reference_thresholds=_task_metric_values(raw.get("reference_thresholds"), f"{source}: reference_thresholds"),
            run_first=_run_first(raw.get("run_first"), list(raw["tasks"]), arms, source),
            comparisons=_comparisons(raw.get("comparisons"), arms, arm_seeds, arm_batches, source),
            changes=list(raw.get("changes") or []),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GridSpec":
        """Read a YAML grid file."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise BertAccumError(f"grid file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise BertAccumError(f"{p}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise BertAccumError(f"{p}: a grid file is a YAML mapping")
        return cls.from_dict(raw, source=str(p))


def _comparisons(value: Any, arms: dict[str, Any], arm_seeds: dict[str, list[int]],
                 arm_batches: dict[str, list[tuple[int, int]]], source: str) -> dict[str, str]:
    """``comparisons`` as {arm: reference arm}: both arms of the grid, never an arm against itself, and the
    reference planned for every seed and (B, N) of the arm (else some cells could never be paired)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BertAccumError(f"{source}: 'comparisons' must map arm names to reference arm names, got {value!r}")
    for arm, ref in value.items():
        unknown = [a for a in (arm, ref) if a not in arms]
        if unknown:
            raise BertAccumError(f"{source}: comparisons name arm(s) {', '.join(unknown)} that the grid does not have")
        if arm == ref:
            raise BertAccumError(f"{source}: comparisons compares arm {arm} with itself")
        for what, restricted in (("seed", arm_seeds), ("(B, N)", arm_batches)):
            if ref not in restricted:
                continue  # the reference runs every seed / (B, N) of the grid
            if arm not in restricted or set(restricted[arm]) - set(restricted[ref]):
                raise BertAccumError(f"{source}: comparisons: reference arm {ref} is not planned for every {what} of "
                                     f"arm {arm}, so some of its cells could never be paired")
    return dict(value)


def _run_first(value: Any, tasks: list[str], arms: dict[str, Any], source: str) -> list[list[str]]:
    """``run_first`` as groups of prefixes; each entry is text with one or more space-separated prefixes, each
    starting with a task of the grid and, if it goes on, an arm of the grid (a typo is an error here, whatever
    the command; `run_order` checks the rest against the cells)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.split() for v in value):
        raise BertAccumError(f"{source}: 'run_first' must be a list of cell-name prefixes such as "
                             f"'sst2/default', got {value!r}")
    groups = [v.split() for v in value]
    for prefix in (p for group in groups for p in group):
        parts = prefix.strip("/").split("/")
        if parts[0] not in tasks or (len(parts) > 1 and parts[1] not in arms):
            raise BertAccumError(f"{source}: run_first prefix {prefix!r} matches no cell of the grid "
                                 "(it must start with one of its tasks, then one of its arms)")
    return groups


def run_order(cells: list[Cell], run_first: list[list[str]], source: str = "grid") -> list[Cell]:
    """`cells` in the order of computation: each `run_first` group (grid order within it), then the rest.

    A prefix that matches no cell is an error, so a typo cannot silently demote the cells it meant."""
    def matches(cell: Cell, prefix: str) -> bool:
        return cell.name == prefix or cell.name.startswith(prefix.rstrip("/") + "/")

    for group in run_first:
        for prefix in group:
            if not any(matches(c, prefix) for c in cells):
                raise BertAccumError(f"{source}: run_first prefix {prefix!r} matches no cell of the grid")

    def rank(cell: Cell) -> int:
        return next((i for i, group in enumerate(run_first) if any(matches(cell, p) for p in group)), len(run_first))

    return sorted(cells, key=lambda c: (rank(c), c.index))


def _check_types(raw: dict[str, Any], source: str) -> None:
    """One-line errors for grid values of the wrong YAML type (a bare number where a list belongs, text for a
    number, a list where a mapping belongs), before anything iterates over them."""
    if not isinstance(raw.get("tasks"), list) or not raw["tasks"] or not all(isinstance(t, str) for t in raw["tasks"]):
        raise BertAccumError(f"{source}: 'tasks' must be a non-empty list of task names, got {raw.get('tasks')!r}")
    if not isinstance(raw.get("seeds"), list) or not raw["seeds"]:
        raise BertAccumError(f"{source}: 'seeds' must be a non-empty list of integers, got {raw.get('seeds')!r}")
    if "effective_batch_size" in raw and not _is_int(raw["effective_batch_size"], 1):
        raise BertAccumError(f"{source}: 'effective_batch_size' must be an integer >= 1, got {raw['effective_batch_size']!r}")
    for key in ("runs_dir", "name"):
        if key in raw and not isinstance(raw[key], (str, int)):
            raise BertAccumError(f"{source}: '{key}' must be text, got {raw[key]!r}")
    if "keep_checkpoints" in raw and not isinstance(raw["keep_checkpoints"], bool):
        raise BertAccumError(f"{source}: 'keep_checkpoints' must be true or false, got {raw['keep_checkpoints']!r}")
    for key in ("arms", "shared", "task_overrides", "seed_offsets", "equivalence_margins"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise BertAccumError(f"{source}: '{key}' must be a mapping, got {raw[key]!r}")
    for key in ("arms", "task_overrides", "equivalence_margins"):
        for name, value in (raw.get(key) or {}).items():
            if value is not None and not isinstance(value, dict):
                raise BertAccumError(f"{source}: {key}.{name} must be a mapping, got {value!r}")
    changes = raw.get("changes")
    if changes is not None and (not isinstance(changes, list) or not all(isinstance(c, str) and c.strip() for c in changes)):
        raise BertAccumError(f"{source}: 'changes' must be a list of sentences, got {changes!r}")
    for task, margins in (raw.get("equivalence_margins") or {}).items():
        for metric, margin in (margins or {}).items():
            if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin > 0:
                raise BertAccumError(f"{source}: equivalence_margins.{task}.{metric} must be a number > 0, got {margin!r}")


def _is_int(value: Any, minimum: int) -> bool:
    """An integer (not a bool, not text) >= minimum."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _int_list(value: Any, where: str, minimum: int) -> list[int]:
    """A non-empty YAML list of integers >= minimum."""
    if not isinstance(value, list) or not value:
        raise BertAccumError(f"{where} must be a non-empty list of integers, got {value!r}")
    bad = [v for v in value if not _is_int(v, minimum)]
    if bad:
        raise BertAccumError(f"{where}: {bad[0]!r} is not an integer >= {minimum}")
    return list(value)


def _batch_pairs(value: Any, where: str) -> list[tuple[int, int]]:
    """[[B, N], ...] as int pairs, each >= 1."""
    pairs = value if isinstance(value, list) and value else None
    if pairs is None or not all(isinstance(p, list) and len(p) == 2 and all(_is_int(x, 1) for x in p) for p in pairs):
        raise BertAccumError(f"{where} must be a non-empty list of [B, N] pairs of integers >= 1, got {value!r}")
    return [(b, n) for b, n in pairs]


def _task_metric_values(value: Any, where: str) -> dict[str, dict[str, float]]:
    """{task: {metric: float}}, checked."""
    try:
        return {str(t): {str(m): float(x) for m, x in (v or {}).items()} for t, v in (value or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise BertAccumError(f"{where} maps tasks to {{metric: number}}, got {value!r}") from None


def _seed_offsets(value: Any, where: str) -> dict[str, int]:
    """{seed field: int offset}, checked."""
    if not isinstance(value, dict) or set(value) - set(SEED_FIELDS):
        raise BertAccumError(f"{where} maps {', '.join(SEED_FIELDS)} to integer offsets, got {value!r}")
    try:
        return {k: int(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise BertAccumError(f"{where} maps {', '.join(SEED_FIELDS)} to integer offsets, got {value!r}") from None


def expand(spec: GridSpec, runs_dir: str | None = None, set_values: dict[str, Any] | None = None) -> list[Cell]:
    """All cells of the grid in run order (seed, task, arm, (B, N)), each with a validated TrainConfig.

    `set_values` (e.g. ``glue_dir`` from the command line) applies to every cell, after the grid's own values.
    """
    root = Path(runs_dir or spec.runs_dir)
    cells: list[Cell] = []
    for seed, task, (arm, arm_values), (b, n) in itertools.product(spec.seeds, spec.tasks, spec.arms.items(), spec.batches):
        if seed not in spec.arm_seeds.get(arm, spec.seeds) or (b, n) not in spec.arm_batches.get(arm, spec.batches):
            continue
        name = f"{task}/{arm}/B{b}_N{n}/seed{seed}"
        values = {
            **spec.shared, **arm_values, **spec.task_overrides.get(task, {}), **(set_values or {}),
            "task_name": task, "per_device_train_batch_size": b, "gradient_accumulation_steps": n, "seed": seed,
            "output_dir": str(root / name), "disable_progress_bar": True,
        }
        values.update({key: seed + offset for key, offset in spec.seed_offsets.get(arm, {}).items()})
        try:
            cfg = TrainConfig.from_dict(values)
            cfg.validate()
        except (BertAccumError, TypeError) as exc:
            raise BertAccumError(f"grid cell {name}: {exc}") from None
        cells.append(Cell(len(cells), name, task, arm, b, n, seed, cfg))
    return cells


def cell_status(cell: Cell) -> str:
    """'finished' (verified), 'damaged' (final metrics but incomplete or unreadable records), 'interrupted'
    (has a checkpoint), 'stale' (started, no checkpoint) or 'new'."""
    d = cell.run_dir
    if (d / "final_metrics.json").exists():
        return "damaged" if run_problem(d) else "finished"
    if has_checkpoint(d):
        return "interrupted"
    if d.exists() and any(d.iterdir()):
        return "stale"
    return "new"


def time_left(cells: list[Cell], states: list[str]) -> tuple[float, int]:
    """(seconds, cells without an estimate): the training time the unfinished `cells` still need, each counted at
    the median `train_seconds` of the finished cells of the same task and (B, N) (as they ran, so under the load
    they had; evaluation and start-up not included). A cell of a shape none has finished is not estimated."""
    done: dict[tuple[str, int, int], list[float]] = {}
    for cell, state in zip(cells, states):
        if state == "finished":
            try:
                seconds = float(json.loads((cell.run_dir / "final_metrics.json").read_text())["train_seconds"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            done.setdefault((cell.task, cell.micro_batch_size, cell.accumulation_steps), []).append(seconds)
    total, unknown = 0.0, 0
    for cell, state in zip(cells, states):
        if state == "finished":
            continue
        seen = done.get((cell.task, cell.micro_batch_size, cell.accumulation_steps))
        if not seen:
            unknown += 1
            continue
        total += statistics.median(seen)
    return total, unknown


def check_config_matches(cell: Cell) -> None:
    """Refuse a run folder made from different settings than the cell's (the grid file was edited since).

    Keys missing from the saved config.json count as their defaults (fields are added over time); an
    unreadable config.json is left to `cell_status`, which calls the folder damaged.
    """
    path = cell.run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    diff = cell.config.differences(saved)
    if diff:
        raise BertAccumError(
            f"{cell.run_dir} was made with different settings ({', '.join(diff)}); "
            "delete that folder or point the grid at another runs_dir"
        )


def cell_command(cell: Cell, launcher: str | None = None, python: str | None = None) -> list[str]:
    """The command that runs `cell` from where it stands (fresh, or resumed from its latest checkpoint)."""
    # The precision is always spelled out: a launcher's --mixed_precision must not silently change a cell.
    argv = cell.config.to_argv(always=("task_name", "per_device_train_batch_size", "seed", "precision"))
    status = cell_status(cell)
    if status == "interrupted":
        argv += ["--resume_from_checkpoint", "latest"]
    elif status in ("stale", "damaged"):
        argv += ["--overwrite_output_dir"]
    if launcher:
        return [*shlex.split(launcher), "-m", "bert_accum.cli", *argv]
    return [python or sys.executable, "-m", "bert_accum.cli", *argv]


def describe(cell: Cell, launcher: str | None = None) -> str:
    """One dry-run line: index, run folder and the exact command (``python`` for the interpreter)."""
    cmd = cell_command(cell, launcher, python="python")
    return f"{cell.index}\t{cell.run_dir}\t{shlex.join(cmd)}"


def _runs_root(cell: Cell) -> Path:
    """The runs folder a cell's run folder sits in (its name is the path below it)."""
    d = str(cell.run_dir)
    return Path(d[: -len(cell.name)]) if d.endswith(cell.name) else cell.run_dir.parent


class CellLock:
    """The exclusive lock of one cell, ``<runs_dir>/.locks/<cell name with / as __>.lock`` (``fcntl.flock``).

    The lock file is never deleted (deleting it while another process opens it would let both lock).
    The holder writes its pid into it, for the message another process prints.
    """

    def __init__(self, cell: Cell):
        self.path = _runs_root(cell) / ".locks" / (cell.name.replace("/", "__") + ".lock")
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (a cell process that inherited it keeps it until it exits)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (creates nothing)."""
        import fcntl

        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def holder(self) -> str:
        """The pid written by the holder, or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"


def _die_with_parent():
    """A `preexec_fn` that makes the child get SIGTERM when the grid process dies (Linux `PR_SET_PDEATHSIG`).

    libc is looked up here, in the parent; the child only calls the function, then checks that the parent did
    not die before the call (the signal would then never come). Elsewhere: None.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(1)

    return preexec


TAKEN = "taken by another process"


def run_cell(cell: Cell, launcher: str | None = None, threads: int | None = None, log_dir: Path | None = None,
             keep_checkpoints: bool = False) -> str:
    """Run one cell to completion unless it is already finished; returns its final status.

    Runs under the cell's lock; a cell locked by another process is left to it and returns
    ``"taken by another process (pid P)"``. The cell's output goes to
    ``<log_dir>/<cell name with / as __>.log`` (default log_dir: ``<runs_dir>/logs``), appended across attempts.
    """
    lock = CellLock(cell)
    if not lock.acquire():
        return f"{TAKEN} (pid {lock.holder()})"
    try:
        return _run_locked(cell, lock, launcher, threads, log_dir, keep_checkpoints)
    finally:
        lock.release()


def _run_locked(cell: Cell, lock: CellLock, launcher, threads, log_dir, keep_checkpoints) -> str:
    # Status is read under the lock: another process may have finished the cell since this one listed it.
    check_config_matches(cell)
    status = cell_status(cell)
    if status == "finished":
        return "skipped"
    env = dict(os.environ)
    if threads:
        # P cells side by side on C cores: each gets C/P intra-op threads instead of all fighting for C.
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_dir = Path(log_dir or _runs_root(cell) / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / (cell.name.replace("/", "__") + ".log")
    cmd = cell_command(cell, launcher)
    with log.open("a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} ({status}) {shlex.join(cmd)}\n")
        fh.flush()
        # The cell's process inherits the lock (pass_fds), so the cell stays locked until it has exited too.
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, pass_fds=(lock.fd,),
                            preexec_fn=_die_with_parent()).returncode
    if (cell.run_dir / "final_metrics.json").exists():
        problem = run_problem(cell.run_dir)
        if problem:
            raise BertAccumError(f"grid cell {cell.index} ({cell.name}) exited with status {rc} and damaged records: {problem}")
        if not keep_checkpoints:
            shutil.rmtree(cell.run_dir / "checkpoints", ignore_errors=True)
        final = json.loads((cell.run_dir / "final_metrics.json").read_text())
        return final.get("status", "completed")
    raise BertAccumError(f"grid cell {cell.index} ({cell.name}) exited with status {rc} without final metrics; see {log}")


def run_grid(cells: list[Cell], parallel: int = 1, launcher: str | None = None, keep_going: bool = False,
             keep_checkpoints: bool = False, log_dir: Path | None = None, say=print) -> dict[str, str]:
    """Run cells one after another (`parallel` = 1) or several at a time; returns {cell name: outcome}.

    Cells locked by another grid process are skipped with a line saying so (outcome ``taken by another process``).
    """
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    outcomes: dict[str, str] = {}
    lock = threading.Lock()
    for c in cells:
        check_config_matches(c)  # a finished folder from other settings (a smoke test) must not count as done
    todo = [c for c in cells if cell_status(c) != "finished"]
    say(f"[bert_accum grid] {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run"
        + (f", {parallel} at a time with {threads} threads each" if parallel > 1 else ""))
    for c in cells:
        if c not in todo:
            outcomes[c.name] = "skipped"

    def one(cell: Cell) -> None:
        t0 = time.perf_counter()
        try:
            outcome = run_cell(cell, launcher, threads, log_dir, keep_checkpoints)
        except BertAccumError as exc:
            if not keep_going:
                raise
            outcome = f"failed: {exc}"
        with lock:
            outcomes[cell.name] = outcome
            say(f"[bert_accum grid] [{cell.index}] {cell.name}: {outcome} ({time.perf_counter() - t0:.0f} s)")

    if parallel <= 1:
        for cell in todo:
            one(cell)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            futures = [pool.submit(one, c) for c in todo]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # stop at the first failure, as the serial loop does
                raise
    taken = [name for name, o in outcomes.items() if o.startswith(TAKEN)]
    if taken:
        say(f"[bert_accum grid] {len(taken)} cell(s) were being run by another grid process and were left to it; "
            "`--status` shows when they finish")
    return outcomes


def grid_dir() -> Path | None:
    """The grid files shipped with the package (`bert_accum/configs/` in an installed wheel), or the checkout's
    `configs/` folder beside the package (an editable install or a clone on PYTHONPATH)."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "configs", package.parent / "configs"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def packaged_grid_files() -> list[Path]:
    """The shipped grid files (`grid_dir()`), by name."""
    folder = grid_dir()
    return sorted(folder.glob("*.yaml")) if folder is not None else []


def find_grid_file(name: str) -> Path:
    """`name` as given when that file exists, else the shipped grid file of that name (`configs/study_main.yaml`,
    `study_main.yaml` and `study_main` all find it), so the README's commands work from any folder."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    for shipped in packaged_grid_files():
        if shipped.name == stem:
            return shipped
    names = ", ".join(p.stem for p in packaged_grid_files()) or "none found"
    raise BertAccumError(f"grid file not found: {name} (relative to {Path.cwd()}); the grid files shipped with "
                         f"bert_accum are: {names}")


def grid_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum grid` (`scripts/grid.py`): expand a grid file and run, list, count or dry-run its cells."""
    from ..cli import ArgumentParser, guarded, positive_int

    p = ArgumentParser(prog=prog, description="Run a YAML grid of fine-tuning cells (see configs/).")
    p.add_argument("grid", help="YAML grid file, or the name of one shipped with the package (study_main, ...: "
                                f"{', '.join(f.stem for f in packaged_grid_files())})")
    p.add_argument("--glue_dir", help="local GLUE folder for every cell (default: the grid's own setting, else the Hub)")
    p.add_argument("--runs_dir", help="root of the run folders (default: the grid's runs_dir)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field in every cell (YAML value), e.g. --set max_train_steps=5")
    p.add_argument("--cell", type=int, nargs="+", help="run only these cell indices (a SLURM array task runs one)")
    p.add_argument("--parallel", type=positive_int, default=1, help="cells to run at the same time (default 1)")
    p.add_argument("--launcher", help="command prefix for each cell, e.g. 'accelerate launch --num_processes 2'")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print '<index>\\t<run folder>\\t<command>' per cell and run nothing")
    p.add_argument("--count", action="store_true", help="print the number of cells and exit")
    p.add_argument("--status", action="store_true",
                   help="print each cell's state: new, stale (started, no checkpoint; or made with other settings, "
                        "named in a fourth column), interrupted, running (locked by a grid process), damaged (final "
                        "metrics but incomplete records; rerun from scratch) or finished (verified)")
    p.add_argument("--keep_going", action="store_true", help="carry on with the other cells when one fails")
    a = p.parse_args(argv)

    def go() -> None:
        import yaml

        spec = GridSpec.load(find_grid_file(a.grid))
        set_values: dict[str, Any] = {}
        for item in a.set:
            if "=" not in item:
                raise BertAccumError(f"--set expects KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            set_values[key] = yaml.safe_load(value)
        if a.glue_dir:
            set_values["glue_dir"] = a.glue_dir
        cells = expand(spec, a.runs_dir, set_values)
        if a.count:
            print(len(cells))
            return
        if a.cell is not None:
            bad = [i for i in a.cell if not 0 <= i < len(cells)]
            if bad:
                raise BertAccumError(f"--cell {bad}: the grid has cells 0..{len(cells) - 1}")
            cells = [cells[i] for i in a.cell]
        else:
            cells = run_order(cells, spec.run_first, a.grid)
        if a.dry_run or a.status:
            states = []
            for cell in cells:
                if a.dry_run:
                    print(describe(cell, a.launcher))
                    continue
                try:
                    check_config_matches(cell)
                except BertAccumError as exc:
                    # A folder made with other settings is what --status is asked to find, not a reason to stop.
                    print(f"{cell.index}\tstale\t{cell.name}\t{exc}")
                    states.append("stale")
                    continue
                state = "running" if CellLock(cell).held_elsewhere() else cell_status(cell)
                problem = run_problem(cell.run_dir) if state == "damaged" else None
                print(f"{cell.index}\t{state}\t{cell.name}" + (f"\t{problem}" if problem else ""))
                states.append(state)
            if a.status:
                # The summary goes to stderr: stdout stays one tab-separated line per cell for scripts.
                counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(sorted(states)))
                seconds, unknown = time_left(cells, states)
                left = len(cells) - states.count("finished")
                line = f"[bert_accum grid] {len(cells)} cells: {counts}. Left: {left} cells"
                if left and unknown == left:
                    # 0.0 h would read as "done": say there is nothing to estimate from yet
                    line += ", no time estimate yet: none has a finished cell of its task and (B, N) to go by"
                elif left:
                    line += (f", about {seconds / 3600:.1f} h of training time (each at the median train_seconds of "
                             f"the finished cells of its task and (B, N); evaluation and start-up not included)")
                    if a.parallel > 1:
                        line += f", {seconds / 3600 / a.parallel:.1f} h with --parallel {a.parallel}"
                    if unknown:
                        line += f"; {unknown} of them have no finished cell of their shape to go by"
                print(line + ".", file=sys.stderr)
            return
        outcomes = run_grid(cells, a.parallel, a.launcher, a.keep_going, spec.keep_checkpoints)
        failed = [name for name, o in outcomes.items() if o.startswith("failed")]
        if failed:
            raise BertAccumError(f"{len(failed)} cell(s) failed: {', '.join(failed)}")

    return guarded(go)
