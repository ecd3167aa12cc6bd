"""The report's numbers: one pass over the studies, the probe tables and the early-training tables into one flat
dict of named values, written beside the report as numbers.json so every sentence can be checked.

Keys are dotted paths, values numbers, strings, booleans, None or lists of them ([lo, hi] for a range). The main
prefixes (``<s>`` a converged study, ``<t>`` a task, ``e<E>`` an effective batch, ``<arm>.B<B>_N<N>`` a cell):

  provenance                         the report's `command: ... | git_commit: ...`
  toy.*                              the toy example
  studies.converged / studies.early  study names
  <s>.planned/finished/unfinished/missing, <s>.missing_names, <s>.unfinished_names, <s>.setup.*
  <s>.<t>.setup.*                    how the runs were made, from config.json / environment.json / final_metrics.json
                                     (setup.arm.<arm>.seeds / seed_offsets: grid seeds started, resolved seeds' offsets)
  <s>.<t>.probe_tables               probe tables of the same task and objective
  <s>.<t>.metric/margin/threshold/baseline/baseline_rule/baseline_labels, <s>.<t>.E (list)
  <s>.<t>.e<E>.cells / .pairs / .floors           lists of the labels below
  <s>.<t>.e<E>.cell.<arm>.B<B>_N<N>.*             runs of a cell: planned, finished, unfinished, missing, diverged,
                                                   failed, failure_rate, mean, sd, metrics, seeds, curve.*; and for
                                                   an (E, 1) reference: cleared (of finished) its threshold
  <s>.<t>.e<E>.pair.<arm>.B<B>_N<N>.*             (B, N) - (E, 1) paired by seed: seeds, diffs, n, required,
                                                   headline, tost.* (stats.Tost), verdict (gated by n), spread.*
                                                   (stats.Spread against the dropout-only floor), disagreement.*
  <s>.<t>.e<E>.floor.<kind>.*                     (E, 1) with other seeds - (E, 1): arm, reference_arm, varied,
                                                   seeds, diffs, mean, sd, abs_mean, disagreement.*
  probe.tables, probe.<table>.task/objective/arms, probe.<table>.<arm>.ratio/rel_l2/kind
  cause.ids, cause.<id>.probe_arm/switch/systematic_in/random_in/roundoff_in
  switches.<arm>                     `--field value` settings that turn a headline run into that arm's run
  early.studies, early.<study>.*, early.arm.<arm>.*, early.bugs
  batchnorm.*, answer.*              the first five lines of the report
  biases.*                           the bias study at the end of training (bias-study's paired.csv), when given:
                                     present, comparisons, shown (bias, optimizer, B, N, effect and 95% interval),
                                     below (per bias and metric: detection-limit range), not_at_convergence (reference runs below the
                                     grid's bar), waiting, waiting_pairs_finished/planned
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ..controls.bugs import canonical_bug_names
from ..errors import BertAccumError
from . import stats
from .plumbing import mean_std, t_interval
from .report import (BATCH_FACTOR, SEED_DIR, SEED_FIELDS, ConvergedStudy, EarlyStudy, Run, arm_rank, cell_identity, check_pair,
                     toy_example)

# Headline pairs (the arm users run) need this many seeds before the report states any verdict on them.
HEADLINE_MIN_N = 10
# A deterministic cause whose one-step relative L2 stays within this factor of the fp32 round-off of the
# everything-off arm is round-off, beyond it systematic.
ROUND_OFF_FACTOR = 10.0
# Floor kinds, named by the seeds the floor run changes against its (E, 1) reference.
FLOOR_KINDS = {frozenset({"dropout_seed"}): "dropout", frozenset({"data_seed"}): "data", frozenset({"seed"}): "init",
               frozenset(SEED_FIELDS): "all"}
FLOOR_ORDER = ("dropout", "data", "init", "all")
# The causes, each with the probe arm that switches it on alone and the switch that removes it.
CAUSES = (
    ("dropout", "controlled_dropout_standard", "--dropout invariant"),
    ("padding", "controlled_padding_dynamic", "--padding window"),
    ("loss_averaging", "controlled_loss_mean_of_means", "--loss_normalization global"),
    ("fp32_order", "controlled", "--precision fp64"),
    ("bf16", "controlled_bf16", "--precision fp32"),
)
# A pair whose training losses differ by less than this at the first optimizer step starts at fp32 round-off (the
# one-step probe measures 1e-7 relative for the exact arm; a dropout re-seed 1e-3 and more).
ROUNDOFF_FIRST_STEP = 1e-5
# Settings printed in the "how the runs were made" section.
SETUP_FIELDS = ("model_name_or_path", "max_length", "optim", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                "weight_decay",
                "max_grad_norm", "precision", "num_train_epochs", "max_train_samples", "max_train_examples",
                "max_eval_samples", "glue_dir", "train_file", "validation_file", "per_device_eval_batch_size")
PACKAGES = ("torch", "transformers", "accelerate", "datasets")


def cell_label(arm: str, b: int, n: int, w: int = 1) -> str:
    """`<arm>.B<B>_N<N>` (with `_W<W>` for several processes)."""
    return f"{arm}.B{b}_N{n}" + (f"_W{w}" if w != 1 else "")


def one_or_list(values: Iterable[Any]) -> Any:
    """The single value of `values`, or the sorted list of its distinct values (None when empty)."""
    distinct = sorted({json.dumps(v, sort_keys=True) for v in values})
    vals = [json.loads(v) for v in distinct]
    return None if not vals else vals[0] if len(vals) == 1 else vals


def span(values: Iterable[float]) -> list[float] | None:
    """[min, max] of the finite values, None when there is none."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return [min(vals), max(vals)] if vals else None


def _put(nums: dict[str, Any], prefix: str, **values: Any) -> None:
    for k, v in values.items():
        nums[f"{prefix}.{k}"] = v


def to_json(nums: dict[str, Any]) -> str:
    """numbers.json: NaN and infinities as null (JSON has neither), keys in order."""
    def clean(v: Any) -> Any:
        """A value JSON can hold."""
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps({k: clean(v) for k, v in sorted(nums.items())}, indent=1, allow_nan=False) + "\n"


# ------------------------------------------------------------------------------------------ everything
def compute(converged: list[ConvergedStudy], early: list[EarlyStudy], probes: dict[str, list[dict[str, Any]]],
            batchnorm_dir: Path | None, provenance_text: str, glue_dir: str | None = None,
            bias_pairs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The numbers dict of a report (see the module docstring for its keys); `bias_pairs` are the rows of a bias
    study's paired.csv (`report.read_bias_pairs`)."""
    nums: dict[str, Any] = {"provenance": provenance_text}
    toy = toy_example()
    _put(nums, "toy", batch_grad=toy["batch_grad"], accumulated_first=toy["accumulated"][0],
         accumulated=toy["accumulated"][1], w_accumulated=toy["w_accumulated"], w_batch=toy["w_batch"])
    nums["studies.converged"] = [c.name for c in converged]
    nums["studies.early"] = [e.name for e in early]
    for c in converged:
        _converged(nums, c, glue_dir)
    _record_switches(nums, converged)
    _probes(nums, probes)
    _task_probes(nums)
    _early(nums, early)
    _batchnorm(nums, batchnorm_dir)
    _biases(nums, bias_pairs)
    _answer(nums)
    return nums


def _biases(nums: dict[str, Any], rows: list[dict[str, Any]] | None) -> None:
    """biases.*: which biases the bias study shows at the end of training, which stay below their detection limit,
    and how many comparisons still wait for pairs (its checks, a backend against the loop, are no test of a bias)."""
    nums["biases.present"] = rows is not None
    if rows is None:
        return
    tests = [r for r in rows if r["verdict"] != "a check"]
    shown = [{"bias": r["bias"], "optimizer": r["optimizer"], "micro_batch_size": r["micro_batch_size"],
              "accumulation_steps": r["accumulation_steps"], "metric": r["metric"], "n": r["n"],
              "mean_diff": r["mean_diff"], "ci95": [r["ci95_lo"], r["ci95_hi"]], "p_holm": r["p_holm"]}
             for r in tests if r["verdict"] == "a bias"]
    # A comparison whose pairs all ended on the same final metric has no interval to quote (its limit is 0): it is
    # counted apart, so a range like ±0.0000–0.0086 never mixes "identical" with "not detectable".
    below: dict[tuple[str, str], list[float]] = defaultdict(list)
    identical: dict[tuple[str, str], int] = defaultdict(int)
    for r in tests:
        if r["verdict"] == "below the detection limit":
            key = (r["bias"], r["metric"])
            if r["max_abs_diff"] == 0:
                identical[key] += 1
            else:
                below[key].append(r["detection_limit"])
    below_keys = list(dict.fromkeys(
        (r["bias"], r["metric"]) for r in tests if r["verdict"] == "below the detection limit"))
    waiting = [r for r in tests if r["verdict"].startswith("not yet decidable")]
    _put(nums, "biases", comparisons=len(tests), shown=shown,
         below=[{"bias": b, "metric": m, "limit": span(below[(b, m)]),
                 "comparisons": len(below[(b, m)]) + identical[(b, m)], "identical": identical[(b, m)]}
                for b, m in below_keys],
         waiting=len(waiting), waiting_pairs_finished=sum(r["n"] for r in waiting),
         waiting_pairs_planned=sum(r["planned"] for r in waiting),
         too_few=sum(r["verdict"] == "too few pairs" for r in tests),
         not_at_convergence=[{"bias": r["bias"], "optimizer": r["optimizer"], "micro_batch_size": r["micro_batch_size"],
                              "accumulation_steps": r["accumulation_steps"], "below": r["reference_below_bar"],
                              "n": r["n"]} for r in tests if r["verdict"].startswith("not at convergence")])


# ------------------------------------------------------------------------------------------ converged
def _converged(nums: dict[str, Any], c: ConvergedStudy, glue_dir: str | None) -> None:
    p = c.name
    finished = {str(r.path.relative_to(c.root)): r for r in c.runs}
    unfinished = set(c.unfinished)
    missing = [cell.name for cell in c.planned if cell.name not in finished and cell.name not in unfinished]
    tasks = sorted({cell.task for cell in c.planned} | {r.task for r in c.runs})
    _put(nums, p, grid=c.grid_file, root=str(c.root), tasks=tasks, planned=len(c.planned), finished=len(finished),
         unfinished=len(unfinished), missing=len(missing), missing_names=sorted(missing),
         unfinished_names=sorted(unfinished), headline_arms=c.headline_arms, changes=c.changes)
    _study_setup(nums, p, c)
    for task in tasks:
        _task(nums, c, task, glue_dir)


def _started_configs(c: ConvergedStudy, task: str) -> list[dict[str, Any]]:
    """config.json of every started run of `task` (finished or not)."""
    return [cfg for cfg, _ in c.started if cfg.get("derived", {}).get("task", cfg.get("task_name")) == task]


def _study_setup(nums: dict[str, Any], p: str, c: ConvergedStudy) -> None:
    runs = c.runs
    envs = [env for _, env in c.started]
    _put(nums, f"{p}.setup", runs=len(runs), started=len(c.started),
         devices=one_or_list(e.get("device_name") or e.get("device") for e in envs if e),
         commits=one_or_list(e.get("git_commit") for e in envs if e),
         python=one_or_list(e.get("python") for e in envs if e),
         threads=one_or_list(e.get("torch_num_threads") for e in envs if e),
         train_hours=sum(float(r.final.get("train_seconds") or 0.0) for r in runs) / 3600)
    for pkg in PACKAGES:
        nums[f"{p}.setup.package.{pkg}"] = one_or_list(e.get("packages", {}).get(pkg) for e in envs if e)


def _task(nums: dict[str, Any], c: ConvergedStudy, task: str, glue_dir: str | None) -> None:
    from ..core.tasks import get_task

    t = f"{c.name}.{task}"
    runs = [r for r in c.runs if r.task == task]
    planned = [cell for cell in c.planned if cell.task == task]
    configs = _started_configs(c, task)
    metric = runs[0].metric_name if runs else get_task(task).main_metric
    labels, source = dev_labels(task, configs, glue_dir)
    baseline = stats.trivial_baseline(metric, labels)
    rule = ("constant" if metric in stats.ZERO_BASELINE_METRICS else "majority" if metric == "accuracy" and labels
            else "positive" if metric == "f1" and labels else "unknown")
    _put(nums, t, metric=metric, margin=c.margins.get(task, {}).get(metric, math.nan),
         threshold=c.thresholds.get(task, {}).get(metric, math.nan), baseline=baseline, baseline_rule=rule,
         baseline_labels=len(labels or []), baseline_source=source,
         regression=get_task(task).is_regression,
         objective=one_or_list(cfg.get("objective", "classification") for cfg in configs) or "classification")
    for k in SETUP_FIELDS:
        nums[f"{t}.setup.{k}"] = one_or_list(cfg.get(k) for cfg in configs)
    nums[f"{t}.setup.model_path"] = one_or_list("/".join(Path(str(cfg.get("derived", {}).get("model_path"))).parts[-2:])
                                                for cfg in configs)
    nums[f"{t}.setup.dev_examples"] = one_or_list(r.final.get("eval", {}).get("num_examples") for r in runs)
    _arm_seeds(nums, t, configs)

    # Runs keyed by (arm, B, N, W, cell seed); planned cells by (arm, B, N, seed) (a grid plans W = 1).
    by_cell: dict[tuple, dict[int, Run]] = defaultdict(dict)
    for r in runs:
        by_cell[(r.arm, r.micro_batch_size, r.accumulation_steps, r.num_processes)][r.cell_seed] = r
    plan: dict[tuple, dict[int, Any]] = defaultdict(dict)
    for cell in planned:
        plan[(cell.arm, cell.micro_batch_size, cell.accumulation_steps, 1)][cell.seed] = cell
    unfinished = defaultdict(set)
    for name in c.unfinished:
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == task:
            b, n = (int(x[1:]) for x in parts[2].split("_"))
            unfinished[(parts[1], b, n, 1)].add(int(parts[3][4:]))
    keys = set(by_cell) | set(plan)
    main_arms = sorted({k[0] for k in keys if k[2] > 1}, key=arm_rank)
    Es = sorted({k[1] * k[2] * k[3] for k in keys})
    nums[f"{t}.E"] = Es
    for E in Es:
        e = f"{t}.e{E}"
        here = [cfg["derived"] for cfg in configs if cfg.get("derived", {}).get("effective_batch_size") == E]
        for k in ("train_examples", "total_optimizer_steps", "num_warmup_steps", "epochs"):
            nums[f"{e}.setup.{k}"] = one_or_list(d.get(k) for d in here)
        # A run capped by max_train_examples stops inside its first epoch; "1 epoch" would overstate it.
        nums[f"{e}.setup.epochs_trained"] = one_or_list(
            round(d["total_optimizer_steps"] / d["optimizer_steps_per_epoch"], 3) for d in here
            if d.get("total_optimizer_steps") and d.get("optimizer_steps_per_epoch"))
        at_e = sorted((k for k in keys if k[1] * k[2] * k[3] == E), key=lambda k: (*arm_rank(k[0]), k[2], -k[1]))
        nums[f"{e}.cells"] = [cell_label(*k) for k in at_e]
        for k in at_e:
            _cell(nums, f"{e}.cell.{cell_label(*k)}", k, by_cell.get(k, {}), plan.get(k, {}), unfinished.get(k, set()),
                  baseline, nums[f"{t}.threshold"], is_reference=k[0] in main_arms and k[2] == 1)
        floors = _floors(nums, e, at_e, main_arms, by_cell, plan, get_task(task).is_regression, nums[f"{t}.margin"])
        pairs = []
        for k in at_e:
            if k[0] in main_arms and k[2] > 1:
                ref = (k[0], E // k[3], 1, k[3])
                label = cell_label(*k)
                pairs.append(label)
                _pair(nums, f"{e}.pair.{label}", by_cell.get(k, {}), by_cell.get(ref, {}),
                      set(plan.get(k, {})) & set(plan.get(ref, {})), nums[f"{t}.margin"],
                      headline=k[0] in c.headline_arms, regression=get_task(task).is_regression)
                _put(nums, f"{e}.pair.{label}", task=task, task_prefix=t, E=E)
                _against_floor(nums, f"{e}.pair.{label}", floors.get((k[0], "dropout")) or _only_dropout_floor(floors))
        nums[f"{e}.pairs"] = pairs


def _arm_seeds(nums: dict[str, Any], t: str, configs: list[dict[str, Any]]) -> None:
    """Per arm of the started runs: their grid seeds (the seed<k> folder of their output_dir) and each resolved seed
    relative to it, from config.json."""
    arms: dict[str, dict[str, set]] = defaultdict(lambda: {"seeds": set(), "offsets": set()})
    for cfg in configs:
        parts = Path(str(cfg.get("output_dir") or "")).parts
        m = SEED_DIR.match(parts[-1]) if len(parts) >= 3 else None
        if m is None:
            continue
        seed, resolved = int(m.group(1)), cfg.get("derived", {}).get("seeds", {})
        arms[parts[-3]]["seeds"].add(seed)
        arms[parts[-3]]["offsets"].add(tuple(f"{f} {resolved[f] - seed:+d}" for f in SEED_FIELDS if f in resolved))
    nums[f"{t}.setup.arms"] = sorted(arms, key=arm_rank)
    for arm, v in arms.items():
        _put(nums, f"{t}.setup.arm.{arm}", seeds=sorted(v["seeds"]), seed_offsets=one_or_list(list(o) for o in v["offsets"]))


def _task_probes(nums: dict[str, Any]) -> None:
    """<s>.<t>.probe_tables: the probe tables of the same task and objective as a converged study's runs (a probe
    of another task never stands in for this one)."""
    for s in nums["studies.converged"]:
        for task in nums[f"{s}.tasks"]:
            objective = nums[f"{s}.{task}.objective"]
            nums[f"{s}.{task}.probe_tables"] = [name for name in nums["probe.tables"] if nums[f"probe.{name}.task"] == task
                                                and nums[f"probe.{name}.objective"] == objective]


def data_source(cfg: dict[str, Any], glue_dir: str | None) -> tuple[dict[str, Any], str] | None:
    """Where a run's dev data can be read on this machine: (data keyword arguments, folder or file), from the run's own
    GLUE folder or user files when they are here, else `glue_dir`; None when neither is."""
    if cfg.get("glue_dir") and Path(cfg["glue_dir"]).is_dir():
        return {"glue_dir": cfg["glue_dir"]}, cfg["glue_dir"]
    if cfg.get("train_file") and cfg.get("validation_file") and Path(cfg["validation_file"]).is_file():
        return ({"train_file": cfg["train_file"], "validation_file": cfg["validation_file"],
                 "label_column_name": cfg.get("label_column_name")}, cfg["validation_file"])
    if glue_dir:
        return {"glue_dir": glue_dir}, glue_dir
    return None


def dev_labels(task: str, configs: list[dict[str, Any]], glue_dir: str | None) -> tuple[list | None, str]:
    """The first evaluation split's labels (first max_eval_samples of them) from the runs' own data source when it
    is on this machine, else from `glue_dir`; (None, "none") when neither is readable."""
    from ..core.data import load_eval_labels
    from ..core.tasks import get_task

    spec = get_task(task)
    cfg = configs[0] if configs else {}
    source = data_source(cfg, glue_dir)
    if source is None or spec.is_regression:
        return None, "none"
    kwargs, where = source
    labels = load_eval_labels(spec, **kwargs)[spec.eval_splits[0]]
    limit = cfg.get("max_eval_samples")
    return (labels[:limit] if limit else labels), where


def _cell(nums: dict[str, Any], key: str, k: tuple, runs: dict[int, Run], plan: dict[int, Any],
          unfinished: set[int], baseline: float, threshold: float, is_reference: bool) -> None:
    arm, b, n, w = k
    seeds = sorted(runs)
    metrics = [runs[s].metric for s in seeds]
    m, sd = mean_std(metrics)
    diverged = [s for s in seeds if runs[s].final.get("status", "completed") != "completed" or not math.isfinite(runs[s].metric)]
    failed = [s for s in seeds if stats.failed(runs[s].metric, baseline)]
    planned = sorted(plan)
    _put(nums, key, arm=arm, B=b, N=n, W=w, reference=is_reference, planned=len(planned), finished=len(seeds),
         unfinished=len(unfinished - set(seeds)), missing_seeds=sorted(set(planned) - set(seeds) - unfinished),
         unfinished_seeds=sorted(unfinished - set(seeds)), seeds=seeds, metrics=metrics, mean=m, sd=sd,
         diverged=len(diverged), failed=len(failed), failed_seeds=failed,
         failure_rate=len(failed) / len(seeds) if seeds else math.nan,
         median_train_seconds=statistics.median([float(runs[s].final.get("train_seconds") or math.nan) for s in seeds]) if seeds else math.nan,
         median_examples_per_second=statistics.median([float(runs[s].final.get("examples_per_second") or math.nan) for s in seeds]) if seeds else math.nan)
    clipped = [float(runs[s].final["clipped_fraction"]) for s in seeds
               if isinstance(runs[s].final.get("clipped_fraction"), (int, float))]
    nums[f"{key}.clipped_fraction"] = statistics.fmean(clipped) if clipped else math.nan
    nums[f"{key}.missing"] = len(nums[f"{key}.missing_seeds"])
    if is_reference:
        cleared = [s for s in seeds if math.isfinite(threshold) and runs[s].metric >= threshold]
        _put(nums, key, cleared=len(cleared), below_threshold_seeds=[s for s in seeds if s not in cleared] if math.isfinite(threshold) else [])
    steps: dict[int, list[float]] = defaultdict(list)
    metric_name = runs[seeds[0]].metric_name if seeds else ""
    for s in seeds:
        for row in runs[s].evals:
            if isinstance(row.get(metric_name), (int, float)):
                steps[int(row["optimizer_step"])].append(float(row[metric_name]))
    _put(nums, f"{key}.curve", steps=sorted(steps), mean=[statistics.fmean(steps[x]) for x in sorted(steps)],
         n=[len(steps[x]) for x in sorted(steps)])


def _preds_gap(a: Run, b: Run, regression: bool) -> float:
    pa, pb = a.final_predictions, b.final_predictions
    if pa is None or pb is None:
        return math.nan
    if len(pa) != len(pb):
        raise BertAccumError(f"{a.path} and {b.path} predict {len(pa)} and {len(pb)} dev examples: not the same dev set")
    return stats.disagreement(pa, pb, regression)


def _disagreement(nums: dict[str, Any], key: str, gaps: list[float]) -> None:
    vals = [g for g in gaps if math.isfinite(g)]
    m, sd = mean_std(vals)
    _put(nums, f"{key}.disagreement", values=vals, n=len(vals), mean=m, sd=sd)


def _pair(nums: dict[str, Any], key: str, runs: dict[int, Run], refs: dict[int, Run], planned: set[int], margin: float,
          headline: bool, regression: bool) -> None:
    """(B, N) - (E, 1) by cell seed: TOST, gated verdict, disagreement."""
    seeds = sorted(set(runs) & set(refs))
    for s in seeds:
        check_pair(runs[s], refs[s], BATCH_FACTOR)
    ok = [s for s in seeds if math.isfinite(runs[s].metric) and math.isfinite(refs[s].metric)]
    diffs = [runs[s].metric - refs[s].metric for s in ok]
    result = stats.tost(diffs, margin)
    required = max(len(planned), HEADLINE_MIN_N if headline else 0, 2)
    _put(nums, key, seeds=ok, diffs=diffs, metrics=[runs[s].metric for s in ok], reference_metrics=[refs[s].metric for s in ok],
         n=result.n, planned=len(planned), required=required, headline=headline,
         missing_seeds=sorted(planned - set(ok)), verdict=stats.gated_verdict(result.verdict, result.n, required),
         decided=result.n >= required)
    for f, v in result.as_dict().items():
        nums[f"{key}.tost.{f}"] = v
    _disagreement(nums, key, [_preds_gap(runs[s], refs[s], regression) for s in ok])
    # How far apart the two runs train, step by step: the first optimizer step whose training loss differs by more
    # than 1e-4 and 1e-2 relative (None: never). An exact arm matches every step to fp32 round-off, and over a long
    # run that round-off can still grow until the pair parts.
    gaps = [loss_gaps(runs[s], refs[s]) for s in ok]
    _put(nums, f"{key}.trajectory", steps=[len(g) for g in gaps],
         apart_1e4=[first_above(g, 1e-4) for g in gaps], apart_1e2=[first_above(g, 1e-2) for g in gaps],
         max_rel=[max((x for _, x in g), default=math.nan) for g in gaps],
         first_rel=[g[0][1] if g else math.nan for g in gaps])


def loss_gaps(a: Run, b: Run) -> list[tuple[int, float]]:
    """(optimizer step, |loss_a - loss_b| / |loss_b|) at every optimizer step both runs recorded."""
    la = {r["optimizer_step"]: r.get("loss") for r in a.steps}
    out = []
    for r in b.steps:
        x, y = la.get(r["optimizer_step"]), r.get("loss")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y) and y:
            out.append((int(r["optimizer_step"]), abs(x - y) / abs(y)))
    return out


def first_above(gaps: list[tuple[int, float]], threshold: float) -> int | None:
    """The optimizer step at which the loss gap first exceeds `threshold`, None if it never does."""
    return next((step for step, g in gaps if g > threshold), None)


def _floors(nums: dict[str, Any], e: str, at_e: list[tuple], main_arms: list[str], by_cell: dict, plan: dict,
            regression: bool, margin: float) -> dict[tuple[str, str], str]:
    """Noise floors at this E: each arm with only (E, 1) cells against the main arm whose planned runs differ from
    it only in seeds, judged by the pairs' TOST too (what re-seeding alone can be shown to be).
    Returns {(reference arm, kind): key}."""
    out: dict[tuple[str, str], str] = {}
    kinds = []
    for k in at_e:
        arm, b, n, w = k
        if arm in main_arms or n != 1:
            continue
        ref_arm, varied = _floor_reference(k, main_arms, plan)
        if ref_arm is None:
            continue
        kind = FLOOR_KINDS.get(frozenset(varied), "+".join(sorted(varied)))
        key = f"{e}.floor.{kind}"
        if key in nums:
            raise BertAccumError(f"two floor arms of kind {kind} at {e}: {nums[key + '.arm']} and {arm}")
        runs, refs = by_cell.get(k, {}), by_cell.get((ref_arm, b, n, w), {})
        seeds = sorted(set(runs) & set(refs))
        for s in seeds:
            check_pair(runs[s], refs[s], varied)
        ok = [s for s in seeds if math.isfinite(runs[s].metric) and math.isfinite(refs[s].metric)]
        diffs = [runs[s].metric - refs[s].metric for s in ok]
        m, sd = mean_std(diffs)
        am, asd = mean_std([abs(d) for d in diffs])
        planned = len(set(plan.get(k, {})) & set(plan.get((ref_arm, b, n, w), {})))
        result = stats.tost(diffs, margin)
        nums[key] = kind
        _put(nums, key, arm=arm, reference_arm=ref_arm, varied=sorted(varied), seeds=ok, diffs=diffs, n=len(diffs),
             planned=planned, mean=m, sd=sd, abs_mean=am, abs_sd=asd,
             verdict=stats.gated_verdict(result.verdict, result.n, max(planned, 2)))
        for f, v in result.as_dict().items():
            nums[f"{key}.tost.{f}"] = v
        _disagreement(nums, key, [_preds_gap(runs[s], refs[s], regression) for s in ok])
        out[(ref_arm, kind)] = key
        kinds.append(kind)
    nums[f"{e}.floors"] = sorted(kinds, key=lambda x: FLOOR_ORDER.index(x) if x in FLOOR_ORDER else len(FLOOR_ORDER))
    # A floor measured on fewer seeds is compared with the dropout-only floor on those same seeds.
    dropout = f"{e}.floor.dropout"
    by_seed = dict(zip(nums.get(f"{dropout}.seeds", []), nums.get(f"{dropout}.diffs", [])))
    for kind in kinds:
        key = f"{e}.floor.{kind}"
        same = [abs(by_seed[s]) for s in nums[f"{key}.seeds"] if s in by_seed]
        nums[f"{key}.dropout_abs_mean_same_seeds"] = statistics.fmean(same) if same else math.nan
    return out


def _floor_reference(k: tuple, main_arms: list[str], plan: dict) -> tuple[str | None, set[str]]:
    """The main arm whose planned (E, 1) cell of the same seed differs from the floor's only in seeds, and those
    seeds; (None, set()) when none does. Two such arms are ambiguous and refused."""
    arm, b, n, w = k
    mine = plan.get(k, {})
    found = []
    for ref_arm in main_arms:
        theirs = plan.get((ref_arm, b, n, w), {})
        common = sorted(set(mine) & set(theirs))
        if not common:
            continue
        a, r = cell_identity(mine[common[0]]), cell_identity(theirs[common[0]])
        diff = {f for f in set(a) | set(r) if a.get(f) != r.get(f)}
        if diff and diff <= set(SEED_FIELDS):
            found.append((ref_arm, diff))
    if len(found) > 1:
        raise BertAccumError(f"floor arm {arm} matches several reference arms ({', '.join(a for a, _ in found)})")
    return found[0] if found else (None, set())


def _only_dropout_floor(floors: dict[tuple[str, str], str]) -> str | None:
    keys = [v for (_, kind), v in floors.items() if kind == "dropout"]
    return keys[0] if len(keys) == 1 else None


def _against_floor(nums: dict[str, Any], key: str, floor: str | None) -> None:
    """Spread and mean of a pair's differences against the dropout-only floor, and the disagreement ratio.

    A pair of the floor's own reference arm shares its (E, 1) runs with the floor: the two are compared seed by seed
    (Pitman-Morgan for the spread, a paired t test for the mean). A pair of another arm has its own (E, 1) runs:
    its spread is compared as an independent sample and its mean against 0, as a mean against the floor's would mix
    two references."""
    floor_diffs = nums.get(f"{floor}.diffs", []) if floor else []
    arm = key.split(".pair.")[1].split(".")[0]
    shared = bool(floor) and nums.get(f"{floor}.reference_arm") == arm
    floor_by_seed = dict(zip(nums.get(f"{floor}.seeds", []), floor_diffs)) if floor else {}
    both = [(d, floor_by_seed[s]) for s, d in zip(nums[f"{key}.seeds"], nums[f"{key}.diffs"]) if s in floor_by_seed]
    if shared:
        result = stats.spread([d for d, _ in both], [f for _, f in both], paired=True)
    else:
        result = stats.spread(nums[f"{key}.diffs"], floor_diffs)
    for f, v in result.as_dict().items():
        nums[f"{key}.spread.{f}"] = v
    nums[f"{key}.spread.equal_spread_p"] = result.equal_spread_p
    sd_ratio = math.sqrt(result.var_ratio) if math.isfinite(result.var_ratio) else math.nan
    # Below the required number of pairs the reading is the gated verdict ("not yet decidable (n = k of m)").
    # The mean against the floor's, seed by seed: (B,N)_i - floor_i = diff_i - floor_diff_i.
    matched = [d - f for d, f in both] if shared else []
    vs_floor_p = stats.t_p(matched) if len(matched) > 1 else math.nan
    reading = (stats.reading(result, vs_floor_p=vs_floor_p) if nums[f"{key}.decided"] else nums[f"{key}.verdict"]
               if result.n else "no pairs yet")
    lo, hi = t_interval(matched)
    _put(nums, f"{key}.spread", floor=floor or "", sd_ratio=sd_ratio, reading=reading, vs_floor_n=len(matched),
         vs_floor_mean=statistics.fmean(matched) if matched else math.nan, vs_floor_ci95_low=lo,
         vs_floor_ci95_high=hi, vs_floor_t_p=vs_floor_p)
    fm = nums.get(f"{floor}.disagreement.mean", math.nan) if floor else math.nan
    nums[f"{key}.disagreement.floor_mean"] = fm
    m = nums[f"{key}.disagreement.mean"]
    nums[f"{key}.disagreement.ratio"] = m / fm if math.isfinite(m) and math.isfinite(fm) and fm > 0 else math.nan


def converged_tables(nums: dict[str, Any], study: str) -> dict[str, list[dict[str, Any]]]:
    """The converged study's tables as CSV rows: tost, spread, trajectory, floors, disagreement, cells."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in nums.get(f"{study}.tasks", []):
        t = f"{study}.{task}"
        for E in nums.get(f"{t}.E", []):
            e = f"{t}.e{E}"
            for label in nums.get(f"{e}.pairs", []):
                k = f"{e}.pair.{label}"
                base = {"task": task, "E": E, "cell": label}
                out["tost"].append({**base, "n": nums[f"{k}.n"], "required": nums[f"{k}.required"],
                                    **{f: nums[f"{k}.tost.{f}"] for f in ("mean", "sd", "ci90_low", "ci90_high",
                                                                           "ci95_low", "ci95_high", "p", "margin",
                                                                           "bound")},
                                    "verdict": nums[f"{k}.verdict"], "missing_seeds": " ".join(map(str, nums[f"{k}.missing_seeds"]))})
                out["spread"].append({**base, **{f: nums[f"{k}.spread.{f}"] for f in (
                    "n", "n_floor", "sd", "floor_sd", "var_ratio", "var_ratio_low", "var_ratio_high", "paired",
                    "equal_spread_p", "pitman_morgan_p", "brown_forsythe_p", "t_p", "wilcoxon_p", "floor_t_p", "vs_floor_n", "vs_floor_mean", "vs_floor_ci95_low", "vs_floor_ci95_high", "vs_floor_t_p",
                    "reading")}})
                t = f"{k}.trajectory"
                out["trajectory"] += [{**base, "seed": seed, "diff": d, "steps": n, "apart_1e4": a4, "apart_1e2": a2,
                                       "first_rel": f, "max_rel": m}
                                      for seed, d, n, a4, a2, f, m in zip(
                                          nums[f"{k}.seeds"], nums[f"{k}.diffs"], nums[f"{t}.steps"],
                                          nums[f"{t}.apart_1e4"], nums[f"{t}.apart_1e2"], nums[f"{t}.first_rel"],
                                          nums[f"{t}.max_rel"])]
                out["disagreement"].append({**base, "n": nums[f"{k}.disagreement.n"], "mean": nums[f"{k}.disagreement.mean"],
                                            "sd": nums[f"{k}.disagreement.sd"], "floor_mean": nums[f"{k}.disagreement.floor_mean"],
                                            "ratio": nums[f"{k}.disagreement.ratio"]})
            for kind in nums.get(f"{e}.floors", []):
                k = f"{e}.floor.{kind}"
                out["floors"].append({"task": task, "E": E, "kind": kind, "arm": nums[f"{k}.arm"],
                                      "dropout_abs_mean_same_seeds": nums[f"{k}.dropout_abs_mean_same_seeds"],
                                      "reference_arm": nums[f"{k}.reference_arm"], "n": nums[f"{k}.n"],
                                      "mean": nums[f"{k}.mean"], "sd": nums[f"{k}.sd"], "abs_mean": nums[f"{k}.abs_mean"],
                                      "disagreement": nums[f"{k}.disagreement.mean"], "ci90_low": nums[f"{k}.tost.ci90_low"],
                                      "ci90_high": nums[f"{k}.tost.ci90_high"], "margin": nums[f"{k}.tost.margin"],
                                      "bound": nums[f"{k}.tost.bound"], "verdict": nums[f"{k}.verdict"]})
            for label in nums.get(f"{e}.cells", []):
                k = f"{e}.cell.{label}"
                out["cells"].append({"task": task, "E": E, "cell": label, **{f: nums[f"{k}.{f}"] for f in (
                    "planned", "finished", "unfinished", "missing", "diverged", "failed", "failure_rate", "mean", "sd",
                    "median_train_seconds", "clipped_fraction")}, "cleared": nums.get(f"{k}.cleared", "")})
    return out


# ------------------------------------------------------------------------------------------ probes
def _probes(nums: dict[str, Any], probes: dict[str, list[dict[str, Any]]]) -> None:
    from .probe import ARMS

    nums["probe.tables"] = sorted(probes)
    kinds: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, rows in sorted(probes.items()):
        arms = list(dict.fromkeys(r["arm"] for r in rows))
        _put(nums, f"probe.{name}", task=rows[0].get("task") if rows else "", objective=rows[0].get("objective") if rows else "",
             arms=arms)
        roundoff = span(r["rel_l2"] for r in rows if r["arm"] == "controlled")
        nums[f"probe.{name}.roundoff"] = roundoff[1] if roundoff else math.nan
        for arm in arms:
            mine = [r for r in rows if r["arm"] == arm]
            ratio, rel = span(r.get("ratio_to_floor") for r in mine), span(r.get("rel_l2") for r in mine)
            if arm in ARMS and ARMS[arm].dropout == "standard":
                kind = "random"
            elif arm in ("controlled", "controlled_fp64") or rel is None or not roundoff:
                kind = "round-off"
            else:
                kind = "systematic" if rel[1] > ROUND_OFF_FACTOR * roundoff[1] else "round-off"
            _put(nums, f"probe.{name}.{arm}", ratio=ratio, rel_l2=rel, kind=kind)
            kinds[arm][kind].append(name)
    nums["cause.ids"] = [c[0] for c in CAUSES]
    for cid, arm, switch in CAUSES:
        _put(nums, f"cause.{cid}", probe_arm=arm, switch=switch, systematic_in=kinds[arm]["systematic"],
             random_in=kinds[arm]["random"], roundoff_in=kinds[arm]["round-off"])


# ------------------------------------------------------------------------------------------ early training
def _arm_name(arm: str) -> str:
    """An early-study arm under today's name: a bug arm recorded under a bug's old name gets its new one."""
    return "bug_" + canonical_bug_names([arm[4:]])[0] if arm.startswith("bug_") else arm


def _early(nums: dict[str, Any], early: list[EarlyStudy]) -> None:
    bugs = []
    for st in early:
        p = f"early.{st.name}"
        steps = span(r.get("optimizer_steps") for r in st.runs)
        _put(nums, p, source=st.source, runs=len(st.runs), steps=steps, tasks=sorted({s.task for s in st.summaries}),
             arms=sorted({_arm_name(s.arm) for s in st.summaries}, key=arm_rank), seeds=sorted({int(r["seed"]) for r in st.runs}),
             devices=one_or_list(r.get("device") for r in st.runs),
             train_hours=sum(float(r.get("train_seconds") or 0.0) for r in st.runs if not _nan(r.get("train_seconds"))) / 3600)
        if st.run_objects:
            cfgs = [r.config for r in st.run_objects]
            for k in ("model_name_or_path", "max_length", "learning_rate", "warmup_ratio"):
                nums[f"{p}.setup.{k}"] = one_or_list(c.get(k) for c in cfgs)
            for k in ("train_examples", "epochs", "effective_batch_size"):
                nums[f"{p}.setup.{k}"] = one_or_list(c.get("derived", {}).get(k) for c in cfgs)
        labels = []
        for s in st.summaries:
            label = f"{s.task}.{cell_label(s.arm, s.micro_batch_size, s.accumulation_steps)}"
            labels.append(label)
            k = f"{p}.cell.{label}"
            _put(nums, k, task=s.task, arm=_arm_name(s.arm), B=s.micro_batch_size, N=s.accumulation_steps, metric=s.metric_name,
                 n=s.n, non_finite=s.non_finite, mean=s.mean, std=s.std, n_pairs=s.n_pairs, diff_mean=s.diff_mean,
                 diff_lo=s.diff_lo, diff_hi=s.diff_hi, ci_excludes_zero=bool(s.n_pairs > 1 and s.ci_excludes_zero),
                 seed_std=s.seed_std, rel_param_distance=s.rel_param_distance,
                 rel_param_distance_std=s.rel_param_distance_std, reference=s.reference)
            mine = [r for r in st.runs if (r["task"], r["arm"], r["micro_batch_size"], r["accumulation_steps"])
                    == (s.task, s.arm, s.micro_batch_size, s.accumulation_steps)]
            _put(nums, k, optimizer_steps=one_or_list(r.get("optimizer_steps") for r in mine),
                 last_learning_rate=one_or_list(r.get("last_learning_rate") for r in mine if "last_learning_rate" in r))
            if s.arm.startswith("bug_") and s.n_pairs:
                bugs.append(k)
                nums[f"{k}.bug"] = _arm_name(s.arm)[4:]
        nums[f"{p}.cells"] = labels
        paired = [lab for lab in labels if nums[f"{p}.cell.{lab}.n_pairs"] > 1 and not nums[f"{p}.cell.{lab}.arm"].startswith("bug_")]
        _put(nums, p, paired=len(paired), excluding_zero=[lab for lab in paired if nums[f"{p}.cell.{lab}.ci_excludes_zero"]],
             n_pairs=span(nums[f"{p}.cell.{lab}.n_pairs"] for lab in paired),
             # every seed of the cell and of its reference at one value (a constant predictor, e.g. the majority
             # class): a difference cannot show there, so these cells say nothing about drift
             constant=[lab for lab in paired if nums[f"{p}.cell.{lab}.std"] == 0 == nums[f"{p}.cell.{lab}.seed_std"]
                       and nums[f"{p}.cell.{lab}.diff_mean"] == 0])
    for k in bugs:
        study = k.split(".")[1]
        task, b, n = nums[f"{k}.task"], nums[f"{k}.B"], nums[f"{k}.N"]
        ref = f"early.{study}.cell.{task}.{cell_label('default', b, n)}"
        _put(nums, k, reference_steps=nums.get(f"{ref}.optimizer_steps"), reference_last_learning_rate=nums.get(f"{ref}.last_learning_rate"))
    nums["early.bugs"] = bugs
    _early_arms(nums, early)


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _early_arms(nums: dict[str, Any], early: list[EarlyStudy]) -> None:
    """Per arm over every early study, task and (B, N): final relative parameter distance, |paired difference|,
    the seed floor's distance and the distance after the first step that moved the weights."""
    curves = [c for st in early for c in st.curves]
    summaries = [s for st in early for s in st.summaries if s.n_pairs]
    arms = sorted({s.arm for s in summaries if not s.arm.startswith("bug_")}, key=arm_rank)
    nums["early.arms"] = arms
    for arm in arms:
        sel = [s for s in summaries if s.arm == arm]
        dists = [_last(curves, s.study, s.task, arm, "vs_reference", (s.micro_batch_size, s.accumulation_steps)) for s in sel]
        floors = [_last(curves, s.study, s.task, arm, "seed_floor") for s in sel]
        first = [c for c in curves if c["arm"] == arm and c["kind"] == "vs_reference" and math.isfinite(c["rel_param_distance"])]
        first_step = min((c["optimizer_step"] for c in first), default=None)
        # per task: the tasks' metrics (accuracy, MCC, F1, Pearson) do not share a scale
        tasks = list(dict.fromkeys(s.task for s in sel))
        _put(nums, f"early.arm.{arm}", absdiff_tasks=tasks,
             absdiff_by_task=[_mean([abs(s.diff_mean) for s in sel if s.task == t]) for t in tasks],
             absdiff_metrics=[next(s.metric_name for s in sel if s.task == t) for t in tasks])
        _put(nums, f"early.arm.{arm}", dist=_mean(dists), floor=_mean(floors),
             first_dist=_mean([c["rel_param_distance"] for c in first if c["optimizer_step"] == first_step]),
             dist_by_cell=[_last(curves, s.study, s.task, arm, "vs_reference", (s.micro_batch_size, s.accumulation_steps)) for s in sel])


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def _last(curves: list[dict[str, Any]], study: str, task: str, arm: str, kind: str, bn: tuple[int, int] | None = None) -> float:
    """Mean relative parameter distance at the last step of `kind` rows (over seeds)."""
    pts = [c for c in curves if c["study"] == study and c["task"] == task and c["arm"] == arm and c["kind"] == kind
           and (bn is None or (c["micro_batch_size"], c["accumulation_steps"]) == bn)]
    if not pts:
        return math.nan
    last = max(c["optimizer_step"] for c in pts)
    return _mean(c["rel_param_distance"] for c in pts if c["optimizer_step"] == last)


def _batchnorm(nums: dict[str, Any], folder: Path | None) -> None:
    import re

    path = folder / "norm_study.md" if folder else None
    if path is None or not path.is_file():
        nums["batchnorm.path"] = ""
        return
    m = re.search(r"## Interpretation\s+(.+?)(\n\n|$)", path.read_text(), re.S)
    _put(nums, "batchnorm", path=str(path), excerpt=m.group(1).strip() if m else "")


# ------------------------------------------------------------------------------------------ the answer
def _decided_floors(nums: dict[str, Any], pairs: list[str]) -> list[str]:
    """The dropout-only floors of `pairs` (each once) that have all their planned runs."""
    keys = dict.fromkeys(nums[f"{k}.spread.floor"] for k in pairs if nums.get(f"{k}.spread.floor"))
    return [f for f in keys if nums[f"{f}.n"] >= max(nums[f"{f}.planned"], 2)]


def _answer(nums: dict[str, Any]) -> None:
    """What the first five lines need: the headline pairs' verdicts and readings, their size against the floor,
    the probe's systematic causes and the switches of the most exact arm."""
    pairs, others = [], []
    for s in nums["studies.converged"]:
        for task in nums[f"{s}.tasks"]:
            for E in nums[f"{s}.{task}.E"]:
                for label in nums[f"{s}.{task}.e{E}.pairs"]:
                    key = f"{s}.{task}.e{E}.pair.{label}"
                    (pairs if nums[f"{key}.headline"] else others).append(key)
    decided = [k for k in pairs if nums[f"{k}.decided"]]
    verdicts = defaultdict(int)
    for k in pairs:
        verdicts[nums[f"{k}.verdict"] if nums[f"{k}.decided"] else "undecided"] += 1
    readings = [nums[f"{k}.spread.reading"] for k in decided]
    if any(r.startswith("nonzero mean") for r in readings):
        decided_state = "bias"
    elif readings and all(r.endswith("(variance, not bias)") for r in readings):
        decided_state = "variance"
    else:
        decided_state = "spread" if readings else "undecided"
    if not pairs:
        state = "no data"
    elif not decided:
        state = "undecided"
    elif len(decided) < len(pairs):
        state = "partial"  # some comparisons have their pairs: say what they show, and which wait
    else:
        state = decided_state
    waiting = [k for k in pairs if not nums[f"{k}.decided"]]
    _put(nums, "answer", headline=pairs, n_headline=len(pairs), decided=len(decided), state=state,
         decided_state=decided_state, decided_pairs=decided, waiting_pairs=waiting,
         n_range_waiting=span(nums[f"{k}.n"] for k in waiting) if waiting else None,
         equivalent=verdicts["equivalent"], not_shown=verdicts["not shown equivalent"], different=verdicts["different"],
         undecided=verdicts["undecided"], n_range=span(nums[f"{k}.n"] for k in pairs),
         required=one_or_list(nums[f"{k}.required"] for k in pairs),
         pairs_in=sum(nums[f"{k}.n"] for k in pairs), pairs_planned=sum(nums[f"{k}.required"] for k in pairs),
         biased=[k for k in decided if nums[f"{k}.spread.reading"].startswith("nonzero mean")],
         systematic=[c for c in nums["cause.ids"] if nums[f"cause.{c}.systematic_in"]],
         random=[c for c in nums["cause.ids"] if nums[f"cause.{c}.random_in"] and not nums[f"cause.{c}.systematic_in"]],
         roundoff=[c for c in nums["cause.ids"] if nums[f"cause.{c}.roundoff_in"] and not nums[f"cause.{c}.systematic_in"]
                   and not nums[f"cause.{c}.random_in"]],
         bugs=list(dict.fromkeys(nums[f"{k}.bug"] for k in nums["early.bugs"] if nums[f"{k}.ci_excludes_zero"])))
    # Sizes per task (a fraction of dev labels and an RMS of regression outputs do not share a scale).
    tasks = list(dict.fromkeys(nums[f"{k}.task"] for k in pairs))
    nums["answer.tasks"] = tasks
    for task in tasks:
        mine = [k for k in pairs if nums[f"{k}.task"] == task]
        t = nums[f"{mine[0]}.task_prefix"]
        _put(nums, f"answer.{task}", metric=nums[f"{t}.metric"], margin=nums[f"{t}.margin"], regression=nums[f"{t}.regression"],
             bound=span(nums[f"{k}.tost.bound"] for k in mine if nums[f"{k}.decided"]),
             floor_bound=span(nums[f"{f}.tost.bound"] for f in _decided_floors(nums, mine)))
        # Per comparison (one per effective batch), so line 2 sets each beside its own floor: what one run pair
        # typically differs by (mean |difference|), beside what one dropout re-seed does.
        with_pairs = [k for k in mine if nums[f"{k}.diffs"]]
        abs_means = [statistics.fmean(abs(d) for d in nums[f"{k}.diffs"]) for k in with_pairs]
        floor_abs = [nums.get(f"{nums[f'{k}.spread.floor']}.abs_mean", math.nan) if nums[f"{k}.spread.floor"]
                     else math.nan for k in with_pairs]
        _put(nums, f"answer.{task}", pairs=with_pairs, abs_mean_by_pair=abs_means, floor_abs_mean_by_pair=floor_abs,
             sd_ratio_by_pair=[nums[f"{k}.spread.sd_ratio"] for k in with_pairs],
             disagreement_by_pair=[nums[f"{k}.disagreement.mean"] for k in with_pairs],
             floor_disagreement_by_pair=[nums[f"{k}.disagreement.floor_mean"] for k in with_pairs],
             abs_mean_ratio=span(a / f for a, f in zip(abs_means, floor_abs) if math.isfinite(f) and f > 0))
    # Decided pairs read as a dropout re-seed whose mean is nonetheless not 0: the floor's runs shift as much, so the
    # shift belongs to the shared (E, 1) runs' draw; line 1 says so rather than let "variance" hide it.
    nums["answer.shifted"] = [k for k in decided if nums[f"{k}.spread.t_p"] < 0.05
                              and nums[f"{k}.spread.reading"].endswith("(variance, not bias)")]
    # The same TOST on the dropout-only floors of the decided comparisons: can a mere re-seed be shown equivalent?
    floors = _decided_floors(nums, decided)
    _put(nums, "answer", floor_decided=len(floors),
         floor_equivalent=sum(nums[f"{f}.verdict"] == "equivalent" for f in floors),
         # not shown equivalent while a mere dropout re-seed is not either: the margin is finer than n runs resolve
         unresolved=[k for k in decided if nums[f"{k}.verdict"] == "not shown equivalent"
                     and nums[f"{k}.spread.floor"] in floors and nums[f"{nums[f'{k}.spread.floor']}.verdict"] != "equivalent"])
    # How large a spread the decided comparisons leave possible: the top of the variance ratios' 95% intervals.
    nums["answer.var_ratio_high"] = max((nums[f"{k}.spread.var_ratio_high"] for k in decided
                                         if math.isfinite(nums[f"{k}.spread.var_ratio_high"])), default=math.nan)
    # The most exact non-headline arm: its largest |paired difference| over every pair, and what it switches;
    # per task, because the tasks' metrics do not share a scale.
    exact = defaultdict(list)
    for k in others:
        exact[k.split(".pair.")[1].split(".")[0]] += [(nums[f"{k}.task"], abs(d)) for d in nums[f"{k}.diffs"]]
    def scaled(arm: str) -> float:
        """The arm's largest |difference| over the dropout-only floor's sd of its pair (metrics do not share a
        scale); the raw |difference| where no floor sd exists."""
        out = 0.0
        for k in others:
            if k.split(".pair.")[1].split(".")[0] == arm and nums[f"{k}.diffs"]:
                fsd = nums.get(f"{k}.spread.floor_sd", math.nan)
                d = max(map(abs, nums[f"{k}.diffs"]))
                out = max(out, d / fsd if isinstance(fsd, float) and math.isfinite(fsd) and fsd > 0 else d)
        return out

    best = min((a for a in exact if exact[a]), key=scaled, default=None)
    mine = [k for k in others if k.split(".pair.")[1].split(".")[0] == best]
    # Does the arm start at fp32 round-off? The largest relative loss gap of its pairs at their first step.
    first_gap = max((g for k in mine for g in nums[f"{k}.trajectory.first_rel"] if math.isfinite(g)), default=math.nan)
    by_task: dict[str, float] = {}
    for task, d in exact[best] if best else []:
        by_task[task] = max(by_task.get(task, 0.0), d)
    metric_of = {nums[f"{k}.task"]: nums[f"{nums[f'{k}.task_prefix']}.metric"] for k in mine}
    # Against the dropout-only floor of the pair where each task's largest |difference| occurred.
    floor_ratio = {}
    for task, d in by_task.items():
        k = max((k for k in mine if nums[f"{k}.task"] == task), key=lambda k: max(map(abs, nums[f"{k}.diffs"]), default=0.0))
        fsd = nums.get(f"{k}.spread.floor_sd", math.nan)
        floor_ratio[task] = d / fsd if isinstance(fsd, float) and math.isfinite(fsd) and fsd > 0 else math.nan
    # Every seed-level pair of the arm: did its training losses part (1e-2), where, and how far did the others get?
    seed_pairs = [(k, i) for k in mine for i in range(len(nums[f"{k}.seeds"])) if nums[f"{k}.trajectory.steps"][i]]
    parted = [(k, i) for k, i in seed_pairs if nums[f"{k}.trajectory.apart_1e2"][i] is not None]
    held = [nums[f"{k}.trajectory.max_rel"][i] for k, i in seed_pairs if (k, i) not in parted]
    _put(nums, "answer", exact_seed_pairs=len(seed_pairs), exact_parted=len(parted),
         exact_parted_steps=span(nums[f"{k}.trajectory.apart_1e2"][i] for k, i in parted),
         exact_parted_where=list(dict.fromkeys(
             f"{nums[f'{k}.task']} E = {k.split('.e')[-1].split('.')[0]} ({nums[f'{k}.trajectory.steps'][i]} steps)"
             for k, i in parted)),
         exact_parted_diff=max((abs(nums[f"{k}.diffs"][i]) for k, i in parted), default=math.nan),
         exact_held_gap=max(held, default=math.nan))
    _put(nums, "answer", exact_arm=best or "", exact_max_abs_diff=max(by_task.values()) if best else math.nan,
         exact_n=len(exact[best]) if best else 0, exact_switches=nums.get(f"switches.{best}", []),
         exact_tasks=list(by_task), exact_by_task=list(by_task.values()),
         exact_metrics=[metric_of[t] for t in by_task], exact_floor_ratio=[floor_ratio[t] for t in by_task],
         exact_first_gap=first_gap,
         exact_roundoff=bool(math.isfinite(first_gap) and first_gap < ROUNDOFF_FIRST_STEP),
         exact_planned=sum(nums[f"{k}.required"] for k in mine),
         exact_not_equivalent=[k for k in mine if nums[f"{k}.decided"] and nums[f"{k}.verdict"] != "equivalent"],
         exact_decided=all(nums[f"{k}.decided"] for k in mine) if mine else False)
    # Runs still to come, by arm, and whether any of them belongs to what lines 1-3 rest on (the headline arms and
    # the dropout-only floors).
    pending, planned, answer_arms = defaultdict(int), 0, set()
    for s in nums["studies.converged"]:
        planned += nums[f"{s}.planned"]
        for name in nums[f"{s}.missing_names"] + nums[f"{s}.unfinished_names"]:
            pending[name.split("/")[1]] += 1
        answer_arms |= set(nums[f"{s}.headline_arms"])
        answer_arms |= {nums[f"{nums[f'{k}.spread.floor']}.arm"] for k in pairs if nums[f"{k}.spread.floor"]}
    _put(nums, "answer", pending_runs=sum(pending.values()), planned_runs=planned, pending_arms=sorted(pending),
         pending_touches_answer=bool(set(pending) & answer_arms))


def _record_switches(nums: dict[str, Any], converged: list[ConvergedStudy]) -> None:
    """switches.<arm>: the command-line settings that turn a headline run into that arm's run (same task, cell)."""
    for c in converged:
        runs = {(r.task, r.arm, r.bn, r.cell_seed): r for r in c.runs}
        for (task, arm, bn, seed), r in sorted(runs.items()):
            if arm in c.headline_arms:
                continue
            for head in c.headline_arms:
                h = runs.get((task, head, bn, seed))
                if h is None or f"switches.{arm}" in nums:
                    continue
                diff = sorted(k for k in set(r.config) | set(h.config)
                              if k not in ("output_dir", "derived") and r.config.get(k) != h.config.get(k))
                nums[f"switches.{arm}"] = [f"--{k} {r.config.get(k)}" for k in diff]
