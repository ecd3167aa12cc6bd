"""The offline demo study: does gradient accumulation drift from the large batch, and do the controls remove it?

Needs no network and no GLUE files: it generates this project's synthetic GLUE-format task (not GLUE) and
fine-tunes the embedded all-MiniLM-L6-v2 at one effective batch E in two arms,

* ``default``: the loop as the Hugging Face examples write it (standard dropout, dynamic padding, mean of
  micro-batch means), and
* ``controlled``: invariant dropout, window padding and global loss normalisation,

each at (E, 1) and at the other (B, N) of the grid, plus the *dropout-only floor*: (E, 1) of the default arm with
another ``--dropout_seed``, i.e. how far two large-batch runs land apart only because their dropout masks differ.
Every run stores parameter fingerprints (``--fingerprint_steps``), and the distance of each (B, N) to its arm's
(E, 1) after every fingerprinted step is `study.report.param_distance`: ||θ − θ(E,1)|| / ||θ(E,1) − θ₀||.

Writes ``param_distance.png`` (that distance per step, log scale, both arms and the floor), ``report.md``
(the answer, accuracies, the distances, and the per-step gradient-norm difference to (E, 1)) and the run folders:
``runs/B<B>_N<N>`` (default arm), ``runs/controlled/B<B>_N<N>``, ``runs/dropout_floor/B<E>_N1``, each run's
output in ``logs/``. Prints a five-line answer.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import TrainConfig
from ..core.records import check_writable_dir, read_jsonl
from ..errors import BertAccumError
from .plumbing import fmt, header, provenance

DEFAULT_GRID = ((16, 1), (8, 2), (4, 4))
CONTROLLED = {"dropout": "invariant", "padding": "window", "loss_normalization": "global"}
ARMS = {"default": {}, "controlled": CONTROLLED}
FLOOR = "dropout_floor"
FLOOR_DROPOUT_SEED_OFFSET = 1000
"""The floor run's --dropout_seed is the demo's seed plus this: another dropout stream, same head and data."""
NEGATION_RATE = 0.25
"""Share of negated sentences in the demo's data: the adjective's polarity alone is right 75% of the time, so the
embedded model learns the task within the demo's 24 steps (at the task's default 0.5 it stays at chance longer)."""


@dataclass
class DemoRun:
    """One run of the demo: its arm ('default', 'controlled' or the floor), (B, N), config and results."""

    arm: str
    micro_batch_size: int
    accumulation_steps: int
    config: TrainConfig
    final: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bn(self) -> tuple[int, int]:
        """(B, N)."""
        return self.micro_batch_size, self.accumulation_steps

    @property
    def path(self) -> Path:
        """The run folder."""
        return Path(self.config.output_dir)

    @property
    def label(self) -> str:
        """'default (8,2)', 'controlled (16,1)', 'dropout_floor (16,1)'."""
        return f"{self.arm} ({self.micro_batch_size},{self.accumulation_steps})"

    @property
    def accuracy(self) -> float:
        """Final dev-set value of the task's main metric."""
        return float(self.final.get("eval", {}).get(self.final.get("main_metric", "accuracy"), math.nan))


def _load_average() -> str:
    """The 1-minute load average, or 'unknown' where the platform has none."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _say(line: str) -> None:
    """Print a progress or answer line at once, also into a pipe (each run takes many seconds)."""
    print(line, flush=True)


def fingerprint_schedule(total_steps: int, points: int = 9) -> list[int]:
    """Step 0 and about `points` steps from 1 to `total_steps`, spaced geometrically: dense where the distance
    grows fastest, and each fingerprint costs a pass over all 22.7M parameters of the embedded model."""
    if total_steps <= points:
        return list(range(total_steps + 1))
    ratio = total_steps ** (1 / (points - 1))
    return sorted({0, total_steps, *(round(ratio**i) for i in range(points))})


def demo_runs(out: Path, data_dir: str, grid, *, epochs: int, seed: int, max_length: int, learning_rate: float,
              model_name_or_path: str, fingerprint_steps: list[int]) -> list[DemoRun]:
    """The demo's runs in run order: each arm's (E, 1) first, then its other (B, N); the floor last."""
    e = grid[0][0] * grid[0][1]
    ordered = sorted(grid, key=lambda bn: -bn[0])

    def make(arm: str, b: int, n: int, folder: Path, **fields: Any) -> DemoRun:
        cfg = TrainConfig(
            task_name="synthetic", glue_dir=data_dir, model_name_or_path=model_name_or_path,
            per_device_train_batch_size=b, gradient_accumulation_steps=n, num_train_epochs=epochs, max_length=max_length,
            learning_rate=learning_rate, seed=seed, output_dir=str(folder), overwrite_output_dir=True,
            disable_progress_bar=True, fingerprint_steps=list(fingerprint_steps), **fields,
        )
        return DemoRun(arm, b, n, cfg)

    runs = [make("default", b, n, out / "runs" / f"B{b}_N{n}") for b, n in ordered]
    runs += [make("controlled", b, n, out / "runs" / "controlled" / f"B{b}_N{n}", **CONTROLLED) for b, n in ordered]
    runs.append(make(FLOOR, e, 1, out / "runs" / FLOOR / f"B{e}_N1", dropout_seed=seed + FLOOR_DROPOUT_SEED_OFFSET))
    return runs


def run_demo(output_dir: str, grid: tuple[tuple[int, int], ...] = DEFAULT_GRID, n_train: int = 384, n_dev: int = 200,
             epochs: int = 1, seed: int = 0, max_length: int = 48, overwrite: bool = False,
             model_name_or_path: str = "embedded", learning_rate: float = 2e-4, negation_rate: float = NEGATION_RATE,
             say: Callable[[str], None] | None = None) -> Path:
    """Run both arms and the floor, write the figure and `<output_dir>/report.md`, print the answer; returns the
    report's path. `grid` holds (B, N) pairs of one effective batch E and must include (E, 1)."""
    from ..core.synthetic import generate_synthetic_glue

    say = say or _say
    grid = tuple((int(b), int(n)) for b, n in grid)
    sizes = {b * n for b, n in grid}
    if len(sizes) != 1:
        raise BertAccumError(f"every demo configuration must have the same effective batch, got {sorted(sizes)}")
    e = sizes.pop()
    if (e, 1) not in grid or len(grid) < 2:
        raise BertAccumError(f"the demo compares (B, N) pairs with the large batch: include ({e}, 1) and at least one other")
    if not isinstance(epochs, int) or epochs < 1:
        raise BertAccumError(f"epochs must be an integer >= 1, got {epochs!r}")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BertAccumError(f"{out} exists and is not empty; pass --overwrite")
    check_writable_dir(out, "--output_dir")
    # No mkdir here: generate_synthetic_glue checks its sizes before it creates the folder, so bad input leaves none.
    data_dir = generate_synthetic_glue(str(out / "data"), n_train=n_train, n_dev=n_dev, seed=seed,
                                       negation_rate=negation_rate)
    shutil.rmtree(out / "runs", ignore_errors=True)  # an earlier demo's runs (another grid) must not be read back
    total = math.ceil(n_train / e) * epochs
    runs = demo_runs(out, data_dir, grid, epochs=epochs, seed=seed, max_length=max_length, learning_rate=learning_rate,
                     model_name_or_path=model_name_or_path, fingerprint_steps=fingerprint_schedule(total))

    import torch  # torch and transformers: only once the input is known to be good

    from ..core.train import run

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load_before = _load_average()
    started = time.perf_counter()
    for i, r in enumerate(runs, start=1):
        t0 = time.perf_counter()
        log = logs / f"{r.arm}_B{r.micro_batch_size}_N{r.accumulation_steps}.log"
        # Each run's own lines (arithmetic, progress, notes) go to its log: the terminal gets one line per run.
        with log.open("w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            r.final = run(r.config)
        r.seconds = time.perf_counter() - t0
        say(f"[demo] {i}/{len(runs)} {r.label}: accuracy {r.accuracy:.3f} ({r.seconds:.0f} s)")
    elapsed = time.perf_counter() - started

    result = analyse(runs)
    result.negation_rate = negation_rate
    # How long the demo took means little without what else the machine was doing.
    result.timing = (f"wall time {elapsed:.0f} s for {len(runs)} runs with {torch.get_num_threads()} torch thread(s) "
                     f"on {os.cpu_count()} cores, load average {load_before} at the start and {_load_average()} at the end")
    figure = plot_distances(result, out / "param_distance.png")
    answer = answer_lines(result, figure)
    report = out / "report.md"
    report.write_text(render_report(result, answer, figure))
    say(f"[demo] {result.timing}; report {report}")
    say("")
    for line in answer:
        say(line)
    return report


@dataclass
class DemoResult:
    """The demo's numbers: runs, per-step distances to each arm's (E, 1), and the floor's."""

    runs: list[DemoRun]
    distances: dict[tuple[str, tuple[int, int]], dict[int, float]]
    """(arm, (B, N)) -> {optimizer step: relative parameter distance to the arm's (E, 1)}; the floor under (FLOOR, (E, 1))."""
    negation_rate: float = NEGATION_RATE
    timing: str = ""

    @property
    def effective_batch_size(self) -> int:
        """E."""
        return self.runs[0].micro_batch_size * self.runs[0].accumulation_steps

    def reference(self, arm: str) -> DemoRun:
        """The arm's (E, 1) run."""
        return next(r for r in self.runs if r.arm == arm and r.accumulation_steps == 1)

    def others(self) -> list[tuple[int, int]]:
        """The (B, N) pairs compared with (E, 1), largest B first."""
        return [r.bn for r in self.runs if r.arm == "default" and r.accumulation_steps > 1]

    def last(self, arm: str, bn: tuple[int, int]) -> float:
        """Distance after the last fingerprinted step."""
        d = self.distances.get((arm, bn), {})
        return d[max(d)] if d else math.nan


def analyse(runs: list[DemoRun]) -> DemoResult:
    """Relative parameter distances per fingerprinted step (`report.param_distance` on the runs' fingerprints)."""
    from .report import load_runs, param_distance

    loaded = {r.path.resolve(): r for r in load_runs([runs[0].path.parent])}
    by_path = {r.path.resolve(): loaded[r.path.resolve()] for r in runs}
    result = DemoResult(runs, {})
    for arm in ARMS:
        ref = by_path[result.reference(arm).path.resolve()]
        # The floor is a default-arm run: standard dropout, another dropout seed.
        members = [r for r in runs if r.arm == arm or (arm == "default" and r.arm == FLOOR)]
        for r in members:
            run_ = by_path[r.path.resolve()]
            if run_ is ref:
                continue
            steps = sorted(set(run_.fingerprints) & set(ref.fingerprints) - {0})
            result.distances[(r.arm, r.bn)] = {s: param_distance(run_, ref, s) for s in steps}
    return result


def _ratio(value: float, floor: float) -> str:
    """`value` as a multiple of the floor: '1.1x', '3e-05x'."""
    if math.isnan(value) or math.isnan(floor) or floor == 0:
        return "—"
    x = value / floor
    return f"{x:.2f}x" if x >= 0.01 else f"{x:.0e}x"


def answer_lines(result: DemoResult, figure: Path | None) -> list[str]:
    """The five printed lines: setup and accuracies, the floor, one line per compared (B, N), the conclusion
    (five with the default grid's two compared pairs)."""
    e = result.effective_batch_size
    ref_d, ref_c = result.reference("default"), result.reference("controlled")
    floor = result.last(FLOOR, (e, 1))
    steps = ref_d.final.get("optimizer_steps", "?")
    lines = [
        f"Answer: {ref_d.final.get('model', '?')} on the synthetic task, effective batch {e}, {steps} optimizer steps; "
        f"({e},1) dev accuracy {ref_d.accuracy:.3f} default, {ref_c.accuracy:.3f} controlled (chance 0.5).",
        f"Dropout-only floor: ({e},1) with another --dropout_seed ends {fmt(floor)} from ({e},1) "
        f"(parameter distance relative to how far ({e},1) moved from the initial weights).",
    ]
    for bn in result.others():
        d, c = result.last("default", bn), result.last("controlled", bn)
        lines.append(f"({bn[0]},{bn[1]}) vs ({e},1): default arm {fmt(d)} ({_ratio(d, floor)} the floor), "
                     f"controlled arm {fmt(c)} ({_ratio(c, floor)}).")
    worst_c = max((result.last("controlled", bn) for bn in result.others()), default=math.nan)
    verdict = ("the default loop drifts about as far as re-drawing the dropout masks; invariant dropout, window padding "
               "and global loss normalisation keep every (B, N) on the large batch"
               if worst_c < 0.1 * floor else
               "the controlled arm did not stay well below the floor here; see report.md")
    lines.append(f"So: {verdict}" + (f" (figure: {figure})." if figure else "."))
    return lines


def plot_distances(result: DemoResult, path: Path) -> Path | None:
    """param_distance.png: distance to (E, 1) per optimizer step, log scale; default arm solid, controlled dashed,
    the dropout-only floor black. Exact zeros cannot be drawn on a log scale and are left out."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = result.effective_batch_size
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    colours = plt.cm.viridis_r([0.25 + 0.5 * i / max(1, len(result.others()) - 1) for i in range(len(result.others()))])
    for colour, bn in zip(colours, result.others()):
        for arm, style in (("default", "-"), ("controlled", "--")):
            pts = [(s, v) for s, v in sorted(result.distances.get((arm, bn), {}).items()) if v > 0 and not math.isnan(v)]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, marker="o", ms=3, label=f"{arm} B={bn[0]}, N={bn[1]}")
    floor = [(s, v) for s, v in sorted(result.distances.get((FLOOR, (e, 1)), {}).items()) if v > 0]
    if floor:
        ax.plot(*zip(*floor), ":", color="black", lw=2, label=f"dropout-only floor ({e},1)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"||θ − θ({e},1)|| / ||θ({e},1) − θ₀||")
    ax.set_title(f"Parameter distance to the large batch ({e}, 1) of the same arm", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grad_norm_rows(result: DemoResult, arm: str) -> list[str]:
    """Table rows: how each run's total gradient norm per step departs from its arm's (E, 1)."""
    ref_steps = read_jsonl(result.reference(arm).path / "steps.jsonl")
    rows = []
    for r in (r for r in result.runs if r.arm == arm):
        steps = read_jsonl(r.path / "steps.jsonl")
        rel = [abs(s["grad_norm"] - t["grad_norm"]) / t["grad_norm"] for s, t in zip(steps, ref_steps)]
        rows.append(f"| {r.micro_batch_size} | {r.accumulation_steps} | {rel[0]:.2e} | {statistics.median(rel):.2e} | "
                    f"{max(rel):.2e} | {statistics.fmean(s['grad_norm'] for s in steps):.3f} |")
    return rows


def render_report(result: DemoResult, answer: list[str], figure: Path | None) -> str:
    """report.md: the answer, the setup, accuracies and distances per (B, N) and arm, gradient norms per step."""
    e = result.effective_batch_size
    ref = result.reference("default")
    final = ref.final
    floor = result.last(FLOOR, (e, 1))
    by = {(r.arm, r.bn): r for r in result.runs}
    lines = [
        header(provenance(), markdown=True),
        "# bert_accum demo: does gradient accumulation drift from the large batch?",
        "",
        *(f"> {line}" + ("  " if i < len(answer) - 1 else "") for i, line in enumerate(answer)),
        "",
        f"Data: this project's **synthetic** GLUE-format task (not GLUE; {final['train_examples']} train examples, "
        f"label = adjective polarity XOR negation, {result.negation_rate:.0%} of the sentences negated), model "
        f"`{final.get('model', final.get('model_path'))}`, effective batch {e}, {final['optimizer_steps']} optimizer "
        f"steps, learning rate {ref.config.learning_rate:g}, device {final['device']}, {result.timing}.",
        "",
        "Arms: **default** = the loop as the Hugging Face examples write it (standard dropout, dynamic padding, mean "
        "of micro-batch means); **controlled** = invariant dropout, window padding, global loss normalisation. "
        f"**Dropout-only floor** = ({e}, 1) of the default arm with "
        f"`--dropout_seed {ref.config.seed + FLOOR_DROPOUT_SEED_OFFSET}`.",
        "",
        f"## Accuracy and parameter distance to ({e}, 1)",
        "",
        f"Distance after the last fingerprinted step, ||θ − θ({e},1)|| / ||θ({e},1) − θ₀||, in multiples of the floor "
        f"({fmt(floor)}).",
        "",
        "| micro_batch_size | accumulation_steps | effective_batch_size | default accuracy | controlled accuracy "
        "| default distance | controlled distance |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bn in [(e, 1), *result.others()]:
        d, c = by[("default", bn)], by[("controlled", bn)]
        dist = [("—" if bn == (e, 1) else f"{fmt(result.last(arm, bn))} ({_ratio(result.last(arm, bn), floor)})")
                for arm in ARMS]
        lines.append(f"| {bn[0]} | {bn[1]} | {e} | {d.accuracy:.4f} | {c.accuracy:.4f} | {dist[0]} | {dist[1]} |")
    fl = by[(FLOOR, (e, 1))]
    lines.append(f"| {e} | 1 | {e} | {fl.accuracy:.4f} (floor) | — | {fmt(floor)} (floor) | — |")
    if figure is not None:
        lines += ["", f"![parameter distance per step]({figure.name})"]
    for arm in ARMS:
        lines += [
            "",
            f"## Gradient norm per optimizer step, {arm} arm, relative to ({e}, 1)",
            "",
            "|g(B,N) − g(E,1)| / g(E,1) of the total gradient norm before clipping. Step 1 starts from identical "
            "weights and examples, so it is the one-step drift; later steps add the drift of the weights.",
            "",
            "| micro_batch_size | accumulation_steps | step 1 | median | max | mean grad norm |",
            "|---:|---:|---:|---:|---:|---:|",
            *_grad_norm_rows(result, arm),
        ]
    lines += [
        "",
        "Run folders: `runs/B<B>_N<N>` (default arm), `runs/controlled/B<B>_N<N>`, `runs/dropout_floor/`; each has "
        "`steps.jsonl` (loss, gradient norm per layer group, learning rate, tokens per step) and `fingerprints/`. "
        "Each run's own output is in `logs/`.",
        "",
    ]
    return "\n".join(lines)

