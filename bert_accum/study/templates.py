"""Every sentence and table of REPORT.md, filled from the numbers dict (`bert_accum.study.numbers`).

A template is a string whose ``{fields}`` are keys of the numbers dict, relative to a prefix (``{tost.mean}`` under
the prefix ``converged.sst2.e8.pair.default.B2_N4``), with an optional format: ``{x:range}`` prints a [lo, hi]
value as one number when both ends print the same (never "0.002–0.002"), ``{x:range3}`` with 3 decimals,
``{x:p}`` a p-value, ``{x:signed}`` with its sign, ``{x:pct}`` a percentage, ``{x:g}`` the shortest form; lists print comma-separated, NaN and
None as "—". Which template is used may depend on a number (a verdict, a count), never on text typed here about
how the runs were made: that all comes from the run folders through the numbers dict.
"""

from __future__ import annotations

import math
import string
from typing import Any

from .plumbing import fmt, header

# ------------------------------------------------------------------------------------------ filling


def show(value: Any, spec: str = "") -> str:
    """One value as the report prints it (see the module docstring for the formats)."""
    kind = spec.rstrip("0123456789")
    digits = int(spec[len(kind):]) if spec[len(kind):] else None
    if kind == "range":
        if isinstance(value, (list, tuple)) and len(value) == 2:
            lo, hi = show(value[0], str(digits or "")), show(value[1], str(digits or ""))
            return lo if lo == hi else f"{lo}–{hi}"
        return show(value, str(digits or ""))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(show(v, spec) for v in value) if value else "none"
    if kind == "p" and isinstance(value, (int, float)):
        return "<0.001" if value < 0.001 else f"{value:.3f}"
    if kind == "g" and isinstance(value, (int, float)):
        return f"{value:.{digits or 6}g}"
    if kind == "pct" and isinstance(value, (int, float)):
        return f"{100 * value:.{digits if digits is not None else 1}f}%"
    if kind == "signed" and isinstance(value, (int, float)):
        text = fmt(float(value), digits or 4)
        return text if text.startswith("-") or text == "—" else "+" + text
    if isinstance(value, float):
        return fmt(value, digits or 4)
    return str(value)


class _Filler(string.Formatter):
    """str.format over the numbers dict: a whole field name is one key (dots belong to the key)."""

    def __init__(self, nums: dict[str, Any], prefix: str):
        super().__init__()
        self.nums, self.prefix = nums, prefix

    def get_field(self, field_name: str, args, kwargs) -> tuple[Any, str]:
        """The value of `field_name`: an extra keyword, else the key under the prefix, else the key itself."""
        if field_name in kwargs:
            return kwargs[field_name], field_name
        key = f"{self.prefix}.{field_name}" if self.prefix else field_name
        for k in (key, field_name):
            if k in self.nums:
                return self.nums[k], k
        raise KeyError(f"template field {field_name!r}: the numbers have no {key!r}")

    def format_field(self, value: Any, format_spec: str) -> str:
        """`show` instead of format()."""
        return show(value, format_spec)


def fill(template: str, nums: dict[str, Any], prefix: str = "", **extra: Any) -> str:
    """`template` with its fields looked up under `prefix` in `nums` (or given in `extra`)."""
    return _Filler(nums, prefix).format(template, **extra)


def table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ci(nums: dict[str, Any], key: str, lo: str, hi: str, digits: int = 4) -> str:
    a, b = nums.get(f"{key}.{lo}"), nums.get(f"{key}.{hi}")
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return "—"
    return f"[{fmt(float(a), digits)}, {fmt(float(b), digits)}]"


def _within(nums: dict[str, Any], key: str) -> str:
    """±bound of a TOST, or a dash without two pairs."""
    bound = nums.get(f"{key}.tost.bound")
    return f"±{show(bound)}" if isinstance(bound, float) and math.isfinite(bound) else "—"


def _ratio_ci(nums: dict[str, Any], key: str) -> str:
    ratio = nums.get(f"{key}.var_ratio")
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        return "—"
    return f"{show(ratio, '3')} {_ci(nums, key, 'var_ratio_low', 'var_ratio_high', 3)}"


def _equal_spread(nums: dict[str, Any], key: str) -> str:
    """The equal-spread test that fits the samples, named: `PM p` (paired by seed) or `BF p` (independent)."""
    p = nums.get(f"{key}.equal_spread_p")
    if not isinstance(p, (int, float)) or not math.isfinite(p):
        return "—"
    return f"{'PM' if nums.get(f'{key}.paired') else 'BF'} {show(p, 'p')}"


def _vs_floor(nums: dict[str, Any], key: str) -> str:
    """Mean of (B, N) minus the dropout floor run of the same seed, with its 95% interval (a dash without pairs)."""
    mean = nums.get(f"{key}.vs_floor_mean")
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return "—"
    ci = _ci(nums, key, "vs_floor_ci95_low", "vs_floor_ci95_high")
    return show(mean, "signed") if ci == "—" else f"{show(mean, 'signed')} {ci}"


def _pm(nums: dict[str, Any], key: str, m: str = "mean", s: str = "sd") -> str:
    mean, sd = nums.get(f"{key}.{m}"), nums.get(f"{key}.{s}")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return show(mean)  # one value has no spread
    return f"{show(mean)} ± {show(sd)}"


def _bn(label: str) -> str:
    """'default.B2_N4' -> '(2, 4)'."""
    bn = label.split(".", 1)[1]
    parts = dict((p[0], p[1:]) for p in bn.split("_"))
    return f"({parts['B']}, {parts['N']}" + (f", W={parts['W']})" if "W" in parts else ")")


def _arm(label: str) -> str:
    return label.split(".", 1)[0]


# ------------------------------------------------------------------------------------------ the sentences
TITLE = "# Gradient accumulation against one large batch: the study report"
INTRO = ("Generated by `scripts/report.py`. Every number below is computed from run folders, grid files and probe "
         "tables, and is stored in `numbers.json` beside this file; nothing about how the runs were made is typed in "
         "by hand.")

ANSWER_HEAD = "## The answer"
ANSWER_STATE = {
    "variance": ("1. **Variance, not bias.** In all {answer.decided} headline comparisons of (B, N) with (E, 1) the paired "
                 "differences cannot be told from the dropout-only floor's, in spread or in mean (n = "
                 "{answer.n_range:range} seeds each{spread_limit}): accumulating cannot be told from re-seeding "
                 "dropout."),
    "bias": ("1. **A bias in {n_biased} of {answer.decided} headline comparisons** ({biased}): their paired "
             "differences have a mean unlike the dropout-only floor's (see the spread table for the test); the others "
             "behave like a dropout re-seed."),
    "bias_all": ("1. **A bias in every headline comparison** ({biased}): the paired differences have a mean unlike "
                 "the dropout-only floor's (see the spread table for the test), unlike a dropout re-seed."),
    "spread": ("1. **The floor's mean, but not its spread.** No headline comparison's paired differences have a mean "
               "unlike the dropout-only floor's, but in some the spread differs from the floor's (see the spread "
               "table)."),
    "undecided": ("1. **Not yet decidable.** Headline pairs finished: {answer.pairs_in} of {answer.pairs_planned} "
                  "(n = {answer.n_range:range} of {answer.required} per comparison); no verdict is stated below "
                  "{answer.required} pairs."),
    "no data": "1. **No converged study in this report**: nothing is said here about final outcomes.",
    "partial": ("1. **Decided for {answer.decided} of {answer.n_headline} headline comparisons ({decided}): "
                "{reading}** Still waiting: {waiting} (n = {answer.n_range_waiting:range} of {answer.required} pairs so "
                "far, no verdict yet)."),
}
ANSWER_PARTIAL_READING = {
    "variance": "variance, not bias: the paired differences cannot be told from the dropout-only floor's, in spread "
                "or in mean{spread_limit}, as if dropout had been re-seeded.",
    "bias": "a mean paired difference unlike the dropout-only floor's in {n_biased} of them ({biased}).",
    "spread": "the floor's mean, but a spread unlike the dropout-only floor's in some (see the spread table).",
}
ANSWER_SHIFTED = (" {pair}: its mean paired difference is not 0 ({mean:signed}, t p {p:p}), but a dropout re-seed of "
                  "the same (E, 1) runs shifts the metric as much ({floor_mean:signed}): the shift belongs to those "
                  "reference runs' draw, not to accumulating.")
ANSWER_SPREAD_LIMIT = "; a variance up to {answer.var_ratio_high:2}× the floor's is not ruled out"
ANSWER_SIZE_BY_E = ("2. **How large, against the dropout-only floor?** Mean |(B, N) − (E, 1)| over seeds, against "
                    "the same for a dropout re-seed of (E, 1), and the ratio of their standard deviations: {parts}.")
ANSWER_SIZE_TASK = "{task} {metric}: {items}"
ANSWER_SIZE_PAIR = "{bn} at E = {E} {abs} against {floor_abs} (sd {sd_ratio:2}×)"
ANSWER_SIZE_DIS_BY_E = " On the dev set, {parts}."
ANSWER_SIZE_DIS_TASK = "{task}'s paired runs {what} {values} against {floor_values} for two dropout seeds of (E, 1)"
DISAGREE_WHAT = {False: "label this fraction of examples differently:", True: "differ by an RMS of"}
ANSWER_SIZE_NONE = "2. **How large, against the dropout-only floor?** Not measured yet: no headline pair has finished."
ANSWER_EQUIV_NONE = "3. **Equivalence**: no headline comparison in this report."
ANSWER_EQUIV = ("3. **Equivalence** (TOST, 90% interval inside ±margin): of {answer.n_headline} headline comparisons, "
                "{answer.equivalent} equivalent, {answer.not_shown} not shown equivalent, {answer.different} "
                "different, {answer.undecided} not yet decidable.")
ANSWER_EQUIV_FLOOR = (" The same test on the dropout-only floor (two dropout seeds of (E, 1)): {answer.floor_equivalent} "
                      "of {answer.floor_decided} equivalent. Smallest margin the runs show: {bounds}.")
ANSWER_EQUIV_UNRESOLVED = (" For {pairs} the dropout-only floor is not shown equivalent either: ±margin is finer than "
                           "{n} seeds can resolve against dropout noise, so that verdict is about the number of seeds, "
                           "not evidence of a difference.")
ANSWER_EQUIV_BOUND = "{task}: (B, N) ±{bound:range}, a dropout re-seed ±{floor_bound:range} {metric}"
ANSWER_CAUSES = ("4. **Which causes are real biases?** One step (the probe, per table; sizes against the dropout "
                 "floor in the drift attribution section): deterministic, the same shift at every draw and beyond fp32 "
                 "round-off: "
                 "{systematic}; random, like a new dropout draw: {random}; round-off: {roundoff}.{bugs}")
ANSWER_CAUSES_NONE = "4. **Which causes are real biases?** No probe tables in this report."
ANSWER_BIASES_END = (" At the end of training (the bias study: each bias against its fix, paired by seed, "
                     "Holm-adjusted over {comparisons} comparisons): {parts}.")
ANSWER_BIASES_SHOWN = "a bias: {items}"
ANSWER_BIAS_SHOWN = "{bias} ({optimizer}, ({micro_batch_size},{accumulation_steps}), n = {n}: {effect} {metric})"
ANSWER_BIASES_NONE_SHOWN = "none shown"
ANSWER_BIASES_BELOW = "below the detection limit: {items}"
ANSWER_BIAS_BELOW = "{bias} (no effect beyond ±{limit} {metric}{identical})"
ANSWER_BIAS_IDENTICAL = "{bias} (the same final {metric} in every pair of {which})"
ANSWER_BIAS_ALSO_IDENTICAL = "; the same final {metric} in every pair of {which}"
ANSWER_BIASES_OFF = ("{n} not at convergence (their correct runs did not all reach the grid's reference bar: "
                     "{items})")
ANSWER_BIAS_OFF = "{bias} ({optimizer}, ({micro_batch_size},{accumulation_steps})) {below} of {n}"
ANSWER_BIASES_WAITING = "{waiting} not yet decidable ({finished} of {planned} pairs finished)"
ANSWER_BUGS = (" Loop bugs whose effect on the first optimizer steps excludes 0 (early training, not a final "
               "outcome): {bugs}.")
ANSWER_ACT = {
    "variance": ("5. **What to do.** Accumulate as usual with a correct loop (each window's loss normalised as the "
                 "large batch's: not the loop bugs below, nor the stock HF Trainer's N-fold loss on BERT): in "
                 "these runs its cost could not be told from another dropout seed's{excess}. To make (B, N) take "
                 "(E, 1)'s steps instead, {exact}"),
    "bias": "5. **What to do.** Do not swap (B, N) for (E, 1) where a bias is shown; to remove it, {exact}",
    "spread": "5. **What to do.** Check the spread table before relying on (B, N); to take (E, 1)'s steps, {exact}",
    "undecided": "5. **What to do** until the comparisons are decided: to take (E, 1)'s steps exactly, {exact}",
    "partial": ("5. **What to do.** Where decided, read line 1 (variance: accumulate as usual; a bias: do not swap "
                "(B, N) for (E, 1) there); until the others are decided, to take (E, 1)'s steps exactly, {exact}"),
    "no data": "5. **What to do.** To take (E, 1)'s steps exactly, {exact}",
}
# Line 5's last sentence: each bias the bias study shows at the end of training, with the fix in a few words.
ANSWER_ACT_BIASES = " Where the bias study shows a bias at the end of training (section 2), fix it: {items}."
ANSWER_ACT_BIAS = "{bias} ({effects} {metric}): {fix}"
ANSWER_ACT_BIAS_EFFECT = "{effect} at ({micro_batch_size},{accumulation_steps})"
BIAS_FIX = {
    "mean_of_means": "with a per-token loss, divide the window's token-loss sum by its token count "
                     "(`--loss_normalization global`), not each micro-batch's mean by N",
    "scheduler_stepped_per_micro_batch": "call `lr_scheduler.step()` only where `optimizer.step()` is called",
    "schedule_sized_in_micro_batches": "size the schedule in optimizer steps, `ceil(len(dataloader) / N) * epochs`",
    "step_mod_boundaries": "step when `(step + 1) % N == 0` or at the epoch's last micro-batch",
    "last_window_1_over_n": "divide a short last window's losses by the micro-batches it holds, not by N",
    "clip_per_micro_batch": "clip once per window, right before `optimizer.step()`",
}
BIAS_FIX_UNKNOWN = "see its section"
ANSWER_EXACT = ("run with `{switches}` (arm `{answer.exact_arm}`: {start}; largest |paired difference| at the end "
                "{by_task} over {answer.exact_n} pairs{so_far}{apart}).")
ANSWER_EXACT_START = {"round-off": "its first steps match (E, 1) to fp32 round-off",
                      "apart": "the closest arm, though its first steps differ from (E, 1)'s by up to "
                               "{answer.exact_first_gap:g} relative (training loss)",
                      "unknown": "the closest arm (no step records to compare its first steps)"}
ANSWER_EXACT_TASK = "{task} {value} {metric} ({ratio}× the dropout-only floor's sd)"
ANSWER_EXCESS = " (point estimates of the mean |difference| against a re-seed's: {items})"
ANSWER_EXCESS_TASK = "{task} {ratio:range2}×"
ANSWER_EXACT_APART = ("; over a run the gap can still grow until pairs part: the training losses of "
                      "{answer.exact_parted} of its {answer.exact_seed_pairs} pairs differ by 1% from {steps} on, "
                      "in {where}{not_equivalent}")
ANSWER_EXACT_NOT_EQUIVALENT = ", and {pairs} {is_are} not shown equivalent to (E, 1)"
ANSWER_EXACT_SO_FAR = " so far, of {answer.exact_planned} planned"
SETUP_CHANGES = ("The design changed after runs had started (recorded in `{grid}` under `changes`, copied here as "
                 "written):")
SETUP_PENDING = "Arms with runs still to come: {arms}. {touch}"
SETUP_PENDING_TOUCH = {False: "Lines 1–3 of the answer rest only on the headline arms and the dropout-only floors, "
                              "none of which has runs still to come.",
                       True: "Some of them are headline arms or dropout-only floors: lines 1–3 of the answer may "
                             "change."}
ANSWER_EXACT_NONE = "see the cause sections: no exact arm has finished pairs in this report."

CAUSE_WITH_TABLES = "{cause} ({tables})"
PAIR_NAME = "{task} {arm} {bn} vs ({E}, 1)"
NONE = "none"
CAUSE_NAMES = {"dropout": "dropout RNG", "padding": "dynamic padding",
               "loss_averaging": "per-token loss averaging (a mean of micro-batch means)",
               "fp32_order": "fp32 summation order", "bf16": "bf16 autocast"}

SETUP_HEAD = "## How the runs were made"
SETUP_STUDY = ("Study `{s}` (grid `{grid}`, run folders in `{root}`): {finished} of {planned} planned runs finished, "
               "{unfinished} started and unfinished, {missing} not started (all names in `numbers.json`, keys "
               "`{s}.unfinished_names` and `{s}.missing_names`).")
SETUP_ENV = ("The {setup.started} started runs were made on {setup.devices} at {commit_word} {setup.commits} with torch "
             "{setup.package.torch}, transformers {setup.package.transformers}, accelerate {setup.package.accelerate}, "
             "Python {setup.python}, {setup.threads} torch {thread_word}; the {setup.runs} finished ones trained for "
             "{setup.train_hours:2} h in all.")
SETUP_TASK = ("- **{task}**: model `{setup.model_name_or_path}` ({setup.model_path}), max_length {setup.max_length:g}, "
              "learning rate {setup.learning_rate:g} ({setup.lr_scheduler_type}, warmup ratio {setup.warmup_ratio:g}), "
              "optimizer {setup.optim}, max grad norm {setup.max_grad_norm:g}, weight decay {setup.weight_decay:g}, "
              "{setup.precision}; data from {setup.glue_dir}, {train_data}, num_train_epochs "
              "{setup.num_train_epochs:g}; {setup.dev_examples:g} dev examples; headline metric {metric}.")
SETUP_TRAIN_DATA = {"samples": "the first {setup.max_train_samples:g} training examples of the file (max_train_samples)",
                    "examples": "training stops after {setup.max_train_examples:g} examples of each seed's shuffled "
                                "order (max_train_examples)",
                    "both": "the first {setup.max_train_samples:g} training examples of the file (max_train_samples), "
                            "training stopped after {setup.max_train_examples:g} of them (max_train_examples)",
                    "all": "the whole training set"}
SETUP_E = ("  - E = {E}: {setup.total_optimizer_steps} optimizer steps ({setup.num_warmup_steps} warmup) over "
           "{setup.train_examples} training examples: {setup.epochs_trained:g} {epoch_word}.")
SETUP_ARM = ("  - arm `{arm}`: started for grid seeds {seeds}; resolved seeds against the grid seed: "
             "{seed_offsets}.")
SETUP_NONE = "No converged study in this report."
SETUP_TASK_NONE = "- **{task}**: no run started yet (settings are read from run folders once they exist)."

CONV_HEAD = "## The converged study `{s}`: final outcomes"
PROBE_OF_TASK = ("- {task}, one step (probe `{table}` of this task; the relative L2 distance of the first accumulated "
                 "gradient from (E, 1)'s, as a ratio to that of a dropout re-seed of (E, 1)): standard dropout alone "
                 "{dropout:range3}, the default loop {default:range3}, everything off {controlled:range3}.")
PROBE_OF_TASK_NONE = "- {task}: no probe table of this task and objective (another task's probe is not used for it)."
TOST_HEAD = "### Is (B, N) equivalent to (E, 1)? (TOST)"
TOST_COLS = ["task", "E", "arm", "(B, N) vs (E, 1)", "n", "mean paired diff", "90% CI", "95% CI", "margin", "verdict",
             "equivalent within"]
TOST_NOTE = ("Paired differences (B, N) − (E, 1) of the final dev metric over runs sharing all three seeds. "
             "`equivalent`: the 90% interval (two one-sided t tests at 5%) lies inside ±margin (margins from the grid "
             "file, fixed before the runs); `different`: the 95% interval excludes 0 and equivalence is not shown; "
             "`not shown equivalent`: neither. `equivalent within`: the smallest margin the 90% interval fits inside (the "
             "dropout-only floor's, in the floors table below, is what a mere dropout re-seed can be shown to be). "
             "Headline comparisons (arm {headline_arms}) get no verdict below "
             "{min_n} pairs, the others none below their planned number. Table: `study/{s}_tost.csv`.")
SPREAD_HEAD = "### Variance or bias: against the dropout-only floor"
SPREAD_COLS = ["task", "E", "arm", "(B, N)", "n", "sd", "floor n", "floor sd", "variance ratio [95% CI]",
               "equal spread: p", "mean 0: t p", "mean − floor's [95% CI]", "vs floor: t p", "reading"]
SPREAD_NOTE = ("The floor: (E, 1) with another dropout seed − (E, 1), same init and data order. An arm whose (E, 1) "
               "runs are the floor's reference (the headline arm) is compared with the floor seed by seed, because both "
               "differences contain the same (E, 1) run: `PM` is the Pitman–Morgan test of equal variances for paired "
               "samples and the variance ratio's 95% interval is its own. An arm with its own (E, 1) runs is an "
               "independent sample: `BF` is the Brown–Forsythe test (Levene about the median) and the interval the F "
               "interval. `mean 0` is the one-sample t test of whether the paired differences average 0 (the CSV adds "
               "the Wilcoxon signed-rank test; a dash where all differences are equal). For the headline arm the reading "
               "asks instead whether the mean is the floor's: (B, N) minus the floor run of the same seed, its mean "
               "with a 95% t interval and a paired t test (`vs floor`), because a reference with a lucky dropout draw "
               "shifts both alike; another arm's mean is read against 0. Same spread and the floor's mean: the drift is "
               "a dropout re-seed, variance and not bias. A row short of its required pairs shows no tests (its CSV row "
               "keeps them). Table: `study/{s}_spread.csv`.")
DISAGREE_HEAD = "### Do paired runs predict the same dev labels?"
DISAGREE_COLS = ["task", "E", "compared", "measure", "n", "paired runs", "dropout floor", "ratio"]
DISAGREE_MEASURE = {False: "fraction of dev labels that differ", True: "RMS difference of dev predictions"}
DISAGREE_NOTE = ("From each run's predictions.json of its final evaluation: mean ± standard deviation over the pairs; "
                 "an RMS difference is in the task's label units (STS-B: similarity 0–5). Table: "
                 "`study/{s}_disagreement.csv`.")
FLOORS_HEAD = "### Noise floors, measured"
FLOORS_COLS = ["task", "E", "floor (seeds changed)", "arm vs reference", "n", "mean diff", "sd", "mean abs diff",
               "dropout floor's, same seeds", "disagreement", "TOST at ±margin", "equivalent within"]
FLOORS_NOTE = ("Each floor run is an (E, 1) run that changes only the named seeds against the (E, 1) reference of the "
               "same grid seed. `dropout floor's, same seeds`: the dropout-only floor's mean abs diff over the seeds "
               "that floor has, so floors measured on fewer seeds compare like for like. `TOST at ±margin` judges the floor's differences by the pairs' test and margin: where "
               "even a re-seed is not shown equivalent, the margin is tighter than the noise the runs can resolve. "
               "{few}Table: `study/{s}_floors.csv`.")
FLOORS_FEW = ("A floor of {n} seeds gives a rough size, not a verdict to lean on: compare its mean abs diff with the "
              "dropout floor's on the same seeds, and note that every floor is measured from the same (E, 1) "
              "reference runs, so one lucky reference draw moves all of a seed's floors alike. ")
TRAJ_HEAD = "### Step by step: when do the paired runs part?"
TRAJ_COLS = ["task", "E", "arm", "(B, N) vs (E, 1)", "seed", "optimizer steps", "loss 1e-4 apart from step",
             "loss 1e-2 apart from step", "largest loss gap", "final difference", "× floor sd"]
TRAJ_NOTE = ("The training loss of (B, N) and (E, 1) at every optimizer step, as a relative gap |a − b| / |b|: the step "
             "at which it first exceeds 1e-4 and 1e-2 (— never) and its largest value, beside the final dev-metric "
             "difference and that difference over the dropout-only floor's sd. An exact arm starts at fp32 round-off "
             "(about 1e-7); where training amplifies round-off, the gap still grows over a long run until the two runs "
             "part like a dropout re-seed. With standard dropout the gap is open from the first step. Headline arms: "
             "medians over seeds (of the final |difference| too; a step's median over the seeds that parted, with "
             "their number when some never did) in the first rows; the others seed by seed. Table: "
             "`study/{s}_trajectory.csv`.")
CELLS_HEAD = "### Runs, failures and the reference bar"
CELLS_COLS = ["task", "E", "arm", "(B, N)", "planned", "finished", "unfinished seeds", "missing seeds", "diverged",
              "at/below baseline", "failure rate", "mean ± sd", "reference ≥ threshold", "steps clipped"]
BASELINE = {
    "majority": ("- {task}: trivial baseline {baseline} (accuracy of the majority class over the {baseline_labels} dev "
                 "labels of {baseline_source}); reference threshold {threshold}."),
    "positive": ("- {task}: trivial baseline {baseline} (F1 of always predicting class 1 over the {baseline_labels} "
                 "dev labels of {baseline_source}); reference threshold {threshold}."),
    "constant": "- {task}: trivial baseline {baseline} ({metric} of a constant predictor); reference threshold {threshold}.",
    "unknown": ("- {task}: trivial baseline unknown (no dev labels readable here: pass --glue_dir); only non-finite "
                "runs count as failed; reference threshold {threshold}."),
}
CELLS_NOTE = ("A run fails when its final metric is not finite or at or below the trivial baseline; failed runs stay "
              "in every table. `steps clipped`: the fraction of optimizer steps whose gradient norm exceeded "
              "max_grad_norm and was scaled down, mean over the finished seeds. Table: `study/{s}_cells.csv`.")
CURVES_HEAD = "### Learning curves and per-seed outcomes"

MECH_HEAD = "## Why accumulation drifts: the mechanism, cause by cause"
TOY = ("One weight w = 1, loss −(w·x)² per example, examples x = 4 and x = 2. As one batch, the mean loss has gradient "
       "mean(−2x²w) = −(32 + 8)/2 = {toy.batch_grad:g}. Accumulated over two micro-batches of one example, each loss "
       "scaled by 1/N = 1/2: the first backward leaves {toy.accumulated_first:g} in `.grad`, the second adds −4, "
       "giving {toy.accumulated:g}. SGD with lr 0.01 moves w from 1 to {toy.w_accumulated:g} accumulated and to "
       "{toy.w_batch:g} as one batch (computed by `bert_accum.study.report.toy_example` with the loop's own loss "
       "scaling). It is exact because the gradient is linear in the loss and the loss is a sum over examples that "
       "never interact: splitting the sum and scaling each part by its share of the examples changes only the order "
       "of additions. BERT fine-tuning breaks each of those premises somewhere: dropout draws masks per micro-batch, "
       "padding changes tensor shapes, a per-token loss averages over different counts, float additions are not "
       "associative, and loops get the bookkeeping wrong.")
ATTR_HEAD = "### Drift attribution at a glance"
ATTR_COLS = ["cause", "switch that removes it", "probe table", "one step: ratio to dropout-only floor", "one step: rel L2", "kind"]
ATTR_NOTE = ("One step: the probe's accumulated gradient of (B, N) against the (E, 1) gradient of the same arm, as "
             "relative L2 and as a ratio to the dropout-only floor (two dropout seeds of (E, 1)), min–max over (B, N); each "
             "row is read from the probe table of its own task. `systematic`: a deterministic cause more than "
             "{factor:g}× the fp32 round-off of the everything-off arm; `random`: a cause that redraws dropout masks.")
PROBE_ITEM = "{table}: {value:range3}"
CAUSE_TEXT = {
    "dropout": ("### Dropout RNG\n\nWith standard dropout each micro-batch draws its masks from torch's RNG stream, so "
                "the same example gets different masks in (B, N) than in (B·N, 1). The `invariant` mode makes a mask a "
                "pure function of (seed, example, epoch, site, position)."),
    "padding": ("### Padding\n\nDynamic padding pads each micro-batch to its own longest sequence, so (B, N) runs other "
                "tensor shapes and another floating-point path than (B·N, 1); with the attention mask honoured, padded "
                "positions contribute exact zeros."),
    "loss_averaging": ("### Per-token loss averaging\n\nWith a per-token loss (masked-LM), `mean_of_means` averages each "
                       "micro-batch's token mean with weight 1/N although micro-batches hold different numbers of "
                       "predicted tokens; `global` divides the window's summed token loss by the window's token count. "
                       "For classification both are the same (one item per example)."),
    "fp32_order": "### Precision and floating-point order",
    "bf16": "",
}
CAUSE_PROBE = {
    "dropout": ("- One step, standard dropout with every other cause off: {ratio} of the dropout-only floor; everything off: "
                "{controlled}."),
    "padding": ("- One step, dynamic instead of window padding with everything else off: {ratio} of the dropout-only floor, "
                "relative L2 {rel}."),
    "loss_averaging": "- One step, mean_of_means with everything else off: {ratio} of the dropout-only floor, relative L2 {rel}.",
    "fp32_order": ("- fp32 with every cause off (one step): relative L2 {rel}; the same in float64: {fp64}: the fp32 "
                   "difference is summation order, nothing else."),
    "bf16": "- bf16 autocast (one step): relative L2 {rel}.",
}
CAUSE_WHOLE_RUN = ("- Over whole runs (arm `{answer.exact_arm}` of the converged study, whose first steps match to "
                   "round-off): {answer.exact_parted} of {answer.exact_seed_pairs} pairs part, in {where}: their "
                   "training losses are 1% apart from step {answer.exact_parted_steps:range} on, and their final metrics "
                   "up to {answer.exact_parted_diff} apart; in the other pairs the per-step loss gap stays below "
                   "{answer.exact_held_gap:2}. Training amplifies fp32 round-off: over enough steps it parts runs that "
                   "started equal to round-off (table \"Step by step\" above).")
CAUSE_NOT_PROBED = "- One step: {what} not probed in this report."
EARLY_ARM_TEXT = ("- Early training, arm `{arm}`: at the last step its parameters are {dist} away from (E, 1) of the "
                  "same seeds, relative to how far (E, 1) moved from the start (‖θ − θ_E1‖ / ‖θ_E1 − θ_0‖, mean over "
                  "tasks and (B, N)); {first_dist} already after the first optimizer step that changed the weights; two "
                  "(E, 1) runs of different seeds (head, order and dropout) end {floor} apart on the same scale. Mean "
                  "|paired difference| of the final metric: {by_task}.")
EARLY_ARM_TASK = "{task} {value} {metric}"
BUGS_HEAD = "### Known loop bugs (early training, against the correct loop at the same (B, N) and seeds)"
BUGS_COLS = ["bug", "task", "B", "N", "n", "optimizer steps", "correct loop steps", "last LR", "correct last LR",
             "paired diff", "95% CI", "seed std", "param dist"]
BUGS_NOTE = ("`param dist`: final parameter distance to the correct run of the same seed, relative to the correct "
             "run's total movement. `optimizer steps` and `last LR` show what each bug changes in the schedule.")
BATCHNORM = ("### BatchNorm (accumulation is exact only without batch statistics)\n\n{batchnorm.excerpt} (from "
             "`{batchnorm.path}`.) BERT uses LayerNorm, which normalises each token by itself, so this cause does "
             "not apply to it.")
MULTIPROCESS = ("### Multi-process reduction\n\nWith W processes DDP averages gradients over ranks; the loop scales "
                "each rank's loss by W and all-reduces the item count for `global` normalisation, so (W=2, B=2, N=2) "
                "gives the (W=1, B=8, N=1) gradient to round-off (`tests/test_distributed.py`); see "
                "`docs/distributed.md`.")

EARLY_HEAD = "## Early training (first {steps:range} optimizer steps)"
EARLY_INTRO = ("These runs stop after {steps:range} optimizer steps, long before convergence: they show the mechanism "
               "in the first steps (how far and how fast (B, N) moves away from (E, 1)), not final outcomes, which "
               "the converged study judges.")
EARLY_STUDY = ("### Study `{name}`\n\nFrom {source}: {runs} runs, tasks {tasks}, arms {arms}, seeds {seeds}, on "
               "{devices}; {train_hours:2} h of training.")
EARLY_SETUP = ("Model `{setup.model_name_or_path}`, max_length {setup.max_length:g}, learning rate "
               "{setup.learning_rate:g}, warmup ratio {setup.warmup_ratio:g}, {setup.train_examples:g} training examples "
               "({setup.epochs:g} {epoch_word}), effective batch {setup.effective_batch_size:g}.")
EARLY_COLS = ["task", "arm", "B", "N", "metric", "n", "mean ± std", "paired diff", "95% CI", "seed std",
              "CI excludes 0", "param dist", "vs"]
EARLY_VERDICT = ("After {steps:range} optimizer steps {n_excl} of {paired} paired (B, N) cells in `{name}` have a 95% "
                 "interval of the paired difference that excludes 0 (n = {n_pairs:range} seeds per cell){which}.{constant} An "
                 "early difference describes the first steps' trajectory, not the trained model.")
EARLY_CONSTANT = (" In {n_const} of the {paired} cells every run of both (B, N) and its reference ends at one value "
                  "(a constant predictor, such as the majority class): no difference can show there ({cells}).")
EARLY_NOTE = ("Columns: `mean ± std` over seeds; `paired diff` and its 95% Student-t interval over the paired seeds; "
              "`seed std` = standard deviation of the reference's metric over seeds; `param dist` = final relative "
              "parameter distance to the reference.")
EARLY_NONE = "No early-training study in this report."
FIGURE = "![{caption}]({path})"
FIGURE_CAPTIONS = {
    "attribution": "Drift attribution: each cause's one-step effect as a ratio to the dropout-only floor",
    "forest": "TOST forest plot: paired differences and the dropout-only floor (grey), 90% intervals against the margins",
    "scatter": "Per-seed final metrics: (B, N) against (E, 1)",
    "curves": "Learning curves: dev metric over optimizer steps, mean over finished seeds",
}


# ------------------------------------------------------------------------------------------ sections
SECTION_SOURCE = "*This section is `{path}`, written by its own script ({provenance}).*"


def render(nums: dict[str, Any], figures: dict[str, str], sections: list[tuple[str, str, str]] = ()) -> str:
    """REPORT.md: the answer, how the runs were made, the converged study, the sections of other study scripts
    ((path, provenance, body) each, shown with their source), the mechanism, early training."""
    parts = [header(nums["provenance"], markdown=True), "", TITLE, "", INTRO, ""]
    for section in (_answer, _setup):
        parts += section(nums, figures)
    # The evidence sections are numbered in the order they appear, whichever sections a report includes: every
    # top-level heading this module writes, and the first one of each included section.
    count = [0]
    parts += _numbered(_converged(nums, figures), count)
    for path, prov, text in sections:
        parts += _numbered(text.split("\n"), count, first_only=True) + ["", fill(SECTION_SOURCE, {}, path=path, provenance=prov), ""]
    for section in (_mechanism, _early):
        parts += _numbered(section(nums, figures), count)
    return "\n".join(parts).rstrip("\n") + "\n"


def _numbered(lines: list[str], count: list[int], first_only: bool = False) -> list[str]:
    """`lines` (joined and split again) with their "## " headings numbered on from `count`."""
    out, done = [], False
    for line in "\n".join(lines).split("\n"):
        if line.startswith("## ") and not (first_only and done):
            count[0] += 1
            line, done = f"## {count[0]}. {line[3:]}", True
        out.append(line)
    return out


def _answer(nums: dict[str, Any], figures: dict[str, str]) -> list[str]:
    state = nums["answer.state"]
    line1 = "bias_all" if state == "bias" and len(nums["answer.biased"]) == nums["answer.decided"] else state
    biased = dict(n_biased=len(nums["answer.biased"]), biased=", ".join(_pair_name(nums, k) for k in nums["answer.biased"]))
    limit = nums.get("answer.var_ratio_high")
    spread_limit = fill(ANSWER_SPREAD_LIMIT, nums) if isinstance(limit, float) and math.isfinite(limit) else ""
    partial = {}
    if state == "partial":
        partial = dict(decided=", ".join(_pair_name(nums, k) for k in nums["answer.decided_pairs"]),
                       waiting=", ".join(_pair_name(nums, k) for k in nums["answer.waiting_pairs"]),
                       reading=fill(ANSWER_PARTIAL_READING[nums["answer.decided_state"]], nums, **biased,
                                    spread_limit=spread_limit))
    L = [ANSWER_HEAD, "", fill(ANSWER_STATE[line1], nums, **biased, **partial, spread_limit=spread_limit)]
    for k in nums.get("answer.shifted", []):
        L[-1] += fill(ANSWER_SHIFTED, nums, pair=_pair_name(nums, k), mean=nums[f"{k}.spread.mean"],
                      p=nums[f"{k}.spread.t_p"], floor_mean=nums[f"{k}.spread.floor_mean"])
    L.append(_size_line(nums))
    equiv = fill(ANSWER_EQUIV, nums) if nums["answer.n_headline"] else ANSWER_EQUIV_NONE
    bounds = [fill(ANSWER_EQUIV_BOUND, nums, f"answer.{t}", task=t) for t in nums["answer.tasks"]
              if nums[f"answer.{t}.bound"] is not None and nums[f"answer.{t}.floor_bound"] is not None]
    if nums.get("answer.floor_decided") and bounds:
        equiv += fill(ANSWER_EQUIV_FLOOR, nums, bounds="; ".join(bounds))
    if nums.get("answer.unresolved"):
        ks = nums["answer.unresolved"]
        ns = sorted({nums[f"{k}.n"] for k in ks})
        equiv += fill(ANSWER_EQUIV_UNRESOLVED, nums, pairs=", ".join(_pair_name(nums, k) for k in ks),
                      n=str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}")
    L.append(equiv)
    if nums["probe.tables"]:
        def names(ids: list[str]) -> str:
            """Each cause with the probe tables that show it so."""
            return ", ".join(fill(CAUSE_WITH_TABLES, nums, f"cause.{c}", cause=CAUSE_NAMES[c], tables=(
                nums[f"cause.{c}.systematic_in"] or nums[f"cause.{c}.random_in"] or nums[f"cause.{c}.roundoff_in"]))
                for c in ids) or NONE

        bugs = fill(ANSWER_BUGS, nums, bugs=", ".join(nums["answer.bugs"])) if nums["answer.bugs"] else ""
        L.append(fill(ANSWER_CAUSES, nums, systematic=names(nums["answer.systematic"]), random=names(nums["answer.random"]),
                      roundoff=names(nums["answer.roundoff"]), bugs=bugs))
    else:
        L.append(ANSWER_CAUSES_NONE)
    if nums.get("biases.present"):
        L[-1] += _biases_at_the_end(nums)
    if nums["answer.exact_arm"]:
        by_task = ", ".join(fill(ANSWER_EXACT_TASK, nums, task=t, value=show(v), metric=m, ratio=show(r, "2"))
                            for t, v, m, r in zip(nums["answer.exact_tasks"], nums["answer.exact_by_task"],
                                                  nums["answer.exact_metrics"], nums["answer.exact_floor_ratio"]))
        exact = fill(ANSWER_EXACT, nums, switches=" ".join(nums["answer.exact_switches"]), by_task=by_task,
                     start=fill(ANSWER_EXACT_START[_exact_start(nums)], nums),
                     so_far="" if nums["answer.exact_decided"] else fill(ANSWER_EXACT_SO_FAR, nums),
                     apart=_exact_apart(nums))
    else:
        exact = ANSWER_EXACT_NONE
    ratios = [fill(ANSWER_EXCESS_TASK, nums, ratio=nums[f"answer.{t}.abs_mean_ratio"], task=t)
              for t in nums["answer.tasks"] if nums.get(f"answer.{t}.abs_mean_ratio")]
    excess = fill(ANSWER_EXCESS, nums, items=", ".join(ratios)) if ratios else ""
    L += [fill(ANSWER_ACT[state], nums, exact=exact, excess=excess) + _fix_shown_biases(nums), ""]
    return L


def _fix_shown_biases(nums: dict[str, Any]) -> str:
    """Line 5's closing sentence: each bias shown at the end of training, its effects per (B, N), and its fix."""
    by_bias: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in (nums.get("biases.shown") or []) if nums.get("biases.present") else []:
        by_bias.setdefault((r["bias"], r["metric"]), []).append(r)
    items = [fill(ANSWER_ACT_BIAS, nums, bias=bias, metric=metric, fix=BIAS_FIX.get(bias, BIAS_FIX_UNKNOWN),
                  effects=", ".join(fill(ANSWER_ACT_BIAS_EFFECT, nums, effect=show(r["mean_diff"], "signed"),
                                         micro_batch_size=r["micro_batch_size"],
                                         accumulation_steps=r["accumulation_steps"]) for r in rows))
             for (bias, metric), rows in by_bias.items()]
    return fill(ANSWER_ACT_BIASES, nums, items="; ".join(items)) if items else ""


def _exact_apart(nums: dict[str, Any]) -> str:
    """Line 5's clause on the exact arm's pairs that part over a whole run, and its comparisons not shown equivalent."""
    if not nums.get("answer.exact_parted"):
        return ""
    ks = nums.get("answer.exact_not_equivalent", [])
    not_equivalent = fill(ANSWER_EXACT_NOT_EQUIVALENT, nums, pairs=", ".join(_pair_name(nums, k) for k in ks),
                          is_are="is" if len(ks) == 1 else "are") if ks else ""
    lo, hi = nums["answer.exact_parted_steps"]
    steps = f"step {lo}" if lo == hi else f"steps {lo}–{hi}"
    return fill(ANSWER_EXACT_APART, nums, where=", ".join(nums["answer.exact_parted_where"]), steps=steps,
                not_equivalent=not_equivalent)


def _size_line(nums: dict[str, Any]) -> str:
    """Line 2: each headline comparison's mean |difference| and sd beside its own dropout-only floor's, per task and
    effective batch (a range over effective batches would hide which floor goes with which), then the dev-set
    disagreement the same way."""
    parts, dis = [], []
    for t in nums["answer.tasks"]:
        p = f"answer.{t}"
        keys = nums.get(f"{p}.pairs") or []
        if not keys:
            continue
        items = [fill(ANSWER_SIZE_PAIR, nums, bn=_bn(k.split(".pair.")[1]), E=k.split(".e")[-1].split(".")[0],
                      abs=show(a), floor_abs=show(f), sd_ratio=r)
                 for k, a, f, r in zip(keys, nums[f"{p}.abs_mean_by_pair"], nums[f"{p}.floor_abs_mean_by_pair"],
                                       nums[f"{p}.sd_ratio_by_pair"])]
        parts.append(fill(ANSWER_SIZE_TASK, nums, task=t, metric=nums[f"{p}.metric"], items=", ".join(items)))
        values, floors = nums[f"{p}.disagreement_by_pair"], nums[f"{p}.floor_disagreement_by_pair"]
        if any(isinstance(v, float) and math.isfinite(v) for v in values):
            dis.append(fill(ANSWER_SIZE_DIS_TASK, nums, task=t, what=DISAGREE_WHAT[bool(nums[f"{p}.regression"])],
                            values=" and ".join(show(v) for v in values), floor_values=" and ".join(show(v) for v in floors)))
    if not parts:
        return ANSWER_SIZE_NONE
    return fill(ANSWER_SIZE_BY_E, nums, parts="; ".join(parts)) + (fill(ANSWER_SIZE_DIS_BY_E, nums, parts="; ".join(dis))
                                                                    if dis else "")


def _bias_below(nums: dict[str, Any], b: dict[str, Any]) -> str:
    """One bias below its detection limit: the largest effect its intervals leave room for, with the comparisons
    whose pairs all ended identical counted apart (they have no interval, and a limit of 0 would read as one)."""
    same = b.get("identical", 0)
    which = (("its one comparison" if same == 1 else f"its {same} comparisons") if same == b["comparisons"]
             else f"{same} of its {b['comparisons']} comparisons")
    if b["limit"] is None:
        return fill(ANSWER_BIAS_IDENTICAL, nums, bias=b["bias"], metric=b["metric"], which=which)
    return fill(ANSWER_BIAS_BELOW, nums, bias=b["bias"], limit=show(b["limit"], "range"), metric=b["metric"],
                identical=fill(ANSWER_BIAS_ALSO_IDENTICAL, nums, metric=b["metric"], which=which) if same else "")


def _biases_at_the_end(nums: dict[str, Any]) -> str:
    """Line 4's last sentence: the bias study's verdicts at the end of training."""
    shown = [fill(ANSWER_BIAS_SHOWN, nums, **{k: v for k, v in r.items() if k != "ci95"},
                  effect=f"{show(r['mean_diff'], 'signed')} {_pair_ci(r['ci95'])}") for r in nums["biases.shown"]]
    parts = []
    if shown:
        parts.append(fill(ANSWER_BIASES_SHOWN, nums, items="; ".join(shown)))
    elif nums["biases.below"]:  # "none shown" only once some comparison has been decided
        parts.append(ANSWER_BIASES_NONE_SHOWN)
    if nums["biases.below"]:
        parts.append(fill(ANSWER_BIASES_BELOW, nums, items=", ".join(_bias_below(nums, b) for b in nums["biases.below"])))
    off = nums.get("biases.not_at_convergence") or []
    if off:
        parts.append(fill(ANSWER_BIASES_OFF, nums, n=len(off), items=", ".join(fill(ANSWER_BIAS_OFF, nums, **r) for r in off)))
    if nums["biases.waiting"]:
        parts.append(fill(ANSWER_BIASES_WAITING, nums, waiting=nums["biases.waiting"],
                          finished=nums["biases.waiting_pairs_finished"], planned=nums["biases.waiting_pairs_planned"]))
    return fill(ANSWER_BIASES_END, nums, comparisons=nums["biases.comparisons"], parts="; ".join(parts))


def _pair_ci(ci: list[float]) -> str:
    lo, hi = ci
    if isinstance(lo, float) and math.isnan(lo):
        return "(one pair)"
    return f"[{fmt(float(lo), 4)}, {fmt(float(hi), 4)}]"


def _exact_start(nums: dict[str, Any]) -> str:
    gap = nums.get("answer.exact_first_gap")
    if not isinstance(gap, float) or not math.isfinite(gap):
        return "unknown"
    return "round-off" if nums["answer.exact_roundoff"] else "apart"


def _trajectories(nums: dict[str, Any], s: str) -> list[str]:
    """When each pair's training losses part: headline arms as medians over seeds, every other arm seed by seed."""
    import statistics

    def step(v: Any) -> str:
        return "—" if v is None else str(int(v))

    def median_step(values: list[int | None]) -> str:
        """The median over the seeds that parted, and how many did: a run that never parts has no step."""
        found = [v for v in values if v is not None]
        if not found:
            return f"none of {len(values)}"
        return step(statistics.median(found)) + ("" if len(found) == len(values) else f" ({len(found)} of {len(values)})")

    def median(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return statistics.median(finite) if finite else math.nan

    head_rows, rows = [], []
    for task, E, label, k in _each(nums, s, "pair"):
        t, seeds, fsd = f"{k}.trajectory", nums[f"{k}.seeds"], nums.get(f"{k}.spread.floor_sd")
        if not seeds:
            continue

        def vs_floor(d: float) -> str:
            return show(abs(d) / fsd, "2") if isinstance(fsd, float) and math.isfinite(fsd) and fsd > 0 else "—"

        pair = [task, str(E), _arm(label), f"{_bn(label)} vs ({E}, 1)"]
        if not any(nums[f"{t}.steps"]):
            rows.append(pair + [", ".join(map(str, seeds)), "no step records"] + ["—"] * 5)
            continue
        if nums[f"{k}.headline"]:
            final = statistics.median(abs(d) for d in nums[f"{k}.diffs"])
            head_rows.append(pair + [f"median of {len(seeds)}", step(statistics.median(nums[f"{t}.steps"])),
                                     median_step(nums[f"{t}.apart_1e4"]), median_step(nums[f"{t}.apart_1e2"]),
                                     show(median(nums[f"{t}.max_rel"]), "2"), show(final), vs_floor(final)])
            continue
        for i, seed in enumerate(seeds):
            rows.append(pair + [str(seed), str(nums[f"{t}.steps"][i]), step(nums[f"{t}.apart_1e4"][i]),
                                step(nums[f"{t}.apart_1e2"][i]), show(nums[f"{t}.max_rel"][i], "2"),
                                show(nums[f"{k}.diffs"][i], "signed"), vs_floor(nums[f"{k}.diffs"][i])])
    if not rows and not head_rows:
        return []
    return [TRAJ_HEAD, "", table(TRAJ_COLS, head_rows + rows), "", fill(TRAJ_NOTE, nums, s=s), ""]


def _plural(value: Any, word: str) -> str:
    """`word` or its plural for a value shown beside it: a list of values, or a count other than 1."""
    many = isinstance(value, list) or (isinstance(value, (int, float)) and value != 1)
    return word + "s" if many else word


def _train_data(nums: dict[str, Any], prefix: str) -> str:
    """Which training examples a task's runs used, in words, from max_train_samples / max_train_examples."""
    samples, examples = (nums.get(f"{prefix}.{f}") is not None for f in ("max_train_samples", "max_train_examples"))
    kind = "both" if samples and examples else "samples" if samples else "examples" if examples else "all"
    return fill(SETUP_TRAIN_DATA[kind], nums, prefix.rsplit(".setup", 1)[0])


def _pair_name(nums: dict[str, Any], key: str) -> str:
    label = key.split(".pair.", 1)[1]
    return fill(PAIR_NAME, nums, key, arm=_arm(label), bn=_bn(label))


def _setup(nums: dict[str, Any], figures: dict[str, str]) -> list[str]:
    L = [SETUP_HEAD, ""]
    if not nums["studies.converged"]:
        return L + [SETUP_NONE, ""]
    for s in nums["studies.converged"]:
        L += [fill(SETUP_STUDY, nums, s, s=s), ""]
        if nums.get(f"{s}.changes"):
            L += [fill(SETUP_CHANGES, nums, s), ""] + [f"- {c.strip()}" for c in nums[f"{s}.changes"]] + [""]
        L += [fill(SETUP_ENV, nums, s, commit_word=_plural(nums[f"{s}.setup.commits"], "commit"),
                                                    thread_word=_plural(nums[f"{s}.setup.threads"], "thread")), ""]
        for task in nums[f"{s}.tasks"]:
            if nums[f"{s}.{task}.setup.model_name_or_path"] is None:
                L.append(fill(SETUP_TASK_NONE, nums, task=task))
                continue
            L.append(fill(SETUP_TASK, nums, f"{s}.{task}", task=task, train_data=_train_data(nums, f"{s}.{task}.setup")))
            L += [fill(SETUP_E, nums, f"{s}.{task}.e{E}", E=E, epoch_word=_plural(
                nums[f"{s}.{task}.e{E}.setup.epochs_trained"], "epoch")) for E in nums[f"{s}.{task}.E"]
                  if nums[f"{s}.{task}.e{E}.setup.total_optimizer_steps"] is not None]
            L += [fill(SETUP_ARM, nums, f"{s}.{task}.setup.arm.{arm}", arm=arm) for arm in nums[f"{s}.{task}.setup.arms"]]
        L.append("")
    if nums.get("answer.pending_runs"):
        L += [fill(SETUP_PENDING, nums, arms=", ".join(nums["answer.pending_arms"]),
                   touch=SETUP_PENDING_TOUCH[nums["answer.pending_touches_answer"]]), ""]
    return L


def _each(nums: dict[str, Any], s: str, what: str) -> list[tuple[str, int, str, str]]:
    """(task, E, label, key) for every pair / floor / cell of study `s`."""
    out = []
    for task in nums[f"{s}.tasks"]:
        for E in nums[f"{s}.{task}.E"]:
            e = f"{s}.{task}.e{E}"
            for label in nums[f"{e}.{what}s"]:
                out.append((task, E, label, f"{e}.{what}.{label}"))
    return out


def _converged(nums: dict[str, Any], figures: dict[str, str]) -> list[str]:
    L: list[str] = []
    for s in nums["studies.converged"]:
        L += [fill(CONV_HEAD, nums, s=s), ""]
        for task in nums[f"{s}.tasks"]:
            tables = nums[f"{s}.{task}.probe_tables"]
            L += [fill(PROBE_OF_TASK, nums, task=task, table=t, dropout=nums.get(f"probe.{t}.controlled_dropout_standard.ratio"),
                       default=nums.get(f"probe.{t}.default.ratio"), controlled=nums.get(f"probe.{t}.controlled.ratio"))
                  for t in tables] or [fill(PROBE_OF_TASK_NONE, nums, task=task)]
        L += ["", TOST_HEAD, ""]
        rows = [[task, str(E), _arm(label), f"{_bn(label)} vs ({E}, 1)", f"{nums[k + '.n']} of {nums[k + '.required']}",
                 show(nums[k + ".tost.mean"], "signed"), _ci(nums, k, "tost.ci90_low", "tost.ci90_high"),
                 _ci(nums, k, "tost.ci95_low", "tost.ci95_high"), f"±{show(nums[k + '.tost.margin'])}", nums[k + ".verdict"],
                 _within(nums, k) if nums[k + ".decided"] else "—"]
                for task, E, label, k in _each(nums, s, "pair")]
        L += [table(TOST_COLS, rows), "", _figure(figures, f"forest_{s}", "forest"),
              fill(TOST_NOTE, nums, s=s, headline_arms=", ".join(nums[f"{s}.headline_arms"]), min_n=_min_n()), ""]
        L += [SPREAD_HEAD, ""]
        # Below the pairs a comparison needs, the tests are not shown (their p-values would read as verdicts).
        rows = [[task, str(E), _arm(label), _bn(label), str(nums[k + ".spread.n"]), show(nums[k + ".spread.sd"]),
                 str(nums[k + ".spread.n_floor"]), show(nums[k + ".spread.floor_sd"])]
                + ([_ratio_ci(nums, k + ".spread"), _equal_spread(nums, k + ".spread"),
                    show(nums[k + ".spread.t_p"], "p") if nums[k + ".spread.sd"] else "—", _vs_floor(nums, k + ".spread"),
                    show(nums[k + ".spread.vs_floor_t_p"], "p")] if nums[k + ".decided"] else ["—"] * 5)
                + [nums[k + ".spread.reading"]]
                for task, E, label, k in _each(nums, s, "pair")]
        L += [table(SPREAD_COLS, rows), "", fill(SPREAD_NOTE, nums, s=s), ""]
        L += [DISAGREE_HEAD, ""]
        rows = [[task, str(E), f"{_arm(label)} {_bn(label)} vs ({E}, 1)",
                 DISAGREE_MEASURE[bool(nums[f"{s}.{task}.regression"])], str(nums[k + ".disagreement.n"]),
                 _pm(nums, k + ".disagreement"), show(nums[k + ".disagreement.floor_mean"]),
                 show(nums[k + ".disagreement.ratio"], "2")] for task, E, label, k in _each(nums, s, "pair")]
        L += [table(DISAGREE_COLS, rows), "", fill(DISAGREE_NOTE, nums, s=s), ""]
        L += [FLOORS_HEAD, ""]
        rows = [[task, str(E), f"{kind} ({show(nums[k + '.varied'])})", f"{nums[k + '.arm']} vs {nums[k + '.reference_arm']}",
                 f"{nums[k + '.n']} of {nums[k + '.planned']}", show(nums[k + ".mean"], "signed"), show(nums[k + ".sd"]),
                 show(nums[k + ".abs_mean"]), show(nums[k + ".dropout_abs_mean_same_seeds"]) if kind != "dropout" else "—",
                 _pm(nums, k + ".disagreement"), nums[k + ".verdict"], "—" if nums[k + ".verdict"].startswith("not yet") else _within(nums, k)]
                for task, E, kind, k in _each(nums, s, "floor")]
        few = sorted({nums[k + ".planned"] for _, _, _, k in _each(nums, s, "floor") if nums[k + ".planned"] < _min_n()})
        L += [table(FLOORS_COLS, rows), "", fill(FLOORS_NOTE, nums, s=s, few=fill(
            FLOORS_FEW, nums, n=" or ".join(map(str, few))) if few else ""), ""]
        L += _trajectories(nums, s)
        L += [CELLS_HEAD, ""]
        rows = []
        for task, E, label, k in _each(nums, s, "cell"):
            cleared = (f"{nums[k + '.cleared']} of {nums[k + '.finished']}" if nums[k + ".reference"] and nums[k + ".finished"]
                       else "—")
            rows.append([task, str(E), _arm(label), _bn(label), str(nums[k + ".planned"]), str(nums[k + ".finished"]),
                         show(nums[k + ".unfinished_seeds"]), show(nums[k + ".missing_seeds"]), str(nums[k + ".diverged"]),
                         str(nums[k + ".failed"]), show(nums[k + ".failure_rate"], "pct"), _pm(nums, k), cleared,
                         show(nums[k + ".clipped_fraction"], "pct")])
        L += [table(CELLS_COLS, rows), ""]
        L += [fill(BASELINE[nums[f"{s}.{t}.baseline_rule"]], nums, f"{s}.{t}", task=t) for t in nums[f"{s}.tasks"]]
        L += ["", fill(CELLS_NOTE, nums, s=s), "", CURVES_HEAD, ""]
        L += [_figure(figures, f"curves_{s}", "curves"), _figure(figures, f"scatter_{s}", "scatter")]
    return L


def _min_n() -> int:
    from .numbers import HEADLINE_MIN_N

    return HEADLINE_MIN_N


def _figure(figures: dict[str, str], name: str, caption: str) -> str:
    return fill(FIGURE, {}, caption=FIGURE_CAPTIONS[caption], path=figures[name]) + "\n" if name in figures else ""


def _probe_values(nums: dict[str, Any], arm: str, col: str) -> str:
    items = [fill(PROBE_ITEM, nums, table=t, value=nums[f"probe.{t}.{arm}.{col}"]) for t in nums["probe.tables"]
             if f"probe.{t}.{arm}.{col}" in nums]
    return "; ".join(items) or "not probed"


def _mechanism(nums: dict[str, Any], figures: dict[str, str]) -> list[str]:
    from .numbers import ROUND_OFF_FACTOR

    L = [MECH_HEAD, "", fill(TOY, nums), ""]
    if nums["probe.tables"]:
        rows = []
        for c in nums["cause.ids"]:
            arm = nums[f"cause.{c}.probe_arm"]
            for t in nums["probe.tables"]:
                if f"probe.{t}.{arm}.ratio" in nums:
                    rows.append([CAUSE_NAMES[c], f"`{nums[f'cause.{c}.switch']}`", t, show(nums[f"probe.{t}.{arm}.ratio"], "range3"),
                                 show(nums[f"probe.{t}.{arm}.rel_l2"], "range3"), nums[f"probe.{t}.{arm}.kind"]])
        L += [ATTR_HEAD, "", table(ATTR_COLS, rows), "", _figure(figures, "attribution", "attribution"),
              fill(ATTR_NOTE, nums, factor=ROUND_OFF_FACTOR), ""]
    for c in nums["cause.ids"]:
        arm = nums[f"cause.{c}.probe_arm"]
        if CAUSE_TEXT[c]:
            L += [CAUSE_TEXT[c], ""]
        if any(f"probe.{t}.{arm}.ratio" in nums for t in nums["probe.tables"]):
            L.append(fill(CAUSE_PROBE[c], nums, ratio=_probe_values(nums, arm, "ratio"), rel=_probe_values(nums, arm, "rel_l2"),
                          controlled=_probe_values(nums, "controlled", "ratio"),
                          fp64=_probe_values(nums, "controlled_fp64", "rel_l2")))
        else:
            L.append(fill(CAUSE_NOT_PROBED, nums, what=CAUSE_NAMES[c]))
        if c == "fp32_order" and nums.get("answer.exact_roundoff") and nums.get("answer.exact_parted"):
            L.append(fill(CAUSE_WHOLE_RUN, nums, where="; ".join(nums["answer.exact_parted_where"])))
        # Early-training arms: the masked-LM ones measure the loss averaging, the others the dropout masks.
        arms = [a for a in nums["early.arms"] if (c == "loss_averaging") == a.startswith("mlm_")]
        if c in ("dropout", "loss_averaging"):
            L += [fill(EARLY_ARM_TEXT, nums, f"early.arm.{a}", arm=a, by_task=", ".join(
                fill(EARLY_ARM_TASK, nums, task=t, value=show(v), metric=m) for t, v, m in zip(
                    nums[f"early.arm.{a}.absdiff_tasks"], nums[f"early.arm.{a}.absdiff_by_task"],
                    nums[f"early.arm.{a}.absdiff_metrics"]))) for a in arms]
        L.append("")
    if nums["early.bugs"]:
        rows = [[nums[k + ".bug"], nums[k + ".task"], str(nums[k + ".B"]), str(nums[k + ".N"]), str(nums[k + ".n_pairs"]),
                 show(nums[k + ".optimizer_steps"]), show(nums[k + ".reference_steps"]),
                 show(nums[k + ".last_learning_rate"], ""), show(nums[k + ".reference_last_learning_rate"]),
                 show(nums[k + ".diff_mean"]), _ci(nums, k, "diff_lo", "diff_hi"), show(nums[k + ".seed_std"]),
                 show(nums[k + ".rel_param_distance"])] for k in nums["early.bugs"]]
        L += [BUGS_HEAD, "", table(BUGS_COLS, rows), "", BUGS_NOTE, ""]
    if nums.get("batchnorm.path"):
        L += [fill(BATCHNORM, nums), ""]
    L += [MULTIPROCESS, ""]
    return L


def _early(nums: dict[str, Any], figures: dict[str, str]) -> list[str]:
    studies = nums["studies.early"]
    if not studies:
        return [EARLY_NONE, ""]
    from .numbers import span

    steps = span(x for s in studies for x in (nums[f"early.{s}.steps"] or []))
    L = [fill(EARLY_HEAD, nums, steps=steps), "", fill(EARLY_INTRO, nums, steps=steps), ""]
    for s in studies:
        p = f"early.{s}"
        L += [fill(EARLY_STUDY, nums, p, name=s), ""]
        if f"{p}.setup.model_name_or_path" in nums:
            L += [fill(EARLY_SETUP, nums, p, epoch_word=_plural(nums.get(f"{p}.setup.epochs"), "epoch")), ""]
        for name in (f"paired_diff_{s}",):
            if name in figures:
                L.append(fill(FIGURE, {}, caption="paired differences", path=figures[name]) + "\n")
        rows = []
        for label in nums[f"{p}.cells"]:
            k = f"{p}.cell.{label}"
            n = f"{nums[k + '.n']} ({nums[k + '.non_finite']} diverged)" if nums[k + ".non_finite"] else str(nums[k + ".n"])
            paired = nums[k + ".n_pairs"] > 1
            dist = (f"{show(nums[k + '.rel_param_distance'])} ± {show(nums[k + '.rel_param_distance_std'])}"
                    if _finite(nums[k + ".rel_param_distance"]) else "—")
            rows.append([nums[k + ".task"], nums[k + ".arm"], str(nums[k + ".B"]), str(nums[k + ".N"]), nums[k + ".metric"], n,
                         _pm(nums, k, "mean", "std"), show(nums[k + ".diff_mean"]), _ci(nums, k, "diff_lo", "diff_hi"),
                         show(nums[k + ".seed_std"]), show(nums[k + ".ci_excludes_zero"]) if paired else "—", dist,
                         nums[k + ".reference"] or "—"])
        L += [table(EARLY_COLS, rows), ""]
        if nums[f"{p}.paired"]:
            which = nums[f"{p}.excluding_zero"]
            const = nums.get(f"{p}.constant") or []
            L += [fill(EARLY_VERDICT, nums, p, name=s, n_excl=len(which), which=(": " + ", ".join(which)) if which else "",
                       constant=fill(EARLY_CONSTANT, nums, p, n_const=len(const), cells=", ".join(const)) if const else ""),
                  ""]
        for kind, caption in (("grad_norm", "gradient norm"), ("param_distance", "parameter distance")):
            L += [fill(FIGURE, {}, caption=f"{caption}, {s} / {task}", path=figures[f"{kind}_{s}_{task}"]) + "\n"
                  for task in nums[f"{p}.tasks"] if f"{kind}_{s}_{task}" in figures]
    L += [EARLY_NOTE, ""]
    return L


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)

