"""The Hugging Face Trainer study (issue 14): what the stock Trainer's gradient accumulation does to a fine-tuned BERT.

Reads the run folders of ``configs/study_trainer.yaml`` (``--backend trainer`` and ``--backend exact_trainer``,
(8,1) and (2,4), AdamW and SGD, several seeds) and, when present, the probe's Trainer arms
(``scripts/probe.py --trainer_arms``), and writes to the output folder (default ``results/trainer``):

* ``final_metrics.csv``: per optimizer x backend x (B, N): dev accuracy (mean, std, range), fraction of steps
  clipped, median pre-clip gradient norm, the loss factor measured on the first window, final training loss;
* ``paired_differences.csv``: per optimizer, the paired (same seed) differences of final dev accuracy with a 95%
  Student-t interval: stock (2,4) - (8,1), exact (2,4) - (8,1), exact (2,4) - stock (2,4), and the N = 1 check
  exact (8,1) - stock (8,1); with the mean number of dev examples the two runs label differently;
* ``grad_norms.csv`` and ``grad_norms.png``: the pre-clip gradient norm and the fraction of seeds clipped at every
  optimizer step (small multiples, one column per optimizer);
* ``trainer.md``: the section "The Hugging Face Trainer" for results/REPORT.md.

The (8,1) reference of both backends is the stock Trainer's (8,1) run of the same seed and optimizer: at N = 1 with
standard dropout the two trainers compute the same gradient (the grid's ``*_n1check`` arms check it on one seed).
Every file is headed by the command and commit that wrote it (`plumbing.provenance`).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BertAccumError
from .plumbing import fmt, header, mean_std, provenance, t_interval, write_csv

BACKEND_NAMES = {"trainer": "stock transformers.Trainer", "exact_trainer": "ExactAccumulationTrainer",
                 "bert_accum": "bert_accum loop"}
OPTIMIZER_NAMES = {"adamw_torch": "AdamW", "sgd": "plain SGD", "adamw_torch_noclip": "AdamW, no clipping",
                   "sgd_noclip": "plain SGD, no clipping"}
"""Names of the settings: the optimizer, with ``_noclip`` where the runs do not clip (max_grad_norm 0)."""
REFERENCE = ("trainer", 8, 1)
"""The shared (8,1) reference: the stock Trainer's run (identical to the exact trainer's at N = 1)."""
COMPARISONS = (
    # (name, (backend, B, N) of a, (backend, B, N) of b): difference a - b on the same seed
    ("stock (2,4) - (8,1)", ("trainer", 2, 4), REFERENCE),
    ("exact (2,4) - (8,1)", ("exact_trainer", 2, 4), REFERENCE),
    ("exact (2,4) - stock (2,4)", ("exact_trainer", 2, 4), ("trainer", 2, 4)),
    ("N=1 check: exact (8,1) - stock (8,1)", ("exact_trainer", 8, 1), ("trainer", 8, 1)),
)
FINAL_COLUMNS = ("optimizer", "learning_rate", "max_grad_norm", "backend", "micro_batch_size", "accumulation_steps", "n", "seeds",
                 "accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max", "fraction_clipped",
                 "grad_norm_median", "loss_factor_first_window", "final_train_loss")
PAIR_COLUMNS = ("optimizer", "comparison", "n", "mean_diff", "ci95_lo", "ci95_hi", "diffs", "mean_disagreements")
NORM_COLUMNS = ("optimizer", "backend", "micro_batch_size", "accumulation_steps", "optimizer_step", "n",
                "grad_norm_mean", "grad_norm_min", "grad_norm_max", "fraction_clipped")


@dataclass
class TrainerRun:
    """One finished run folder of the study."""

    path: Path
    backend: str
    optim: str
    """The setting: the optimizer's name, with ``_noclip`` when the run does not clip."""
    learning_rate: float
    max_grad_norm: float
    micro_batch_size: int
    accumulation_steps: int
    seed: int
    accuracy: float
    steps: list[dict[str, Any]]
    final: dict[str, Any]
    predictions: list[int] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        """(backend, B, N): the cell this run belongs to."""
        return self.backend, self.micro_batch_size, self.accumulation_steps

    @property
    def fraction_clipped(self) -> float:
        """Fraction of optimizer steps whose gradient norm clipping scaled down (NaN without step rows)."""
        return statistics.fmean(bool(s["clipped"]) for s in self.steps) if self.steps else math.nan


def load(runs_dir: Path) -> list[TrainerRun]:
    """Every finished run below `runs_dir` (read with the report's `load_runs`, so it reads what the report reads)."""
    from .report import load_runs

    out = []
    for r in load_runs([runs_dir]):
        if r.final.get("status") != "completed":
            continue
        cfg = json.loads((r.path / "config.json").read_text())
        preds_path = r.path / "predictions.json"
        preds = json.loads(preds_path.read_text())["splits"] if preds_path.exists() else {}
        out.append(TrainerRun(
            path=r.path, backend=cfg.get("backend", "bert_accum"),
            optim=cfg.get("optim", "adamw_torch") + ("" if (cfg.get("max_grad_norm") or 0) > 0 else "_noclip"),
            learning_rate=float(cfg["learning_rate"]), max_grad_norm=float(cfg.get("max_grad_norm") or 0), micro_batch_size=r.micro_batch_size,
            accumulation_steps=r.accumulation_steps, seed=r.seed, accuracy=r.metric, steps=r.steps, final=r.final,
            predictions=next(iter(preds.values()), []),
        ))
    if not out:
        raise BertAccumError(f"no finished run folders below {runs_dir}")
    return out


def _by(runs: list[TrainerRun]) -> dict[tuple[str, tuple[str, int, int]], dict[int, TrainerRun]]:
    """{(optim, (backend, B, N)): {seed: run}}."""
    out: dict[tuple[str, tuple[str, int, int]], dict[int, TrainerRun]] = {}
    for r in runs:
        out.setdefault((r.optim, r.key), {})[r.seed] = r
    return out


def final_rows(runs: list[TrainerRun]) -> list[dict[str, Any]]:
    """One row per optimizer x backend x (B, N)."""
    rows = []
    for (optim, key), seeds in sorted(_by(runs).items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        group = [seeds[s] for s in sorted(seeds)]
        mean, std = mean_std([r.accuracy for r in group])
        norms = [s["grad_norm"] for r in group for s in r.steps]
        factors = [r.final.get("trainer", {}).get("loss_factor_first_window", math.nan) for r in group]
        tail = [statistics.fmean(s.get("window_mean_loss", s["loss"]) for s in r.steps[-32:]) for r in group]
        rows.append({
            "optimizer": optim, "learning_rate": group[0].learning_rate, "max_grad_norm": group[0].max_grad_norm,
            "backend": key[0],
            "micro_batch_size": key[1], "accumulation_steps": key[2], "n": len(group),
            "seeds": " ".join(str(r.seed) for r in group), "accuracy_mean": mean, "accuracy_std": std,
            "accuracy_min": min(r.accuracy for r in group), "accuracy_max": max(r.accuracy for r in group),
            "fraction_clipped": statistics.fmean(r.fraction_clipped for r in group),
            "grad_norm_median": statistics.median(norms) if norms else math.nan,
            "loss_factor_first_window": statistics.fmean(factors), "final_train_loss": statistics.fmean(tail),
        })
    return rows


def _order(key: tuple[str, int, int]) -> tuple:
    """Table order: the reference, the stock (2,4), the exact (2,4), the exact (8,1) check, then anything else."""
    known = [REFERENCE, ("trainer", 2, 4), ("exact_trainer", 2, 4), ("exact_trainer", 8, 1)]
    return (known.index(key), key) if key in known else (len(known), key)


def pair_rows(runs: list[TrainerRun]) -> list[dict[str, Any]]:
    """Paired differences of final dev accuracy (same seed), per optimizer and comparison."""
    by = _by(runs)
    rows = []
    for optim in sorted({r.optim for r in runs}):
        for name, a_key, b_key in COMPARISONS:
            a, b = by.get((optim, a_key), {}), by.get((optim, b_key), {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            diffs = [a[s].accuracy - b[s].accuracy for s in seeds]
            lo, hi = (float(x) for x in t_interval(diffs))  # scipy's numpy floats would be written as np.float64(...)
            flips = [sum(x != y for x, y in zip(a[s].predictions, b[s].predictions)) for s in seeds]
            rows.append({"optimizer": optim, "comparison": name, "n": len(seeds), "mean_diff": statistics.fmean(diffs),
                         "ci95_lo": lo, "ci95_hi": hi, "diffs": " ".join(f"{d:+.4f}" for d in diffs),
                         "mean_disagreements": statistics.fmean(flips)})
    return rows


def norm_rows(runs: list[TrainerRun]) -> list[dict[str, Any]]:
    """Pre-clip gradient norm and fraction clipped at every optimizer step, over the seeds of each group."""
    rows = []
    for (optim, key), seeds in sorted(_by(runs).items()):
        group = list(seeds.values())
        for k in range(min(len(r.steps) for r in group)):
            norms = [r.steps[k]["grad_norm"] for r in group]
            rows.append({"optimizer": optim, "backend": key[0], "micro_batch_size": key[1],
                         "accumulation_steps": key[2], "optimizer_step": group[0].steps[k]["optimizer_step"],
                         "n": len(group), "grad_norm_mean": statistics.fmean(norms), "grad_norm_min": min(norms),
                         "grad_norm_max": max(norms),
                         "fraction_clipped": statistics.fmean(bool(r.steps[k]["clipped"]) for r in group)})
    return rows


def _label(key: tuple[str, int, int]) -> str:
    backend, b, n = key
    text = f"{BACKEND_NAMES[backend]}, B={b} x N={n}"
    return text + " (reference of both)" if key == REFERENCE else text


def _rolling(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def figure(rows: list[dict[str, Any]], path: Path, head: str, max_grad_norm: dict[str, float], width: int = 16) -> Path:
    """Small multiples: pre-clip gradient norm (top) and fraction of seeds clipped (bottom) per setting
    (`max_grad_norm`: the clipping threshold of each setting, 0 for none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optims = sorted({r["optimizer"] for r in rows})
    keys = sorted({(r["backend"], r["micro_batch_size"], r["accumulation_steps"]) for r in rows},
                  key=lambda k: (k != REFERENCE, k))
    colours = {REFERENCE: "black", ("trainer", 2, 4): "tab:red", ("exact_trainer", 2, 4): "tab:blue",
               ("exact_trainer", 8, 1): "tab:gray"}
    fig, axes = plt.subplots(2, len(optims), figsize=(6.2 * len(optims), 7.4), sharex=True, squeeze=False)
    for col, optim in enumerate(optims):
        for key in keys:
            mine = [r for r in rows if r["optimizer"] == optim
                    and (r["backend"], r["micro_batch_size"], r["accumulation_steps"]) == key]
            if not mine:
                continue
            steps = [r["optimizer_step"] for r in mine]
            style = dict(color=colours.get(key, "tab:green"), lw=1.3,
                         ls="--" if key == ("exact_trainer", 8, 1) else "-",
                         label=_label(key) if col == 0 else None)
            axes[0][col].plot(steps, _rolling([r["grad_norm_mean"] for r in mine], width), **style)
            axes[1][col].plot(steps, _rolling([r["fraction_clipped"] for r in mine], width), **style)
        if max_grad_norm.get(optim):
            axes[0][col].axhline(max_grad_norm[optim], color="gray", lw=0.8, ls=":",
                                 label=f"max_grad_norm = {max_grad_norm[optim]:g}" if col == 0 else None)
        axes[0][col].set_yscale("log")
        seeds = max(r["n"] for r in rows if r["optimizer"] == optim)
        axes[0][col].set_title(f"SST-2, {OPTIMIZER_NAMES.get(optim, optim)} (up to {seeds} seeds)")
        axes[0][col].set_ylabel("pre-clip gradient norm")
        axes[1][col].set_ylabel("fraction of seeds clipped")
        axes[1][col].set_xlabel("optimizer step")
        axes[1][col].set_ylim(-0.02, 1.02)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle(f"Seed means, {width}-step rolling means", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.02))
    fig.text(0.01, 0.003, head, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.11, 1, 0.97))
    fig.savefig(path, dpi=100, metadata={"Description": head})
    plt.close(fig)
    return path


def _probe_rows(probe_dir: Path) -> dict[str, list[dict[str, str]]]:
    """{folder name: rows of its probe_trainer.csv} for every probe below `probe_dir`."""
    out = {}
    for p in sorted(probe_dir.glob("*/probe_trainer.csv")) if probe_dir.is_dir() else []:
        with p.open() as fh:
            out[p.parent.name] = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    return out


def _ci(row: dict[str, Any]) -> str:
    if row["n"] < 2 or math.isnan(row["ci95_lo"]):
        return f"{row['mean_diff']:+.4f} (one seed)"
    return f"{row['mean_diff']:+.4f} [{row['ci95_lo']:+.4f}, {row['ci95_hi']:+.4f}]"


def _verdict(row: dict[str, Any]) -> str:
    if row["n"] < 2 or math.isnan(row["ci95_lo"]):
        return "too few seeds for an interval"
    if row["ci95_lo"] > 0 or row["ci95_hi"] < 0:
        return "the 95% interval excludes 0"
    return "the 95% interval includes 0"


def markdown(runs: list[TrainerRun], finals: list[dict[str, Any]], pairs: list[dict[str, Any]],
             probes: dict[str, list[dict[str, str]]], head: str, figure_name: str) -> str:
    """The section "The Hugging Face Trainer"."""
    any_run = next((r for r in runs if r.max_grad_norm > 0), runs[0])
    env = json.loads((any_run.path / "environment.json").read_text())
    cfg = json.loads((any_run.path / "config.json").read_text())
    versions = env.get("packages", {})
    tv = env.get("trainer", {}).get("transformers", versions.get("transformers"))
    stock = next((r for r in runs if r.key == ("trainer", 2, 4)), None)
    facts = stock.final.get("trainer", {}) if stock else {}
    n_seeds = sorted({r.seed for r in runs})
    lrs = {OPTIMIZER_NAMES.get(r.optim, r.optim): r.learning_rate for r in runs}
    lines = [header(head, markdown=True), "", "## The Hugging Face Trainer", ""]
    lines += [
        f"Measured with transformers {tv} (torch {versions.get('torch')}, accelerate {versions.get('accelerate')}) on "
        f"{env.get('device', 'cpu')} ({env.get('torch_num_threads')} torch thread(s) per run): the same configuration trained by the stock "
        "`transformers.Trainer` (`scripts/finetune.py --backend trainer`) and by `ExactAccumulationTrainer` "
        "(`--backend exact_trainer`), both with standard dropout and dynamic padding, so that only the loss "
        "normalisation differs. Both backends build model, head, data order (the project's `WindowPlan`), optimizer "
        "and schedule through `core.setup`, as the project's own loop does.",
        "",
    ]
    if facts:
        factor = facts.get("loss_factor_first_window", math.nan)
        n = stock.accumulation_steps
        result = (f"its accumulated gradient is N = {n} times the (8,1) gradient" if abs(factor - n) < 1e-3 * n
                  else "it divides correctly" if abs(factor - 1) < 1e-3 else f"a factor of {factor:.4f}")
        lines += [
            f"**What the stock Trainer does.** Its attributes say `model_accepts_loss_kwargs = "
            f"{facts.get('model_accepts_loss_kwargs')}`, so it does not divide the loss by N "
            f"(`divides_loss_by_accumulation_steps = {facts.get('divides_loss_by_accumulation_steps')}`), and BERT's "
            f"classification head ignores `num_items_in_batch` and returns each micro-batch's mean: the loss it "
            f"backpropagates over the first (2,4) window is **{factor:.4f}x** the window's mean loss (upstream "
            f"transformers issue #47688): {result}. The probe (one window, dropout off) measures the same on the "
            "gradient itself:",
            "",
        ]
    for name, prows in probes.items():
        for arm in ("trainer_dropout_off", "exact_trainer", "loop_controlled"):
            sel = [r for r in prows if r["arm"] == arm]
            if not sel:
                continue
            ratios = ", ".join(f"({r['micro_batch_size']},{r['accumulation_steps']}): "
                               f"{float(r['norm_ratio']):.4f}" for r in sel)
            worst = max(float(r["rel_l2"]) for r in sel)
            lines.append(f"- probe `{name}`, arm `{arm}`: gradient-norm ratio ||g(B,N)|| / ||g(8,1)|| {ratios}; "
                         f"largest relative L2 to (8,1) {worst:.2e}")
    if probes:
        lines += ["", "(`python scripts/probe.py --task_name sst2 --glue_dir ... --effective_batch_size 8 "
                  "--micro_batch_sizes 8 4 2 1 --trainer_arms`, tables in `probe/<task>/probe_trainer.md`.)", ""]
    lines += [
        f"**The fine-tuning study** (`configs/study_trainer.yaml`): SST-2, the first {cfg.get('max_train_samples')} "
        f"training examples (file order), one epoch ({any_run.final.get('total_optimizer_steps')} optimizer steps "
        f"at E = 8 for both (B, N)), max_length {cfg.get('max_length')}, warmup {cfg.get('warmup_ratio')} then "
        f"{cfg.get('lr_scheduler_type')} decay, max_grad_norm {cfg.get('max_grad_norm')} (0 in the rows "
        "'no clipping'), learning rate "
        + ", ".join(f"{k} {v:g}" for k, v in lrs.items())
        + " (SGD's with clipping from a pilot, see the grid file; without clipping 0.1 / the clipped runs' median "
        "pre-clip norm of about 6, no pilot); full dev set "
        f"({any_run.final.get('eval', {}).get('num_examples')} "
        f"examples), evaluated at the end; seeds {', '.join(map(str, n_seeds))}. The (8,1) reference of both "
        "backends is the stock Trainer's (8,1) run of the same seed (at N = 1 the two trainers compute the same "
        "gradient; the N = 1 check below trains both on seed 1).",
        "",
        "| optimizer | backend | (B, N) | n | dev accuracy mean ± std | range | fraction of steps clipped | "
        "median pre-clip grad norm | loss factor (1st window) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in finals:
        # one seed has no spread and no range
        spread = f" ± {fmt(r['accuracy_std'])}" if r["n"] > 1 else ""
        lo, hi = f"{r['accuracy_min']:.4f}", f"{r['accuracy_max']:.4f}"
        span = "—" if r["n"] < 2 else lo if lo == hi else f"{lo}–{hi}"
        lines.append(
            f"| {OPTIMIZER_NAMES.get(r['optimizer'], r['optimizer'])} | {BACKEND_NAMES[r['backend']]} | "
            f"({r['micro_batch_size']},{r['accumulation_steps']}) | {r['n']} | {r['accuracy_mean']:.4f}{spread} | {span} | "
            f"{r['fraction_clipped']:.3f} | {fmt(r['grad_norm_median'], 3)} | {fmt(r['loss_factor_first_window'], 4)} |")
    lines += ["", "Paired differences of final dev accuracy (same seed; mean and 95% Student-t interval; "
              "disagreements = dev examples the two runs label differently, mean over seeds):", "",
              "| optimizer | comparison | n | mean difference [95% CI] | per seed | disagreements |",
              "|---|---|---|---|---|---|"]
    for r in pairs:
        lines.append(f"| {OPTIMIZER_NAMES.get(r['optimizer'], r['optimizer'])} | {r['comparison']} | {r['n']} | "
                     f"{_ci(r)} | {r['diffs']} | {r['mean_disagreements']:.1f} |")
    lines += ["", "**In numbers.**", ""]
    clip = {(r["optimizer"], r["backend"], r["micro_batch_size"], r["accumulation_steps"]): r["fraction_clipped"]
            for r in finals}
    for optim in sorted({r["optimizer"] for r in pairs}):
        name = OPTIMIZER_NAMES.get(optim, optim)
        by = {r["comparison"]: r for r in pairs if r["optimizer"] == optim}
        s, e, d = by.get(COMPARISONS[0][0]), by.get(COMPARISONS[1][0]), by.get(COMPARISONS[2][0])
        if s is None or e is None or d is None:
            continue
        lines.append(
            f"- {name}: the stock Trainer's (2,4) ends at {_ci(s)} dev accuracy against (8,1) (n = {s['n']}: "
            f"{_verdict(s)}; {s['mean_disagreements']:.0f} dev examples labelled differently); the exact trainer's "
            f"(2,4) at {_ci(e)} (n = {e['n']}: {_verdict(e)}; {e['mean_disagreements']:.0f} labelled differently). "
            "With standard dropout the exact (2,4) run differs from (8,1) only by its dropout masks (and the rounding "
            "of other padded shapes), so its "
            "difference is the noise against which the stock Trainer's is read; exact minus stock at (2,4): "
            f"{_ci(d)} ({_verdict(d)}). " + (_clipping(clip, optim) if not optim.endswith("_noclip") else
            _unclipped(finals, optim)))
        check = by.get(COMPARISONS[3][0])
        if check is not None:
            seeds = " ".join(str(r.seed) for r in runs if r.optim == optim and r.key == ("exact_trainer", 8, 1))
            lines.append(f"  N = 1 check (seed {seeds}): exact (8,1) - stock (8,1) = {check['mean_diff']:+.4f} dev "
                         f"accuracy, {check['mean_disagreements']:.0f} dev examples labelled differently.")
    lines += [
        "",
        "![Pre-clip gradient norm and fraction of steps clipped per optimizer step, stock Trainer vs "
        f"ExactAccumulationTrainer]({figure_name})",
        "",
        "Files (in `results/trainer/`): `final_metrics.csv`, `paired_differences.csv`, `grad_norms.csv`, "
        f"`{figure_name}`; the run folders in `runs/` (regenerate with `python scripts/trainer_study.py`).",
        "",
    ]
    return "\n".join(lines)


def _unclipped(finals: list[dict[str, Any]], optim: str) -> str:
    """What the factor is without clipping: a learning rate N times larger (plain SGD)."""
    ref = next((r for r in finals if r["optimizer"] == optim
                and (r["backend"], r["micro_batch_size"], r["accumulation_steps"]) == REFERENCE), None)
    if ref is None:
        return "Without clipping the stock Trainer's update is N = 4 times the exact one's at every step."
    lr = ref["learning_rate"]
    return (f"Without clipping the stock Trainer's update is N = 4 times the exact one's at every step: for plain "
            f"SGD, learning rate {4 * lr:g} instead of {lr:g}; at {lr:g} the (8,1) reference reaches "
            f"{ref['accuracy_mean']:.4f} (n = {ref['n']}).")


def _clipping(clip: dict[tuple, float], optim: str) -> str:
    """How much of the run clipping leaves to the stock Trainer's factor."""
    return (f"Fraction of steps clipped at max_grad_norm: stock (2,4) "
            f"{clip.get((optim, 'trainer', 2, 4), math.nan):.3f}, exact (2,4) "
            f"{clip.get((optim, 'exact_trainer', 2, 4), math.nan):.3f}, (8,1) "
            f"{clip.get((optim, 'trainer', 8, 1), math.nan):.3f}; a step clipped in both runs has the same norm "
            "whatever the factor, so the stock Trainer's N-times gradient can change that step's update only on at "
            f"most the other {1 - clip.get((optim, 'exact_trainer', 2, 4), math.nan):.1%} of the exact run's steps"
            + (" (with AdamW the moment estimates carry such a step into later ones)" if optim.startswith("adamw")
               else "") + ".")


def run_study(runs_dir: Path, output_dir: Path, probe_dir: Path | None = None, command: str | None = None) -> dict[str, Path]:
    """Write every output of the study to `output_dir`; returns {name: path}."""
    runs = load(Path(runs_dir))
    head = provenance(command)
    output_dir.mkdir(parents=True, exist_ok=True)
    finals, pairs, norms = final_rows(runs), pair_rows(runs), norm_rows(runs)
    files = {"final": output_dir / "final_metrics.csv", "pairs": output_dir / "paired_differences.csv",
             "norms": output_dir / "grad_norms.csv", "figure": output_dir / "grad_norms.png",
             "markdown": output_dir / "trainer.md"}
    write_csv(files["final"], finals, head, FINAL_COLUMNS)
    write_csv(files["pairs"], pairs, head, PAIR_COLUMNS)
    write_csv(files["norms"], norms, head, NORM_COLUMNS)
    figure(norms, files["figure"], head, {r.optim: r.max_grad_norm for r in runs})
    probes = _probe_rows(Path(probe_dir)) if probe_dir else {}
    files["markdown"].write_text(markdown(runs, finals, pairs, probes, head, files["figure"].name))
    return files
