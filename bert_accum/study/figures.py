"""The report's figures, drawn from the numbers dict (and, for early-training runs, from their run folders):
small multiples with full arm names in the labels and a legend in every figure.

  attribution.png            each cause's one-step effect (probe) as a ratio to the dropout-only floor, log scale
  forest_<study>.png         TOST forest plot: paired differences and the dropout-only floor, 90% intervals, ±margin
  scatter_<study>.png        per-seed (B, N) final metric against (E, 1), y = x, trivial baseline, floor pairs
  curves_<study>.png         learning curves from eval.jsonl, mean over finished seeds
  paired_diff_<study>.png, grad_norm_<study>_<task>.png, param_distance_<study>_<task>.png   early training
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .numbers import cell_label
from .report import ConvergedStudy, EarlyStudy, arm_rank


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def draw_all(nums: dict[str, Any], converged: list[ConvergedStudy], early: list[EarlyStudy],
             probes: dict[str, list[dict[str, Any]]], figdir: Path) -> dict[str, Path]:
    """Every figure the numbers allow; {name: path}."""
    out: dict[str, Path] = {}
    if probes:
        out["attribution"] = attribution(nums, probes, figdir / "attribution.png")
    for s in nums["studies.converged"]:
        for name, fn in (("forest", forest), ("scatter", scatter), ("curves", curves)):
            path = fn(nums, s, figdir / f"{name}_{s}.png")
            if path is not None:
                out[f"{name}_{s}"] = path
    for st in early:
        if not st.run_objects:
            continue
        p = plot_paired_diffs(st, figdir)
        if p is not None:
            out[p.stem] = p
        for task in sorted({r.task for r in st.run_objects}):
            for p in plot_task(st, task, figdir):
                out[p.stem] = p
    return out


def pretty(label: str) -> str:
    """'default.B2_N4' -> 'default (B=2, N=4)': a cell label with the arm's full name."""
    arm, bn = label.split(".", 1)
    return f"{arm} (" + ", ".join(f"{p[0]}={p[1:]}" for p in bn.split("_")) + ")"


def _grid(n: int, width: float = 4.6, height: float = 3.6, cols: int = 3):
    plt = _plt()
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def attribution(nums: dict[str, Any], probes: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per probe table: every probe arm's ratio to the dropout-only floor per (B, N), log scale."""
    plt = _plt()
    tables = sorted(probes)
    fig, axes = _grid(len(tables), width=6.0, height=4.0)
    for ax, name in zip(axes, tables):
        rows = probes[name]
        arms = list(dict.fromkeys(r["arm"] for r in rows))
        bns = sorted({(int(r["micro_batch_size"]), int(r["accumulation_steps"])) for r in rows}, key=lambda bn: -bn[0])
        colours = {bn: plt.cm.viridis(i / max(1, len(bns) - 1)) for i, bn in enumerate(bns)}
        for i, bn in enumerate(bns):
            xs, ys = [], []
            for j, arm in enumerate(arms):
                for r in rows:
                    if r["arm"] == arm and (int(r["micro_batch_size"]), int(r["accumulation_steps"])) == bn:
                        v = r.get("ratio_to_floor")
                        if isinstance(v, float) and v > 0:
                            xs.append(j + (i - (len(bns) - 1) / 2) * 0.12)
                            ys.append(v)
            ax.scatter(xs, ys, color=colours[bn], s=22, label=f"B={bn[0]}, N={bn[1]}", zorder=3)
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="dropout-only floor (two dropout seeds of (E, 1))")
        ax.set_yscale("log")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([f"{a}\n({nums.get(f'probe.{name}.{a}.kind', '')})" for a in arms], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("one-step ||g − g(E,1)|| / dropout-only floor")
        ax.set_title(f"probe {name} ({nums.get(f'probe.{name}.task')}, {nums.get(f'probe.{name}.objective')})", fontsize=9)
        ax.grid(alpha=0.3, which="both", axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path, layout=False)


def _pairs(nums: dict[str, Any], s: str) -> list[tuple[str, int, str, str]]:
    out = []
    for task in nums[f"{s}.tasks"]:
        for E in nums[f"{s}.{task}.E"]:
            for label in nums[f"{s}.{task}.e{E}.pairs"]:
                out.append((task, E, label, f"{s}.{task}.e{E}.pair.{label}"))
    return out


def forest_rows(nums: dict[str, Any], s: str, task: str) -> list[dict[str, Any]]:
    """The forest plot's rows for one task, grouped by E: each (arm, (B, N)) pair against (E, 1), then the
    dropout-only floor (two dropout seeds of (E, 1)) judged by the same TOST, so each interval is read beside what
    a mere dropout re-seed shows. Rows without finished pairs carry mean None."""
    rows = []
    for E in nums[f"{s}.{task}.E"]:
        for label in nums[f"{s}.{task}.e{E}.pairs"]:
            k = f"{s}.{task}.e{E}.pair.{label}"
            rows.append({"kind": "headline" if nums[f"{k}.headline"] else "other", "n": nums[f"{k}.n"],
                         "label": f"{pretty(label)} vs (B={E}, N=1)", "verdict": nums[f"{k}.verdict"],
                         **{f: nums[f"{k}.tost.{f}"] for f in ("mean", "ci90_low", "ci90_high")}})
        if "dropout" in nums.get(f"{s}.{task}.e{E}.floors", []):
            k = f"{s}.{task}.e{E}.floor.dropout"
            rows.append({"kind": "floor", "n": nums[f"{k}.n"], "verdict": nums[f"{k}.verdict"],
                         "label": f"dropout-only floor: {nums[f'{k}.arm']} (B={E}, N=1) vs {nums[f'{k}.reference_arm']}",
                         **{f: nums[f"{k}.tost.{f}"] for f in ("mean", "ci90_low", "ci90_high")}})
    return rows


_FOREST_COLOURS = {"headline": ("tab:blue", "headline arm"), "other": ("tab:orange", "other arm"),
                   "floor": ("grey", "dropout-only floor (same test)")}


def forest(nums: dict[str, Any], s: str, path: Path) -> Path | None:
    """One panel per task: each (arm, (B, N)) pair's mean paired difference with its 90% interval beside the
    dropout-only floor's, ±margin shaded."""
    tasks = [t for t in nums[f"{s}.tasks"] if any(p[0] == t for p in _pairs(nums, s))]
    if not tasks:
        return None
    most = max(len(forest_rows(nums, s, t)) for t in tasks)
    fig, axes = _grid(len(tasks), width=11.0, height=1.6 + 0.45 * max(most, 2), cols=1)
    for ax, task in zip(axes, tasks):
        rows = forest_rows(nums, s, task)
        margin = nums[f"{s}.{task}.margin"]
        if isinstance(margin, float) and math.isfinite(margin):
            ax.axvspan(-margin, margin, color="tab:green", alpha=0.12, label=f"±margin {margin:g}")
        ax.axvline(0, color="black", lw=0.8)
        for i, r in enumerate(rows):
            m, lo, hi = r["mean"], r["ci90_low"], r["ci90_high"]
            if isinstance(m, float) and math.isfinite(m):
                err = [[m - lo], [hi - m]] if isinstance(lo, float) and math.isfinite(lo) else None
                ax.errorbar([m], [i], xerr=err, fmt="o", color=_FOREST_COLOURS[r["kind"]][0], capsize=3)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{r['label']}: {r['verdict']}" if "(n =" in r["verdict"]
                            else f"{r['label']}, n={r['n']}: {r['verdict']}" for r in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel(f"paired difference of final {nums[f'{s}.{task}.metric']} (90% CI)")
        ax.set_title(f"{s} / {task}", fontsize=9)
        for kind in sorted({r["kind"] for r in rows}, key=list(_FOREST_COLOURS).index):
            colour, name = _FOREST_COLOURS[kind]
            ax.errorbar([], [], xerr=[], fmt="o", color=colour, label=name)
        ax.xaxis.set_major_locator(_plt().MaxNLocator(7))
        # below the axes: inside, it hid the lowest rows' intervals
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, frameon=False)
    return _save(fig, path)


def scatter(nums: dict[str, Any], s: str, path: Path) -> Path | None:
    """One panel per (task, E): per-seed (B, N) final metric against its (E, 1) reference, and the dropout-only
    floor's runs against theirs, with y = x, the trivial baseline and the reference threshold."""
    panels = [(task, E) for task in nums[f"{s}.tasks"] for E in nums[f"{s}.{task}.E"]
              if nums[f"{s}.{task}.e{E}.pairs"] or nums[f"{s}.{task}.e{E}.floors"]]
    if not panels:
        return None
    fig, axes = _grid(len(panels), width=5.0, height=5.4)  # room under each panel for its legend
    markers = ["o", "s", "^", "D", "v"]
    for ax, (task, E) in zip(axes, panels):
        e = f"{s}.{task}.e{E}"
        vals: list[float] = []
        for i, label in enumerate(nums[f"{e}.pairs"]):
            k = f"{e}.pair.{label}"
            xs, ys = nums[f"{k}.reference_metrics"], nums[f"{k}.metrics"]
            if not xs:
                continue
            vals += xs + ys
            ax.scatter(xs, ys, marker=markers[i % len(markers)], s=24, zorder=3,
                       label=f"{pretty(label)} vs (B={E}, N=1), n={len(xs)}")
        for kind in nums[f"{e}.floors"]:
            k = f"{e}.floor.{kind}"
            refs = _floor_refs(nums, e, E, k)
            ys = [r + d for r, d in zip(refs, nums[f"{k}.diffs"])]
            if not ys:
                continue
            vals += refs + ys
            ax.scatter(refs, ys, marker="x", s=20, color="grey" if kind == "dropout" else None, alpha=0.8,
                       label=f"floor {kind}: {nums[k + '.arm']} vs {nums[k + '.reference_arm']} (n={len(ys)})")
        base, thr = nums[f"{s}.{task}.baseline"], nums[f"{s}.{task}.threshold"]
        base = base if isinstance(base, float) and math.isfinite(base) else None
        thr = thr if isinstance(thr, float) and math.isfinite(thr) else None
        lo, hi = scatter_limits(vals, thr)
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="y = x")
        if base is not None and lo <= base <= hi:
            ax.axhline(base, color="tab:red", lw=0.8, ls=":", label=f"trivial baseline {base:.3f}")
            ax.axvline(base, color="tab:red", lw=0.8, ls=":")
        elif base is not None:
            ax.plot([], [], color="tab:red", lw=0.8, ls=":",
                    label=f"trivial baseline {base:.3f} ({'below' if base < lo else 'above'} these axes)")
        if thr is not None:
            ax.axvline(thr, color="tab:green", lw=0.8, ls="--", label=f"reference threshold {thr:g}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        metric = nums[f"{s}.{task}.metric"]
        ax.set_xlabel(f"(B={E}, N=1) reference's final {metric}")
        ax.set_ylabel(f"paired run's final {metric}")
        ax.set_title(f"{s} / {task}, E = {E}", fontsize=9)
        # below the panel: inside it, the legend covered points near a corner
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def scatter_limits(values: list[float], threshold: float | None) -> tuple[float, float]:
    """Axis range of a per-seed scatter: the finite run metrics and the reference threshold, padded by 5%.

    The trivial baseline is left out on purpose: stretching the axes to a far-away baseline (0.509 accuracy
    against runs at 0.80-0.85) would squeeze every seed into one corner, so the figure names it instead."""
    finite = [v for v in values if math.isfinite(v)] + ([threshold] if threshold is not None else [])
    lo, hi = (min(finite), max(finite)) if len(finite) > 1 else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _floor_refs(nums: dict[str, Any], e: str, E: int, k: str) -> list[float]:
    """The reference metrics of a floor's pairs (its reference cell's metrics at the floor's seeds)."""
    ref = f"{e}.cell.{cell_label(nums[k + '.reference_arm'], E, 1)}"
    by_seed = dict(zip(nums.get(f"{ref}.seeds", []), nums.get(f"{ref}.metrics", [])))
    return [by_seed.get(sd, math.nan) for sd in nums[f"{k}.seeds"]]


def curves(nums: dict[str, Any], s: str, path: Path) -> Path | None:
    """One panel per (task, E): each cell's dev metric over optimizer steps, mean over its finished seeds."""
    panels = [(task, E) for task in nums[f"{s}.tasks"] for E in nums[f"{s}.{task}.E"]
              if any(nums[f"{s}.{task}.e{E}.cell.{c}.curve.steps"] for c in nums[f"{s}.{task}.e{E}.cells"])]
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (task, E) in zip(axes, panels):
        e = f"{s}.{task}.e{E}"
        for c in nums[f"{e}.cells"]:
            k = f"{e}.cell.{c}.curve"
            if nums[f"{k}.steps"]:
                # (E, 1) broad and pale under its thin (B, N): an exact arm's two curves coincide and both show
                reference = c.endswith("_N1")
                ax.plot(nums[f"{k}.steps"], nums[f"{k}.mean"], marker="o", ms=3,
                        ls="-" if c.split(".")[0] in nums[f"{s}.headline_arms"] else "--",
                        lw=3.5 if reference else 1.3, alpha=0.45 if reference else 1.0, zorder=2 if reference else 3,
                        label=f"{pretty(c)}, n={max(nums[k + '.n'])}")
        thr = nums[f"{s}.{task}.threshold"]
        if isinstance(thr, float) and math.isfinite(thr):
            ax.axhline(thr, color="0.35", lw=0.8, ls=":", label=f"reference threshold {thr:g}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"dev {nums[f'{s}.{task}.metric']}")
        ax.set_title(f"{s} / {task}, E = {E}", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ early training
def plot_task(st: EarlyStudy, task: str, figdir: Path) -> list[Path]:
    """Gradient-norm trajectories and parameter distance vs step for one task of an early study: two PNGs."""
    plt = _plt()
    mine = [r for r in st.run_objects if r.task == task]
    arms = sorted({r.arm for r in mine}, key=arm_rank)
    bns = sorted({r.bn for r in mine}, key=lambda bn: -bn[0])
    colours = {bn: plt.cm.viridis(i / max(1, len(bns) - 1)) for i, bn in enumerate(bns)}
    fig, axes = plt.subplots(1, len(arms), figsize=(5.2 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for bn in bns:
            group = [r for r in mine if r.arm == arm and r.bn == bn]
            for i, r in enumerate(group):
                ax.plot([x["optimizer_step"] for x in r.steps], [x["grad_norm"] for x in r.steps], color=colours[bn],
                        alpha=0.8, lw=1.2, label=f"B={bn[0]}, N={bn[1]}" if i == 0 else None)
        ax.set_title(f"{task}: {arm}")
        ax.set_xlabel("optimizer_step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("gradient norm (before clipping)")
    paths = [_save(fig, figdir / f"grad_norm_{st.name}_{task}.png")]

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = ["-", "--", ":", "-."]
    rows = [c for c in st.curves if c["task"] == task]
    for ai, arm in enumerate(arms):
        for bn in bns:
            pts = [c for c in rows if c["arm"] == arm and c["kind"] == "vs_reference"
                   and (c["micro_batch_size"], c["accumulation_steps"]) == bn]
            if pts:
                steps = sorted({c["optimizer_step"] for c in pts})
                ys = [statistics.fmean(c["rel_param_distance"] for c in pts if c["optimizer_step"] == x) for x in steps]
                ax.plot(steps, np.maximum(ys, 1e-12), styles[ai % 4], color=colours[bn], marker="o", ms=3,
                        label=f"{arm} B={bn[0]}, N={bn[1]}")
        floor = [c for c in rows if c["arm"] == arm and c["kind"] == "seed_floor"]
        if floor:
            steps = sorted({c["optimizer_step"] for c in floor})
            ys = [statistics.fmean(c["rel_param_distance"] for c in floor if c["optimizer_step"] == x) for x in steps]
            ax.plot(steps, ys, styles[ai % 4], color="grey", lw=2.5, alpha=0.6, label=f"{arm}: seed floor")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer_step")
    ax.set_ylabel("||θ − θ_ref|| / ||θ_ref − θ₀||")
    ax.set_title(f"{st.name} / {task}: parameter distance to the paired reference (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, figdir / f"param_distance_{st.name}_{task}.png"))
    return paths


def plot_paired_diffs(st: EarlyStudy, figdir: Path) -> Path | None:
    """Paired final-metric difference to the reference with 95% CI, against ±1 seed std, per task and cell."""
    plt = _plt()
    rows = [s for s in st.summaries if s.n_pairs > 0]
    if not rows:
        return None
    tasks = list(dict.fromkeys(s.task for s in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [s for s in rows if s.task == task]
        arms = list(dict.fromkeys(s.arm for s in mine))
        colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
        for i, s in enumerate(mine):
            err = [[s.diff_mean - s.diff_lo], [s.diff_hi - s.diff_mean]] if not math.isnan(s.diff_lo) else None
            ax.errorbar([i], [s.diff_mean], yerr=err, fmt="o", color=colours[s.arm], capsize=3,
                        label=s.arm if s is next(x for x in mine if x.arm == s.arm) else None)
            if not math.isnan(s.seed_std):
                ax.fill_between([i - 0.35, i + 0.35], -s.seed_std, s.seed_std, color="grey", alpha=0.2, lw=0)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([f"B{s.micro_batch_size} N{s.accumulation_steps}" for s in mine], fontsize=7)
        ax.set_title(f"{st.name} / {task} ({mine[0].metric_name})", fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("paired difference to reference\n(95% CI; grey: ±1 seed std)")
    return _save(fig, figdir / f"paired_diff_{st.name}.png")
