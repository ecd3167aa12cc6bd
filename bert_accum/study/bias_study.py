"""The real biases at convergence (issue 12): each known bias of gradient accumulation against its fix, paired by seed.

Reads the run folders of grids whose file declares ``comparisons: {arm: reference arm}``:
``configs/study_bugs_converged.yaml`` (every loop bug against the correct loop at the same (B, N), AdamW and plain
SGD) and ``configs/study_mlm_converged.yaml`` (masked-LM: a mean of micro-batch means against global normalisation,
with dropout and padding held fixed), and writes to the output folder (default ``results/biases``):

* ``paired.csv``: per comparison x task x (B, N): pairs finished of planned, the reference's and the arm's final dev
  metric, the paired difference with its 95% Student-t interval, the *detection limit* (the largest |effect| the
  interval leaves possible), dev predictions that differ, the clipping threshold and the fraction of steps clipped in
  both arms, the final learning rate of both, and for masked-LM the items per micro-batch and their spread;
* ``lr.csv`` and ``lr.png``: the learning rate of every arm at every optimizer step (first seed), small multiples per
  optimizer and (B, N);
* ``curves.csv`` and ``curves.png``: the dev metric over training, seed means, per arm, with the grid's reference bar
  and the trivial baseline (majority class; for masked-LM, the most frequent masked dev token) drawn across;
* ``biases.md``: the section "The real biases at convergence" for ``results/REPORT.md`` (``report.py --biases DIR``,
  which also reads ``paired.csv`` for the report's answer), opening with its answer, then per grid how each
  reference arm was trained (read from its runs' configs) and what each compared arm changes. A comparison gets a
  verdict only once all its planned pairs have finished.

A pair is two finished runs of the same grid cell name except the arm; they are refused (one line) when they differ
in anything but the settings that distinguish the two arms in the grid file. Every file is headed by the command and
commit that wrote it.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BertAccumError
from . import stats
from .plumbing import fmt, header, provenance, t_interval, write_csv

OPTIMIZER_NAMES = {"adamw_torch": "AdamW", "adamw_torch_fused": "AdamW", "sgd": "plain SGD"}

# What each bias is, in one sentence, and how to remove it: this project's flag, the HF Trainer, a hand-written loop.
BIASES: dict[str, dict[str, str]] = {
    "mean_of_means": {
        "title": "Per-token loss averaged as a mean of micro-batch means",
        "mechanism": "Each micro-batch's loss is the mean over its own masked tokens and the N means are averaged, "
                     "so a token in a micro-batch with few masked tokens weighs more than one in a micro-batch with "
                     "many: the accumulated gradient is not the large batch's mean over all tokens.",
        "fix": "`--loss_normalization global` here (sum of token losses / the window's token count). With the HF "
               "Trainer: a model whose loss uses `num_items_in_batch` (BERT's masked-LM head in transformers 5 "
               "accepts the argument but ignores it, and the Trainer then skips its division by N, so the gradient "
               "is N times a mean of means: see the Trainer section), or `Trainer(compute_loss_func=...)` returning "
               "the token-loss sum divided by `num_items_in_batch`, or `bert_accum.ExactAccumulationTrainer`. In a "
               "hand-written loop: `loss = token_losses.sum() / tokens_in_window`, with `tokens_in_window` counted "
               "over the window's N micro-batches and all W processes before the first backward, times W under DDP "
               "(which averages gradients over processes), and times N if `accelerator.backward` divides by N "
               "(`Accelerator(gradient_accumulation_steps=N)`).",
    },
    "step_mod_boundaries": {
        "title": "Optimizer step on `micro_step % N == 0` with `micro_step` counted from 0",
        "mechanism": "The off-by-one makes the first window of every epoch a single micro-batch and shifts every "
                     "later window by one, so one extra optimizer step per epoch is taken on 1/N of a batch (its "
                     "loss still divided by N: a small step under plain SGD; Adam's first update does not depend on "
                     "gradient scale) and the epoch's last window changes size.",
        "fix": "step when `(step + 1) % N == 0 or step + 1 == len(dataloader)` with `step` counted from 0 per "
               "epoch (the HF examples), or let `accelerator.accumulate` decide; this project plans windows per "
               "epoch.",
    },
    "schedule_sized_in_micro_batches": {
        "title": "LR schedule sized in micro-batches, stepped per optimizer step",
        "mechanism": "`num_training_steps = len(dataloader) * epochs` counts micro-batches, so the schedule is N "
                     "times too long: warmup lasts N times longer (at large N longer than training) and the learning "
                     "rate ends far above 0.",
        "fix": "size it in optimizer steps: `math.ceil(len(dataloader) / N) * epochs` (as the HF examples and "
               "Trainer do); this project always does.",
    },
    "scheduler_stepped_per_micro_batch": {
        "title": "`lr_scheduler.step()` on every micro-batch",
        "mechanism": "The schedule is sized in optimizer steps but advanced N times per optimizer step, so warmup "
                     "ends N times too early and the learning rate reaches zero after 1/N of training.",
        "fix": "call `lr_scheduler.step()` inside the `if` that calls `optimizer.step()` (an accelerate-prepared "
               "scheduler steps only when gradients sync).",
    },
    "last_window_1_over_n": {
        "title": "A short last window divided by N",
        "mechanism": "Every micro-batch loss is divided by N, also in an epoch's last window of fewer than N "
                     "micro-batches, so that one window's gradient is scaled down by (micro-batches in it)/N; only "
                     "one optimizer step per epoch is affected, which bounds the effect whatever the optimizer "
                     "(Adam cancels a scale that persists over steps, not a one-off one).",
        "fix": "divide by the number of micro-batches (or items) actually in the window "
               "(`--loss_normalization global` here; the HF Trainer counts the window's items when the model's "
               "loss uses `num_items_in_batch`); with `Accelerator(gradient_accumulation_steps=N)`, "
               "`accelerator.backward` divides by N whatever the window holds, so rescale the last window's loss.",
    },
    "trainer_vs_loop": {
        "title": "The same loss through the Hugging Face Trainer (a check, not a bias)",
        "mechanism": "`ExactAccumulationTrainer` (`--backend exact_trainer`) computes this project's window loss from "
                     "the same micro-batches, masks and dropout, so with the same settings it should train the same "
                     "run up to float round-off; any difference here would be the Trainer's, not accumulation's.",
        "fix": "none needed where the difference is round-off; `bert_accum.ExactAccumulationTrainer(loss_normalization="
               "\"global\")` is the global-normalised path of the HF Trainer for BERT's masked-LM head.",
    },
    "clip_per_micro_batch": {
        "title": "Gradient clipping after every micro-batch",
        "mechanism": "`clip_grad_norm_` inside the micro-batch loop clips the partial sum after each backward, so "
                     "early micro-batches are shrunk again by every later clip and the window's gradient is no "
                     "longer the clipped large-batch gradient.",
        "fix": "clip once per window, right before `optimizer.step()` (`if accelerator.sync_gradients: "
               "accelerator.clip_grad_norm_(...)`); the HF Trainer and this project do.",
    },
}
PAIR_COLUMNS = ("bias", "arm", "reference", "optimizer", "task", "micro_batch_size", "accumulation_steps", "metric",
                "n", "planned", "reference_below_bar", "reference_mean", "arm_mean", "mean_diff", "ci95_lo", "ci95_hi", "detection_limit",
                "max_abs_diff", "p_value", "p_holm", "verdict", "diffs", "mean_disagreements", "max_grad_norm", "clipped_fraction_arm", "clipped_fraction_reference",
                "final_lr_arm", "final_lr_reference", "param_distance", "items_per_micro_batch", "items_cv_within_window",
                "steps_identical", "pairs_identical", "max_loss_gap", "first_step_apart_1e2")
LR_COLUMNS = ("study", "arm", "optimizer", "micro_batch_size", "accumulation_steps", "seed", "optimizer_step", "learning_rate")
CURVE_COLUMNS = ("study", "arm", "task", "micro_batch_size", "accumulation_steps", "optimizer_step", "n", "metric", "value_mean")


@dataclass
class BiasStudy:
    """One grid's finished runs and its declared comparisons."""

    name: str
    grid_file: str
    runs: list[Any]
    planned: list[Any]
    arms: dict[str, dict[str, Any]]
    comparisons: dict[str, str]
    thresholds: dict[str, dict[str, float]]
    unfinished: list[str]
    changes: list[str] = field(default_factory=list)
    """The grid file's record of design changes made after runs had started (printed under the grid's line)."""
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per task of the reference runs, the trivial baseline (`trivial_baselines`); empty until computed."""


def load_study(runs_dir: Path, grid_file: str | Path) -> BiasStudy:
    """A grid's runs (checked against its cells by the report's reader) and its ``comparisons``."""
    from .grid import GridSpec
    from .report import load_converged

    spec = GridSpec.load(grid_file)
    if not spec.comparisons:
        raise BertAccumError(f"{grid_file}: no 'comparisons' key, so no arm is compared with another")
    study = load_converged(Path(runs_dir), grid_file)
    return BiasStudy(name=study.name, grid_file=str(grid_file), runs=study.runs, planned=study.planned,
                     arms=spec.arms, comparisons=spec.comparisons, thresholds=spec.reference_thresholds,
                     unfinished=study.unfinished, changes=spec.changes)


def trivial_baselines(study: BiasStudy, glue_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Per task of the study's reference runs, the score of a trivial predictor on the dev data the runs were scored
    on: for masked-LM, always predicting the most frequent masked dev token, with each evaluation seed's masks; for
    classification and regression, the best constant predictor (`stats.trivial_baseline`: majority class, ...).

    Returns {task: {"metric", "value" (mean over seeds; NaN when no data source is readable here), "source", and
    for masked-LM "rates" ({seed: rate}), "tokens" (masked dev tokens, first seed), "token" (the most frequent one);
    else "labels" (dev labels counted)}}.
    """
    from .numbers import data_source, dev_labels

    references = set(study.comparisons.values())
    out: dict[str, dict[str, Any]] = {}
    for task in sorted({r.task for r in study.runs if r.arm in references}):
        runs = [r for r in study.runs if r.task == task and r.arm in references]
        metric = runs[0].metric_name
        if runs[0].objective == "mlm":
            source = data_source(runs[0].config, glue_dir)
            b = _mlm_baseline(runs, source) if source else {"rates": {}, "tokens": 0, "token": None, "source": "none"}
            rates = list(b["rates"].values())
            out[task] = {"metric": metric, "value": statistics.fmean(rates) if rates else math.nan, **b}
            continue
        labels, where = dev_labels(task, [r.config for r in runs], glue_dir)
        out[task] = {"metric": metric, "value": stats.trivial_baseline(metric, labels), "labels": len(labels or []),
                     "source": where}
    return out


def _mlm_baseline(runs: list[Any], source: tuple[dict[str, Any], str]) -> dict[str, Any]:
    import dataclasses

    from ..core.config import TrainConfig
    from ..core.setup import load_model, load_raw, load_splits
    from ..core.train import mlm_eval_targets

    values = {k: v for k, v in runs[0].config.items() if k != "derived"}
    values.update({"glue_dir": None, "train_file": None, "validation_file": None, **source[0]})
    cfg = TrainConfig.from_dict(values)
    spec, tokenizer, _, _ = load_model(cfg)
    raw = load_raw(cfg, spec)
    raw["train"] = raw["train"].select(range(1))  # only the dev split is scored; skip tokenising the rest
    dev = load_splits(cfg, spec, tokenizer, raw=raw)[spec.eval_splits[0]]
    rates, tokens, token = {}, 0, None
    for seed in sorted({int(r.config.get("seed", cfg.seed)) for r in runs}):
        targets = mlm_eval_targets(dataclasses.replace(cfg, seed=seed), tokenizer, dev)
        rates[seed] = stats.majority_rate(targets)
        if token is None:
            tokens = len(targets)
            token = tokenizer.convert_ids_to_tokens(Counter(targets).most_common(1)[0][0])
    return {"rates": rates, "tokens": tokens, "token": token, "source": source[1]}


def _baseline_text(study: BiasStudy) -> str:
    """'; sst2 trivial baseline ...' for the grid's line of the section, per task ('' for none)."""
    parts = []
    for task, b in study.baselines.items():
        if math.isnan(b["value"]):
            parts.append(f"{task}: trivial baseline unknown (no dev data readable here: pass --glue_dir)")
        elif "rates" in b:
            lo, hi = min(b["rates"].values()), max(b["rates"].values())
            span = fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"
            parts.append(f"{task} trivial baseline {span} {b['metric']} (always predicting the most frequent masked "
                         f"dev token, `{b['token']}`, with the dev masks of {len(b['rates'])} "
                         f"{'seed' if len(b['rates']) == 1 else 'seeds'}; {b['tokens']} masked tokens)")
        else:
            rule = (f"the best constant predictor over the {b['labels']} dev labels" if b["labels"]
                    else "a constant predictor")
            parts.append(f"{task} trivial baseline {fmt(b['value'])} {b['metric']} ({rule})")
    return "".join(f"; {p}" for p in parts)


def _one(values: set[Any]) -> str:
    """A setting across runs: its value, or the values joined with ' / ' where runs differ."""
    return " / ".join(str(v) for v in sorted(values, key=str))


# Grid keys that choose which cells run or what they save, not how a run trains.
_NOT_TRAINING = {"batches", "seeds", "micro_batch_sizes", "checkpointing_steps", "checkpoints_total_limit",
                 "fingerprint_steps", "fingerprint_dim", "eval_steps"}


def _arm_change(arm: dict[str, Any], ref: dict[str, Any]) -> str:
    """'bug_modes step_mod_boundaries': the training settings in which the grid file's arm differs from its reference."""
    keys = [k for k in dict.fromkeys([*arm, *ref]) if k not in _NOT_TRAINING and arm.get(k) != ref.get(k)]
    def shown(v: Any) -> str:
        return ", ".join(map(str, v)) if isinstance(v, list) else str(v)
    return "; ".join(f"{k} {shown(arm.get(k))}" for k in keys) or "no training setting"


def _settings_text(study: BiasStudy) -> list[str]:
    """One line per reference arm: how its finished runs were trained, read from their configs (so the report states
    the schedule, optimizer and clipping threshold the comparisons were made under), and the arms compared with it."""
    lines = []
    for ref in dict.fromkeys(study.comparisons.values()):
        runs = [r for r in study.runs if r.arm == ref]
        if not runs:
            continue

        def values(key: str, derived: bool = False) -> set[Any]:
            return {(r.config.get("derived", {}) if derived else r.config).get(key) for r in runs}

        objective = _one(values("objective"))
        what = (f"masked-LM ({_one({f'{p:.0%}' for p in values('mlm_probability')})} of tokens masked)"
                if objective == "mlm" else objective)
        limit = values("max_train_examples")
        pool = _one(values("train_examples", True))
        epochs = _one(values("epochs", True))
        first = " first" if values("max_train_samples") != {None} else ""
        data = (f"{_one(limit)} training examples (of {pool}, in each seed's order)" if limit != {None}
                else f"the{first} {pool} training examples{' (file order)' if first else ''}, {epochs} "
                     f"{'epoch' if epochs == '1' else 'epochs'}")
        optims = values("optim")
        clip = values("max_grad_norm")
        clipping = ("no gradient clipping" if not any(clip)
                    else f"gradient clipping at max_grad_norm {_one(clip)}")
        compared = [f"`{arm}` ({_arm_change(study.arms[arm], study.arms[ref])})"
                    for arm, r in study.comparisons.items() if r == ref]
        lines.append(
            f"  - How `{ref}` was trained ({len(runs)} runs): {_one(values('task', True))} {what}, {data}: "
            f"{_one(values('total_optimizer_steps', True))} optimizer steps at effective batch "
            f"{_one(values('effective_batch_size', True))}; {_one({_optimizer(o) for o in optims})} "
            f"(`{_one(optims)}`), learning rate {_one(values('learning_rate'))}, {_one(values('lr_scheduler_type'))} "
            f"schedule after {_one(values('num_warmup_steps', True))} warmup steps; {clipping}; max_length "
            f"{_one(values('max_length'))}; {_one(values('dropout'))} dropout, {_one(values('padding'))} padding, "
            f"loss normalisation {_one(values('loss_normalization'))}, {_one(values('precision'))}, backend "
            f"{_one(values('backend'))}. Compared with it, each differing only in the settings named: {'; '.join(compared)}.")
    return lines


def _guides(studies: list[BiasStudy]) -> dict[tuple[str, str, str], list[tuple[float, str, str]]]:
    """Horizontal lines for the learning-curve panels, keyed by (study, task, metric): the reference bar and the
    trivial baseline, as (value, label, colour)."""
    out: dict[tuple[str, str, str], list[tuple[float, str, str]]] = {}
    for s in studies:
        for task, by_metric in s.thresholds.items():
            for metric, v in by_metric.items():
                out.setdefault((s.name, task, metric), []).append((float(v), f"reference bar {v:g}", "gray"))
        for task, b in s.baselines.items():
            if not math.isnan(b["value"]):
                out.setdefault((s.name, task, b["metric"]), []).append(
                    (b["value"], f"trivial baseline {b['value']:.3f}", "tab:red"))
    return out


def bias_of(arm_values: dict[str, Any], ref_values: dict[str, Any]) -> str:
    """The bias an arm reproduces against its reference: its bug mode, ``mean_of_means``, or ``trainer_vs_loop``
    (the same settings through another backend: a check that the two loops agree)."""
    from ..controls.bugs import canonical_bug_names

    bugs = [b for b in canonical_bug_names(arm_values.get("bug_modes"))
            if b not in canonical_bug_names(ref_values.get("bug_modes"))]
    if len(bugs) == 1:
        return bugs[0]
    norm, ref_norm = (v.get("loss_normalization", "mean_of_means") for v in (arm_values, ref_values))
    if not bugs and norm == "mean_of_means" and ref_norm == "global":
        return "mean_of_means"
    if not bugs and norm == ref_norm and arm_values.get("backend", "bert_accum") != ref_values.get("backend", "bert_accum"):
        return "trainer_vs_loop"
    raise BertAccumError(f"cannot name the bias of arm settings {arm_values} against {ref_values}: "
                         "one bug mode, mean_of_means against global, or one loss through two backends, per comparison")


def _clears_bar(run, thresholds: dict[str, dict[str, float]]) -> bool:
    """Whether a reference run reached the grid's bar for its task and metric (no bar stated: it does)."""
    bar = thresholds.get(run.task, {}).get(run.metric_name)
    return bar is None or run.metric >= bar


def _optimizer(optim: str) -> str:
    return OPTIMIZER_NAMES.get(optim, optim)


# Clipped on at least this fraction of steps in both arms: the gradient norm was the clipping threshold throughout.
ALWAYS_CLIPPED = 0.99


def _clipped_fraction(run) -> float:
    return statistics.fmean(bool(s.get("clipped")) for s in run.steps) if run.steps else math.nan


def _items_spread(run) -> tuple[float, float]:
    """(mean items per micro-batch, mean within-window coefficient of variation) from the step rows' micro_items."""
    means, cvs = [], []
    for s in run.steps:
        items = s.get("micro_items") or []
        if len(items) > 1 and statistics.fmean(items) > 0:
            means.append(statistics.fmean(items))
            cvs.append(statistics.pstdev(items) / statistics.fmean(items))
    return (statistics.fmean(means), statistics.fmean(cvs)) if means else (math.nan, math.nan)


def verdict(n: int, p_holm: float, planned: int | None = None, below_bar: int = 0) -> str:
    """'a bias' (Holm-adjusted p < 0.05 over all decided comparisons), 'below the detection limit', 'too few
    pairs', or, while fewer than the `planned` pairs have finished, 'not yet decidable (n = k of m)'; once all have,
    'not at convergence (...)' when `below_bar` of the reference runs stayed below the grid's reference bar."""
    if planned is not None and n < planned:
        return f"not yet decidable (n = {n} of {planned})"
    if below_bar:
        return f"not at convergence (reference below the bar in {below_bar} of {n})"
    if n < 2 or math.isnan(p_holm):
        return "too few pairs"
    return "a bias" if p_holm < 0.05 else "below the detection limit"


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def pair_rows(study: BiasStudy) -> list[dict[str, Any]]:
    """Paired differences (arm - reference, same cell seed) of the final dev metric per comparison x task x (B, N)."""
    from .numbers import first_above, loss_gaps
    from .report import check_pair, param_distance

    by_cell = {(r.task, r.arm, r.bn, r.cell_seed): r for r in study.runs}
    rows = []
    for arm, ref in study.comparisons.items():
        compared = {k for k in set(study.arms[arm]) | set(study.arms[ref])
                    if study.arms[arm].get(k) != study.arms[ref].get(k)}
        bias = bias_of(study.arms[arm], study.arms[ref])
        cells = sorted({(c.task, (c.micro_batch_size, c.accumulation_steps)) for c in study.planned if c.arm == arm})
        for task, bn in cells:
            cell_plan = [c for c in study.planned
                         if c.arm == arm and c.task == task and (c.micro_batch_size, c.accumulation_steps) == bn]
            planned = sorted(c.seed for c in cell_plan)
            pairs = [(by_cell[(task, arm, bn, s)], by_cell[(task, ref, bn, s)]) for s in planned
                     if (task, arm, bn, s) in by_cell and (task, ref, bn, s) in by_cell]
            for a, b in pairs:
                check_pair(a, b, compared)
            # The grid's reference bar, fixed before the runs, says when a comparison is one made at convergence.
            # Every pair stays in the test: dropping those whose reference missed the bar would keep the pairs where
            # only the arm failed and so, where runs fail at random, read chance as a bias.
            below_bar = sum(not _clears_bar(b, study.thresholds) for _, b in pairs)
            diffs = [a.metric - b.metric for a, b in pairs]
            check = bias == "trainer_vs_loop"
            lo, hi = (float(x) for x in t_interval(diffs)) if len(diffs) > 1 else (math.nan, math.nan)
            flips = [sum(x != y for x, y in zip(a.final_predictions, b.final_predictions))
                     for a, b in pairs if a.final_predictions is not None and b.final_predictions is not None]
            spread = [_items_spread(a) for a, _ in pairs]
            metric = pairs[0][0].metric_name if pairs else ""
            gaps = [loss_gaps(a, b) for a, b in pairs]
            apart = [first_above(g, 1e-2) for g in gaps]
            rows.append({
                "bias": bias, "arm": arm, "reference": ref,
                "optimizer": _optimizer(cell_plan[0].config.optim),  # from the plan: named before any pair finishes
                "task": task, "micro_batch_size": bn[0], "accumulation_steps": bn[1], "metric": metric,
                "n": len(pairs), "planned": len(planned), "reference_below_bar": below_bar,
                "reference_mean": statistics.fmean(b.metric for _, b in pairs) if pairs else math.nan,
                "arm_mean": statistics.fmean(a.metric for a, _ in pairs) if pairs else math.nan,
                "mean_diff": statistics.fmean(diffs) if diffs else math.nan, "ci95_lo": lo, "ci95_hi": hi,
                "detection_limit": max(abs(lo), abs(hi)) if not math.isnan(lo) else math.nan,
                # a check is not a test of a bias: it stays out of the Holm family and is read by its largest |diff|
                "p_value": math.nan if check else stats.t_p(diffs), "diffs": " ".join(f"{d:+.4f}" for d in diffs),
                "max_abs_diff": max((abs(d) for d in diffs), default=math.nan),
                "mean_disagreements": statistics.fmean(flips) if flips else math.nan,
                "clipped_fraction_arm": statistics.fmean(_clipped_fraction(a) for a, _ in pairs) if pairs else math.nan,
                "clipped_fraction_reference": statistics.fmean(_clipped_fraction(b) for _, b in pairs) if pairs else math.nan,
                "max_grad_norm": pairs[0][1].config.get("max_grad_norm", math.nan) if pairs else math.nan,
                "final_lr_arm": pairs[0][0].steps[-1]["learning_rate"] if pairs and pairs[0][0].steps else math.nan,
                "final_lr_reference": pairs[0][1].steps[-1]["learning_rate"] if pairs and pairs[0][1].steps else math.nan,
                # ||theta_arm - theta_ref|| / ||theta_ref - theta_0|| from the parameter fingerprints (NaN without)
                "param_distance": statistics.fmean(param_distance(a, b) for a, b in pairs) if pairs else math.nan,
                "items_per_micro_batch": statistics.fmean(m for m, _ in spread) if spread else math.nan,
                "items_cv_within_window": statistics.fmean(c for _, c in spread) if spread else math.nan,
                # the training loss step by step (relative gap): how long the pairs take the same steps, bit for bit,
                # how far apart they get, and the first step where they differ by 1% (min over pairs; None: never)
                "steps_identical": min((_leading_zeros(g) for g in gaps), default=math.nan),
                "pairs_identical": sum(bool(g) and _leading_zeros(g) == len(g) for g in gaps),
                "max_loss_gap": max((x for g in gaps for _, x in g), default=math.nan),
                "first_step_apart_1e2": min((s for s in apart if s is not None), default=None) if apart else None,
            })
    judge(rows)
    return rows


def _leading_zeros(gaps: list[tuple[int, float]]) -> int:
    """How many optimizer steps, from the first, the two runs' training losses are exactly equal."""
    return next((i for i, (_, g) in enumerate(gaps) if g != 0), len(gaps))


def judge(rows: list[dict[str, Any]]) -> None:
    """Set each row's Holm-adjusted p and verdict. Many comparisons are judged at once: a bias is claimed only at a
    Holm-adjusted 5% over all of them. A comparison still short of its planned pairs is not judged yet and counts in
    the family as p = 1, so the family is the planned one from the start and a verdict can only strengthen as the
    others finish. A check (`trainer_vs_loop`) is no test and stays out of the family."""
    # A comparison whose reference runs did not all reach the bar is no comparison at convergence: no claim, p = 1.
    complete = [r["n"] >= r["planned"] and not r.get("reference_below_bar") for r in rows]
    family = [r["p_value"] if done else 1.0 if r["bias"] != "trainer_vs_loop" else math.nan
              for r, done in zip(rows, complete)]
    for row, p, done in zip(rows, holm(family), complete):
        row["p_holm"] = p if done else math.nan
        row["verdict"] = "a check" if row["bias"] == "trainer_vs_loop" else verdict(row["n"], p, row["planned"],
                                                                                    row.get("reference_below_bar", 0))


def lr_rows(study: BiasStudy) -> list[dict[str, Any]]:
    """The learning rate at every optimizer step of each arm x (B, N), for its first finished seed."""
    first: dict[tuple, Any] = {}
    for r in sorted(study.runs, key=lambda r: r.cell_seed):
        first.setdefault((r.arm, r.bn), r)
    return [{"study": study.name, "arm": arm, "optimizer": _optimizer(r.config.get("optim", "adamw_torch")), "micro_batch_size": bn[0], "accumulation_steps": bn[1],
             "seed": r.cell_seed, "optimizer_step": s["optimizer_step"], "learning_rate": s["learning_rate"]}
            for (arm, bn), r in sorted(first.items()) for s in r.steps]


def curve_rows(study: BiasStudy) -> list[dict[str, Any]]:
    """Seed means of the dev metric at every evaluation, per arm x task x (B, N)."""
    groups: dict[tuple, dict[int, list[float]]] = {}
    metric_of: dict[tuple, str] = {}
    for r in study.runs:
        key = (r.arm, r.task, r.bn)
        metric_of[key] = r.metric_name
        for e in r.evals:
            if r.metric_name in e:
                groups.setdefault(key, {}).setdefault(e["optimizer_step"], []).append(float(e[r.metric_name]))
    return [{"study": study.name, "arm": arm, "task": task, "micro_batch_size": bn[0], "accumulation_steps": bn[1], "optimizer_step": step,
             "n": len(vals), "metric": metric_of[(arm, task, bn)], "value_mean": statistics.fmean(vals)}
            for (arm, task, bn), by_step in sorted(groups.items()) for step, vals in sorted(by_step.items())]


def _small_multiples(rows, x, y, panel_keys, path: Path, head: str, ylabel: str, title,
                     references: set[tuple[str, str]],
                     guides: dict[tuple, list[tuple[float, str, str]]] | None = None) -> Path:
    """One panel per study and value of `panel_keys`, one line per arm (full arm names in a legend under the panel,
    where it hides no line; reference arms, given as (study, arm), solid); `guides`, keyed by a panel's first
    values (study, then its first keys), adds dotted horizontal lines as (value, label, colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Each grid gets its own panels: two grids at the same (B, N) run different schedules and lengths.
    panel_keys = ("study", *panel_keys)
    panels = sorted({tuple(r[k] for k in panel_keys) for r in rows})
    arms = sorted({r["arm"] for r in rows})
    colours = dict(zip(arms, plt.cm.tab10.colors * 3))
    cols = min(len(panels), 3) or 1
    rows_of_panels = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(5.4 * cols, 5.2 * rows_of_panels), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for arm in arms:
            mine = [r for r in rows if r["arm"] == arm and tuple(r[k] for k in panel_keys) == panel]
            if mine:
                ax.plot([r[x] for r in mine], [r[y] for r in mine], color=colours[arm], lw=1.3,
                        ls="-" if (panel[0], arm) in references else "--", label=arm)
        for key, lines in (guides or {}).items():
            if panel[:len(key)] == key:
                for value, label, colour in lines:
                    ax.axhline(value, color=colour, lw=0.9, ls=":", label=label)
        ax.set_title(f"{panel[0]}: {title(panel[1:])}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.text(0.01, 0.003, head, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100, metadata={"Description": head})
    plt.close(fig)
    return path


def _effect(row: dict[str, Any]) -> str:
    if row["n"] == 0:
        return "no pairs yet"
    if math.isnan(row["ci95_lo"]):
        return f"{row['mean_diff']:+.4f} (one pair)"
    return f"{row['mean_diff']:+.4f} [{row['ci95_lo']:+.4f}, {row['ci95_hi']:+.4f}]"


def _n_of(row: dict[str, Any]) -> str:
    """'4 of 5', with how many of those pairs' reference runs stayed below the grid's bar."""
    text = f"{row['n']} of {row['planned']}"
    if row.get("reference_below_bar"):
        text += f" (reference below the bar in {row['reference_below_bar']})"
    return text


def _reading(row: dict[str, Any]) -> str:
    if row["verdict"] == "a check":
        if row["n"] == 0:
            return "a check: no pairs yet"
        n, same = row["n"], row["pairs_identical"]
        steps = ("training losses bit-identical at every optimizer step in every pair" if same == n else
                 f"training losses bit-identical at every optimizer step in {same} of {n} pairs, at most "
                 f"{row['max_loss_gap']:.1e} apart (relative) over the run"
                 + (f" (identical for the first {row['steps_identical']} steps in every pair)"
                    if row["steps_identical"] else "")
                 + ("" if row["first_step_apart_1e2"] is None
                    else f", 1% apart from step {row['first_step_apart_1e2']}"))
        return f"a check: largest |difference| {row['max_abs_diff']:.2g} over {n} {'pair' if n == 1 else 'pairs'}; {steps}"
    if row["verdict"] == "a bias":
        return f"a bias (Holm-adjusted p = {row['p_holm']:.2g})"
    if row["verdict"] == "below the detection limit":
        if row["max_abs_diff"] == 0:
            # A degenerate interval (every difference 0) would print as "±0.0000": say what happened instead.
            return f"below the detection limit: the same final {row['metric']} in all {row['n']} pairs"
        return (f"below the detection limit: no effect beyond ±{row['detection_limit']:.4f} (95% interval; "
                f"Holm-adjusted p = {row['p_holm']:.2g})")
    if row["verdict"].startswith(("not yet decidable", "not at convergence")):
        return row["verdict"]
    return "too few pairs for an interval"


def _summary(pairs: list[dict[str, Any]]) -> str:
    """The section's answer first: which biases are shown, which stay below their detection limit, what waits."""
    def named(rows: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['bias']} ({r['optimizer']}, ({r['micro_batch_size']},{r['accumulation_steps']}): "
                         f"{_effect(r)} {r['metric']})" for r in rows)

    tests = [r for r in pairs if r["verdict"] != "a check"]
    shown = [r for r in tests if r["verdict"] == "a bias"]
    below = [r for r in tests if r["verdict"] == "below the detection limit"]
    waiting = [r for r in tests if r["verdict"].startswith("not yet decidable")]
    unjudgeable = [r for r in tests if r["verdict"] == "too few pairs"]
    parts = [f"**In short.** Of {len(tests)} comparisons of a bias with its fix, {len(shown)} "
             f"{'shows' if len(shown) == 1 else 'show'} a bias at the end of training"
             + (f": {named(shown)}" if shown else "")]
    if below:
        limits = []
        for metric in dict.fromkeys(r["metric"] for r in below):  # metrics do not share a scale
            lo, hi = (f"{f(r['detection_limit'] for r in below if r['metric'] == metric):.4f}" for f in (min, max))
            limits.append(f"{lo if lo == hi else f'{lo}–{hi}'} {metric}")
        parts.append(f"{len(below)} {'stays' if len(below) == 1 else 'stay'} below the detection limit "
                     f"(largest |effect| the intervals leave possible: {', '.join(limits)})")
    if waiting:
        parts.append(f"{len(waiting)} {'waits' if len(waiting) == 1 else 'wait'} for pairs "
                     f"({sum(r['n'] for r in waiting)} of {sum(r['planned'] for r in waiting)} finished)")
    if unjudgeable:
        parts.append(f"{len(unjudgeable)} cannot be judged (fewer than 2 usable pairs)")
    off = [r for r in tests if r["verdict"].startswith("not at convergence")]
    if off:
        parts.append(f"{len(off)} {'is' if len(off) == 1 else 'are'} not at convergence, as their reference runs did not "
                     "all reach the grid's bar: "
                     + ", ".join(f"{r['bias']} ({r['optimizer']}, ({r['micro_batch_size']},{r['accumulation_steps']}): "
                                 f"{r['reference_below_bar']} of {r['n']})" for r in off))
    return "; ".join(parts) + "."


def markdown(studies: list[BiasStudy], pairs: list[dict[str, Any]], head: str, figures: dict[str, str]) -> str:
    """The section "The real biases at convergence": the answer in one paragraph, a summary table, then one
    subsection per bias."""
    lines = [header(head, markdown=True), "", "## The real biases at the end of training", "", _summary(pairs), ""]
    for s in studies:
        done = len(s.runs)
        thr = "; ".join(f"{t} {m} ≥ {v:g}" for t, mv in s.thresholds.items() for m, v in mv.items())
        refs = [r for r in s.runs if r.arm in set(s.comparisons.values())]
        below = [r for r in refs for t, mv in s.thresholds.items() for m, v in mv.items()
                 if r.task == t and r.metric_name == m and not r.metric >= v]
        bar = (f"reference bar {thr}: {len(refs) - len(below)} of {len(refs)} finished reference runs clear it"
               + (f" ({len(below)} below it, kept in the tables)" if below else "") if thr
               else "no reference bar stated in the grid file")
        lines.append(f"- Grid `{s.grid_file}` (runs `{s.name}`): {done} of {len(s.planned)} planned runs finished, "
                     f"{len(s.unfinished)} started and unfinished; {bar}{_baseline_text(s)}.")
        lines += _settings_text(s)
        lines += [f"  - Design change after runs had started (recorded in the grid file under `changes`): "
                  f"{' '.join(c.split())}" for c in s.changes]
    lines += ["", "Paired differences arm − reference of the final dev metric (same task, (B, N), head "
              "initialisation, data order and dropout seed; mean and 95% Student-t interval). A comparison is made at "
              "convergence when all its reference runs reach the grid's reference bar (fixed before the runs); one "
              "whose reference runs did not all reach it is shown with its interval but claims nothing (`not at "
              "convergence`). A bias is claimed when the "
              "t test of zero mean, Holm-adjusted over all the comparisons below, gives p < 0.05; otherwise the "
              "*detection limit* is stated: the largest |effect| the 95% interval leaves possible. *Parameter distance*: "
              "||θ_arm − θ_ref|| / ||θ_ref − θ_0|| at the end (parameter fingerprints), mean over pairs; — where the grid "
              "file asks for no fingerprints (`fingerprint_steps`). *Clipped*: fraction of optimizer steps where "
              "gradient clipping acted.", "",
              "| bias | optimizer | task | (B, N) | pairs / planned | reference | arm − reference [95% CI] | reading | "
              "clipped (arm / ref) | final LR (arm / ref) | parameter distance |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in pairs:
        reference = f"{fmt(r['reference_mean'])} {r['metric']}".strip()
        lines.append(
            f"| {r['bias']} | {r['optimizer']} | {r['task']} | ({r['micro_batch_size']},{r['accumulation_steps']}) | "
            f"{_n_of(r)} | {reference} | {_effect(r)} | {_reading(r)} | "
            f"{fmt(r['clipped_fraction_arm'], 2)} / {fmt(r['clipped_fraction_reference'], 2)} | "
            f"{fmt(r['final_lr_arm'], 3)} / {fmt(r['final_lr_reference'], 3)} | {fmt(r['param_distance'], 3)} |")
    for key, fig in figures.items():
        lines += ["", f"![{key}]({fig})"]
    for bias, text in BIASES.items():
        mine = [r for r in pairs if r["bias"] == bias]
        if not mine:
            continue
        lines += ["", f"### {text['title']}", "", f"**Mechanism.** {text['mechanism']}", ""]
        for r in mine:
            extra = ""
            if bias == "mean_of_means" and not math.isnan(r["items_cv_within_window"]):
                extra = (f" Masked tokens per micro-batch: {r['items_per_micro_batch']:.1f} on average, spread within a "
                         f"window (coefficient of variation) {r['items_cv_within_window']:.3f}.")
                if min(r["clipped_fraction_arm"], r["clipped_fraction_reference"]) >= ALWAYS_CLIPPED:
                    # Clipping on every step rescales each window's gradient to the same norm, which removes any
                    # difference in gradient size between the two normalisations: what is left is token weighting.
                    extra += (f" Clipping acted on {r['clipped_fraction_arm']:.0%} / "
                              f"{r['clipped_fraction_reference']:.0%} of optimizer steps (arm / reference), so every "
                              "step had the same gradient norm in both: the comparison is of how the window weights "
                              "its tokens (the gradient's direction), not of the step's size.")
            if bias == "clip_per_micro_batch" and r["n"] and r.get("max_grad_norm"):
                # The bug only acts where clipping binds: state the threshold and how often it did, in both arms.
                extra = (f" Threshold max_grad_norm {r['max_grad_norm']}: the reference clipped its window's gradient "
                         f"on {r['clipped_fraction_reference']:.0%} of optimizer steps, the arm (clipping after every "
                         f"micro-batch) on {r['clipped_fraction_arm']:.0%} (a step counts when any of its micro-batch "
                         "clips acted).")
            where = f"- {r['optimizer']}, {r['task']} ({r['micro_batch_size']},{r['accumulation_steps']})"
            if r["n"] == 0:
                lines.append(f"{where}: {r['arm']} − {r['reference']}: {_reading(r)}.")
                continue
            lines.append(f"{where}, pairs {_n_of(r)}: {r['arm']} − {r['reference']} = {_effect(r)} "
                         f"{r['metric']}: {_reading(r)}." + extra)
        lines += ["", f"**Fix.** {text['fix']}"]
    lines.append("")
    return "\n".join(lines)


def run_study(pairs_of: list[tuple[Path, Path]], output_dir: Path, command: str | None = None,
              glue_dir: str | None = None) -> dict[str, Path]:
    """Read every (runs folder, grid file), write the tables, figures and biases.md to `output_dir`; `glue_dir`
    is where masked-LM dev data is read for the trivial baseline when the runs' own data source is not here."""
    studies = [load_study(d, g) for d, g in pairs_of]
    for s in studies:
        s.baselines = trivial_baselines(s, glue_dir)
    head = provenance(command)
    output_dir.mkdir(parents=True, exist_ok=True)
    pairs = [row for s in studies for row in pair_rows(s)]
    lrs = [row for s in studies for row in lr_rows(s)]
    references = {(s.name, ref) for s in studies for ref in s.comparisons.values()}
    curves = [row for s in studies for row in curve_rows(s)]
    files = {"pairs": output_dir / "paired.csv", "lr": output_dir / "lr.csv", "curves": output_dir / "curves.csv",
             "markdown": output_dir / "biases.md"}
    write_csv(files["pairs"], pairs, head, PAIR_COLUMNS)
    write_csv(files["lr"], lrs, head, LR_COLUMNS)
    write_csv(files["curves"], curves, head, CURVE_COLUMNS)
    figures = {}
    if lrs:
        files["lr_figure"] = _small_multiples(
            lrs, "optimizer_step", "learning_rate", ("optimizer", "micro_batch_size", "accumulation_steps"),
            output_dir / "lr.png", head, "learning rate", lambda p: f"{p[0]}, B={p[1]} x N={p[2]} (first seed)",
            references)
        figures["Learning rate per optimizer step, every arm"] = files["lr_figure"].name
    if curves:
        files["curves_figure"] = _small_multiples(
            curves, "optimizer_step", "value_mean", ("task", "metric", "micro_batch_size", "accumulation_steps"),
            output_dir / "curves.png", head, "dev metric (seed mean)", lambda p: f"{p[0]} {p[1]}, B={p[2]} x N={p[3]}",
            references, _guides(studies))
        figures["Dev metric over training, seed means, every arm"] = files["curves_figure"].name
    files["markdown"].write_text(markdown(studies, pairs, head, figures))
    return files
