"""Throughput benchmark: bert_accum's training loop against a plain Hugging Face-style loop, in one process.

    python scripts/bench.py --task_name rte --glue_dir /path/to/glue      # writes results/perf.md

Contenders (same model, data, B, N, precision and device):

* ``plain``: a loop written the way the Hugging Face GLUE example (``run_glue_no_trainer.py``) writes
  one: tokenised ``datasets`` dataset, ``DataCollatorWithPadding``, shuffled ``DataLoader``, AdamW,
  linear schedule, ``accelerator.accumulate`` + ``accelerator.backward``, clip, step, zero_grad; no
  records. See :func:`train_plain`.
* ``bert_accum``: ``bert_accum.core.train.run`` itself, unmodified, with its per-step records on
  (``steps.jsonl`` flushed every optimizer step, per-group gradient norms). Variants with
  ``--dropout invariant``, ``--padding window`` and each precision.
* ``bert_accum_light``: the same exact-accumulation windows (``WindowPlan``, ``Collator``,
  ``accumulate_window``, clip, step) with no records at all (:func:`train_light`); the gap to
  ``bert_accum`` is the price of the records.

What is timed. Every loop runs in its own worker thread and is paused at a gate placed immediately
before the optimizer applies an update (``run``'s ``before_optimizer_step`` hook, called after
clipping; the same point in the plain and light loops). One round of a contender is
the wall time from leaving one pause to reaching the next, S optimizer steps later: it holds S
complete loop iterations (the optimizer/scheduler step and zero_grad of one window, then collation,
forward/backward of S windows, clipping, and for ``bert_accum`` its records) and nothing else:
model loading, tokenisation, run-folder set-up and evaluation lie outside every round. The first
``warmup_steps`` optimizer steps of each contender are not timed. While one contender runs, all
others are paused (blocked on a semaphore, using no CPU).

Fair data. Every round of every contender trains the same examples: round r covers windows
[w + r*S, w + (r+1)*S) of epoch 0 of ``WindowPlan`` (w = warm-up steps). ``run`` walks those windows
in order; the plain loop's "epoch" r+1 is a shuffled ``DataLoader`` over exactly those S*B*N
examples (so S*N micro-batches and S optimizer steps). Real token counts therefore agree per round;
padded counts differ because the two loops group examples differently.

Drift in machine load. Rounds are interleaved: round 0 runs every contender once in the order
A B C ..., round 1 in the reverse order, and so on, and each per-round ratio compares two contenders
measured minutes apart at most. Ratios are reported per round and as mean +- sample std.

accelerate keeps process-wide singletons (``AcceleratorState``, ``GradientState``) that all
``Accelerator`` objects share. Each contender gets its own ``Accelerator``; before its turn
:func:`_activate` sets the shared mixed precision and accumulation count to that contender's
values (``run`` needs 1, because it scales its losses itself; the plain loop needs N).

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` counts forward plus
backward of the model (eager attention, so the attention matmuls are counted) at three sequence
lengths, which fixes the exact polynomial ``flops(b, L) = b * (gamma + alpha*L + beta*L^2)``; a
fourth shape checks it. Each round's FLOPs are summed over the padded shapes the model really ran.

Peak memory per (B, N) is measured in a fresh process per (loop, B, N) (forked from a fork server
that has only imported the libraries; spawned on a GPU): the process's peak resident set size
(``getrusage`` ``ru_maxrss``) minus its RSS after imports, so it holds the model, data, optimizer
state, gradients and activations of two windows and one optimizer step; on a GPU also
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import BertAccumError
from ..core.records import cpu_info

LOOPS = ("plain", "bert_accum", "bert_accum_light")
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
    low_precision_rounds: int | None = None
    """Rounds (the first ones) in which the bf16/fp16 contenders run; default all. On a CPU without bf16 matrix
    units a bf16 round costs ~15 fp32 rounds, and its speed-up is far from 1, so a few rounds measure it."""
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
    bert_base: str = "auto"  # auto: a random-weight BERT-base pair of contenders when a GPU is used
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
            pairs = [(self.effective_batch_size, 1), (self.micro_batch_size, self.accumulation_steps)]
            return list(dict.fromkeys(pairs))
        out = []
        for text in self.memory_configs:
            try:
                b, n = (int(v) for v in text.lower().split("x"))
            except ValueError:
                raise BertAccumError(f"--memory_configs entries look like 8x4 (B x N), got {text!r}") from None
            if b < 1 or n < 1:
                raise BertAccumError(f"--memory_configs: B and N must be >= 1, got {text!r}")
            out.append((b, n))
        return out

    def validate(self) -> None:
        """Reject settings that cannot make a benchmark, with a one-line message each."""
        if self.low_precision_rounds is not None and self.low_precision_rounds < 1:
            raise BertAccumError(f"--low_precision_rounds must be >= 1, got {self.low_precision_rounds}")
        for name in ("micro_batch_size", "accumulation_steps", "rounds", "steps_per_round", "warmup_steps",
                     "memory_windows", "matmul_reps"):
            if getattr(self, name) < 1:
                raise BertAccumError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise BertAccumError(f"--max_length must be >= 2, got {self.max_length}")
        if not self.precisions:
            raise BertAccumError("--precisions needs at least one of fp32, bf16, fp16")
        for p in self.precisions:
            if p not in ("fp32", "bf16", "fp16"):
                raise BertAccumError(f"--precisions: choose from fp32, bf16, fp16, got {p!r}")
        if len(set(self.precisions)) != len(self.precisions):
            raise BertAccumError("--precisions lists a precision twice")
        if self.bert_base not in ("auto", "on", "off"):
            raise BertAccumError(f"--bert_base must be auto, on or off, got {self.bert_base!r}")
        if self.threads is not None and self.threads < 1:
            raise BertAccumError(f"--threads must be >= 1, got {self.threads}")
        self.memory_pairs()


@dataclass(frozen=True)
class Contender:
    """One training loop under test."""

    loop: str  # one of LOOPS
    precision: str = "fp32"
    dropout: str = "standard"
    padding: str = "dynamic"
    model: str = "main"  # main, or bert-base (random weights, GPU only)

    @property
    def name(self) -> str:
        """Short unique label used in the tables."""
        parts = [{"plain": "plain", "bert_accum": "bert_accum", "bert_accum_light": "bert_accum light"}[self.loop],
                 self.precision]
        if self.dropout != "standard":
            parts.append(f"dropout={self.dropout}")
        if self.padding != "dynamic":
            parts.append(f"padding={self.padding}")
        if self.model != "main":
            parts.append(self.model)
        return " ".join(parts)

    @property
    def description(self) -> str:
        """What the loop does, for the report."""
        if self.loop == "plain":
            return "HF-example-style loop: DataCollatorWithPadding, shuffled DataLoader, accelerator.accumulate; no records"
        if self.loop == "bert_accum_light":
            return "bert_accum's exact windows (WindowPlan, Collator, accumulate_window, clip, step) with no records"
        return (f"bert_accum.core.train.run, per-step records on (steps.jsonl, gradient norms); "
                f"dropout {self.dropout}, padding {self.padding}")


def default_contenders(cfg: BenchConfig, with_bert_base: bool) -> list[Contender]:
    """plain and bert_accum at every precision; light, invariant and window at the first; BERT-base pairs on a GPU."""
    first = cfg.precisions[0]
    out: list[Contender] = []
    for p in cfg.precisions:
        out += [Contender("plain", p), Contender("bert_accum", p)]
    out += [Contender("bert_accum_light", first), Contender("bert_accum", first, dropout="invariant"),
            Contender("bert_accum", first, padding="window")]
    if with_bert_base:
        for p in cfg.precisions:
            out += [Contender("plain", p, model="bert-base"), Contender("bert_accum", p, model="bert-base")]
    return out


@dataclass
class Job:
    """Everything a loop needs to build itself (picklable: the memory probe sends it to a fresh process)."""

    loop: str
    precision: str
    dropout: str
    padding: str
    model_path: str
    task_name: str
    glue_dir: str | None
    train_file: str | None
    validation_file: str | None
    max_length: int
    micro_batch_size: int
    accumulation_steps: int
    epoch_windows: list[int]  # optimizer steps per (plain-loop) epoch: [warm-up, S, S, ...]
    seed: int
    learning_rate: float
    max_grad_norm: float
    max_train_samples: int | None
    cpu: bool

    @property
    def total_steps(self) -> int:
        """Optimizer steps the loop is built for (the schedule's length)."""
        return sum(self.epoch_windows)


@dataclass
class RoundRecord:
    """One timed round of one contender."""

    round: int
    position: int  # place of the contender within the round's order (0 = first)
    seconds: float
    examples: int
    real_tokens: int
    padded_tokens: int
    micro_steps: int
    optimizer_steps: int
    shapes: list[tuple[int, int]]  # (batch, padded length) of every forward
    flops: float = 0.0

    @property
    def examples_per_second(self) -> float:
        """Examples trained per second of the round."""
        return self.examples / self.seconds

    @property
    def tokens_per_second(self) -> float:
        """Real (non-padding) tokens per second."""
        return self.real_tokens / self.seconds

    @property
    def flops_per_second(self) -> float:
        """Model FLOPs (matmuls, forward + backward, padded shapes) per second."""
        return self.flops / self.seconds


@dataclass
class ContenderResult:
    """All timed rounds of one contender."""

    contender: Contender
    rounds: list[RoundRecord]


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
    """Peak memory of one (loop, B, N) in its own process."""

    loop: str
    micro_batch_size: int
    accumulation_steps: int
    baseline_rss_mb: float
    peak_rss_mb: float
    cuda_peak_mb: float | None

    @property
    def delta_mb(self) -> float:
        """Peak RSS minus RSS after imports."""
        return self.peak_rss_mb - self.baseline_rss_mb


@dataclass
class Comparison:
    """A paired per-round ratio between two contenders."""

    quantity: str
    definition: str
    values: list[float]  # one per round
    target: str | None = None
    unit: str = "ratio"  # ratio or percent

    def verdict(self) -> str:
        """'met' / 'not met' when the mean is at least two standard errors from the target, else 'inconclusive'."""
        if self.target is None:
            return ""
        threshold = 1.0 if self.target == ">= 1.0" else 3.0
        m = statistics.fmean(self.values)
        ok = m >= threshold if self.target == ">= 1.0" else m <= threshold
        # standard error of the mean: std / sqrt(rounds)
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
        for c in self.contenders:
            if c.contender.name == name:
                return c
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# accelerate's shared state
# ---------------------------------------------------------------------------------------------


def _mixed(precision: str) -> str:
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")


def _new_accelerator(precision: str, cpu: bool, accumulation_steps: int):
    """An Accelerator of its own for one contender.

    accelerate refuses a second mixed precision in one process (AcceleratorState is a singleton), so
    the shared state is cleared first when the precision changes. Accelerators built earlier keep
    what they fixed at construction and `prepare` (autocast wrapper, scaler); what they read later
    from the shared state is restored by `_activate` before each of their turns.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != _mixed(precision):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=_mixed(precision), cpu=cpu, gradient_accumulation_steps=accumulation_steps)


def _activate(accelerator, precision: str, accumulation_steps: int) -> None:
    """Give accelerate's process-wide state this contender's values before it runs.

    `accelerator.backward` divides the loss by the shared accumulation count (run: 1, plain: N);
    fp16 unscaling reads the shared precision; and every contender pauses inside an optimizer step,
    where accelerate's shared `sync_gradients` flag is True, so it is True whenever a loop resumes.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._shared_state["_mixed_precision"] = _mixed(precision)
    accelerator.gradient_accumulation_steps = accumulation_steps
    accelerator.gradient_state._set_sync_gradients(True)


# ---------------------------------------------------------------------------------------------
# The three loops. Each calls gate(step) right before optimizer step `step` (1-based) updates the
# parameters, and on_model(model) once so the benchmark can watch the model's forwards.
# ---------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised at a gate to end a loop the benchmark no longer needs."""


def _plan_windows(job: Job, num_examples: int):
    """The windows of epoch 0 the job trains, exactly as `run` plans them (drop_last_window=True)."""
    from ..core.windows import WindowPlan

    plan = WindowPlan(num_examples=num_examples, micro_batch_size=job.micro_batch_size,
                      accumulation_steps=job.accumulation_steps, num_processes=1, seed=job.seed, drop_last_window=True)
    windows = plan.windows(0)
    if job.total_steps > len(windows):
        # An epoch end inside a round would make `run` evaluate there, inside the timed time.
        raise BertAccumError(
            f"{num_examples} training examples give {len(windows)} full windows of B*N = "
            f"{plan.effective_batch_size}, fewer than warm-up + rounds * steps_per_round = {job.total_steps}; "
            "use fewer rounds or steps per round"
        )
    return windows[: job.total_steps]


def _train_config(job: Job, output_dir: str):
    from ..core.config import TrainConfig

    return TrainConfig(
        task_name=job.task_name, glue_dir=job.glue_dir, train_file=job.train_file, validation_file=job.validation_file,
        model_name_or_path=job.model_path, max_length=job.max_length, padding=job.padding,
        per_device_train_batch_size=job.micro_batch_size, gradient_accumulation_steps=job.accumulation_steps,
        learning_rate=job.learning_rate, max_grad_norm=job.max_grad_norm, seed=job.seed, dropout=job.dropout,
        precision=job.precision, max_train_steps=job.total_steps, drop_last_window=True,
        max_train_samples=job.max_train_samples, max_eval_samples=8, output_dir=output_dir,
        overwrite_output_dir=True, disable_progress_bar=True, cpu=job.cpu,
    )


def train_bert_accum(job: Job, accelerator, gate: Callable[[int], None], on_model: Callable, state: dict) -> None:
    """`bert_accum.core.train.run` unmodified, records on; its run folder is a temporary one (state['output_dir'])."""
    from ..core.train import run

    out = tempfile.mkdtemp(prefix="bert_accum_bench_")
    state["output_dir"] = out

    def before_optimizer_step(model, step):
        if step == 1:
            on_model(model)
        gate(step)

    run(_train_config(job, out), accelerator=accelerator, before_optimizer_step=before_optimizer_step)


def train_light(job: Job, accelerator, gate: Callable[[int], None], on_model: Callable, state: dict) -> None:
    """bert_accum's own setup and loop (`setup` + `fit`) with no recorder: the same exact windows as `run`,
    with nothing written and nothing evaluated, so its gap to `bert_accum` is the price of the records."""
    from ..core.checkpoint import TrainingProgress
    from ..core.setup import setup
    from ..core.train import fit

    s = setup(_train_config(job, output_dir="unused"), 1, accelerator)
    _plan_windows(job, len(s.train))
    model, optimizer = accelerator.prepare(s.model, s.optimizer)
    on_model(model)
    progress = TrainingProgress()
    state["optimizer_steps"] = 0

    def before_optimizer_step(_model, step):
        gate(step)
        state["optimizer_steps"] = step

    fit(s, model, optimizer, accelerator, progress, eval_loaders=None, recorder=None,
        before_optimizer_step=before_optimizer_step)


def train_plain(job: Job, accelerator, gate: Callable[[int], None], on_model: Callable, state: dict) -> None:
    """The plain loop, written as the Hugging Face GLUE example writes its loop (no records).

    Its epoch e is a shuffled DataLoader over the examples of `job.epoch_windows[e]` windows of
    bert_accum's plan, so both loops train the same examples in every timed round.
    """
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_scheduler

    from ..core.data import load_raw_splits
    from ..core.modeling import load_tokenizer_and_model
    from ..core.tasks import get_task
    from ..core.windows import window_examples

    task = get_task(job.task_name)
    set_seed(job.seed)
    tokenizer, model = load_tokenizer_and_model(job.model_path, task, "classification")
    raw = _raw_splits(job, task, load_raw_splits)
    columns = ("sentence1", "sentence2") if task.is_pair else ("sentence1",)

    def preprocess(examples):
        result = tokenizer(*(examples[c] for c in columns), padding=False, max_length=job.max_length, truncation=True)
        result["labels"] = examples["label"]
        return result

    train_ds = raw["train"].map(preprocess, batched=True, remove_columns=raw["train"].column_names,
                                desc="tokenizing (plain loop)")
    windows = _plan_windows(job, len(train_ds))
    collator = DataCollatorWithPadding(tokenizer)  # pads each batch to its longest sequence
    no_decay = ("bias", "LayerNorm.weight")
    weight_decay = 0.0  # TrainConfig's default, so both loops run the same AdamW
    grouped = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(grouped, lr=job.learning_rate)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=job.total_steps)
    loaders, start = [], 0
    for n_windows in job.epoch_windows:
        examples = [i for w in windows[start : start + n_windows] for i in window_examples(w)]
        start += n_windows
        loaders.append(DataLoader(train_ds.select(examples), shuffle=True, collate_fn=collator,
                                  batch_size=job.micro_batch_size))
    model, optimizer, scheduler, *loaders = accelerator.prepare(model, optimizer, scheduler, *loaders)

    # Count updates on the torch optimizer inside accelerate's wrapper: its hook fires only when the
    # parameters really change (accelerate skips the inner step on accumulation micro-steps).
    state["optimizer_steps"] = 0

    def count_update(opt, args, kwargs):
        state["optimizer_steps"] += 1

    optimizer.optimizer.register_step_post_hook(count_update)
    on_model(model)
    model.train()
    windows_done = 0
    for loader in loaders:
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), job.max_grad_norm)
                    windows_done += 1
                    gate(windows_done)  # benchmark only: the point where run calls before_optimizer_step
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()


def _raw_splits(job: Job, task, load_raw_splits):
    raw = load_raw_splits(task, glue_dir=job.glue_dir, train_file=job.train_file, validation_file=job.validation_file)
    if job.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(job.max_train_samples, len(raw["train"]))))
    return raw


_LOOP_FUNCTIONS = {"plain": train_plain, "bert_accum": train_bert_accum, "bert_accum_light": train_light}


def _accumulate_for_accelerate(job: Job) -> int:
    """The accumulation count accelerate must hold for this loop: only the plain loop lets accelerate accumulate."""
    return job.accumulation_steps if job.loop == "plain" else 1


# ---------------------------------------------------------------------------------------------
# Worker threads and rounds
# ---------------------------------------------------------------------------------------------


class _BatchRecorder:
    """Forward pre-hook: the shape and attention mask of every batch the model is given."""

    def __init__(self) -> None:
        self.batches: list[tuple[tuple[int, int], torch.Tensor]] = []

    def hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.batches.append((tuple(ids.shape), kwargs["attention_mask"]))

    def take(self) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """Batches since the last call."""
        out, self.batches = self.batches, []
        return out


class _Worker:
    """Runs one contender's loop in a thread and lets it advance one round at a time."""

    def __init__(self, contender: Contender, job: Job, pauses: list[int], cuda: bool):
        self.contender = contender
        self.job = job
        self.pauses = set(pauses)
        self.cuda = cuda
        self.rounds: list[RoundRecord] = []
        self.state: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.accelerator = None
        self._recorder = _BatchRecorder()
        self._go = threading.Semaphore(0)
        self._paused = threading.Semaphore(0)
        self._stop = False
        self._t0: float | None = None
        self._steps_at_pause = 0
        self._round = (-1, -1)
        self._thread: threading.Thread | None = None

    def activate(self) -> None:
        """Put accelerate's shared state in this contender's settings."""
        _activate(self.accelerator, self.job.precision, _accumulate_for_accelerate(self.job))

    def start(self) -> None:
        """Build the loop, run its warm-up steps, return at the first pause."""
        self.accelerator = _new_accelerator(self.job.precision, self.job.cpu, _accumulate_for_accelerate(self.job))
        self.activate()
        self._thread = threading.Thread(target=self._main, name=self.contender.name, daemon=True)
        self._thread.start()
        self._wait()

    def turn(self, round_index: int, position: int) -> RoundRecord:
        """Run one timed round (S optimizer steps) and return its record."""
        self._round = (round_index, position)
        self.activate()
        self._go.release()
        self._wait()
        return self.rounds[-1]

    def stop(self) -> None:
        """End the loop at its current pause and join the thread."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._stop = True
            self._go.release()
            self._thread.join()

    def _wait(self) -> None:
        self._paused.acquire()
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            _LOOP_FUNCTIONS[self.job.loop](self.job, self.accelerator, self._gate, self._watch, self.state)
            self.error = BertAccumError(f"{self.contender.name}: the loop ended before the benchmark stopped it")
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
        finally:
            self._paused.release()

    def _watch(self, model) -> None:
        model.register_forward_pre_hook(self._recorder.hook, with_kwargs=True)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _gate(self, step: int) -> None:
        """Called right before optimizer step `step`; pauses at round boundaries."""
        if step not in self.pauses:
            return
        self._sync()
        now = time.perf_counter()
        batches = self._recorder.take()
        steps = self.state.get("optimizer_steps", 0)
        if self._t0 is not None:  # the first pause ends the warm-up, which is not timed
            shapes = [shape for shape, _ in batches]
            self.rounds.append(RoundRecord(
                round=self._round[0], position=self._round[1], seconds=now - self._t0,
                examples=sum(b for b, _ in shapes), real_tokens=int(sum(int(m.sum()) for _, m in batches)),
                padded_tokens=sum(b * length for b, length in shapes), micro_steps=len(shapes),
                optimizer_steps=steps - self._steps_at_pause, shapes=shapes,
            ))
        self._steps_at_pause = steps
        self._paused.release()
        self._go.acquire()
        if self._stop:
            raise _Stopped
        self._t0 = time.perf_counter()

    def finish(self) -> None:
        """After `stop`: optimizer steps of `run` rounds from its steps.jsonl, then remove its run folder."""
        out = self.state.get("output_dir")
        if out is None:
            return
        from ..core.records import read_jsonl

        rows = read_jsonl(Path(out) / "steps.jsonl")
        done = sorted(r["optimizer_step"] for r in rows)
        # Round i is timed from just before optimizer step p_i to just before step p_{i+1}, so the
        # steps completed inside it are p_i .. p_{i+1} - 1.
        pauses = sorted(self.pauses)
        for rec, (lo, hi) in zip(self.rounds, zip(pauses, pauses[1:])):
            rec.optimizer_steps = sum(lo <= s < hi for s in done)
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _job_for(cfg: BenchConfig, contender: Contender, model_path: str, epoch_windows: list[int], *,
             micro_batch_size: int | None = None, accumulation_steps: int | None = None) -> Job:
    return Job(
        loop=contender.loop, precision=contender.precision, dropout=contender.dropout, padding=contender.padding,
        model_path=model_path, task_name=cfg.task_name, glue_dir=cfg.glue_dir, train_file=cfg.train_file,
        validation_file=cfg.validation_file, max_length=cfg.max_length,
        micro_batch_size=micro_batch_size or cfg.micro_batch_size,
        accumulation_steps=accumulation_steps or cfg.accumulation_steps, epoch_windows=epoch_windows,
        seed=cfg.seed, learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm,
        max_train_samples=cfg.max_train_samples, cpu=cfg.cpu,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs, matmul peak, memory
# ---------------------------------------------------------------------------------------------


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
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model.eval()  # dropout costs no FLOPs; eval only skips its random draws
    max_pos = config.max_position_embeddings
    lengths = [v for v in (8, 16, 32, 24) if v <= max_pos]
    if len(lengths) < 4:
        lengths = [2, 3, 4, 5]
    l1, l2, l3, l4 = lengths
    f = [Fraction(count_training_flops(model, 1, n)) for n in (l1, l2, l3)]
    # Solve gamma + alpha*L + beta*L^2 = f(L) through the three points (divided differences).
    d1 = (f[1] - f[0]) / (l2 - l1)
    d2 = (f[2] - f[1]) / (l3 - l2)
    beta = (d2 - d1) / (l3 - l1)
    alpha = d1 - beta * (l1 + l2)
    gamma = f[0] - alpha * l1 - beta * l1 * l1
    counted = count_training_flops(model, 3, l4)
    predicted = 3 * (gamma + alpha * l4 + beta * l4 * l4)
    verified = Fraction(counted) == predicted
    check = f"(b=3, L={l4}): counted {counted:,}, polynomial {float(predicted):,.0f}"
    return FlopModel(float(gamma), float(alpha), float(beta), verified, check)


def matmul_peak(n: int, reps: int, dtype: torch.dtype, device: str) -> dict[str, float]:
    """GFLOP/s of an n x n x n torch.matmul (2*n^3 FLOPs): best and median of `reps` timed runs after 2 untimed."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    cuda = device.startswith("cuda")
    rates = []
    for i in range(reps + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "reps": reps, "best_gflops": max(rates), "median_gflops": statistics.median(rates)}


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak so far is the best available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kilobytes


def _import_libraries(model_path: str) -> None:
    """Import everything a loop imports lazily, so that a memory probe's baseline already holds the libraries."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    from transformers import AutoConfig, DataCollatorWithPadding, get_scheduler  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from ..controls import dropout  # noqa: F401
    from ..core import data, features, modeling, train, windows  # noqa: F401

    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(AutoConfig.from_pretrained(model_path))]  # imports the model's module


# Modules the memory probes' fork server imports once (names only: nothing is run).
_PRELOAD = [
    "bert_accum.study.bench", "bert_accum.core.train", "bert_accum.core.data", "bert_accum.core.features", "bert_accum.controls.dropout",
    "bert_accum.core.modeling", "accelerate", "accelerate.accelerator", "datasets", "torch.utils.data",
    "transformers.modeling_utils", "transformers.models.auto.modeling_auto", "transformers.models.bert.modeling_bert",
    "transformers.data.data_collator", "transformers.optimization",
]


def _memory_child(job: Job, threads: int | None, windows: int, queue) -> None:
    """In a fresh process: train `windows` windows (windows - 1 optimizer steps) of `job`, report peak memory."""
    try:
        if threads:
            torch.set_num_threads(threads)
        _import_libraries(job.model_path)
        baseline = _rss_bytes()
        cuda = torch.cuda.is_available() and not job.cpu
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def gate(step):
            if step == windows:  # window `windows` has run forward/backward; its update is not needed
                raise _Stopped

        accelerator = _new_accelerator(job.precision, job.cpu, _accumulate_for_accelerate(job))
        state: dict[str, Any] = {}
        try:
            _LOOP_FUNCTIONS[job.loop](job, accelerator, gate, lambda model: None, state)
        except _Stopped:
            pass
        finally:
            if state.get("output_dir"):
                import shutil

                shutil.rmtree(state["output_dir"], ignore_errors=True)
        queue.put({"baseline": baseline, "peak": _max_rss_bytes(),
                   "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None})
    except BaseException as exc:  # reported to the parent, which raises it
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_peak_memory(jobs: list[Job], threads: int | None, windows: int, parallel: int = 1) -> list[MemoryRecord]:
    """Peak memory of each job in its own fresh process, `parallel` processes at a time.

    Processes come from a fork server that has imported the libraries once (so each probe does not
    pay the imports again) but has never run a torch kernel, which keeps forking safe for OpenMP;
    on a GPU, or where there is no fork server (Windows), each probe is spawned. Running probes side by side
    changes how long they take, not their peak resident memory.
    """
    import multiprocessing as mp

    # CUDA must not be touched before a fork: on a GPU every probe is spawned.
    if "forkserver" in mp.get_all_start_methods() and not any(torch.cuda.is_available() and not j.cpu for j in jobs):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
    else:
        ctx = mp.get_context("spawn")
    reports: list[dict[str, Any]] = []
    for start in range(0, len(jobs), parallel):
        batch = []
        for job in jobs[start : start + parallel]:
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(job, threads, windows, queue))
            proc.start()
            batch.append((proc, queue))
        for proc, queue in batch:
            try:
                reports.append(queue.get())
            finally:
                proc.join()
    out = []
    mb = 1024 * 1024
    for job, report in zip(jobs, reports):
        if "error" in report:
            raise BertAccumError(f"memory probe for {job.loop} B={job.micro_batch_size} N={job.accumulation_steps} "
                                 f"failed: {report['error']}")
        out.append(MemoryRecord(
            loop=job.loop, micro_batch_size=job.micro_batch_size, accumulation_steps=job.accumulation_steps,
            baseline_rss_mb=report["baseline"] / mb, peak_rss_mb=report["peak"] / mb,
            cuda_peak_mb=None if report["cuda_peak"] is None else report["cuda_peak"] / mb,
        ))
    return out


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def _environment(cfg: BenchConfig, device: str) -> dict[str, Any]:
    import importlib.metadata

    from ..core.records import git_commit

    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "datasets"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["torch"] = torch.__version__
    return {
        "command": cfg.command or " ".join(sys.argv),
        "git_commit": git_commit() or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _build_bert_base(folder: str, tokenizer_path: str) -> str:
    """A BERT-base-sized model (BertConfig defaults: 12 layers, hidden 768) with random weights, and the main tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer))).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _comparisons(cfg: BenchConfig, results: dict[str, ContenderResult]) -> list[Comparison]:
    """Paired per-round ratios; every pair trained the same examples in the same round."""

    def rate(name: str) -> list[float]:
        return [r.examples_per_second for r in results[name].rounds]

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rate(a), rate(b))]

    def overhead(slow: str, base: str) -> list[float]:
        # time per example of `slow` over that of `base`, minus 1, in percent: (t_s/n)/(t_b/n) - 1
        return [100.0 * (y / x - 1.0) for x, y in zip(rate(slow), rate(base))]

    first = cfg.precisions[0]
    out = []
    for p in cfg.precisions:
        out.append(Comparison(
            f"bert_accum / plain, records on, {p}", f"examples/s of `bert_accum {p}` over `plain {p}`",
            ratio(f"bert_accum {p}", f"plain {p}"), target=">= 1.0" if p == first else None))
    out.append(Comparison(
        "record overhead", f"time per example of `bert_accum {first}` (records on) over `bert_accum light {first}`, minus 1",
        overhead(f"bert_accum {first}", f"bert_accum light {first}"), target="<= 3%", unit="percent"))
    out.append(Comparison(
        "invariant-dropout overhead", f"time per example with dropout invariant over standard (`bert_accum {first}`), minus 1",
        overhead(f"bert_accum {first} dropout=invariant", f"bert_accum {first}"), unit="percent"))
    out.append(Comparison(
        "window-padding overhead", f"time per example with padding window over dynamic (`bert_accum {first}`), minus 1; "
        "includes the extra padded tokens", overhead(f"bert_accum {first} padding=window", f"bert_accum {first}"), unit="percent"))
    if "fp32" in cfg.precisions:
        for low in ("bf16", "fp16"):
            if low in cfg.precisions:
                for loop in ("bert_accum", "plain"):
                    out.append(Comparison(
                        f"{low} speed-up, {loop}", f"examples/s of `{loop} {low}` over `{loop} fp32` (> 1: {low} is faster)",
                        ratio(f"{loop} {low}", f"{loop} fp32")))
    if any(name.endswith("bert-base") for name in results):
        for p in cfg.precisions:
            out.append(Comparison(
                f"bert_accum / plain, BERT-base (random weights), {p}",
                f"examples/s of `bert_accum {p} bert-base` over `plain {p} bert-base`",
                ratio(f"bert_accum {p} bert-base", f"plain {p} bert-base")))
    return out


def _interleaved_rounds(cfg: BenchConfig, contenders: list[Contender], model_paths: dict[str, str], cuda: bool,
                        say: Callable[[str], None]) -> tuple[dict[str, ContenderResult], list[list[str]]]:
    """Set every contender up (untimed warm-up included), then run the rounds, alternating the order."""
    S, R, w = cfg.steps_per_round, cfg.rounds, cfg.warmup_steps
    epoch_windows = [w] + [S] * R
    pauses = [w + r * S for r in range(R + 1)]  # before optimizer steps w, w+S, ..., w+R*S
    workers: list[_Worker] = []
    orders: list[list[str]] = []
    try:
        for c in contenders:
            say(f"[bench] setting up {c.name} ({w} untimed warm-up step{'s' * (w > 1)})")
            worker = _Worker(c, _job_for(cfg, c, model_paths[c.model], epoch_windows), pauses, cuda)
            workers.append(worker)
            worker.start()
        low = R if cfg.low_precision_rounds is None else min(R, cfg.low_precision_rounds)
        for r in range(R):
            order = workers if r % 2 == 0 else workers[::-1]
            if r >= low:
                # rounds are paired by index, so the low-precision contenders' rounds are the first `low` ones
                order = [wk for wk in order if wk.job.precision == "fp32"]
            orders.append([wk.contender.name for wk in order])
            for pos, wk in enumerate(order):
                rec = wk.turn(r, pos)
                say(f"[bench] round {r + 1}/{R} {wk.contender.name:<40} {rec.seconds:7.2f} s "
                    f"{rec.examples_per_second:8.1f} examples/s {rec.tokens_per_second:9.0f} tokens/s")
    finally:
        for wk in workers:
            wk.stop()
        for wk in workers:
            wk.finish()
    results = {wk.contender.name: ContenderResult(wk.contender, wk.rounds) for wk in workers}
    del workers
    gc.collect()  # the paused loops' models and optimizer states
    return results, orders


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
    task = get_task(cfg.task_name)
    model_path = resolve_model_path(cfg.model_name_or_path)
    env = _environment(cfg, device)
    with_bert_base = cfg.bert_base == "on" or (cfg.bert_base == "auto" and cuda)
    contenders = default_contenders(cfg, with_bert_base)

    n_mm = cfg.matmul_size or (8192 if cuda else 2048)
    say(f"[bench] matmul peak: {n_mm}x{n_mm} fp32, {cfg.matmul_reps} reps")
    matmul = {"fp32 (before rounds)": matmul_peak(n_mm, cfg.matmul_reps, torch.float32, device)}

    with tempfile.TemporaryDirectory(prefix="bert_accum_bench_model_") as tmp:
        model_paths = {"main": model_path}
        if with_bert_base:
            model_paths["bert-base"] = _build_bert_base(tmp, model_path)
        results, orders = _interleaved_rounds(cfg, contenders, model_paths, cuda, say)

        matmul["fp32 (after rounds)"] = matmul_peak(n_mm, cfg.matmul_reps, torch.float32, device)
        for low, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if low in cfg.precisions:
                # Off-GPU a low-precision matmul may be emulated and slow: a smaller size keeps it short.
                n_low = n_mm if cuda else max(256, n_mm // 2)
                matmul[low] = matmul_peak(n_low, max(2, cfg.matmul_reps // 3), dtype, device)

        say("[bench] counting FLOPs with FlopCounterMode")
        flop_models = {name: fit_flop_model(path, task.num_labels) for name, path in model_paths.items()}
    for res in results.values():
        fm = flop_models[res.contender.model]
        for rec in res.rounds:
            rec.flops = sum(fm(b, length) for b, length in rec.shapes)

    jobs = [_job_for(cfg, Contender(loop, cfg.precisions[0]), model_path, [cfg.memory_windows],
                     micro_batch_size=b, accumulation_steps=n)
            for b, n in cfg.memory_pairs() for loop in MEMORY_LOOPS]
    threads = cfg.threads or torch.get_num_threads()
    parallel = 1 if cuda else max(1, (os.cpu_count() or 1) // threads)  # one GPU: one probe at a time
    if jobs:
        say(f"[bench] peak memory: {len(jobs)} fresh processes, {parallel} at a time")
    memory = measure_peak_memory(jobs, cfg.threads, cfg.memory_windows, parallel)
    return BenchResult(
        config=cfg, environment=env, contenders=list(results.values()), comparisons=_comparisons(cfg, results),
        memory=memory, flop_models=flop_models, matmul=matmul, orders=orders,
        wall_seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _mean_std(values: list[float], fmt: str = "{:.1f}", std_fmt: str | None = None) -> str:
    if len(values) < 2:
        return fmt.format(values[0]) + " (1 round)"
    return f"{fmt.format(statistics.fmean(values))} ± {(std_fmt or fmt).format(statistics.stdev(values))}"


def render_markdown(result: BenchResult) -> str:
    """results/perf.md: command and commit first, then summary, contenders, memory, FLOPs, raw rounds."""
    cfg, env = result.config, result.environment
    cpu = env["cpu"]
    flags = cpu["flags"]
    has_bf16_units = flags.get("avx512_bf16") or flags.get("amx_bf16")
    E = cfg.effective_batch_size
    peak = max(v["best_gflops"] for k, v in result.matmul.items() if k.startswith("fp32"))
    lines = [
        "# Throughput: bert_accum vs a plain Hugging Face-style loop",
        "",
        f"- command: `{env['command']}`",
        f"- git commit: `{env['git_commit']}`",
        f"- date: {env['date']}; wall time of the whole benchmark {result.wall_seconds:.0f} s",
        f"- device: {env['device']}{' (' + env['device_name'] + ')' if env['device'] != 'cpu' else ''}; "
        f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; "
        f"torch threads: {env['threads']}",
        f"- torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"accelerate {env['versions']['accelerate']}, datasets {env['versions']['datasets']}, Python {env['python']}",
        "- CPU matrix instructions: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
        + (". " if env["device"] == "cpu" else " (the GPU does the matrix work). ")
        + ("bf16 runs on the CPU's bf16 units." if has_bf16_units else
           "No avx512_bf16/amx: this CPU has no bf16 matrix instructions, so bf16 matmuls run on emulated kernels "
           "and bf16 is expected to be slower than fp32 (see the bf16 matmul row under FLOPs)."),
        f"- model: `{cfg.model_name_or_path}`; task: {cfg.task_name} "
        f"({'--glue_dir ' + cfg.glue_dir if cfg.glue_dir else '--train_file ' + str(cfg.train_file)}"
        f"{', first ' + str(cfg.max_train_samples) + ' training examples' if cfg.max_train_samples else ''}); "
        f"max_length {cfg.max_length}",
        f"- batch: micro_batch_size B = {cfg.micro_batch_size}, accumulation_steps N = {cfg.accumulation_steps}, "
        f"num_processes W = 1, effective_batch_size E = {E}",
        f"- {cfg.rounds} rounds x {cfg.steps_per_round} optimizer step(s) per contender per round "
        + (f"(bf16/fp16 contenders: the first {cfg.low_precision_rounds} rounds only) "
           if cfg.low_precision_rounds is not None and cfg.low_precision_rounds < cfg.rounds else "")
        + f"({cfg.steps_per_round * E} examples per round), after {cfg.warmup_steps} untimed warm-up step(s); "
        "contender order alternates forward/backward between rounds",
        "",
        "## What is timed",
        "",
        "Each loop runs in its own thread and is paused right before the optimizer applies an update "
        "(`run`'s `before_optimizer_step` hook; the same point, after clipping, in the plain and light loops). "
        "A round is the wall time between leaving one pause and reaching the next, "
        f"{cfg.steps_per_round} optimizer step(s) later: optimizer step, scheduler step and zero_grad of one window, then "
        "collation (bert_accum's `Collator`; the plain loop's `DataLoader` with `DataCollatorWithPadding`), forward and "
        "backward of every micro-batch, clipping and, for `bert_accum`, its per-step records (per-group gradient norms, "
        "`steps.jsonl` row written and flushed). Not timed, for every contender alike: model loading, tokenisation, the "
        "run folder's set-up, evaluation, warm-up steps. The plain loop starts a new DataLoader epoch in every "
        "round (its set-up cost is inside the round). Both loops train the same examples in each round (windows of "
        "bert_accum's plan; the plain loop shuffles them in its own DataLoader), so real token counts agree per round; "
        "padded counts differ with the grouping. Paused contenders are blocked on a semaphore and use no CPU.",
        "",
        "## Summary",
        "",
        "| quantity | mean ± std over rounds | per round | target | |",
        "|---|---|---|---|---|",
    ]
    for comp in result.comparisons:
        fmt, std_fmt = ("{:+.1f}%", "{:.1f}%") if comp.unit == "percent" else ("{:.3f}", "{:.3f}")
        per = ", ".join(fmt.format(v) for v in comp.values)
        lines.append(f"| {comp.quantity} | {_mean_std(comp.values, fmt, std_fmt)} | {per} | {comp.target or ''} | {comp.verdict()} |")
    main_on = result.result(f"bert_accum {cfg.precisions[0]}")
    flops_rate = [r.flops_per_second / 1e9 for r in main_on.rounds]
    lines.append(f"| achieved FLOP/s, `bert_accum {cfg.precisions[0]}` | {_mean_std(flops_rate)} GFLOP/s | "
                 f"{', '.join(f'{v:.1f}' for v in flops_rate)} | | "
                 f"{100 * statistics.fmean(flops_rate) / peak:.0f}% of the fp32 matmul peak |")
    lines.append(f"| matmul peak, fp32 | {peak:.1f} GFLOP/s (best) | | | see FLOPs |")
    if result.memory:
        mem = "; ".join(f"{m.loop} B={m.micro_batch_size} N={m.accumulation_steps}: {m.delta_mb:.0f} MB"
                        for m in result.memory)
        lines.append(f"| peak memory (peak RSS - RSS after imports) | | {mem} | | see below |")
    lines += [
        "",
        "## Contenders",
        "",
        "| contender | loop | examples/s | tokens/s (real) | padded tokens/s | achieved GFLOP/s | % of fp32 matmul peak "
        "| examples / real tokens / padded tokens / micro-steps / optimizer steps (all rounds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in result.contenders:
        rounds = res.rounds
        gf = [r.flops_per_second / 1e9 for r in rounds]
        lines.append(
            f"| {res.contender.name} | {res.contender.description} | "
            f"{_mean_std([r.examples_per_second for r in rounds])} | {_mean_std([r.tokens_per_second for r in rounds], '{:.0f}')} | "
            f"{_mean_std([r.padded_tokens / r.seconds for r in rounds], '{:.0f}')} | {_mean_std(gf)} | "
            f"{100 * statistics.fmean(gf) / peak:.0f}% | "
            f"{sum(r.examples for r in rounds)} / {sum(r.real_tokens for r in rounds)} / "
            f"{sum(r.padded_tokens for r in rounds)} / {sum(r.micro_steps for r in rounds)} / "
            f"{sum(r.optimizer_steps for r in rounds)} |"
        )
    lines += ["", "## Peak memory per (B, N)", ""]
    if result.memory:
        gpu = any(m.cuda_peak_mb is not None for m in result.memory)
        lines += [
            "Each row is a fresh process (multiprocessing fork server, or spawn on a GPU) that builds the loop at "
            f"{cfg.precisions[0]}, trains "
            f"{cfg.memory_windows} windows (forward/backward) with {cfg.memory_windows - 1} optimizer step(s) between them, "
            "and exits. Peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss`; the baseline is the process's RSS after imports, "
            "so the difference holds model weights, tokenised data, optimizer state, gradients and activations"
            + (" (GPU: `torch.cuda.max_memory_allocated`)." if gpu else "."),
            "",
            "| loop | B | N | E | RSS after imports (MB) | peak RSS (MB) | peak - baseline (MB) |"
            + (" GPU max allocated (MB) |" if gpu else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
        ]
        for m in result.memory:
            row = (f"| {m.loop} | {m.micro_batch_size} | {m.accumulation_steps} | {m.micro_batch_size * m.accumulation_steps} | "
                   f"{m.baseline_rss_mb:.0f} | {m.peak_rss_mb:.0f} | {m.delta_mb:.0f} |")
            if gpu:
                row += f" {m.cuda_peak_mb:.0f} |"
            lines.append(row)
    else:
        lines.append("Not measured (--memory_configs given empty).")
    lines += [
        "",
        "## FLOPs",
        "",
        "Training FLOPs of a (b, L) micro-batch (forward + backward matmuls; embeddings lookups, softmax, layer norm "
        "and the optimizer are not counted) were counted with `torch.utils.flop_counter.FlopCounterMode` on the model "
        "with eager attention at b = 1 and three lengths, giving b * (gamma + alpha*L + beta*L^2):",
        "",
        "| model | gamma (per sequence) | alpha (per token) | beta (per token pair) | check |",
        "|---|---|---|---|---|",
    ]
    for name, fm in result.flop_models.items():
        lines.append(f"| {name} | {fm.gamma:,.0f} | {fm.alpha:,.0f} | {fm.beta:,.0f} | "
                     f"{'exact' if fm.verified else 'MISMATCH'} at {fm.check} |")
    lines += [
        "",
        "Each round's FLOPs are summed over the padded shapes the model really ran. Matmul peak (torch.matmul, n x n, "
        "2n^3 FLOPs per product):",
        "",
        "| matmul | n | reps | best GFLOP/s | median GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for key, v in result.matmul.items():
        lines.append(f"| {key} | {v['n']} | {v['reps']} | {v['best_gflops']:.1f} | {v['median_gflops']:.1f} |")
    lines += [
        "",
        "## Rounds",
        "",
        "Order per round: " + "; ".join(f"round {i + 1}: " + " → ".join(o) for i, o in enumerate(result.orders)),
        "",
        "| round | position | contender | seconds | examples | real tokens | padded tokens | micro-steps "
        "| optimizer steps | examples/s | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(((rec, res.contender.name) for res in result.contenders for rec in res.rounds),
                  key=lambda t: (t[0].round, t[0].position))
    for rec, name in rows:
        lines.append(f"| {rec.round + 1} | {rec.position + 1} | {name} | {rec.seconds:.3f} | {rec.examples} | "
                     f"{rec.real_tokens} | {rec.padded_tokens} | {rec.micro_steps} | {rec.optimizer_steps} | "
                     f"{rec.examples_per_second:.1f} | {rec.flops_per_second / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(result: BenchResult, path: str | None = None) -> Path:
    """Write the markdown report (default: the config's --output); returns its path."""
    out = Path(path or result.config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(result))
    return out


def bench_main(cfg: BenchConfig) -> Path:
    """`scripts/bench.py`: run the benchmark, write the report, print its path."""
    result = run_bench(cfg)
    path = write_report(result)
    print(f"[bench] wrote {path}", file=sys.stderr)
    return path
