"""Throughput benchmark: bert_accum's training loop against a plain Hugging Face-style loop (results/perf.md).

    python scripts/bench.py --task_name rte --glue_dir /path/to/glue

Contenders, all from the same model, head and examples, at the same B, N, device:

* ``plain``: the loop of the HF GLUE example (``run_glue_no_trainer.py``): ``DataCollatorWithPadding``, shuffled
  ``DataLoader``, AdamW, linear schedule, ``accelerator.accumulate``, clip, step; no records. Its model and
  tokenised examples come from ``core.setup.load_model``/``load_splits``.
* ``bert_accum``: ``core.train.run`` itself, its ``RunRecorder`` writing a temporary run folder (a flushed
  ``steps.jsonl`` row with per-group gradient norms per step); also with ``--dropout invariant``, ``--padding
  window`` and at each precision.
* ``bert_accum_light``: ``core.setup.setup`` + ``core.train.fit`` with no recorder: its gap to ``bert_accum`` is
  the price of the records.

One process per contender. accelerate holds one precision and one accumulation count per process (the plain
loop lets it accumulate over N; ``run`` needs 1, it scales its losses itself), so each contender runs in a child
process with its own ``Accelerator``, forked from a fork server that has only imported the libraries (spawned on
a GPU). Every loop calls a gate right before the optimizer applies an update (``run``'s and ``fit``'s
``before_optimizer_step``, after clipping; the same point in the plain loop). At a round boundary the gate sends
the round just run to the parent over a pipe and blocks (no CPU) until the parent says go or stop.

A round is the wall time, measured in the child, from leaving one pause to reaching the next, S optimizer steps
later; loading, tokenisation, run-folder set-up and the warm-up steps lie outside every round. Round r of every
contender trains windows [w + r*S, w + (r+1)*S) of ``WindowPlan``'s epoch 0 (the plain loop's epoch r+1 is a
shuffled ``DataLoader`` over exactly those examples), so real token counts agree per round. Against drift in
machine load the parent runs round 0 in the order A B C ..., round 1 in reverse, and so on; ratios are paired
per round and reported per round and as mean ± std.

FLOPs: ``FlopCounterMode`` at three lengths fixes ``flops(b, L) = b * (gamma + alpha*L + beta*L^2)`` exactly (a
fourth shape checks it); each round sums it over the shapes it ran. Peak memory per (B, N): a child trains a few
windows and reports its peak RSS minus its RSS after imports.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..core.config import TrainConfig
from ..core.records import environment
from ..errors import BertAccumError

MEMORY_LOOPS = ("bert_accum", "plain")


@dataclass
class BenchConfig:
    """Everything one benchmark run needs; `scripts/bench.py` builds it from its flags."""

    task_name: str = "rte"
    glue_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    model_name_or_path: str = "embedded"
    max_length: int = 128
    micro_batch_size: int = 8
    accumulation_steps: int = 2
    rounds: int = 4
    # bf16/fp16 contenders run in the first this-many rounds only (None: all): on a CPU without bf16 matrix
    # units a bf16 round costs ~15 fp32 rounds, and a speed-up that far from 1 needs few rounds.
    low_precision_rounds: int | None = None
    steps_per_round: int = 1
    warmup_steps: int = 1
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    memory_configs: list[str] | None = None  # "BxN" strings; None: (B*N)x1 and BxN; [] skips the measurement
    memory_windows: int = 2
    seed: int = 42
    learning_rate: float = 5e-5
    max_grad_norm: float = 1.0
    max_train_samples: int | None = None
    threads: int | None = None
    matmul_size: int | None = None  # default 2048 on the CPU, 8192 on a GPU
    matmul_reps: int = 10
    cpu: bool = False
    output: str = "results/perf.md"
    command: str | None = None

    @property
    def effective_batch_size(self) -> int:
        """E = B * N (one process)."""
        return self.micro_batch_size * self.accumulation_steps

    def memory_pairs(self) -> list[tuple[int, int]]:
        """The (B, N) configurations whose peak memory is measured."""
        if self.memory_configs is None:
            return list(dict.fromkeys([(self.effective_batch_size, 1), (self.micro_batch_size, self.accumulation_steps)]))
        try:
            pairs = [tuple(int(v) for v in text.lower().split("x")) for text in self.memory_configs]
        except ValueError:
            pairs = []
        if len(pairs) != len(self.memory_configs) or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise BertAccumError(f"--memory_configs entries look like 8x4 (B x N, both >= 1), got {self.memory_configs}")
        return pairs

    def validate(self) -> None:
        """Reject settings that cannot make a benchmark, with a one-line message each."""
        for name in ("micro_batch_size", "accumulation_steps", "rounds", "steps_per_round", "warmup_steps",
                     "memory_windows", "matmul_reps", "low_precision_rounds", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BertAccumError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise BertAccumError(f"--max_length must be >= 2, got {self.max_length}")
        if not self.precisions or len(set(self.precisions)) < len(self.precisions) \
                or not set(self.precisions) <= {"fp32", "bf16", "fp16"}:
            raise BertAccumError(f"--precisions: distinct values among fp32, bf16, fp16, got {self.precisions}")
        self.memory_pairs()


@dataclass(frozen=True)
class Contender:
    """One training loop under test."""

    loop: str  # plain, bert_accum or bert_accum_light
    precision: str = "fp32"
    dropout: str = "standard"
    padding: str = "dynamic"

    @property
    def name(self) -> str:
        """Short unique label used in the tables."""
        parts = [self.loop.replace("_light", " light"), self.precision]
        parts += [f"dropout={self.dropout}"] if self.dropout != "standard" else []
        parts += [f"padding={self.padding}"] if self.padding != "dynamic" else []
        return " ".join(parts)

    @property
    def description(self) -> str:
        """What the loop does, for the report."""
        if self.loop == "plain":
            return "HF-example-style loop: DataCollatorWithPadding, shuffled DataLoader, accelerator.accumulate; no records"
        if self.loop == "bert_accum_light":
            return "bert_accum's setup + fit (WindowPlan, Collator, accumulate_window, clip, step) with no recorder"
        return (f"bert_accum.core.train.run, per-step records on (steps.jsonl, gradient norms); "
                f"dropout {self.dropout}, padding {self.padding}")


def default_contenders(cfg: BenchConfig) -> list[Contender]:
    """plain and bert_accum at every precision; light, invariant and window at the first precision."""
    first = cfg.precisions[0]
    return [Contender(loop, p) for p in cfg.precisions for loop in ("plain", "bert_accum")] + [
        Contender("bert_accum_light", first), Contender("bert_accum", first, dropout="invariant"),
        Contender("bert_accum", first, padding="window")]


@dataclass
class RoundRecord:
    """One timed round of one contender, as its gate measured it."""

    round: int
    position: int  # place of the contender within the round's order (0 = first)
    seconds: float
    shapes: list[tuple[int, int]]  # (batch, padded length) of every forward
    real_tokens: int
    optimizer_steps: int
    flops: float = 0.0  # model FLOPs of `shapes`, filled in by run_bench

    examples = property(lambda self: sum(b for b, _ in self.shapes), doc="Examples trained.")
    padded_tokens = property(lambda self: sum(b * n for b, n in self.shapes), doc="Tokens, padding included.")
    micro_steps = property(lambda self: len(self.shapes), doc="Forward/backward passes.")
    examples_per_second = property(lambda self: self.examples / self.seconds, doc="Examples per second.")
    tokens_per_second = property(lambda self: self.real_tokens / self.seconds, doc="Real tokens per second.")
    flops_per_second = property(lambda self: self.flops / self.seconds, doc="Counted model FLOPs per second.")


@dataclass
class ContenderResult:
    """All timed rounds of one contender."""

    contender: Contender
    rounds: list[RoundRecord] = field(default_factory=list)


@dataclass
class FlopModel:
    """flops(b, L) = b * (gamma + alpha*L + beta*L^2) for one model, counted by FlopCounterMode."""

    gamma: float
    alpha: float
    beta: float
    verified: bool  # the polynomial reproduced a fourth, independently counted shape exactly
    check: str  # which shape checked it, and how

    def __call__(self, b: int, length: int) -> float:
        """Training FLOPs of one forward + backward of a (b, length) batch."""
        return b * (self.gamma + self.alpha * length + self.beta * length * length)


@dataclass
class MemoryRecord:
    """Peak memory of one (loop, B, N) in its own process, in MB."""

    loop: str
    micro_batch_size: int
    accumulation_steps: int
    baseline_rss_mb: float  # RSS after imports
    peak_rss_mb: float
    cuda_peak_mb: float | None


@dataclass
class Comparison:
    """A paired per-round ratio between two contenders (unit 'ratio' or 'percent')."""

    quantity: str
    values: list[float]  # one per round
    target: str | None = None  # ">= 1.0" or "<= 3%"
    unit: str = "ratio"

    def verdict(self) -> str:
        """'met' / 'not met' when the mean is at least two standard errors from the target, else 'inconclusive'."""
        if self.target is None:
            return ""
        threshold, m = float(self.target[2:].strip(" %")), statistics.fmean(self.values)
        ok = m >= threshold if self.target.startswith(">=") else m <= threshold
        se = statistics.stdev(self.values) / len(self.values) ** 0.5 if len(self.values) > 1 else float("inf")
        if abs(m - threshold) < 2 * se:
            return f"inconclusive (mean {'meets' if ok else 'misses'} it, within 2 standard errors)"
        return "met" if ok else "not met"


@dataclass
class BenchResult:
    """What `run_bench` measured; `render_markdown` turns it into results/perf.md."""

    config: BenchConfig
    environment: dict[str, Any]
    contenders: list[ContenderResult]
    comparisons: list[Comparison]
    memory: list[MemoryRecord]
    flop_models: dict[str, FlopModel]
    matmul: dict[str, dict[str, float]]
    orders: list[list[str]]
    wall_seconds: float

    def result(self, name: str) -> ContenderResult:
        """The rounds of the contender called `name`."""
        return next(c for c in self.contenders if c.contender.name == name)


# --- child processes: one loop each, paused by its gate at round boundaries ------------------------------------


class _Stopped(Exception):
    """Raised at a pause to end a loop the benchmark no longer needs."""


class _Gate:
    """Every loop's `before_optimizer_step(model, step)`: at a pause, send the round just run, then wait."""

    def __init__(self, conn, pauses: list[int], cuda: bool):
        self.conn, self.pauses, self.cuda = conn, set(pauses), cuda
        self.batches: list[tuple[tuple[int, int], torch.Tensor]] = []
        self.steps = self.steps_at_pause = 0
        self.t0: float | None = None
        self.watching = False
        # A global hook: a child holds one optimizer, and the hook sees only updates really applied
        # (accelerate skips the inner step on the plain loop's accumulation micro-steps).
        register_optimizer_step_post_hook(self._count)

    def _count(self, optimizer, args, kwargs) -> None:
        self.steps += 1

    def _watch(self, module, args, kwargs) -> None:
        self.batches.append((tuple(kwargs["input_ids"].shape), kwargs["attention_mask"]))

    def __call__(self, model, step: int) -> None:
        if not self.watching:
            model.register_forward_pre_hook(self._watch, with_kwargs=True)
            self.watching = True
        if step not in self.pauses:
            return
        if self.cuda:
            torch.cuda.synchronize()
        seconds = None if self.t0 is None else time.perf_counter() - self.t0  # None: the untimed warm-up
        self.conn.send(("paused", None if seconds is None else {
            "seconds": seconds, "shapes": [s for s, _ in self.batches],
            "real_tokens": sum(int(m.sum()) for _, m in self.batches), "optimizer_steps": self.steps - self.steps_at_pause}))
        self.batches, self.steps_at_pause = [], self.steps
        if self.conn.recv() == "stop":
            raise _Stopped
        self.t0 = time.perf_counter()


def train_bert_accum(cfg: TrainConfig, pauses: list[int], gate: _Gate) -> None:
    """`core.train.run` unmodified, records on, its run folder a temporary one."""
    import tempfile

    from ..core.train import run

    with tempfile.TemporaryDirectory(prefix="bert_accum_bench_") as out:
        run(dataclasses.replace(cfg, output_dir=out), before_optimizer_step=gate)


def train_light(cfg: TrainConfig, pauses: list[int], gate: _Gate) -> None:
    """`setup` + `fit` with no recorder: `run`'s exact windows with nothing written and nothing evaluated."""
    from ..core.checkpoint import TrainingProgress
    from ..core.setup import setup
    from ..core.train import fit, make_accelerator

    accelerator = make_accelerator(cfg)
    s = setup(cfg, 1, accelerator)
    model, optimizer = accelerator.prepare(s.model, s.optimizer)
    fit(s, model, optimizer, accelerator, TrainingProgress(), eval_loaders=None, before_optimizer_step=gate)


def train_plain(cfg: TrainConfig, pauses: list[int], gate: _Gate) -> None:
    """The plain loop, as the Hugging Face GLUE example writes it (no records); its epoch e is a shuffled
    DataLoader over the examples of bert_accum's windows between pauses e-1 and e."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_scheduler

    from ..core.setup import build_optimizer, load_model, load_splits
    from ..core.windows import WindowPlan, window_examples

    B, N = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.precision, "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=cfg.cpu, gradient_accumulation_steps=N)
    task, tokenizer, model, _ = load_model(cfg)
    train = load_splits(cfg, task, tokenizer)["train"]
    train = train.select_columns([c for c in ("input_ids", "token_type_ids", "attention_mask", "label")
                                  if c in train.column_names])
    windows = WindowPlan(num_examples=len(train), micro_batch_size=B, accumulation_steps=N, num_processes=1,
                         seed=cfg.resolved_data_seed, drop_last_window=True).windows(0)
    # All contenders train the same data and the plain one starts first, so it checks for all that no epoch
    # ends inside a round (run would evaluate there, inside the timed time).
    if cfg.max_train_steps > len(windows):
        raise BertAccumError(f"{len(train)} training examples give {len(windows)} full windows of B*N = {B * N}, "
                             f"fewer than warm-up + rounds * steps_per_round = {cfg.max_train_steps}; "
                             "use fewer rounds or steps per round")
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=cfg.max_train_steps)
    bounds = [0, *pauses]
    loaders = [DataLoader(train.select([i for w in windows[a:b] for i in window_examples(w)]), shuffle=True,
                          collate_fn=DataCollatorWithPadding(tokenizer), batch_size=B) for a, b in zip(bounds, bounds[1:])]
    model, optimizer, scheduler, *loaders = accelerator.prepare(model, optimizer, scheduler, *loaders)
    model.train()
    windows_done = 0
    for loader in loaders:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    windows_done += 1
                    gate(model, windows_done)  # the point where run calls before_optimizer_step
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()


_LOOP_FUNCTIONS = {"plain": train_plain, "bert_accum": train_bert_accum, "bert_accum_light": train_light}
# Imported by the fork server (no torch kernel runs before a fork) and by each child before its baseline RSS.
_PRELOAD = ["bert_accum.study.bench", "bert_accum.core.train", "accelerate", "datasets", "torch.utils.data",
            "transformers.models.bert.modeling_bert", "transformers.data.data_collator", "transformers.optimization"]


def _child(loop: str, cfg: TrainConfig, pauses: list[int], threads: int, conn) -> None:
    """A child process: run `loop` from pause to pause until stopped, then send its peak memory (or the error).

    `pauses` are the optimizer steps before which the loop pauses (the first ends the warm-up); the last is
    `cfg.max_train_steps`, so no loop reaches its final step and its evaluation."""
    import resource

    try:
        torch.set_num_threads(threads)
        for module in _PRELOAD:
            importlib.import_module(module)
        with open("/proc/self/statm") as fh:
            baseline = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        cuda = torch.cuda.is_available() and not cfg.cpu
        try:
            _LOOP_FUNCTIONS[loop](cfg, pauses, _Gate(conn, pauses, cuda))
            raise BertAccumError("the loop ended before the benchmark stopped it")
        except _Stopped:
            pass
        conn.send(("done", {"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                            "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None}))
    except BaseException as exc:  # the parent raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Process:
    """The parent's end of one child, which is set up and warmed up once this returns."""

    def __init__(self, ctx, name: str, *args):
        self.name, (self.conn, child_end) = name, ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(*args, child_end), name=name, daemon=True)
        self.proc.start()
        child_end.close()  # so that a dead child reads as EOF here
        self.send(None)

    def send(self, command: str | None) -> Any:
        """Send `command` ('go': run one round, 'stop', None: nothing) and return the child's answer."""
        if command:
            self.conn.send(command)
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise BertAccumError(f"{self.name}: its process died (exit code {self.proc.exitcode})") from None
        if kind == "error":
            raise BertAccumError(f"{self.name}: {payload}")
        return payload

    def stop(self) -> dict[str, Any]:
        """End the loop at its pause; returns the child's peak memory report."""
        report = self.send("stop")
        self.proc.join()
        return report

    def kill(self) -> None:
        """End the child if it still runs (after an error, or at the end of a benchmark)."""
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _train_config(cfg: BenchConfig, c: Contender, steps: int, b: int = 0, n: int = 0) -> TrainConfig:
    return TrainConfig(
        task_name=cfg.task_name, glue_dir=cfg.glue_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
        model_name_or_path=cfg.model_name_or_path, max_length=cfg.max_length, padding=c.padding,
        per_device_train_batch_size=b or cfg.micro_batch_size, gradient_accumulation_steps=n or cfg.accumulation_steps,
        learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, dropout=c.dropout,
        precision=c.precision, max_train_steps=steps, drop_last_window=True, max_train_samples=cfg.max_train_samples,
        max_eval_samples=8, overwrite_output_dir=True, disable_progress_bar=True, cpu=cfg.cpu)


# --- FLOPs and matmul peak -------------------------------------------------------------------------------------


def count_training_flops(model: torch.nn.Module, b: int, length: int) -> int:
    """FLOPs of one forward + backward of `model` on a (b, length) batch, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.ones((b, length), dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids)).logits
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def fit_flop_model(model_path: str, num_labels: int) -> FlopModel:
    """Exact `b * (gamma + alpha*L + beta*L^2)` from counts at b = 1 and three lengths, checked at a fourth shape.

    Dense layers cost a fixed amount per token (alpha*L), attention scores and their use per pair of
    tokens (beta*L^2), pooler and classifier per sequence (gamma); everything scales with b.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model.eval()  # dropout costs no FLOPs; eval only skips its random draws
    lengths = [v for v in (8, 16, 32, 24) if v <= config.max_position_embeddings]
    l1, l2, l3, l4 = lengths if len(lengths) == 4 else [2, 3, 4, 5]
    f = [Fraction(count_training_flops(model, 1, n)) for n in (l1, l2, l3)]
    # the parabola through the three counts (divided differences), in exact arithmetic
    d1, d2 = (f[1] - f[0]) / (l2 - l1), (f[2] - f[1]) / (l3 - l2)
    beta = (d2 - d1) / (l3 - l1)
    alpha = d1 - beta * (l1 + l2)
    gamma = f[0] - alpha * l1 - beta * l1 * l1
    counted, predicted = count_training_flops(model, 3, l4), 3 * (gamma + alpha * l4 + beta * l4 * l4)
    return FlopModel(float(gamma), float(alpha), float(beta), Fraction(counted) == predicted,
                     f"(b=3, L={l4}): counted {counted:,}, polynomial {float(predicted):,.0f}")


def matmul_peak(n: int, reps: int, dtype: torch.dtype, device: str) -> dict[str, float]:
    """GFLOP/s of an n x n x n torch.matmul (2*n^3 FLOPs): best and median of `reps` timed runs after 2 untimed."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = []
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        if i >= 2:
            rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "reps": reps, "best_gflops": max(rates), "median_gflops": statistics.median(rates)}


# --- the benchmark ---------------------------------------------------------------------------------------------


def _comparisons(cfg: BenchConfig, results: dict[str, ContenderResult]) -> list[Comparison]:
    """Paired per-round ratios; every pair trained the same examples in the same round."""

    def ratio(a: str, b: str) -> list[float]:  # examples/s of a over b
        return [x.examples_per_second / y.examples_per_second for x, y in zip(results[a].rounds, results[b].rounds)]

    def overhead(slow: str, base: str) -> list[float]:  # time per example of `slow` over `base`, minus 1, in percent
        return [100.0 * (1.0 / r - 1.0) for r in ratio(slow, base)]

    first, lows = cfg.precisions[0], [p for p in ("bf16", "fp16") if p in cfg.precisions and "fp32" in cfg.precisions]
    return [Comparison(f"bert_accum / plain, records on, {p}", ratio(f"bert_accum {p}", f"plain {p}"),
                       ">= 1.0" if p == first else None) for p in cfg.precisions] + [
        Comparison("record overhead", overhead(f"bert_accum {first}", f"bert_accum light {first}"), "<= 3%", "percent"),
        Comparison("invariant-dropout overhead", overhead(f"bert_accum {first} dropout=invariant", f"bert_accum {first}"),
                   unit="percent"),
        Comparison("window-padding overhead", overhead(f"bert_accum {first} padding=window", f"bert_accum {first}"),
                   unit="percent"),
    ] + [Comparison(f"{low} speed-up, {loop}", ratio(f"{loop} {low}", f"{loop} fp32"))
         for low in lows for loop in ("bert_accum", "plain")]


def _interleaved_rounds(cfg: BenchConfig, ctx, threads: int, say: Callable[[str], None]):
    """Start every contender (set-up and warm-up untimed), then run the rounds, alternating the order."""
    S, R, w = cfg.steps_per_round, cfg.rounds, cfg.warmup_steps
    pauses = [w + r * S for r in range(R + 1)]  # before optimizer steps w, w+S, ..., w+R*S
    contenders = default_contenders(cfg)
    # rounds are paired by index, so the low-precision contenders' rounds are the first ones
    n_rounds = {c.name: R if c.precision == "fp32" else min(R, cfg.low_precision_rounds or R) for c in contenders}
    results = {c.name: ContenderResult(c) for c in contenders}
    procs: list[_Process] = []
    orders: list[list[str]] = []
    try:
        for c in contenders:
            say(f"[bench] setting up {c.name} ({w} untimed warm-up step{'s' * (w > 1)})")
            procs.append(_Process(ctx, c.name, c.loop, _train_config(cfg, c, pauses[-1]), pauses, threads))
        by_name = {p.name: p for p in procs}
        for r in range(R):
            orders.append([c.name for c in contenders[:: 1 if r % 2 == 0 else -1] if r < n_rounds[c.name]])
            for pos, name in enumerate(orders[-1]):
                rec = RoundRecord(r, pos, **by_name[name].send("go"))
                results[name].rounds.append(rec)
                say(f"[bench] round {r + 1}/{R} {name:<40} {rec.seconds:7.2f} s {rec.examples_per_second:8.1f} "
                    f"examples/s {rec.tokens_per_second:9.0f} tokens/s")
                if r + 1 == n_rounds[name]:
                    by_name[name].stop()  # frees its memory for the remaining rounds
    finally:
        for p in procs:
            p.kill()
    return results, orders


def _peak_memory(cfg: BenchConfig, ctx, threads: int) -> list[MemoryRecord]:
    """Each (B, N) and memory loop in a fresh child that trains `memory_windows` windows, one child at a time."""
    out, mb = [], 1024 * 1024
    for b, n in cfg.memory_pairs():
        for loop in MEMORY_LOOPS:
            train_cfg = _train_config(cfg, Contender(loop, cfg.precisions[0]), cfg.memory_windows, b, n)
            proc = _Process(ctx, f"memory probe {loop} B={b} N={n}", loop, train_cfg, [cfg.memory_windows], threads)
            try:
                m = proc.stop()
            finally:
                proc.kill()
            out.append(MemoryRecord(loop, b, n, m["baseline"] / mb, m["peak"] / mb,
                                    None if m["cuda_peak"] is None else m["cuda_peak"] / mb))
    return out


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResult:
    """Run the interleaved rounds, the FLOP count, the matmul peak and the memory probes; write nothing."""
    from ..core.modeling import resolve_model_path
    from ..core.tasks import get_task

    cfg.validate()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = torch.cuda.is_available() and not cfg.cpu
    device = "cuda" if cuda else "cpu"
    if "fp16" in cfg.precisions and not cuda:
        raise BertAccumError("--precisions fp16 needs a CUDA GPU; use bf16 on the CPU")
    env = environment(device, 1, cfg.precisions[0], {"command": cfg.command or " ".join(sys.argv),
                      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
    threads = torch.get_num_threads()
    # CUDA must not be initialised before a fork: on a GPU every child is spawned.
    ctx = mp.get_context("spawn" if cuda or "forkserver" not in mp.get_all_start_methods() else "forkserver")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    n_mm = cfg.matmul_size or (8192 if cuda else 2048)
    say(f"[bench] matmul peak: {n_mm}x{n_mm} fp32, {cfg.matmul_reps} reps")
    matmul = {"fp32 (before rounds)": matmul_peak(n_mm, cfg.matmul_reps, torch.float32, device)}
    results, orders = _interleaved_rounds(cfg, ctx, threads, say)
    matmul["fp32 (after rounds)"] = matmul_peak(n_mm, cfg.matmul_reps, torch.float32, device)
    for low, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if low in cfg.precisions:
            # Off-GPU a low-precision matmul may be emulated and slow: a smaller size keeps it short.
            matmul[low] = matmul_peak(n_mm if cuda else max(256, n_mm // 2), max(2, cfg.matmul_reps // 3), dtype, device)
    say("[bench] counting FLOPs with FlopCounterMode")
    fm = fit_flop_model(resolve_model_path(cfg.model_name_or_path), get_task(cfg.task_name).num_labels)
    for res in results.values():
        for rec in res.rounds:
            rec.flops = sum(fm(b, length) for b, length in rec.shapes)
    say(f"[bench] peak memory: {len(MEMORY_LOOPS) * len(cfg.memory_pairs())} fresh processes")
    memory = _peak_memory(cfg, ctx, threads)
    return BenchResult(cfg, env, list(results.values()), _comparisons(cfg, results), memory, {"main": fm}, matmul,
                       orders, time.perf_counter() - started)


# --- the report ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float], fmt: str = "{:.1f}", std_fmt: str | None = None) -> str:
    if len(values) < 2:
        return fmt.format(values[0]) + " (1 round)"
    return f"{fmt.format(statistics.fmean(values))} ± {(std_fmt or fmt).format(statistics.stdev(values))}"


def _table(head: str, rows: list[list[Any]]) -> list[str]:
    """A markdown table: `head` is its header cells joined by ' | '."""
    return [f"| {head} |", "|" + "---|" * (head.count("|") + 1)] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def render_markdown(result: BenchResult) -> str:
    """results/perf.md: command and commit first, then summary, contenders, memory, FLOPs, raw rounds."""
    cfg, env, E = result.config, result.environment, result.config.effective_batch_size
    cpu, pkg, flags, low = env["cpu"], env["packages"], env["cpu"]["flags"], cfg.low_precision_rounds
    data = (f"--glue_dir {cfg.glue_dir}" if cfg.glue_dir else f"--train_file {cfg.train_file}") + (
        f", first {cfg.max_train_samples} training examples" if cfg.max_train_samples else "")
    lines = [
        "# Throughput: bert_accum vs a plain Hugging Face-style loop", "",
        f"- command: `{env['command']}`",
        f"- git commit: `{env['git_commit'] or 'unknown'}`",
        f"- date: {env['date']}; wall time of the whole benchmark {result.wall_seconds:.0f} s",
        f"- device: {env['device']}{' (' + env['device_name'] + ')' if env['device'] != 'cpu' else ''}; "
        f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; torch threads: {env['torch_num_threads']}",
        f"- torch {pkg['torch']}, transformers {pkg['transformers']}, accelerate {pkg['accelerate']}, "
        f"datasets {pkg['datasets']}, Python {env['python']}",
        "- CPU matrix instructions: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
        + (". " if env["device"] == "cpu" else " (the GPU does the matrix work). ")
        + ("bf16 runs on the CPU's bf16 units." if flags.get("avx512_bf16") or flags.get("amx_bf16") else
           "No avx512_bf16/amx: this CPU has no bf16 matrix instructions, so bf16 matmuls run on emulated kernels "
           "and bf16 is expected to be slower than fp32 (see the bf16 matmul row under FLOPs)."),
        f"- model: `{cfg.model_name_or_path}`; task: {cfg.task_name} ({data}); max_length {cfg.max_length}",
        f"- batch: micro_batch_size B = {cfg.micro_batch_size}, accumulation_steps N = {cfg.accumulation_steps}, "
        f"num_processes W = 1, effective_batch_size E = {E}",
        f"- {cfg.rounds} rounds x {cfg.steps_per_round} optimizer step(s) per contender per round "
        + (f"(bf16/fp16 contenders: the first {low} rounds only) " if low is not None and low < cfg.rounds else "")
        + f"({cfg.steps_per_round * E} examples per round), after {cfg.warmup_steps} untimed warm-up step(s); "
        "contender order alternates forward/backward between rounds",
        "", "## What is timed", "",
        "Each loop runs in a child process of its own (its own `Accelerator`, precision and accumulation count) and is "
        "paused right before the optimizer applies an update (`run`'s and `fit`'s `before_optimizer_step` hook; the "
        "same point, after clipping, in the plain loop). A round is the wall time, measured in that process, between "
        f"leaving one pause and reaching the next, {cfg.steps_per_round} optimizer step(s) later: optimizer step, "
        "scheduler step and zero_grad of one window, then collation (bert_accum's `Collator`; the plain loop's "
        "`DataLoader` with `DataCollatorWithPadding`), forward and backward of every micro-batch, clipping and, for "
        "`bert_accum`, its per-step records (per-group gradient norms, `steps.jsonl` row written and flushed). Not "
        "timed, for every contender alike: model loading, tokenisation, the run folder's set-up, evaluation, warm-up "
        "steps. The plain loop starts a new DataLoader epoch in every round (its set-up cost is inside the round). "
        "Both loops train the same examples in each round (windows of bert_accum's plan; the plain loop shuffles them "
        "in its own DataLoader), so real token counts agree per round; padded counts differ with the grouping. Paused "
        "contenders wait on a pipe and use no CPU.",
        "", "## Summary", "",
    ]
    peak = max(v["best_gflops"] for k, v in result.matmul.items() if k.startswith("fp32"))
    summary = []
    for c in result.comparisons:
        fmt, std_fmt = ("{:+.1f}%", "{:.1f}%") if c.unit == "percent" else ("{:.3f}", "{:.3f}")
        summary.append([c.quantity, _mean_std(c.values, fmt, std_fmt), ", ".join(fmt.format(v) for v in c.values),
                        c.target or "", c.verdict()])
    main = f"bert_accum {cfg.precisions[0]}"
    rate = [r.flops_per_second / 1e9 for r in result.result(main).rounds]
    summary += [[f"achieved FLOP/s, `{main}`", f"{_mean_std(rate)} GFLOP/s", ", ".join(f"{v:.1f}" for v in rate), "",
                 f"{100 * statistics.fmean(rate) / peak:.0f}% of the fp32 matmul peak"],
                ["matmul peak, fp32", f"{peak:.1f} GFLOP/s (best)", "", "", "see FLOPs"]]
    if result.memory:
        summary.append(["peak memory (peak RSS - RSS after imports)", "", "; ".join(
            f"{m.loop} B={m.micro_batch_size} N={m.accumulation_steps}: {m.peak_rss_mb - m.baseline_rss_mb:.0f} MB"
            for m in result.memory), "", "see below"])
    lines += _table("quantity | mean ± std over rounds | per round | target |", summary)
    lines += ["", "## Contenders", ""] + _table(
        "contender | loop | examples/s | tokens/s (real) | padded tokens/s | achieved GFLOP/s | % of fp32 matmul peak | "
        "examples / real tokens / padded tokens / micro-steps / optimizer steps (all rounds)",
        [[res.contender.name, res.contender.description, _mean_std([r.examples_per_second for r in res.rounds]),
          _mean_std([r.tokens_per_second for r in res.rounds], "{:.0f}"),
          _mean_std([r.padded_tokens / r.seconds for r in res.rounds], "{:.0f}"),
          _mean_std([r.flops_per_second / 1e9 for r in res.rounds]),
          f"{100 * statistics.fmean(r.flops_per_second / 1e9 for r in res.rounds) / peak:.0f}%",
          " / ".join(str(sum(getattr(r, k) for r in res.rounds))
                     for k in ("examples", "real_tokens", "padded_tokens", "micro_steps", "optimizer_steps"))]
         for res in result.contenders])
    lines += ["", "## Peak memory per (B, N)", ""]
    gpu = any(m.cuda_peak_mb is not None for m in result.memory)
    if result.memory:
        lines += [
            f"Each row is a fresh process (multiprocessing fork server, or spawn on a GPU) that builds the loop at "
            f"{cfg.precisions[0]}, trains {cfg.memory_windows} windows (forward/backward) with {cfg.memory_windows - 1} "
            "optimizer step(s) between them, and exits. Peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss`; the baseline is "
            "the process's RSS after imports, so the difference holds model weights, tokenised data, optimizer state, "
            "gradients and activations" + (" (GPU: `torch.cuda.max_memory_allocated`)." if gpu else "."), ""]
        lines += _table("loop | B | N | E | RSS after imports (MB) | peak RSS (MB) | peak - baseline (MB)"
                        + (" | GPU max allocated (MB)" if gpu else ""),
                        [[m.loop, m.micro_batch_size, m.accumulation_steps, m.micro_batch_size * m.accumulation_steps,
                          f"{m.baseline_rss_mb:.0f}", f"{m.peak_rss_mb:.0f}", f"{m.peak_rss_mb - m.baseline_rss_mb:.0f}"]
                         + ([f"{m.cuda_peak_mb:.0f}"] if gpu else []) for m in result.memory])
    else:
        lines.append("Not measured (--memory_configs given empty).")
    lines += [
        "", "## FLOPs", "",
        "Training FLOPs of a (b, L) micro-batch (forward + backward matmuls; embeddings lookups, softmax, layer norm "
        "and the optimizer are not counted) were counted with `torch.utils.flop_counter.FlopCounterMode` on the model "
        "with eager attention at b = 1 and three lengths, giving b * (gamma + alpha*L + beta*L^2):", "",
    ] + _table("model | gamma (per sequence) | alpha (per token) | beta (per token pair) | check",
               [[name, f"{fm.gamma:,.0f}", f"{fm.alpha:,.0f}", f"{fm.beta:,.0f}",
                 f"{'exact' if fm.verified else 'MISMATCH'} at {fm.check}"] for name, fm in result.flop_models.items()])
    lines += ["", "Each round's FLOPs are summed over the padded shapes the model really ran. Matmul peak (torch.matmul, "
              "n x n, 2n^3 FLOPs per product):", ""] + _table(
        "matmul | n | reps | best GFLOP/s | median GFLOP/s",
        [[k, v["n"], v["reps"], f"{v['best_gflops']:.1f}", f"{v['median_gflops']:.1f}"] for k, v in result.matmul.items()])
    rows = sorted(((rec, res.contender.name) for res in result.contenders for rec in res.rounds),
                  key=lambda t: (t[0].round, t[0].position))
    lines += ["", "## Rounds", "",
              "Order per round: " + "; ".join(f"round {i + 1}: " + " → ".join(o) for i, o in enumerate(result.orders)),
              ""] + _table(
        "round | position | contender | seconds | examples | real tokens | padded tokens | micro-steps | optimizer steps "
        "| examples/s | GFLOP/s",
        [[rec.round + 1, rec.position + 1, name, f"{rec.seconds:.3f}", rec.examples, rec.real_tokens, rec.padded_tokens,
          rec.micro_steps, rec.optimizer_steps, f"{rec.examples_per_second:.1f}", f"{rec.flops_per_second / 1e9:.1f}"]
         for rec, name in rows])
    return "\n".join(lines) + "\n"


def bench_main(cfg: BenchConfig) -> Path:
    """`scripts/bench.py`: run the benchmark, write the report (--output), print its path."""
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(run_bench(cfg)))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return out
