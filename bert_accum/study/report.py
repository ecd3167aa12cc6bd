"""The study report: `REPORT.md`, `numbers.json`, tables and figures generated from run folders, grid files,
the probe's tables and, for a study whose run folders are gone, its committed tables.

Inputs
  * run folders written by `scripts/finetune.py` / `scripts/grid.py`, laid out by the grid as
    ``<root>/<task>/<arm>/B<B>_N<N>/seed<seed>`` (each with config.json, environment.json, steps.jsonl,
    eval.jsonl, predictions.json, final_metrics.json and optionally fingerprints/); the root folder's name is
    the study's name (e.g. ``converged``, ``study``, ``study_bugs``);
  * for a *converged* study, its grid file (`--grid`): the planned cells (so missing and unfinished runs are
    counted), the equivalence margins and the reference thresholds. A runs folder without a grid file is an
    *early-training* study (mechanism over a few optimizer steps);
  * the committed tables of an early study whose run folders are absent (`--early_csv`: summary.csv, runs.csv,
    param_distance.csv);
  * the probe's ``probe.csv`` files (one-step gradient drift per cause), the BatchNorm study's ``norm_study.md``.

Everything is read and checked before anything is written: a run folder with malformed JSON or JSONL, or with
final metrics but no config.json, is refused with one line naming the file and line; two runs are paired only
when their full identity (data source, task, objective, every training setting, B, N, W and all three seeds)
differs in nothing but the factor the comparison varies. The numbers are computed in one pass
(`bert_accum.study.numbers`), the prose is filled from them (`bert_accum.study.templates`), and the output
folder receives REPORT.md, numbers.json, study/*.csv and study/figures/ only once all of them are complete.

Early-training comparisons (the `summarise` table) pair a run with its *reference* of the same study, task and
cell seed: the (E, 1) run of the same arm when the study has one (the large batch), otherwise the ``default`` arm
at the same (B, N) (the correct loop, for the bug study). Parameter distance uses the fingerprints (a count
sketch of all parameters, the same projection in every run): ||f_run(t) - f_ref(t)|| / ||f_ref(t) - f_ref(0)||;
the *seed floor* is the same quantity between the reference runs of two different seeds.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.records import check_writable_dir, git_commit, read_json, read_jsonl, run_problem
from ..errors import BertAccumError
from .plumbing import command_line, mean_std, provenance, t_interval, write_csv

_CELL = re.compile(r"B(\d+)_N(\d+)$")
SEED_DIR = re.compile(r"seed(-?\d+)$")
SEED_FIELDS = ("seed", "data_seed", "dropout_seed")


def _require(obj: Any, keys: Iterable[str], path: Path) -> None:
    if not isinstance(obj, dict):
        raise BertAccumError(f"{path}: expected a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BertAccumError(f"{path}: no {', '.join(missing)}")


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One finished run folder."""

    path: Path
    study: str
    task: str
    arm: str
    micro_batch_size: int
    accumulation_steps: int
    num_processes: int
    seed: int
    objective: str
    final: dict[str, Any]
    steps: list[dict[str, Any]]
    cell_seed: int = 0
    """The grid cell's seed (the `seed<k>` folder): what pairs runs, also when a floor arm offsets `seed`."""
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    environment: dict[str, Any] = field(default_factory=dict, repr=False)
    evals: list[dict[str, Any]] = field(default_factory=list, repr=False)
    predictions: dict[str, Any] | None = field(default=None, repr=False)
    _fingerprints: dict[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def bn(self) -> tuple[int, int]:
        """(B, N)."""
        return self.micro_batch_size, self.accumulation_steps

    @property
    def effective_batch_size(self) -> int:
        """B * N * W."""
        return self.micro_batch_size * self.accumulation_steps * self.num_processes

    @property
    def metric_name(self) -> str:
        """The run's headline metric (the task's main metric, masked_accuracy for MLM)."""
        return self.final.get("main_metric", "accuracy")

    @property
    def metric(self) -> float:
        """Final value of the headline metric (NaN if the run stopped early); with several evaluation splits
        (MNLI: validation_matched/..., validation_mismatched/...) the first split's."""
        ev = self.final.get("eval", {})
        if self.metric_name in ev:
            return float(ev[self.metric_name])
        split_keys = sorted(k for k in ev if k.endswith("/" + self.metric_name))
        return float(ev[split_keys[0]]) if split_keys else float("nan")

    @property
    def seeds(self) -> dict[str, int]:
        """The three resolved seeds (init, data order, dropout): config.json's derived.seeds, else the fields,
        with data and dropout seeds defaulting to `seed` as TrainConfig resolves them."""
        resolved = self.config.get("derived", {}).get("seeds")
        if resolved:
            return {k: resolved.get(k) for k in SEED_FIELDS}
        s = self.config.get("seed", self.seed)
        return {"seed": s, "data_seed": self.config.get("data_seed") or s, "dropout_seed": self.config.get("dropout_seed") or s}

    @property
    def final_predictions(self) -> list | None:
        """Dev predictions of the final evaluation (first evaluation split), None when the run has none or its
        predictions.json is from an earlier evaluation."""
        p = self.predictions
        if not p or p.get("optimizer_step") != self.final.get("optimizer_steps"):
            return None
        splits = p.get("splits") or {}
        return splits[sorted(splits)[0]] if len(splits) > 1 else next(iter(splits.values()), None)

    @property
    def fingerprints(self) -> dict[int, np.ndarray]:
        """Parameter fingerprints by optimizer step (loaded on first use)."""
        if self._fingerprints is None:
            from ..core.fingerprint import load_fingerprints

            try:
                self._fingerprints = load_fingerprints(self.path) if (self.path / "fingerprints").is_dir() else {}
            except (OSError, ValueError, EOFError) as exc:
                raise BertAccumError(f"{self.path / 'fingerprints'}: unreadable fingerprint ({exc})") from None
        return self._fingerprints


def load_runs(roots: Iterable[str | Path]) -> list[Run]:
    """Every finished run folder below `roots` (a folder with final_metrics.json), read completely and checked:
    malformed JSON/JSONL or a missing config.json is an error naming the file and line."""
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise BertAccumError(f"runs folder not found: {root}")
        for final_path in sorted(root.rglob("final_metrics.json")):
            runs.append(_load_run(root, final_path.parent))
    return runs


def _load_run(root: Path, d: Path) -> Run:
    if not (d / "config.json").is_file():
        raise BertAccumError(f"{d}: final_metrics.json without config.json; refusing a run folder that does not say how it was made")
    problem = run_problem(d)
    if problem:
        raise BertAccumError(f"damaged run folder: {problem}")
    cfg = read_json(d / "config.json")
    _require(cfg, ("seed", "derived"), d / "config.json")
    derived = cfg["derived"]
    _require(derived, ("micro_batch_size", "accumulation_steps"), d / "config.json")
    final = read_json(d / "final_metrics.json")
    _require(final, (), d / "final_metrics.json")
    optional = {name: read_json(d / name) if (d / name).is_file() else None for name in ("environment.json", "predictions.json")}
    rel = d.relative_to(root).parts
    arm = rel[-3] if len(rel) >= 3 and _CELL.match(rel[-2]) else _arm_label(cfg)
    seed_dir = SEED_DIR.match(d.name)
    return Run(
        path=d, study=root.name, task=derived.get("task", cfg.get("task_name")), arm=arm,
        micro_batch_size=derived["micro_batch_size"], accumulation_steps=derived["accumulation_steps"],
        num_processes=derived.get("num_processes", 1), seed=cfg["seed"], objective=cfg.get("objective", "classification"),
        final=final, steps=read_jsonl(d / "steps.jsonl", strict=True) if (d / "steps.jsonl").is_file() else [],
        cell_seed=int(seed_dir.group(1)) if seed_dir else cfg["seed"], config=cfg,
        environment=optional["environment.json"] or {},
        evals=read_jsonl(d / "eval.jsonl", strict=True) if (d / "eval.jsonl").is_file() else [],
        predictions=optional["predictions.json"],
    )


def unfinished_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Run folders below `roots` that have started (config.json or steps.jsonl) but hold no final_metrics.json.
    Their config.json, when present, must parse; their growing JSONL files are not read."""
    out = set()
    for root in map(Path, roots):
        for name in ("config.json", "steps.jsonl"):
            for p in root.rglob(name):
                d = p.parent
                if "checkpoints" not in d.relative_to(root).parts and not (d / "final_metrics.json").exists():
                    out.add(d)
    for d in out:
        if (d / "config.json").is_file():
            read_json(d / "config.json")
    return sorted(out)


def _arm_label(cfg: dict[str, Any]) -> str:
    """A name for a run made outside a grid, from its switches."""
    parts = [cfg.get("dropout", "standard"), cfg.get("padding", "dynamic"), cfg.get("loss_normalization", "mean_of_means")]
    return "-".join(parts + list(cfg.get("bug_modes") or []))


# ------------------------------------------------------------------------------------------ identity and pairing
# Fields that say where a run writes, how it is logged, checkpointed or resumed: not what it computes.
_BOOKKEEPING = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "disable_progress_bar", "cache_dir", "report_to",
    "with_tracking", "checkpointing_steps", "checkpoints_total_limit", "save_final_model", "fingerprint_steps",
    "fingerprint_dim", "derived",
}
# Replaced in `identity` by the resolved values (B, N, W and the three seeds as the run used them).
_CELL_FIELDS = {"per_device_train_batch_size", "gradient_accumulation_steps", *SEED_FIELDS}
BATCH_FACTOR = frozenset({"micro_batch_size", "accumulation_steps"})


def config_identity(cfg: dict[str, Any], task: str, objective: str, b: int, n: int, w: int,
                    seeds: dict[str, int]) -> dict[str, Any]:
    """Everything that makes a run what it is: data source and sizes, task, objective, every training setting,
    B, N, W and the three resolved seeds. A field the config.json lacks (written before the field existed) counts
    as the field's default, as the grid runner and resume count it."""
    import dataclasses

    from ..core.config import TrainConfig

    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in {**defaults, **cfg}.items() if k not in _BOOKKEEPING | _CELL_FIELDS}
    out.update(task=task, objective=objective, micro_batch_size=b, accumulation_steps=n, num_processes=w, **seeds)
    return out


def identity(run: Run) -> dict[str, Any]:
    """A finished run's identity (`config_identity` of its config.json)."""
    return config_identity(run.config, run.task, run.objective, run.micro_batch_size, run.accumulation_steps,
                           run.num_processes, run.seeds)


def differences(a: Run, b: Run) -> list[str]:
    """The identity fields in which two runs differ (a field one of them lacks counts as its default)."""
    ia, ib = identity(a), identity(b)
    return sorted(k for k in set(ia) | set(ib) if ia.get(k) != ib.get(k))


def check_pair(a: Run, b: Run, compared: Iterable[str]) -> None:
    """Refuse to compare two runs that differ in anything but the `compared` fields (one line naming both)."""
    compared = set(compared)
    extra = [k for k in differences(a, b) if k not in compared]
    if extra:
        ia, ib = identity(a), identity(b)
        what = "; ".join(f"{k} ({ia.get(k)!r} vs {ib.get(k)!r})" for k in extra)
        raise BertAccumError(f"refusing to pair {a.path} with {b.path}: besides {', '.join(sorted(compared)) or 'nothing'} "
                             f"they differ in {what}")


def reference_of(run: Run, runs_by_key: dict[tuple, Run]) -> Run | None:
    """The paired reference of the same cell seed and process count W: the large batch (E/W, 1) of the same arm
    when the study has that cell for any seed, otherwise the `default` arm at the same (B, N). The kind of reference
    is decided per cell, not per seed, so a missing large-batch run leaves its seed unpaired instead of mixing in
    another kind. The pair is checked: it may differ only in (B, N), or for the default-arm reference in the bug
    modes."""
    W = run.num_processes
    large = (run.effective_batch_size // W, 1)
    cell = (run.study, run.task, run.arm, large, W)
    if any(k[:5] == cell for k in runs_by_key):
        big = runs_by_key.get((*cell, run.cell_seed))
        if big is None or big is run:
            return None
        check_pair(run, big, BATCH_FACTOR)
        return big
    if run.arm != "default":
        ref = runs_by_key.get((run.study, run.task, "default", run.bn, W, run.cell_seed))
        if ref is not None:
            check_pair(run, ref, {"bug_modes"})
        return ref
    return None


# ------------------------------------------------------------------------------------------ early training
@dataclass
class Summary:
    """One row of the final-metric table: a (study, task, arm, B, N) cell over its seeds."""

    study: str
    task: str
    arm: str
    micro_batch_size: int
    accumulation_steps: int
    metric_name: str
    n: int
    mean: float
    std: float
    non_finite: int = 0
    n_pairs: int = 0
    diff_mean: float = float("nan")
    diff_lo: float = float("nan")
    diff_hi: float = float("nan")
    reference: str = ""
    seed_std: float = float("nan")
    rel_param_distance: float = float("nan")
    rel_param_distance_std: float = float("nan")
    train_seconds: float = float("nan")
    examples_per_second: float = float("nan")
    device: str = ""

    @property
    def ci_excludes_zero(self) -> bool:
        """The 95% interval of the paired difference excludes 0 (a nonzero difference at that point of training)."""
        return self.diff_lo > 0 or self.diff_hi < 0


def _key(run: Run) -> tuple:
    return run.study, run.task, run.arm, run.bn, run.num_processes, run.cell_seed


def param_distance(run: Run, ref: Run, step: int | None = None) -> float:
    """||f_run - f_ref|| / ||f_ref - f_ref(0)|| at `step` (default: the last step both runs fingerprinted;
    runs of different lengths compare their own last fingerprints)."""
    fr, fe = run.fingerprints, ref.fingerprints
    if not fr or not fe or 0 not in fe:
        return float("nan")
    if step is None:
        common = sorted(set(fr) & set(fe))
        a, b = (fr[max(fr)], fe[max(fe)]) if max(fr) != max(fe) else (fr[common[-1]], fe[common[-1]])
    else:
        if step not in fr or step not in fe:
            return float("nan")
        a, b = fr[step], fe[step]
    moved = np.linalg.norm(b - fe[0])
    return float(np.linalg.norm(a - b) / moved) if moved > 0 else float("nan")


def summarise(runs: list[Run]) -> list[Summary]:
    """Final metric per (study, task, arm, B, N): mean ± std over seeds, paired difference to the reference. The runs
    of a cell may differ only in their seeds, a run and its reference only in the compared factor (`reference_of`)."""
    by_key = {_key(r): r for r in runs}
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        cells[(r.study, r.task, r.arm, r.bn)].append(r)
    out = []
    for (study, task, arm, bn), members in sorted(cells.items(), key=lambda kv: _order(kv[0])):
        members.sort(key=lambda r: r.cell_seed)
        for r in members[1:]:
            check_pair(r, members[0], SEED_FIELDS)  # a cell's runs differ only in their seeds
        m, s = mean_std([r.metric for r in members])
        row = Summary(study, task, arm, bn[0], bn[1], members[0].metric_name, len(members), m, s)
        row.train_seconds = statistics.fmean(r.final.get("train_seconds", float("nan")) for r in members)
        row.examples_per_second = statistics.fmean(r.final.get("examples_per_second", float("nan")) for r in members)
        row.device = ",".join(sorted({str(r.final.get("device", "")) for r in members}))
        row.non_finite = sum(math.isnan(r.metric) for r in members)
        pairs = [(r, reference_of(r, by_key)) for r in members]
        # a diverged run (or reference) has no final metric: counted in `non_finite`, left out of the pairs
        pairs = [(r, ref) for r, ref in pairs if ref is not None and not math.isnan(r.metric) and not math.isnan(ref.metric)]
        if pairs:
            ref0 = pairs[0][1]
            row.reference = f"{ref0.arm} B{ref0.micro_batch_size}_N{ref0.accumulation_steps}"
            diffs = [r.metric - ref.metric for r, ref in pairs]
            row.n_pairs = len(diffs)
            row.diff_mean = statistics.fmean(diffs)
            row.diff_lo, row.diff_hi = t_interval(diffs)
            refs = [ref.metric for _, ref in pairs]
            row.seed_std = statistics.stdev(refs) if len(refs) > 1 else float("nan")
            dists = [param_distance(r, ref) for r, ref in pairs]
            row.rel_param_distance, row.rel_param_distance_std = mean_std(dists)
        out.append(row)
    return out


_ARM_ORDER = ("default", "controlled")


def arm_rank(arm: str) -> tuple[int, str]:
    """Sort key of arms: default, controlled, then the rest by name."""
    return (_ARM_ORDER.index(arm) if arm in _ARM_ORDER else len(_ARM_ORDER)), arm


def _order(key: tuple) -> tuple:
    study, task, arm, bn = key
    return study, task, *arm_rank(arm), -bn[0]


def distance_curves(runs: list[Run]) -> list[dict[str, Any]]:
    """Per run and fingerprinted step: relative parameter distance to the reference, plus the seed floor rows
    (reference runs of two seeds compared with each other, `micro_batch_size` of the reference)."""
    by_key = {_key(r): r for r in runs}
    rows = []
    for r in runs:
        ref = reference_of(r, by_key)
        if ref is None:
            continue
        for step in sorted(set(r.fingerprints) & set(ref.fingerprints)):
            if step == 0:
                continue
            rows.append(dict(study=r.study, task=r.task, arm=r.arm, micro_batch_size=r.micro_batch_size,
                             accumulation_steps=r.accumulation_steps, seed=r.cell_seed, optimizer_step=step,
                             kind="vs_reference", rel_param_distance=param_distance(r, ref, step)))
    refs: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.accumulation_steps == 1:
            refs[(r.study, r.task, r.arm, r.bn)].append(r)
    for (study, task, arm, bn), members in refs.items():
        for a, b in itertools.combinations(sorted(members, key=lambda r: r.cell_seed), 2):
            check_pair(a, b, SEED_FIELDS)
            for step in sorted(set(a.fingerprints) & set(b.fingerprints)):
                if step == 0:
                    continue
                rows.append(dict(study=study, task=task, arm=arm, micro_batch_size=bn[0], accumulation_steps=bn[1],
                                 seed=f"{a.cell_seed}-{b.cell_seed}", optimizer_step=step, kind="seed_floor",
                                 rel_param_distance=param_distance(a, b, step)))
    return rows


@dataclass
class EarlyStudy:
    """An early-training study: its cell summaries, per-run rows and parameter-distance rows, from run folders or
    from the tables a previous report committed (`source` says which)."""

    name: str
    summaries: list[Summary]
    runs: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    source: str
    run_objects: list[Run] = field(default_factory=list)


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a committed CSV (leading `#` provenance lines skipped)."""
    if not path.is_file():
        raise BertAccumError(f"table not found: {path}")
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def _number(text: str, path: Path, column: str) -> float | int:
    if text in ("", "nan", "NaN"):
        return float("nan")
    try:
        return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        raise BertAccumError(f"{path}: column {column} holds {text!r}, not a number") from None


def read_early_tables(folder: str | Path) -> list[EarlyStudy]:
    """The early studies in a committed report folder (summary.csv, runs.csv, param_distance.csv), one per value of
    their `study` column; columns the Summary no longer has (an old verdict column) are ignored."""
    folder = Path(folder)
    names = {f.name: f.type for f in fields(Summary)}
    summaries: dict[str, list[Summary]] = defaultdict(list)
    path = folder / "summary.csv"
    for row in _read_table(path):
        values = {k: (_number(v, path, k) if names[k] in ("int", "float") else v) for k, v in row.items() if k in names}
        summaries[row["study"]].append(Summary(**values))
    run_rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    path = folder / "runs.csv"
    for row in _read_table(path):
        for k in ("micro_batch_size", "accumulation_steps", "num_processes", "seed", "optimizer_steps", "metric",
                  "train_seconds", "examples_per_second"):
            if k in row:
                row[k] = _number(row[k], path, k)
        run_rows[row["study"]].append(row)
    curves: dict[str, list[dict[str, Any]]] = defaultdict(list)
    path = folder / "param_distance.csv"
    if path.is_file():
        for row in _read_table(path):
            for k in ("micro_batch_size", "accumulation_steps", "optimizer_step", "rel_param_distance"):
                row[k] = _number(row[k], path, k)
            curves[row["study"]].append(row)
    return [EarlyStudy(name, summaries[name], run_rows[name], curves[name], source=str(folder)) for name in sorted(summaries)]


def early_from_runs(runs: list[Run]) -> list[EarlyStudy]:
    """Early studies from their run folders."""
    summaries, curves = summarise(runs), distance_curves(runs)
    out = []
    for name in sorted({r.study for r in runs}):
        mine = [r for r in runs if r.study == name]
        out.append(EarlyStudy(name, [s for s in summaries if s.study == name], [run_row(r) for r in mine],
                              [c for c in curves if c["study"] == name], source="run folders", run_objects=mine))
    return out


def run_row(r: Run) -> dict[str, Any]:
    """One run as a row of runs.csv."""
    ev = r.final.get("eval", {})
    return {
        "study": r.study, "task": r.task, "arm": r.arm, "micro_batch_size": r.micro_batch_size,
        "accumulation_steps": r.accumulation_steps, "num_processes": r.num_processes,
        "effective_batch_size": r.effective_batch_size, "seed": r.cell_seed, **{f"resolved_{k}": v for k, v in r.seeds.items()},
        "objective": r.objective, "status": r.final.get("status"), "optimizer_steps": r.final.get("optimizer_steps"),
        "metric_name": r.metric_name, "metric": r.metric,
        "eval": json.dumps({k: v for k, v in ev.items() if isinstance(v, float)}, sort_keys=True),
        "final_loss": r.steps[-1]["loss"] if r.steps else float("nan"),
        "train_seconds": r.final.get("train_seconds"), "examples_per_second": r.final.get("examples_per_second"),
        "last_learning_rate": r.steps[-1].get("learning_rate") if r.steps else float("nan"),
        "device": r.final.get("device"), "run_dir": str(r.path),
    }


# ------------------------------------------------------------------------------------------ probes
def read_probe(path: Path) -> list[dict[str, Any]]:
    """Rows of a probe.csv (leading `#` lines are its command/commit comment); one table holds one task."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    rows = list(csv.DictReader(lines))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = (float(v) if v != "" else math.nan) if k not in ("task", "objective", "arm", "max_group") else v
            except ValueError:
                pass
    tasks = sorted({r.get("task") for r in rows})
    if len(tasks) > 1:
        raise BertAccumError(f"{path}: one probe table per task, found rows of {', '.join(map(str, tasks))}")
    return rows


def load_probes(probe_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """{table name (its folder): rows} for every <probe_dir>/<name>/probe.csv."""
    if not probe_dir.is_dir():
        return {}
    return {p.parent.name: read_probe(p) for p in sorted(probe_dir.glob("*/probe.csv"))}


# ------------------------------------------------------------------------------------------ converged studies
def cell_identity(cell) -> dict[str, Any]:
    """The identity a grid cell's run will have (`config_identity` of its planned TrainConfig, W = 1)."""
    cfg = cell.config
    return config_identity(cfg.to_dict(), cell.task, cfg.objective, cell.micro_batch_size, cell.accumulation_steps, 1,
                           {"seed": cfg.seed, "data_seed": cfg.resolved_data_seed, "dropout_seed": cfg.resolved_dropout_seed})


@dataclass
class ConvergedStudy:
    """A study with a grid file: its finished runs, started-but-unfinished folders and planned cells."""

    name: str
    root: Path
    runs: list[Run]
    unfinished: list[str]
    planned: list[Any]
    """The grid's cells (`grid.Cell`), all of them, finished or not."""
    headline_arms: list[str]
    margins: dict[str, dict[str, float]]
    thresholds: dict[str, dict[str, float]]
    grid_file: str
    started: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    """(config.json, environment.json) of every started run, finished or not: how the runs were made."""
    changes: list[str] = field(default_factory=list)
    """The grid file's record of design changes made after runs had started."""


def load_converged(root: Path, grid_file: str | Path) -> ConvergedStudy:
    """Read a converged study: its grid's plan, its finished runs (each checked against its planned cell) and
    its unfinished folders. A finished run that is no cell of the grid, or was made with other settings than its
    cell (beyond what the grid's command line sets for every cell, such as --glue_dir), is refused."""
    from ..core.config import RUNTIME_FIELDS
    from .grid import GridSpec, expand

    spec = GridSpec.load(grid_file)
    planned = expand(spec)
    by_name = {c.name: c for c in planned}
    runs = load_runs([root])
    for r in runs:
        name = str(r.path.relative_to(root))
        if name not in by_name:
            raise BertAccumError(f"{r.path} is no cell of grid {grid_file}; keep runs of other grids in another folder")
        # What the grid's command line may set for every cell (--glue_dir, ...) is no difference of settings.
        mine, want = identity(r), cell_identity(by_name[name])
        diff = sorted(k for k in set(mine) | set(want) if k not in RUNTIME_FIELDS and mine.get(k) != want.get(k))
        if diff:
            raise BertAccumError(f"{r.path} was made with other settings than its cell of {grid_file}: " + "; ".join(
                f"{k} ({mine.get(k)!r} vs {want.get(k)!r})" for k in diff))
    unfinished = unfinished_runs([root])
    started = [(r.config, r.environment) for r in runs] + [
        (read_json(d / "config.json"), read_json(d / "environment.json") if (d / "environment.json").is_file() else {})
        for d in unfinished if (d / "config.json").is_file()]
    # The headline arm runs TrainConfig's defaults (an empty arm) and accumulates: what users run.
    accumulating = {c.arm for c in planned if c.accumulation_steps > 1}
    headline = [a for a, values in spec.arms.items() if not values and a in accumulating]
    return ConvergedStudy(
        name=root.name, root=root, runs=runs, unfinished=[str(d.relative_to(root)) for d in unfinished], planned=planned,
        headline_arms=headline, margins=spec.equivalence_margins, thresholds=spec.reference_thresholds,
        grid_file=str(grid_file), started=started, changes=spec.changes,
    )


def _match_grids(runs_dirs: list[str], grids: list[str]) -> dict[str, str]:
    """{runs folder: grid file}: a grid belongs to the runs folder named like its `runs_dir` (or, with one of
    each, to the only runs folder)."""
    from .grid import GridSpec

    out: dict[str, str] = {}
    for g in grids:
        want = Path(GridSpec.load(g).runs_dir).name
        match = [d for d in runs_dirs if Path(d).name == want]
        if not match and len(grids) == 1 and len(runs_dirs) == 1:
            match = runs_dirs
        if len(match) != 1:
            raise BertAccumError(f"grid {g} (runs_dir {want}) matches {len(match)} of the runs folders "
                                 f"{', '.join(runs_dirs) or '(none)'}; give the folder named {want}")
        out[match[0]] = g
    return out


# ------------------------------------------------------------------------------------------ the report
@dataclass
class ReportInputs:
    """Where `build_report` reads from and writes to (output_dir None: a new timestamped folder under reports/)."""

    runs_dirs: list[str]
    probe_dir: str | None = "results/probe"
    batchnorm_dir: str | None = "results/batchnorm"
    output_dir: str | None = None
    command: str = ""
    grids: list[str] = field(default_factory=list)
    early_csv: str | None = None
    glue_dir: str | None = None
    sections: list[str] = field(default_factory=list)
    """Markdown sections written by other study scripts (e.g. results/trainer/trainer.md), each headed by its
    provenance comment; appended after the converged study with that provenance kept beside them."""
    biases: str | None = None
    """Output folder of `bias-study`: its biases.md is the first included section, its paired.csv fills the
    answer's end-of-training biases."""


def rebase_links(body: str, section_dir: Path, out_dir: Path) -> str:
    """Markdown links and images of a section written in `section_dir` made relative to `out_dir`, where the
    report that includes it lives (URLs of any scheme, absolute paths, #anchors and code are left alone)."""
    rel = Path(os.path.relpath(section_dir.resolve(), out_dir.resolve()))

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|/|#", target, re.I):
            return m.group(0)
        return f"{m.group(1)}({(rel / target).as_posix()}{m.group(3) or ''})"

    link = re.compile(r"(\])\(([^)\s]+)(\s+\"[^\"]*\")?\)")
    # Odd pieces of a split on backticks are code spans (or fences): never rewritten.
    pieces = re.split(r"(```.*?```|`[^`]*`)", body, flags=re.S)
    return "".join(p if k % 2 else link.sub(fix, p) for k, p in enumerate(pieces))


def read_section(path: Path) -> tuple[str, str, str]:
    """(path, provenance, body) of a Markdown section file whose first line is its `<!-- command: ... -->` header;
    a section that does not say how it was made is refused."""
    if not path.is_file():
        raise BertAccumError(f"--section {path}: no such file")
    lines = path.read_text().splitlines()
    match = re.fullmatch(r"<!-- (command: .*) -->", lines[0]) if lines else None
    if not match:
        raise BertAccumError(f"--section {path}: its first line must be the provenance comment <!-- command: ... -->")
    return str(path), match.group(1), "\n".join(lines[1:]).strip("\n")


BIAS_NUMBER_COLUMNS = ("micro_batch_size", "accumulation_steps", "n", "planned", "reference_below_bar", "reference_mean", "mean_diff",
                       "ci95_lo", "ci95_hi", "detection_limit", "max_abs_diff", "p_value", "p_holm")


def read_bias_pairs(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of a bias study's paired.csv (bias-study --output_dir), numbers parsed; NaN where none was computed."""
    path = Path(folder) / "paired.csv"
    rows = _read_table(path)
    for row in rows:
        missing = [k for k in (*BIAS_NUMBER_COLUMNS, "bias", "verdict", "optimizer", "metric") if k not in row]
        if missing:
            raise BertAccumError(f"{path}: no column {', '.join(missing)}; is it a table written by bias-study?")
        for k in BIAS_NUMBER_COLUMNS:
            row[k] = _number(row[k], path, k)
    return rows


def default_output_dir(base: str | Path = "reports") -> Path:
    """A new folder name under `base` stamped with the local time (never an existing one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, k = Path(base) / stamp, 1
    while out.exists():
        k += 1
        out = Path(base) / f"{stamp}-{k}"
    return out


def build_report(inp: ReportInputs) -> Path:
    """Read and check every input, compute the numbers, render REPORT.md and the figures in a temporary folder,
    then move REPORT.md, numbers.json, study/*.csv and study/figures/ into the output folder; returns REPORT.md."""
    from . import figures, numbers, templates

    if inp.output_dir:
        check_writable_dir(Path(inp.output_dir))  # before any reading or computing
    grid_of = _match_grids(inp.runs_dirs, inp.grids)
    converged = [load_converged(Path(d), grid_of[d]) for d in inp.runs_dirs if d in grid_of]
    early_runs = load_runs([d for d in inp.runs_dirs if d not in grid_of])
    early = early_from_runs(early_runs)
    if inp.early_csv:
        have = {e.name for e in early}
        early += [e for e in read_early_tables(inp.early_csv) if e.name not in have]
    probes = load_probes(Path(inp.probe_dir)) if inp.probe_dir else {}
    if not converged and not early:
        raise BertAccumError("nothing to report: give runs folders (with --grid for a converged study) or --early_csv")
    bias_pairs = read_bias_pairs(inp.biases) if inp.biases else None
    section_files = ([str(Path(inp.biases) / "biases.md")] if inp.biases else []) + list(inp.sections)
    extra = [read_section(Path(p)) for p in section_files]
    prov = provenance(inp.command or command_line(), git_commit())
    out = Path(inp.output_dir) if inp.output_dir else default_output_dir()
    extra = [(p, head, rebase_links(body, Path(p).parent, out)) for p, head, body in extra]

    nums = numbers.compute(converged, early, probes, Path(inp.batchnorm_dir) if inp.batchnorm_dir else None,
                           prov, glue_dir=inp.glue_dir, bias_pairs=bias_pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        figs = figures.draw_all(nums, converged, early, probes, tmp / "study" / "figures")
        text = templates.render(nums, {k: str(p.relative_to(tmp)) for k, p in figs.items()}, extra)
        (tmp / "REPORT.md").write_text(text)
        (tmp / "numbers.json").write_text(numbers.to_json(nums))
        _write_tables(tmp / "study", nums, converged, early, prov)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, out)
    return out / "REPORT.md"


def _write_tables(folder: Path, nums: dict[str, Any], converged: list[ConvergedStudy], early: list[EarlyStudy],
                  prov: str) -> None:
    """study/runs.csv, summary.csv and param_distance.csv for studies read from run folders; the converged
    study's tables as <study>_<table>.csv."""
    from .numbers import converged_tables

    from_runs = [e for e in early if e.run_objects]
    # The early study's tables keep their own names (an --early_csv report reads them back); a converged study's
    # runs go to <study>_runs.csv, so regenerating into results/ never overwrites the committed early tables.
    runs = [row for e in from_runs for row in e.runs]
    if runs:
        write_csv(folder / "runs.csv", runs, prov)
    for c in converged:
        if c.runs:
            write_csv(folder / f"{c.name}_runs.csv", [run_row(r) for r in c.runs], prov)
    if from_runs:
        write_csv(folder / "summary.csv", [{f.name: getattr(s, f.name) for f in fields(Summary)}
                                           for e in from_runs for s in e.summaries], prov)
        curves = [c for e in from_runs for c in e.curves]
        if curves:
            write_csv(folder / "param_distance.csv", curves, prov)
    for c in converged:
        for table, rows in converged_tables(nums, c.name).items():
            if rows:
                write_csv(folder / f"{c.name}_{table}.csv", rows, prov)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Move the finished files from `tmp` into `out`: the whole folder when `out` is new, else file by file with
    the figures folder swapped whole (the old one removed only after the new one is in place)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    try:
        for src in sorted(p for p in tmp.rglob("*") if p.is_file() and "figures" not in p.relative_to(tmp).parts):
            dst = out / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        new_figs, figs = tmp / "study" / "figures", out / "study" / "figures"
        if new_figs.is_dir():
            old = None
            if figs.exists():
                old = figs.with_name(f".figures-old-{os.getpid()}")
                os.replace(figs, old)
            os.replace(new_figs, figs)
            if old is not None:
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def toy_example() -> dict[str, Any]:
    """The seed's toy example, computed with the training loop's own loss scaling (`micro_loss_scale`)."""
    import torch

    from ..controls.loss import micro_loss_scale

    w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    accumulated = []
    for micro in ([4.0], [2.0]):
        x = torch.tensor(micro, dtype=torch.float64)
        scale = micro_loss_scale(normalization="mean_of_means", micro_items=1, micro_examples=1, window_items=2,
                                 window_examples=2, accumulation_steps=2, num_processes=1, one_over_n=False)
        ((-(w * x) ** 2).sum() * scale).backward()
        accumulated.append(float(w.grad))
    torch.optim.SGD([w], lr=0.01).step()
    v = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    (-(v * torch.tensor([4.0, 2.0], dtype=torch.float64)) ** 2).mean().backward()
    batch_grad = float(v.grad)
    torch.optim.SGD([v], lr=0.01).step()
    return {"accumulated": accumulated, "batch_grad": batch_grad, "w_accumulated": float(w.detach()), "w_batch": float(v.detach())}
