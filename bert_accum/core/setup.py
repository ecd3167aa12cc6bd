"""Setup: one config becomes everything a run trains with, built once (litgpt's setup -> fit).

`setup(cfg, num_processes, accelerator)` returns a `RunSetup`: task, tokenizer, model with its dropout
controller, tokenised splits, the window plan, the collator, optimizer and scheduler, and the step arithmetic.
`scripts/finetune.py` (through `train.run`), the probe and the benchmark all build their model and data here, so a
run, a probe and a benchmark of one config start from the same head, the same examples and the same windows.
The order of the steps below is part of the numerics: torch's RNG is seeded once, then the head is
initialised, then (with `dropout_seed`) the dropout stream is restarted; nothing else draws from it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..controls.bugs import BugModes
from ..controls.dropout import DropoutController
from ..errors import BertAccumError
from .config import TrainConfig, total_steps
from .features import Collator, InMemorySplit
from .modeling import model_id
from .tasks import TaskSpec, get_task, is_custom
from .windows import WindowPlan


def task_kind(cfg: TrainConfig, task: TaskSpec) -> str:
    """What a micro-batch's items are: 'mlm' (tokens), 'regression' or 'classification' (examples)."""
    if cfg.objective == "mlm":
        return "mlm"
    return "regression" if task.is_regression else "classification"


def resolve_task(cfg: TrainConfig) -> TaskSpec:
    """The run's task: a named one, or (no --task_name, or `custom`) the one inferred from --train_file."""
    if cfg.train_file is not None and is_custom(cfg.task_name):
        from .data import infer_task

        return infer_task(cfg.train_file, cfg.text_column_names, cfg.label_column_name)
    return get_task(cfg.task_name)


def silence_progress_bars() -> None:
    """Turn off every progress bar a run can show besides its own: datasets' map and loading bars,
    transformers' (weight loading) and huggingface_hub's (downloads)."""
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def load_model(cfg: TrainConfig):
    """(task, tokenizer, model, model path) with the head initialised from `cfg.seed` and, when
    `cfg.dropout_seed` is given, torch's dropout stream restarted from it."""
    from accelerate.utils import set_seed

    from .modeling import load_tokenizer_and_model, resolve_model_path

    if cfg.disable_progress_bar:
        silence_progress_bars()
    task = resolve_task(cfg)
    set_seed(cfg.seed)  # the fresh classification head is the same for every (B, N) of a seed
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer, model = load_tokenizer_and_model(
        model_path, task, cfg.objective, cfg.cache_dir,
        config_path=resolve_model_path(cfg.config_name) if cfg.config_name else None,
        tokenizer_path=resolve_model_path(cfg.tokenizer_name) if cfg.tokenizer_name else None,
        revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code,
        ignore_mismatched_sizes=cfg.ignore_mismatched_sizes, use_fast=not cfg.use_slow_tokenizer,
    )
    if cfg.use_slow_tokenizer and getattr(tokenizer, "is_fast", False):
        print(f"[bert_accum] note: --use_slow_tokenizer was passed on as use_fast=False, but this transformers has only "
              f"fast tokenizers; using {type(tokenizer).__name__}", file=sys.stderr)
    if cfg.dropout_seed is not None:
        # Standard dropout draws from torch's stream, which set_seed(seed) started before the head was
        # initialised; an explicit dropout seed restarts it here, so the masks no longer depend on --seed
        # (an initialisation-only floor keeps them) and the head stays the seed's.
        set_seed(cfg.dropout_seed)
    max_pos = model.config.max_position_embeddings
    if cfg.max_length > max_pos:
        raise BertAccumError(f"--max_length {cfg.max_length} exceeds the model's {max_pos} positions")
    return task, tokenizer, model, model_path


def load_raw(cfg: TrainConfig, task: TaskSpec):
    """The raw splits (a `datasets.DatasetDict`): the first `max_train_samples` training examples and the first
    `max_eval_samples` of each evaluation split."""
    from .data import load_raw_splits

    raw = load_raw_splits(
        task, glue_dir=cfg.glue_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
        text_column_names=cfg.text_column_names, label_column_name=cfg.label_column_name, cache_dir=cfg.cache_dir,
    )
    if cfg.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(cfg.max_train_samples, len(raw["train"]))))
    if cfg.max_eval_samples is not None:
        for split in task.eval_splits:
            raw[split] = raw[split].select(range(min(cfg.max_eval_samples, len(raw[split]))))
    return raw


def load_splits(cfg: TrainConfig, task: TaskSpec, tokenizer, raw=None):
    """Tokenised splits of `raw` (default: `load_raw(cfg, task)`), unpadded, with `length`, `label` and `idx`."""
    from .features import tokenize_splits

    return tokenize_splits(load_raw(cfg, task) if raw is None else raw, tokenizer, cfg.max_length, task.is_pair)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`cfg.optim` without weight decay on biases and LayerNorm weights, as in the HF examples: AdamW
    (``adamw_torch``; ``adamw_torch_fused`` is the same update in one fused kernel) or plain SGD (``sgd``: no momentum, so each step is -lr times the accumulated gradient
    and a gradient N times too large is an N times larger step, which AdamW's normalisation hides)."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grouped = [
        {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    if cfg.optim == "sgd":
        return torch.optim.SGD(grouped, lr=cfg.learning_rate, momentum=0.0)
    return torch.optim.AdamW(grouped, lr=cfg.learning_rate, eps=cfg.adam_epsilon,
                             fused=cfg.optim == "adamw_torch_fused" or None)


@dataclass(frozen=True)
class StepPlan:
    """The run's step arithmetic, in optimizer steps (the schedule never counts micro-steps unless a bug asks)."""

    steps_per_epoch: int
    total: int
    epochs: int
    warmup: int
    schedule_scale: int
    eval_every: int | None


@dataclass
class RunSetup:
    """Everything a run trains with, before accelerate wraps model and optimizer."""

    cfg: TrainConfig
    task: TaskSpec
    kind: str
    bugs: BugModes
    tokenizer: Any
    model: torch.nn.Module
    model_path: str
    tokenized: Any
    train: InMemorySplit
    plan: WindowPlan
    steps: StepPlan
    collator: Collator
    dropout: DropoutController
    groups: dict[str, str]
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @property
    def micro_batch_size(self) -> int:
        """B."""
        return self.plan.micro_batch_size

    @property
    def accumulation_steps(self) -> int:
        """N."""
        return self.plan.accumulation_steps

    @property
    def num_processes(self) -> int:
        """W."""
        return self.plan.num_processes

    @property
    def effective_batch_size(self) -> int:
        """E = B * N * W."""
        return self.plan.effective_batch_size

    def arithmetic(self) -> str:
        """The two lines printed at start: B x N x W, steps per epoch, total steps, warmup, schedule unit."""
        n_train, e, st = len(self.train), self.effective_batch_size, self.steps
        last = n_train % e
        return (
            f"[bert_accum] task {self.task.name} ({self.kind}) | train examples {n_train} | "
            f"B={self.micro_batch_size} x N={self.accumulation_steps} x W={self.num_processes} -> effective batch {e}\n"
            f"[bert_accum] optimizer steps per epoch = ceil({n_train}/{e}) = {st.steps_per_epoch}"
            + (f" (last window {last} examples{', dropped' if self.cfg.drop_last_window else ''})" if last else "")
            + f" | epochs {st.epochs} | total optimizer steps {st.total} | micro-steps per step {self.accumulation_steps}"
            f" | warmup {st.warmup} steps | schedule sized in "
            f"{'MICRO-steps (bug mode)' if st.schedule_scale > 1 else 'optimizer steps'}"
        )

    def derived(self) -> dict[str, Any]:
        """The numbers derived from the config, saved beside it in config.json and final_metrics.json."""
        cfg = self.cfg
        return {
            "micro_batch_size": self.micro_batch_size, "accumulation_steps": self.accumulation_steps,
            "num_processes": self.num_processes, "effective_batch_size": self.effective_batch_size,
            "optimizer_steps_per_epoch": self.steps.steps_per_epoch, "total_optimizer_steps": self.steps.total,
            "epochs": self.steps.epochs, "num_warmup_steps": self.steps.warmup, "train_examples": len(self.train),
            "model": model_id(cfg.model_name_or_path), "model_path": self.model_path, "task": self.task.name,
            "synthetic_data": self.task.name == "synthetic",
            "label_names": None if self.task.label_names is None else list(self.task.label_names),
            "seeds": {"seed": cfg.seed, "data_seed": cfg.resolved_data_seed, "dropout_seed": cfg.resolved_dropout_seed},
        }


def final_metrics(s: "RunSetup", *, optimizer_steps: int, clipped_steps: int, examples_seen: int, real_tokens: int,
                  train_seconds: float, device: str, last_eval: dict[str, Any]) -> dict[str, Any]:
    """final_metrics.json of a completed run, the same keys whichever loop (this project's or a Trainer) trained it."""
    seconds = max(train_seconds, 1e-9)
    return {
        "status": "completed",
        "task": s.task.name,
        "synthetic_data": s.task.name == "synthetic",
        **s.derived(),
        "optimizer_steps": optimizer_steps,
        "clipped_fraction": clipped_steps / max(optimizer_steps, 1),
        "examples_seen": examples_seen,
        "train_seconds": round(train_seconds, 3),
        "examples_per_second": examples_seen / seconds,
        "tokens_per_second": real_tokens / seconds,
        "device": device,
        "precision": s.cfg.precision,
        "eval": last_eval,
        "main_metric": s.task.main_metric if s.kind != "mlm" else "masked_accuracy",
    }


def plan_steps(cfg: TrainConfig, plan: WindowPlan, bugs: BugModes) -> StepPlan:
    """Steps per epoch, total steps, epochs, warmup and evaluation cadence for `plan`."""
    steps_per_epoch = plan.num_windows_per_epoch()
    total, epochs = total_steps(steps_per_epoch, cfg.num_train_epochs, cfg.max_train_steps,
                                cfg.max_train_examples, plan.effective_batch_size)
    warmup = cfg.num_warmup_steps or math.ceil(cfg.warmup_ratio * total)
    return StepPlan(steps_per_epoch, total, epochs, warmup, bugs.schedule_scale(plan.accumulation_steps),
                    cfg.eval_every(total))


def setup(cfg: TrainConfig, num_processes: int = 1, accelerator=None) -> RunSetup:
    """Build model, data, plan, collator, dropout controller, optimizer and scheduler for `cfg` on W processes.

    With an `accelerator`, datasets are prepared on the main process first (one cache for all ranks).
    """
    import contextlib

    from transformers import get_scheduler

    from .modeling import parameter_group

    bugs = BugModes.parse(cfg.bug_modes)
    task, tokenizer, model, model_path = load_model(cfg)
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        tokenized = load_splits(cfg, task, tokenizer)
    train = InMemorySplit.from_dataset(tokenized["train"])
    plan = WindowPlan(
        num_examples=len(train), micro_batch_size=cfg.per_device_train_batch_size,
        accumulation_steps=cfg.accumulation_steps_for(num_processes), num_processes=num_processes,
        seed=cfg.resolved_data_seed, drop_last_window=cfg.drop_last_window, step_mod_boundaries=bugs.step_mod_boundaries,
    )
    steps = plan_steps(cfg, plan, bugs)
    # Dropout controls go on the bare model, before accelerate wraps it.
    if cfg.precision == "fp64":
        model = model.double()
    dropout = DropoutController(model, cfg.dropout, cfg.resolved_dropout_seed)
    groups = {n: parameter_group(n) for n, _ in model.named_parameters()}
    optimizer = build_optimizer(model, cfg)
    # The scheduler is never passed to accelerator.prepare: AcceleratedScheduler steps W times per call unless
    # batches are split, which would size the schedule in process-steps. The loop steps it once per window.
    scheduler = get_scheduler(
        cfg.lr_scheduler_type, optimizer=optimizer,
        num_warmup_steps=steps.warmup * steps.schedule_scale, num_training_steps=steps.total * steps.schedule_scale,
    )
    collator = Collator(train, tokenizer, cfg.padding, cfg.max_length, mlm=cfg.objective == "mlm",
                        mlm_probability=cfg.mlm_probability, seed=cfg.resolved_data_seed)
    return RunSetup(cfg=cfg, task=task, kind=task_kind(cfg, task), bugs=bugs, tokenizer=tokenizer, model=model,
                    model_path=model_path, tokenized=tokenized, train=train, plan=plan, steps=steps, collator=collator,
                    dropout=dropout, groups=groups, optimizer=optimizer, scheduler=scheduler)
