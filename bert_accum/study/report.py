"""The study report: tables, figures and `REPORT.md` generated from run folders and the probe's tables.

Inputs
  * run folders written by `scripts/finetune.py` / `scripts/grid.py`, laid out by the grid as
    ``<root>/<task>/<arm>/B<B>_N<N>/seed<seed>`` (each with config.json, steps.jsonl, final_metrics.json and
    fingerprints/); the root folder's name is the study's name (e.g. ``study``, ``study_bugs``);
  * the probe's ``probe.csv`` files (one-step gradient drift per cause), the BatchNorm study's table.

Comparisons are always paired: a run is compared with its *reference* of the same study, task and seed:
the (E, 1) run of the same arm when the study has one (the large batch), otherwise the ``default`` arm at the
same (B, N) (the correct loop, for the bug study). Seed noise is the sample standard deviation of the
reference's final metric over seeds; a difference counts as "beyond seed noise" when its 95% confidence
interval (Student t over the paired seeds) excludes zero *and* its mean exceeds that standard deviation.

Parameter distance uses the fingerprints (a count sketch of all parameters, the same projection in every
run): ||f_run(t) - f_ref(t)|| / ||f_ref(t) - f_ref(0)||, the distance to the reference after step t relative
to how far the reference itself has moved from the initial weights. The *seed floor* is the same quantity
between the reference runs of two different seeds.

A run folder with final_metrics.json must be whole (config.json and final_metrics.json readable, one steps.jsonl
row per optimizer step): a damaged one stops the report with a line naming the file, before anything is
written, rather than being summarised from part of its records. The tables and figures are written into a
scratch folder that replaces ``<output_dir>/study`` only once everything was produced.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import BertAccumError
from ..core.records import check_writable_dir, git_commit, read_json, read_jsonl, run_problem
from .plumbing import fmt, header, mean_std, provenance, t_interval, write_csv

_CELL = re.compile(r"B(\d+)_N(\d+)$")


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
    """Every finished run folder below `roots` (folders without final_metrics.json are skipped).

    A finished folder that is damaged (unreadable JSON, missing config.json, steps.jsonl rows missing or torn,
    config.json without the fields the report needs) is a one-line BertAccumError naming the file.
    """
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise BertAccumError(f"runs folder not found: {root}")
        for final_path in sorted(root.rglob("final_metrics.json")):
            d = final_path.parent
            problem = run_problem(d)
            if problem:
                raise BertAccumError(f"damaged run folder: {problem}")
            cfg = read_json(d / "config.json")
            derived = cfg.get("derived")
            missing = [k for k in ("micro_batch_size", "accumulation_steps") if not isinstance(derived, dict) or k not in derived]
            missing += [k for k in ("task_name", "seed") if k not in cfg]
            if missing:
                raise BertAccumError(f"{d / 'config.json'}: no {'derived.' if missing[0] in ('micro_batch_size', 'accumulation_steps') else ''}{missing[0]}")
            rel = d.relative_to(root).parts
            arm = rel[-3] if len(rel) >= 3 and _CELL.match(rel[-2]) else _arm_label(cfg)
            runs.append(Run(
                path=d, study=root.name, task=derived.get("task", cfg["task_name"]), arm=arm,
                micro_batch_size=derived["micro_batch_size"], accumulation_steps=derived["accumulation_steps"],
                num_processes=derived.get("num_processes", 1), seed=cfg["seed"], objective=cfg.get("objective", "classification"),
                final=read_json(final_path), steps=read_jsonl(d / "steps.jsonl", strict=True),
            ))
    return runs


def _arm_label(cfg: dict[str, Any]) -> str:
    """A name for a run made outside a grid, from its switches."""
    parts = [cfg.get("dropout", "standard"), cfg.get("padding", "dynamic"), cfg.get("loss_normalization", "mean_of_means")]
    return "-".join(parts + list(cfg.get("bug_modes") or []))


def reference_of(run: Run, runs_by_key: dict[tuple, Run]) -> Run | None:
    """The paired reference of the same seed and process count W: the large batch (E/W, 1) of the same arm when the
    study has that cell for any seed, otherwise the `default` arm at the same (B, N). The kind of reference is decided
    per cell, not per seed, so a missing large-batch run leaves its seed unpaired instead of mixing in another kind."""
    W = run.num_processes
    large = (run.effective_batch_size // W, 1)
    cell = (run.study, run.task, run.arm, large, W)
    if any(k[:5] == cell for k in runs_by_key):
        big = runs_by_key.get((*cell, run.seed))
        return big if big is not run else None
    if run.arm != "default":
        return runs_by_key.get((run.study, run.task, "default", run.bn, W, run.seed))
    return None


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
    beyond_seed_noise: str = ""
    rel_param_distance: float = float("nan")
    rel_param_distance_std: float = float("nan")
    train_seconds: float = float("nan")
    examples_per_second: float = float("nan")
    device: str = ""


def _key(run: Run) -> tuple:
    return run.study, run.task, run.arm, run.bn, run.num_processes, run.seed


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
    """Final metric per (study, task, arm, B, N): mean ± std over seeds, paired difference to the reference."""
    by_key = {_key(r): r for r in runs}
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        cells[(r.study, r.task, r.arm, r.bn)].append(r)
    out = []
    for (study, task, arm, bn), members in sorted(cells.items(), key=lambda kv: _order(kv[0])):
        members.sort(key=lambda r: r.seed)
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
            if row.n_pairs > 1:
                excludes_zero = row.diff_lo > 0 or row.diff_hi < 0
                row.beyond_seed_noise = "yes" if excludes_zero and abs(row.diff_mean) > row.seed_std else "no"
        out.append(row)
    return out


_ARM_ORDER = ("default", "controlled")


def _order(key: tuple) -> tuple:
    study, task, arm, bn = key
    arm_rank = _ARM_ORDER.index(arm) if arm in _ARM_ORDER else len(_ARM_ORDER)
    return study, task, arm_rank, arm, -bn[0]


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
                             accumulation_steps=r.accumulation_steps, seed=r.seed, optimizer_step=step,
                             kind="vs_reference", rel_param_distance=param_distance(r, ref, step)))
    refs: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.accumulation_steps == 1:
            refs[(r.study, r.task, r.arm, r.bn)].append(r)
    for (study, task, arm, bn), members in refs.items():
        for a, b in itertools.combinations(sorted(members, key=lambda r: r.seed), 2):
            for step in sorted(set(a.fingerprints) & set(b.fingerprints)):
                if step == 0:
                    continue
                rows.append(dict(study=study, task=task, arm=arm, micro_batch_size=bn[0], accumulation_steps=bn[1],
                                 seed=f"{a.seed}-{b.seed}", optimizer_step=step, kind="seed_floor",
                                 rel_param_distance=param_distance(a, b, step)))
    return rows


# ------------------------------------------------------------------------------------------ writing
def md_table(rows: list[dict[str, Any]], cols: list[str], names: list[str] | None = None) -> str:
    """A Markdown table of `cols` from dict rows."""
    names = names or cols
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def read_probe(path: Path) -> list[dict[str, Any]]:
    """Rows of a probe.csv (first line is its command/commit comment)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    rows = list(csv.DictReader(lines))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = (float(v) if v != "" else math.nan) if k not in ("task", "objective", "arm", "max_group") else v
            except ValueError:
                pass
    return rows


def _pm(m: float, s: float) -> str:
    return f"{fmt(m)} ± {fmt(s)}"


def _ci(lo: float, hi: float) -> str:
    return "—" if math.isnan(lo) else f"[{fmt(lo)}, {fmt(hi)}]"


def summary_rows(summaries: list[Summary]) -> list[dict[str, Any]]:
    """Summaries as display rows for the Markdown tables."""
    rows = []
    for s in summaries:
        rows.append({
            "task": s.task, "arm": s.arm, "B": s.micro_batch_size, "N": s.accumulation_steps, "metric": s.metric_name,
            "n": f"{s.n} ({s.non_finite} diverged)" if s.non_finite else s.n, "mean ± std": _pm(s.mean, s.std), "paired diff": fmt(s.diff_mean),
            "95% CI": _ci(s.diff_lo, s.diff_hi), "seed std": fmt(s.seed_std), "beyond noise": s.beyond_seed_noise or "—",
            "param dist": _pm(s.rel_param_distance, s.rel_param_distance_std) if not math.isnan(s.rel_param_distance) else "—",
            "vs": s.reference or "—",
        })
    return rows


# ------------------------------------------------------------------------------------------ figures
def plot_task(runs: list[Run], curves: list[dict[str, Any]], task: str, study: str, figdir: Path) -> list[Path]:
    """Gradient-norm trajectories and parameter distance vs step for one task: two PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in runs if r.task == task and r.study == study]
    arms = sorted({r.arm for r in mine}, key=lambda a: (_ARM_ORDER.index(a) if a in _ARM_ORDER else 9, a))
    bns = sorted({r.bn for r in mine}, key=lambda bn: -bn[0])
    colours = {bn: plt.cm.viridis(i / max(1, len(bns) - 1)) for i, bn in enumerate(bns)}
    paths = []

    fig, axes = plt.subplots(1, len(arms), figsize=(5.2 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for bn in bns:
            group = [r for r in mine if r.arm == arm and r.bn == bn]
            for i, r in enumerate(group):
                ax.plot([s["optimizer_step"] for s in r.steps], [s["grad_norm"] for s in r.steps], color=colours[bn],
                        alpha=0.8, lw=1.2, label=f"B={bn[0]}, N={bn[1]}" if i == 0 else None)
        ax.set_title(f"{task}: {arm}")
        ax.set_xlabel("optimizer_step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gradient norm (before clipping)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    p = figdir / f"grad_norm_{study}_{task}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = ["-", "--", ":", "-."]
    for ai, arm in enumerate(arms):
        for bn in bns:
            pts = [c for c in curves if c["task"] == task and c["study"] == study and c["arm"] == arm
                   and c["kind"] == "vs_reference" and (c["micro_batch_size"], c["accumulation_steps"]) == bn]
            if not pts:
                continue
            steps = sorted({c["optimizer_step"] for c in pts})
            ys = [statistics.fmean(c["rel_param_distance"] for c in pts if c["optimizer_step"] == s) for s in steps]
            ax.plot(steps, np.maximum(ys, 1e-12), styles[ai % 4], color=colours[bn], marker="o", ms=3,
                    label=f"{arm} B={bn[0]}, N={bn[1]}")
        floor = [c for c in curves if c["task"] == task and c["study"] == study and c["arm"] == arm and c["kind"] == "seed_floor"]
        if floor:
            steps = sorted({c["optimizer_step"] for c in floor})
            ys = [statistics.fmean(c["rel_param_distance"] for c in floor if c["optimizer_step"] == s) for s in steps]
            ax.plot(steps, ys, styles[ai % 4], color="grey", lw=2.5, alpha=0.6, label=f"{arm}: seed floor")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer_step")
    ax.set_ylabel("||θ − θ_ref|| / ||θ_ref − θ₀||")
    ax.set_title(f"{study} / {task}: parameter distance to the paired reference (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = figdir / f"param_distance_{study}_{task}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_paired_diffs(summaries: list[Summary], study: str, figdir: Path) -> Path | None:
    """Paired final-metric difference to the reference with 95% CI, against ±1 seed std, per task and cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summaries if s.study == study and s.n_pairs > 0]
    if not rows:
        return None
    tasks = list(dict.fromkeys(s.task for s in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [s for s in rows if s.task == task]
        for i, s in enumerate(mine):
            colour = "tab:blue" if s.arm == "default" else "tab:orange"
            err = [[s.diff_mean - s.diff_lo], [s.diff_hi - s.diff_mean]] if not math.isnan(s.diff_lo) else None
            ax.errorbar([i], [s.diff_mean], yerr=err, fmt="o", color=colour, capsize=3)
            if not math.isnan(s.seed_std):
                ax.fill_between([i - 0.35, i + 0.35], -s.seed_std, s.seed_std, color="grey", alpha=0.2, lw=0)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([f"{s.arm[:4]}\nB{s.micro_batch_size}N{s.accumulation_steps}" for s in mine], fontsize=7)
        ax.set_title(f"{task} ({mine[0].metric_name})", fontsize=9)
    axes[0][0].set_ylabel("paired difference to reference\n(95% CI; grey: ±1 seed std)")
    fig.tight_layout()
    p = figdir / f"paired_diff_{study}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# ------------------------------------------------------------------------------------------ the report
@dataclass
class ReportInputs:
    """Where `build_report` reads from and writes to."""

    runs_dirs: list[str]
    probe_dir: str | None = "results/probe"
    batchnorm_dir: str | None = "results/batchnorm"
    output_dir: str = "results"
    command: str = ""


def build_report(inp: ReportInputs) -> Path:
    """Write `<output_dir>/REPORT.md` and `<output_dir>/study/*` (tables, CSVs, figures); returns REPORT.md.

    Every input is read and checked before anything is written; the study folder is built in a scratch folder
    renamed into place at the end, so a failure leaves the output folder as it was.
    """
    runs = load_runs(inp.runs_dirs)
    if not runs:
        raise BertAccumError(f"no finished runs below {', '.join(inp.runs_dirs)}")
    probes = _load_probes(Path(inp.probe_dir)) if inp.probe_dir else {}
    out = Path(inp.output_dir)
    check_writable_dir(out, "--output_dir")
    commit = git_commit()
    command = inp.command or "python " + shlex.join(sys.argv)
    study_dir = out / "study"
    created = not out.exists()
    scratch = out / f".study.partial-{os.getpid()}"
    try:
        scratch.mkdir(parents=True)
        text = _write_study(runs, probes, inp, out, scratch, study_dir, command, commit)
        _replace_dir(scratch, study_dir)
        report = out / "REPORT.md"
        tmp = out / f".REPORT.md.partial-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, report)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        (out / f".REPORT.md.partial-{os.getpid()}").unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return report


def _write_study(runs, probes, inp: ReportInputs, out: Path, scratch: Path, study_dir: Path, command: str,
                 commit: str | None) -> str:
    """Tables and figures into `scratch` (to become `study_dir`); returns the REPORT.md text, whose links point
    at `study_dir`."""
    figdir = scratch / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    csv_head, md_head = provenance(command, commit), header(provenance(command, commit), markdown=True)

    summaries = summarise(runs)
    curves = distance_curves(runs)
    write_csv(scratch / "runs.csv", [_run_row(r) for r in runs], csv_head)
    write_csv(scratch / "summary.csv", [vars(s) for s in summaries], csv_head)
    if curves:
        write_csv(scratch / "param_distance.csv", curves, csv_head)

    figures: dict[str, list[Path]] = defaultdict(list)
    for study, task in sorted({(r.study, r.task) for r in runs}):
        figures[study] += plot_task(runs, curves, task, study, figdir)
    for study in sorted({r.study for r in runs}):
        p = plot_paired_diffs(summaries, study, figdir)
        if p:
            figures[study].insert(0, p)
    final_paths = {study: [study_dir / p.relative_to(scratch) for p in paths] for study, paths in figures.items()}
    return render_report(runs, summaries, curves, probes, final_paths, out, md_head,
                         Path(inp.batchnorm_dir) if inp.batchnorm_dir else None)


def _replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` in the place of `target` (which may exist): the old one is moved aside, then removed."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _run_row(r: Run) -> dict[str, Any]:
    ev = r.final.get("eval", {})
    return {
        "study": r.study, "task": r.task, "arm": r.arm, "micro_batch_size": r.micro_batch_size,
        "accumulation_steps": r.accumulation_steps, "num_processes": r.num_processes,
        "effective_batch_size": r.effective_batch_size, "seed": r.seed, "objective": r.objective,
        "status": r.final.get("status"), "optimizer_steps": r.final.get("optimizer_steps"),
        "metric_name": r.metric_name, "metric": r.metric,
        "eval": json.dumps({k: v for k, v in ev.items() if isinstance(v, float)}, sort_keys=True),
        "final_loss": r.steps[-1]["loss"] if r.steps else float("nan"),
        "train_seconds": r.final.get("train_seconds"), "examples_per_second": r.final.get("examples_per_second"),
        "device": r.final.get("device"), "run_dir": str(r.path),
    }


def _load_probes(probe_dir: Path) -> dict[str, list[dict[str, Any]]]:
    if not probe_dir.is_dir():
        return {}
    return {p.parent.name: read_probe(p) for p in sorted(probe_dir.glob("*/probe.csv"))}


def _probe_stat(probes: dict[str, list[dict[str, Any]]], arm: str, col: str = "ratio_to_floor") -> dict[str, tuple[float, float]]:
    """(min, max) of `col` for `arm` per probe table."""
    out = {}
    for name, rows in probes.items():
        vals = [r[col] for r in rows if r.get("arm") == arm and isinstance(r.get(col), float)]
        if vals:
            out[name] = (min(vals), max(vals))
    return out


def _range_text(stats: dict[str, tuple[float, float]]) -> str:
    if not stats:
        return "not probed"
    return "; ".join(f"{k}: {fmt(lo, 3)}–{fmt(hi, 3)}" for k, (lo, hi) in stats.items())


def _final_distance(curves, study, task, arm, bn=None) -> float:
    """Mean relative parameter distance at the last fingerprinted step (over seeds and, unless given, over (B, N))."""
    pts = [c for c in curves if c["study"] == study and c["task"] == task and c["arm"] == arm and c["kind"] == "vs_reference"
           and (bn is None or (c["micro_batch_size"], c["accumulation_steps"]) == bn)]
    if not pts:
        return float("nan")
    last = max(c["optimizer_step"] for c in pts)
    return statistics.fmean(c["rel_param_distance"] for c in pts if c["optimizer_step"] == last)


def _first_distance(curves, arm: str) -> float:
    """Mean relative parameter distance to the reference at the first step where it is defined (over every task)."""
    pts = [c for c in curves if c["arm"] == arm and c["kind"] == "vs_reference" and not math.isnan(c["rel_param_distance"])]
    if not pts:
        return float("nan")
    first = min(c["optimizer_step"] for c in pts)
    return statistics.fmean(c["rel_param_distance"] for c in pts if c["optimizer_step"] == first)


def _floor_distance(curves, study, task, arm) -> float:
    pts = [c for c in curves if c["study"] == study and c["task"] == task and c["arm"] == arm and c["kind"] == "seed_floor"]
    if not pts:
        return float("nan")
    last = max(c["optimizer_step"] for c in pts)
    return statistics.fmean(c["rel_param_distance"] for c in pts if c["optimizer_step"] == last)


def render_report(runs, summaries, curves, probes, figures, out: Path, md_head: str, batchnorm_dir: Path | None) -> str:
    """REPORT.md: the toy example, then cause by cause with the numbers of these runs and probes."""
    studies = sorted({r.study for r in runs})
    main_rows = [s for s in summaries if s.n_pairs]
    n_runs = len(runs)
    seeds = sorted({r.seed for r in runs})
    total_seconds = sum(r.final.get("train_seconds", 0.0) for r in runs)
    devices = sorted({str(r.final.get("device")) for r in runs})
    rel = lambda p: str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p)  # noqa: E731

    toy = toy_example()
    L = [md_head, "", "# Why gradient accumulation drifts from the large batch: the study report", ""]
    L += [
        f"Generated by `scripts/report.py` from {n_runs} finished run folders ({', '.join(studies)}), seeds "
        f"{', '.join(map(str, seeds))}, on {', '.join(devices)}; {total_seconds / 3600:.2f} h of training time in total. "
        "Every number below is computed from those folders and from the probe tables; nothing is typed in by hand.",
        "",
        "## 1. The toy example is exact, and why",
        "",
        f"One weight w = 1, loss −(w·x)² per example, examples x = 4 and x = 2. As one batch, the mean loss has gradient "
        f"mean(−2x²w) = −(32 + 8)/2 = {toy['batch_grad']:g}. Accumulated over two micro-batches of one example, each loss "
        f"scaled by 1/N = 1/2: the first backward leaves {toy['accumulated'][0]:g} in `.grad`, the second adds −4, giving "
        f"{toy['accumulated'][1]:g}. SGD with lr 0.01 moves w from 1 to {toy['w_accumulated']:.4g} accumulated and to "
        f"{toy['w_batch']:.4g} as one batch (computed by `bert_accum.study.report.toy_example`, the same numbers as "
        "`tests/test_accumulation.py`). It is exact because the gradient is linear in the "
        "loss and the loss is a sum over examples that never interact: splitting the sum and scaling each part by its "
        "share of the examples changes only the order of additions. BERT fine-tuning breaks each of those premises "
        "somewhere: dropout draws masks per micro-batch, padding changes tensor shapes, a per-token loss averages "
        "over different counts, float additions are not associative, and loops get the bookkeeping wrong.",
        "",
    ]

    L += _brief(runs, summaries, curves, probes)

    # ---- the causes, one by one
    L += ["## 2. Where real BERT departs, cause by cause", ""]
    L += _cause_sections(runs, summaries, curves, probes, batchnorm_dir, out)

    # ---- final metrics
    L += ["## 3. Do final metrics differ beyond seed noise?", ""]
    for study in studies:
        rows = [s for s in summaries if s.study == study]
        L += [f"### Study `{study}`", ""]
        L += [_study_setup(runs, study), ""]
        for p in figures.get(study, []):
            if p.name.startswith("paired_diff"):
                L += [f"![paired differences]({rel(p)})", ""]
        L += [md_table(summary_rows(rows), ["task", "arm", "B", "N", "metric", "n", "mean ± std", "paired diff", "95% CI",
                                            "seed std", "beyond noise", "param dist", "vs"]), ""]
        judged = [s for s in rows if s.beyond_seed_noise]
        beyond = [s for s in judged if s.beyond_seed_noise == "yes"]
        if judged:
            L += [f"Of {len(judged)} paired comparisons in `{study}`, {len(beyond)} differ beyond seed noise"
                  + (": " + ", ".join(f"{s.task} {s.arm} B{s.micro_batch_size}N{s.accumulation_steps} "
                                      f"({fmt(s.diff_mean)})" for s in beyond) if beyond else "")
                  + ". `paired diff` is the mean over seeds of (run − reference of the same seed); `param dist` the "
                  "final relative parameter distance to the reference.", ""]
    L += ["Columns: `mean ± std` over seeds (n runs); `paired diff` and its 95% Student-t interval over the paired seeds; "
          "`seed std` = standard deviation of the reference's metric over seeds; `beyond noise` = the interval excludes 0 "
          "and |paired diff| > seed std. Full per-run rows: `study/runs.csv`; this table: `study/summary.csv`.", ""]

    # ---- growth over training
    L += ["## 4. How the drift grows over training", ""]
    L += ["Parameter distance to the large batch after each fingerprinted optimizer step, relative to how far the "
          "large-batch run moved from the initial weights, mean over seeds; grey: two seeds of the large batch "
          "(per-step values in `study/param_distance.csv`).", ""]
    for study in studies:
        for p in figures.get(study, []):
            if p.name.startswith("param_distance"):
                L += [f"![{p.stem}]({rel(p)})", ""]
    L += _growth_table(curves)
    L += ["", "Gradient-norm trajectories per configuration (before clipping):", ""]
    for study in studies:
        for p in figures.get(study, []):
            if p.name.startswith("grad_norm"):
                L += [f"![{p.stem}]({rel(p)})", ""]

    # ---- cost
    L += ["## 5. Cost", ""]
    cost = defaultdict(list)
    for r in runs:
        cost[(r.study, r.task, r.bn)].append(r)
    crow = []
    for (study, task, bn), members in sorted(cost.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2][0])):
        crow.append({"study": study, "task": task, "B": bn[0], "N": bn[1], "runs": len(members),
                     "median train s / run": statistics.median(m.final.get("train_seconds", 0) for m in members),
                     "median examples/s": statistics.median(m.final.get("examples_per_second", 0) for m in members),
                     "device": ",".join(sorted({str(m.final.get('device')) for m in members}))})
    L += [md_table(crow, list(crow[0])), ""]
    L += [f"Total training time {total_seconds / 3600:.2f} h over {n_runs} runs (excluding start-up and evaluation). "
          "Runs shared the machine's cores with each other (two at a time) and with other work, and a few were "
          "paused while the machine was needed for timings, hence medians; throughput here is indicative, see "
          "`perf.md` for controlled timings.", ""]
    return "\n".join(L) + "\n"


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


def _brief(runs, summaries, curves, probes) -> list[str]:
    """The answer in a few numbers, before the details."""
    cls = {k: v for k, v in probes.items() if all(r.get("objective") != "mlm" for r in v)}
    mlm = {k: v for k, v in probes.items() if any(r.get("objective") == "mlm" for r in v)}

    def mean_dist(arm):
        vals = [s.rel_param_distance for s in summaries if s.arm == arm and s.n_pairs and not math.isnan(s.rel_param_distance)]
        return statistics.fmean(vals) if vals else float("nan")

    floors = [c["rel_param_distance"] for c in curves if c["kind"] == "seed_floor" and c["arm"] == "default"]
    last = max((c["optimizer_step"] for c in curves if c["kind"] == "seed_floor" and c["arm"] == "default"), default=None)
    floor = statistics.fmean(c["rel_param_distance"] for c in curves if c["kind"] == "seed_floor" and c["arm"] == "default"
                             and c["optimizer_step"] == last) if floors else float("nan")
    judged = [s for s in summaries if s.beyond_seed_noise and not s.arm.startswith("bug_")]
    beyond = [s for s in judged if s.beyond_seed_noise == "yes"]
    bugs = [s for s in summaries if s.arm.startswith("bug_") and s.beyond_seed_noise]
    L = ["## The answer in brief", ""]
    L.append(f"- **One step, standard dropout:** the accumulated gradient of (B, N) sits "
             f"{_range_text(_probe_stat(cls, 'default'))} of a seed floor away from (E, 1) (ratio to the distance "
             "between two dropout seeds of (E, 1)): dropout masks drawn per micro-batch make accumulation as different "
             "from the large batch as a new seed. Switching every cause off leaves "
             f"{_range_text(_probe_stat(cls, 'controlled', 'rel_l2'))} relative L2 in fp32 and "
             f"{_range_text(_probe_stat(cls, 'controlled_fp64', 'rel_l2'))} in fp64: nothing but summation order.")
    if mlm:
        L.append(f"- **Per-token loss:** with masked-LM, averaging micro-batch means (`mean_of_means`) adds "
                 f"{_range_text(_probe_stat(mlm, 'controlled_loss_mean_of_means', 'rel_l2'))} relative L2 in one step, growing "
                 "as B shrinks; `global` normalisation removes it. Padding, once the attention mask is honoured, adds only "
                 "round-off.")
    L.append(f"- **Over training:** the default arm ends {fmt(mean_dist('default'))} (relative parameter distance, mean over "
             f"tasks and (B, N)) from the large batch of the same seed, against {fmt(floor)} between two seeds of the "
             f"large batch; the controlled arm ends {fmt(mean_dist('controlled'))} away.")
    if judged:
        L.append(f"- **Final metrics:** {len(beyond)} of {len(judged)} (B, N) cells differ from the large batch beyond seed "
                 "noise (the 95% interval of the paired difference excludes 0 and its mean exceeds one seed standard deviation)"
                 + (": " + ", ".join(f"{s.task} {s.arm} B{s.micro_batch_size}N{s.accumulation_steps}" for s in beyond) if beyond else "")
                 + f" (n = {min(s.n_pairs for s in judged)}–{max(s.n_pairs for s in judged)} seeds per cell).")
    if bugs:
        L.append("- **Loop bugs** (against the correct loop): " + "; ".join(
            f"{s.arm[4:]}: {s.metric_name} {fmt(s.diff_mean)} {_ci(s.diff_lo, s.diff_hi)}, "
            f"{'beyond' if s.beyond_seed_noise == 'yes' else 'within'} seed noise" for s in bugs) + ".")
    L.append("")
    return L


def _study_setup(runs: list[Run], study: str) -> str:
    mine = [r for r in runs if r.study == study]
    cfg = json.loads((mine[0].path / "config.json").read_text())
    derived = cfg.get("derived", {})
    name = cfg.get("model_name_or_path")
    model = "embedded all-MiniLM-L6-v2" if name == "embedded" else name
    return (f"Model `{model}`, max_length {cfg.get('max_length')}, "
            f"learning rate {cfg.get('learning_rate')}, warmup ratio {cfg.get('warmup_ratio')}, "
            f"{derived.get('total_optimizer_steps')} optimizer steps over {derived.get('train_examples')} training examples "
            f"({derived.get('epochs')} epoch(s)), effective batch {derived.get('effective_batch_size')}; "
            f"tasks {', '.join(sorted({r.task for r in mine}))}; arms {', '.join(sorted({r.arm for r in mine}))}; "
            f"{len(mine)} runs.")


def _growth_table(curves: list[dict[str, Any]]) -> list[str]:
    keyed = defaultdict(list)
    for c in curves:
        keyed[(c["study"], c["task"], c["arm"], c["kind"], c["micro_batch_size"], c["accumulation_steps"])].append(c)
    rows = []
    for (study, task, arm, kind, b, n), pts in sorted(keyed.items()):
        at = lambda s: statistics.fmean(p["rel_param_distance"] for p in pts if p["optimizer_step"] == s)  # noqa: E731
        # A step whose reference has not moved yet (learning rate 0 at the first warmup step) has no relative distance.
        steps = [s for s in sorted({p["optimizer_step"] for p in pts}) if not math.isnan(at(s))]
        if not steps:
            continue
        rows.append({"study": study, "task": task, "arm": arm, "compared": "seed floor" if kind == "seed_floor" else f"B{b} N{n}",
                     "first step": steps[0], "at first": at(steps[0]), "middle step": steps[len(steps) // 2],
                     "at middle": at(steps[len(steps) // 2]), "last step": steps[-1], "at last": at(steps[-1])})
    if not rows:
        return ["(no fingerprints)"]
    return [md_table(rows, list(rows[0]))]


def _cause_sections(runs, summaries, curves, probes, batchnorm_dir, out) -> list[str]:
    L: list[str] = []
    cls_probes = {k: v for k, v in probes.items() if all(r.get("objective") != "mlm" for r in v)}
    mlm_probes = {k: v for k, v in probes.items() if any(r.get("objective") == "mlm" for r in v)}
    attribution = []

    def training_numbers(arm: str) -> tuple[float, float, float]:
        """(mean final relative distance, mean |paired diff|, mean seed floor distance) over tasks for an arm."""
        sel = [s for s in summaries if s.arm == arm and s.n_pairs]
        dist = [_final_distance(curves, s.study, s.task, arm, (s.micro_batch_size, s.accumulation_steps)) for s in sel]
        dist = [d for d in dist if not math.isnan(d)]
        diffs = [abs(s.diff_mean) for s in sel if not math.isnan(s.diff_mean)]
        floors = [_floor_distance(curves, s.study, s.task, arm) for s in sel]
        floors = [f for f in floors if not math.isnan(f)]
        return (statistics.fmean(dist) if dist else float("nan"), statistics.fmean(diffs) if diffs else float("nan"),
                statistics.fmean(floors) if floors else float("nan"))

    d_def, m_def, f_def = training_numbers("default")
    d_ctl, m_ctl, f_ctl = training_numbers("controlled")
    L += [
        "### Dropout RNG",
        "",
        "With standard dropout each micro-batch draws its masks from torch's RNG stream, so the same example gets "
        "different masks in (B, N) than in (B·N, 1). The `invariant` mode makes a mask a pure function of (seed, "
        "example, epoch, site, position).",
        "",
        f"- One step (probe, accumulated gradient vs (E, 1), as a fraction of the seed floor = two dropout seeds of "
        f"(E, 1)): standard dropout with every other cause off: {_range_text(_probe_stat(cls_probes, 'controlled_dropout_standard'))}; "
        f"everything off: {_range_text(_probe_stat(cls_probes, 'controlled'))}.",
        f"- Training (final relative parameter distance to (E, 1), mean over tasks, (B, N) and seeds): default arm "
        f"{fmt(d_def)} (seed floor {fmt(f_def)}), controlled arm {fmt(d_ctl)} (seed floor {fmt(f_ctl)}); mean "
        f"|paired metric difference| {fmt(m_def)} (default) vs {fmt(m_ctl)} (controlled).",
        "",
    ]
    attribution.append({"cause": "dropout RNG", "switch": "--dropout invariant",
                        "one step (ratio to seed floor)": _range_text(_probe_stat(cls_probes, "controlled_dropout_standard")),
                        "training: param distance": f"default {fmt(d_def)} vs controlled {fmt(d_ctl)}",
                        "training: mean abs metric diff": f"default {fmt(m_def)} vs controlled {fmt(m_ctl)}"})

    L += [
        "### Padding",
        "",
        "Dynamic padding pads each micro-batch to its own longest sequence, so (B, N) runs other tensor shapes and "
        "another floating-point path than (B·N, 1). With the attention mask honoured (also in the invariant-dropout "
        "attention function, whose mask function is registered alongside it), padded positions contribute exact zeros.",
        "",
        f"- One step: dynamic instead of window padding with everything else off: "
        f"{_range_text(_probe_stat(cls_probes, 'controlled_padding_dynamic'))} of the seed floor; "
        f"relative L2 {_range_text(_probe_stat(cls_probes, 'controlled_padding_dynamic', 'rel_l2'))}: round-off.",
        "",
    ]
    attribution.append({"cause": "padding", "switch": "--padding window",
                        "one step (ratio to seed floor)": _range_text(_probe_stat(cls_probes, "controlled_padding_dynamic")),
                        "training: param distance": "in the default arm (probe: round-off)", "training: mean abs metric diff": "—"})

    mlm_rows = {a: [s for s in summaries if s.arm == a and s.n_pairs]
                for a in ("mlm_default", "mlm_global", "mlm_controlled", "mlm_controlled_mean_of_means")}
    L += [
        "### Per-token loss averaging (masked-LM)",
        "",
        "With a per-token loss, `mean_of_means` averages each micro-batch's token mean with weight 1/N although "
        "micro-batches hold different numbers of predicted tokens; `global` divides the window's summed token loss by "
        "the window's token count (all-reduced over processes). For classification both are the same (one item per "
        "example).",
        "",
        f"- One step: mean_of_means with everything else off: {_range_text(_probe_stat(mlm_probes, 'controlled_loss_mean_of_means'))} "
        f"of the seed floor (relative L2 {_range_text(_probe_stat(mlm_probes, 'controlled_loss_mean_of_means', 'rel_l2'))}); "
        f"for classification: {_range_text(_probe_stat(cls_probes, 'controlled_loss_mean_of_means', 'rel_l2'))} relative L2.",
    ]
    for arm, rows in mlm_rows.items():
        for s in rows:
            L.append(f"- Training, `{arm}` B={s.micro_batch_size} N={s.accumulation_steps} (n={s.n_pairs}): final relative "
                     f"parameter distance to (E, 1) {_pm(s.rel_param_distance, s.rel_param_distance_std)}, paired "
                     f"{s.metric_name} difference {fmt(s.diff_mean)} {_ci(s.diff_lo, s.diff_hi)}.")
    dist = {a: statistics.fmean(s.rel_param_distance for s in rows) for a, rows in mlm_rows.items() if rows}
    if "mlm_default" in dist and "mlm_global" in dist:
        L.append(f"- With standard dropout the normalisation hardly shows over training: {fmt(dist['mlm_default'])} "
                 f"(mean_of_means) against {fmt(dist['mlm_global'])} (global), because the dropout masks already move "
                 "(B, N) that far from (E, 1).")
    if "mlm_controlled" in dist and "mlm_controlled_mean_of_means" in dist:
        L.append(f"- With dropout and padding held fixed it is the only difference left: {fmt(dist['mlm_controlled'])} "
                 f"(global) against {fmt(dist['mlm_controlled_mean_of_means'])} (mean_of_means).")
    L.append("")
    attribution.append({"cause": "per-token loss averaging", "switch": "--loss_normalization global",
                        "one step (ratio to seed floor)": _range_text(_probe_stat(mlm_probes, "controlled_loss_mean_of_means")),
                        "training: param distance": "; ".join(f"{a} {fmt(statistics.fmean(s.rel_param_distance for s in rows))}"
                                                              for a, rows in mlm_rows.items() if rows) or "not run",
                        "training: mean abs metric diff": "; ".join(f"{a} {fmt(statistics.fmean(abs(s.diff_mean) for s in rows))}"
                                                                  for a, rows in mlm_rows.items() if rows) or "not run"})

    L += [
        "### Precision and floating-point order",
        "",
        f"- fp32 round-off with every cause off (one step): relative L2 {_range_text(_probe_stat(cls_probes, 'controlled', 'rel_l2'))}; "
        f"in float64: {_range_text(_probe_stat(cls_probes, 'controlled_fp64', 'rel_l2'))}. The fp32 difference is "
        "summation order, nothing else.",
        f"- bf16 autocast (one step): relative L2 {_range_text(_probe_stat(cls_probes, 'controlled_bf16', 'rel_l2'))}.",
        f"- Over training, the controlled arm's fp32 round-off becomes a relative parameter distance of "
        f"{fmt(_first_distance(curves, 'controlled'))} after the first step that moves the weights and "
        f"{fmt(d_ctl)} at the end (section 4), against {fmt(f_def)} between two seeds. The jump from the gradient's 1e-7 "
        "to 1e-5 in one step fits Adam's first update, lr·g/(|g| + ε) ≈ lr·sign(g): a coordinate whose gradient is near "
        "zero gets a full-size step whose sign round-off can decide (a likely mechanism, not measured separately here); "
        "after that step the distance stays flat.",
        "",
    ]
    attribution.append({"cause": "fp32 summation order", "switch": "(fp64 shows the floor)",
                        "one step (ratio to seed floor)": _range_text(_probe_stat(cls_probes, "controlled")),
                        "training: param distance": f"controlled {fmt(d_ctl)}", "training: mean abs metric diff": f"controlled {fmt(m_ctl)}"})
    attribution.append({"cause": "bf16 autocast", "switch": "--precision fp32",
                        "one step (ratio to seed floor)": _range_text(_probe_stat(cls_probes, "controlled_bf16")),
                        "training: param distance": "not run", "training: mean abs metric diff": "not run"})

    bug_rows = [s for s in summaries if s.arm.startswith("bug_") and s.n_pairs]
    if bug_rows:
        L += ["### Known loop bugs (measured, against the correct loop at the same (B, N) and seeds)", ""]
        table = []
        for s in bug_rows:
            bn = (s.micro_batch_size, s.accumulation_steps)
            members = [r for r in runs if (r.study, r.task, r.arm, r.bn) == (s.study, s.task, s.arm, bn)]
            refs = [r for r in runs if (r.study, r.task, r.arm, r.bn) == (s.study, s.task, "default", bn)]
            table.append({"bug": s.arm[4:], "task": s.task, "B": s.micro_batch_size, "N": s.accumulation_steps, "n": s.n_pairs,
                          "optimizer steps": _steps_text(members), "correct loop steps": _steps_text(refs),
                          "last LR": _last_lr(members), "correct last LR": _last_lr(refs),
                          "paired diff": s.diff_mean, "95% CI": _ci(s.diff_lo, s.diff_hi), "seed std": s.seed_std,
                          "param dist": s.rel_param_distance})
            attribution.append({"cause": f"bug: {s.arm[4:]}", "switch": "(correct loop)", "one step (ratio to seed floor)": "—",
                                "training: param distance": fmt(s.rel_param_distance),
                                "training: mean abs metric diff": fmt(abs(s.diff_mean))})
        L += [md_table(table, list(table[0])), "",
              "`param dist`: final parameter distance to the correct run of the same seed, relative to the correct run's "
              "total movement. `optimizer steps` and `last LR` show what each bug changes in the schedule.", ""]

    if batchnorm_dir is not None and (batchnorm_dir / "norm_study.md").exists():
        text = (batchnorm_dir / "norm_study.md").read_text()
        m = re.search(r"## Interpretation\s+(.+?)\n\n", text, re.S)
        L += ["### BatchNorm (the remark that accumulation is exact only without batch statistics)", "",
              (m.group(1).strip() if m else "See the table.") + f" Full table: `{batchnorm_dir.relative_to(out) if batchnorm_dir.is_relative_to(out) else batchnorm_dir}/norm_study.md`. "
              "BERT uses LayerNorm, which normalises each token by itself, so this cause does not apply to it.", ""]
        attribution.append({"cause": "BatchNorm statistics (not in BERT)", "switch": "LayerNorm/GroupNorm",
                            "one step (ratio to seed floor)": "see norm_study.md", "training: param distance": "see norm_study.md",
                            "training: mean abs metric diff": "see norm_study.md"})

    L += ["### Multi-process reduction", "",
          "With W processes DDP averages gradients over ranks; the loop scales each rank's loss by W and all-reduces the "
          "item count for `global` normalisation, so (W=2, B=2, N=2) gives the (W=1, B=8, N=1) gradient to round-off "
          "(`tests/test_distributed.py`, two gloo ranks); see `docs/distributed.md`.", ""]

    L += ["### Drift attribution at a glance", "",
          md_table(attribution, list(attribution[0])), "",
          "One step: the probe's accumulated-gradient difference to (E, 1) divided by the seed floor (two dropout seeds "
          "of (E, 1)), min–max over (B, N) per probe table. Training: final relative parameter distance and mean "
          "|paired final-metric difference| to the reference, averaged over tasks and (B, N).", ""]
    return L


def _steps_text(members: list[Run]) -> str:
    vals = sorted({m.final.get("optimizer_steps", m.final.get("optimizer_step")) for m in members} - {None})
    return ",".join(map(str, vals))


def _last_lr(members: list[Run]) -> str:
    vals = sorted({round(m.steps[-1]["learning_rate"], 10) for m in members if m.steps})
    return ",".join(f"{v:.2e}" for v in vals)
