"""The Hugging Face Trainer as a backend of the study: ``scripts/finetune.py --backend trainer|exact_trainer``.

One `TrainConfig` trained by the stock `transformers.Trainer` (``trainer``) or by `ExactAccumulationTrainer`
(``exact_trainer``) writes the same run folder as this project's loop (``bert_accum``, `core.train.run`), so the
report reads all three alike. What the three backends share, so that only the loop differs:

* `core.setup.setup`: the model and its head (from ``seed``), the tokenised data, the `WindowPlan`, the step
  arithmetic (total steps, warmup, evaluation cadence), the optimizer (`build_optimizer`, ``--optim``) and the
  LR scheduler; the Trainer is handed that optimizer and scheduler instead of building its own;
* the data order: a batch sampler yields the plan's micro-batches (window k = examples [k*E, (k+1)*E) of the
  epoch's permutation of ``data_seed``; a short last window split into near-equal micro-batches as the plan
  splits it), collated by the project's `Collator`, so every backend sees the same tensors in the same order;
* the dropout stream: torch's RNG state after setup is restored right before the first micro-batch (the
  Trainer reseeds torch with ``seed`` when it is built), so standard dropout draws the same masks as the
  project's loop at (B·N, 1);
* clipping: the Trainer's own clipping is switched off (``max_grad_norm=0``) and a callback measures the
  accumulated gradient's norm (total and per parameter group) before clipping it to ``max_grad_norm`` in
  ``on_pre_optimizer_step``, so ``grad_norm`` is the real pre-clip norm and ``clipped`` is exact;
* evaluation: the project's `_evaluate` on the same dev loaders, at the same steps, writing eval.jsonl and
  predictions.json; the Trainer's own evaluation, logging and saving are off.

Each steps.jsonl row has the project loop's keys. ``loss`` is what the backend backpropagated: the sum over the
window's micro-steps of the loss the Trainer's ``training_step`` returned (the Trainer's logged training loss
at ``logging_steps=1``); ``window_mean_loss`` is the window's mean per-example loss computed from the same
logits, and ``loss_factor`` their ratio: 1 where the accumulated gradient is the large batch's, N where the
Trainer did not divide the micro-batch means by N (transformers 5.x with BERT heads, upstream #47688).
environment.json and final_metrics.json state the transformers version, what the Trainer's attributes say it
does with the loss (``divides_loss_by_accumulation_steps``) and the factor measured on the first window.

Masked-LM (``--objective mlm``) trains through both: the collator's masks are the project's, so the exact trainer
computes the loop's window loss with either ``--loss_normalization``; the stock Trainer backpropagates BERT's
per-micro-batch token mean, N of them summed (``loss_factor`` about N, mean-of-means weighting).

Limits (each refused with a one-line error): one process, fp32 or fp64; the stock Trainer only with standard or
off dropout, dynamic or max_length padding and ``mean_of_means`` normalisation (it has no other); no
checkpoints, bug modes or trackers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from transformers import TrainerCallback

from ..core.config import TrainConfig
from ..errors import BertAccumError, NonFiniteLossError

__all__ = ["run_trainer", "PlanBatchSampler", "trainer_facts"]

TRAINER_BACKENDS = ("trainer", "exact_trainer")


class PlanBatchSampler:
    """The micro-batches of a single-process `WindowPlan`, window after window, for a DataLoader.

    `set_epoch` (called by the Trainer through accelerate before each epoch) selects the epoch's
    permutation; the micro-batches are exactly those of the project's loop (`core.train.fit`).
    """

    def __init__(self, plan):
        if plan.num_processes != 1:
            raise BertAccumError("PlanBatchSampler serves one process")
        self.plan = plan
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s permutation from the next iteration on."""
        self.epoch = int(epoch)

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """Example indices of every micro-batch of `epoch`, in training order."""
        return [micro[0] for window in self.plan.windows(epoch) for micro in window]

    def __iter__(self):
        yield from self.micro_batches(self.epoch)

    def __len__(self) -> int:
        return sum(len(window) for window in self.plan.windows(0))


class _Indices(torch.utils.data.Dataset):
    """A dataset whose items are their own indices: the collator builds the tensors from the tokenised split."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@dataclasses.dataclass
class _Tally:
    """What the micro-steps of the current window add up to."""

    backprop_loss: float = 0.0  # sum of the losses training_step backpropagated
    item_loss_sum: float = 0.0  # summed per-item loss, from the same logits
    items: int = 0
    micro_items: list[int] = dataclasses.field(default_factory=list)  # items of each micro-batch, in order
    examples: int = 0
    micro_steps: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0


def _recording(base: type) -> type:
    """`base` (a Trainer class) with the per-window tallies the step rows need and the plan's data order."""

    class Recorded(base):
        _tally: _Tally
        _plan_loader: Any
        _record_kind: str

        def get_train_dataloader(self):
            """The plan's micro-batches (see `PlanBatchSampler`), prepared by the Trainer's accelerator."""
            return self.accelerator.prepare(self._plan_loader)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The class's own loss, plus this micro-batch's summed per-item loss from the same logits."""
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            from ..controls.loss import per_item_loss

            labels = inputs["labels"]  # ExactAccumulationTrainer pops it from `inputs`
            mask = inputs["attention_mask"]
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if self._record_kind == "mlm" and logits.dim() == 2:
                labels = labels[labels != -100]  # ExactAccumulationTrainer's logits: predicted positions only
            with torch.no_grad():
                dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
                total, items = per_item_loss(logits.detach(), labels, self._record_kind, dtype)
            t = self._tally
            t.item_loss_sum += float(total)
            t.items += int(items)
            t.micro_items.append(int(items))
            t.examples += len(labels)
            t.real_tokens += int(mask.sum())
            t.padded_tokens += mask.numel()
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The class's training step; its returned (backpropagated) loss is added to the window's."""
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._tally.backprop_loss += float(loss)
            self._tally.micro_steps += 1
            return loss

    Recorded.__name__ = Recorded.__qualname__ = f"Recorded{base.__name__}"
    return Recorded


def trainer_facts(trainer, backend: str) -> dict[str, Any]:
    """What the installed Trainer says it does with the loss under gradient accumulation.

    ``divides_loss_by_accumulation_steps`` follows `Trainer.training_step`: it divides the loss by N unless
    ``loss_is_scaled_for_ga`` says the loss is already scaled, or (when that is None) the model accepts
    loss kwargs (then it assumes the model divided by ``num_items_in_batch``). BERT heads accept ``**kwargs``
    but ignore ``num_items_in_batch``, so there the accumulated gradient comes out N times too large; the run
    measures it (``loss_factor``).
    """
    import transformers

    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = bool(trainer.model_accepts_loss_kwargs) or trainer.compute_loss_func is not None
    return {
        "backend": backend,
        "trainer_class": type(trainer).__mro__[1].__name__,
        "transformers": transformers.__version__,
        "model_accepts_loss_kwargs": bool(trainer.model_accepts_loss_kwargs),
        "loss_is_scaled_for_ga": trainer.loss_is_scaled_for_ga,
        "divides_loss_by_accumulation_steps": not scaled,
    }


def _check(cfg: TrainConfig) -> None:
    """Refuse what the Trainer backends do not reproduce, before anything is loaded."""
    problems = []
    if cfg.precision not in ("fp32", "fp64"):
        problems.append(f"--precision {cfg.precision} (fp32 or fp64)")
    if cfg.checkpointing_steps or cfg.resume_from_checkpoint:
        problems.append("checkpoints (--checkpointing_steps / --resume_from_checkpoint)")
    if cfg.bug_modes:
        problems.append("--bug_modes")
    if cfg.with_tracking:
        problems.append("--with_tracking")
    if cfg.backend == "trainer":
        if cfg.dropout == "invariant":
            problems.append("--dropout invariant (needs --backend exact_trainer)")
        if cfg.padding == "window":
            problems.append("--padding window (needs --backend exact_trainer)")
        if cfg.loss_normalization != "mean_of_means":
            problems.append(f"--loss_normalization {cfg.loss_normalization} (the stock Trainer has its own)")
    if problems:
        raise BertAccumError(f"--backend {cfg.backend} does not support " + "; ".join(problems))


def run_trainer(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg` with the Trainer named by ``cfg.backend``; returns what final_metrics.json holds."""
    import os
    import tempfile

    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    from ..core.records import RunRecorder, create_output_dir, prepare_output_dir
    from ..core.setup import final_metrics, setup
    from ..core.train import _eval_loaders
    from .trainer import ExactAccumulationTrainer

    cfg.validate()
    if cfg.backend not in TRAINER_BACKENDS:
        raise BertAccumError(f"run_trainer trains --backend {' or '.join(TRAINER_BACKENDS)}, got {cfg.backend!r}")
    if cfg.output_dir is None:
        raise BertAccumError("--output_dir is required")
    _check(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BertAccumError(f"--backend {cfg.backend} runs as one process (launched as {os.environ['WORLD_SIZE']})")
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, False)
    exact = cfg.backend == "exact_trainer"
    # The exact trainer installs the dropout mode and pads windows itself; setup must not do it twice.
    setup_cfg = dataclasses.replace(
        cfg, dropout="standard" if exact else cfg.dropout, padding="dynamic" if cfg.padding == "window" else cfg.padding)
    s = setup(setup_cfg, 1, None)
    dropout_stream = torch.get_rng_state()  # what the project's loop draws its first masks from
    print(s.arithmetic().replace("[bert_accum]", f"[bert_accum:{cfg.backend}]"), flush=True)

    sampler = PlanBatchSampler(s.plan)
    keep_ids = exact

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = s.collator(indices, indices, sampler.epoch)
        if not keep_ids:
            batch.pop("example_ids")
        return batch

    # Its own generator, so the DataLoader's per-epoch seed draw leaves torch's global (dropout) stream alone.
    loader = DataLoader(_Indices(len(s.train)), batch_sampler=sampler, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.resolved_data_seed))
    # The Trainer creates its output_dir; it saves nothing there (save_strategy="no"), so it stays out of the run folder.
    scratch = tempfile.TemporaryDirectory(prefix="bert_accum_trainer_")
    args = TrainingArguments(
        output_dir=scratch.name, per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.accumulation_steps, max_steps=s.steps.total, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, adam_epsilon=cfg.adam_epsilon, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=s.steps.warmup, max_grad_norm=0.0, optim=cfg.optim, seed=cfg.seed,
        data_seed=cfg.resolved_data_seed, logging_strategy="no", eval_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=cfg.disable_progress_bar, remove_unused_columns=False, use_cpu=cfg.cpu,
        dataloader_num_workers=0,
    )
    extra = {}
    if exact:
        extra = dict(dropout=cfg.dropout, padding="window" if cfg.padding == "window" else "dynamic",
                     loss_normalization=cfg.loss_normalization, dropout_seed=cfg.resolved_dropout_seed,
                     example_id_column="example_ids")
    cls = _recording(ExactAccumulationTrainer if exact else Trainer)
    callback = _StepRows()
    trainer = cls(model=s.model, args=args, optimizers=(s.optimizer, s.scheduler), callbacks=[callback], **extra)
    trainer._tally, trainer._plan_loader, trainer._record_kind = _Tally(), loader, s.kind
    facts = trainer_facts(trainer, cfg.backend)

    create_output_dir(out, cfg.overwrite_output_dir, False)
    recorder = RunRecorder(out, trainer.accelerator, cfg, s.derived(), environment_extra={"trainer": facts})
    callback.bind(trainer=trainer, setup=s, cfg=cfg, recorder=recorder, dropout_stream=dropout_stream,
                  loaders=_eval_loaders(s.tokenized, s.task, s.tokenizer, cfg, trainer.accelerator))
    if 0 in cfg.fingerprint_steps:
        recorder.fingerprint(0, s.model)
    try:
        trainer.train()
    finally:
        recorder.close()
        scratch.cleanup()
    if callback.optimizer_step != s.steps.total:
        raise BertAccumError(f"the Trainer took {callback.optimizer_step} optimizer steps, the plan has {s.steps.total}")
    final = {
        **final_metrics(s, optimizer_steps=callback.optimizer_step, clipped_steps=callback.clipped_steps,
                        examples_seen=callback.examples_seen, real_tokens=callback.real_tokens,
                        train_seconds=callback.train_seconds, device=str(trainer.accelerator.device),
                        last_eval=callback.last_eval),
        "backend": cfg.backend,
        "trainer": {**facts, "loss_factor_first_window": callback.first_factor},
    }
    if cfg.save_final_model:
        trainer.model.save_pretrained(out / "model")
        s.tokenizer.save_pretrained(out / "model")
    recorder.finish(final)
    print(f"[bert_accum:{cfg.backend}] done: {callback.optimizer_step} optimizer steps, loss factor of the first "
          f"window {callback.first_factor:.6g}, eval "
          + ", ".join(f"{k}={v:.4f}" for k, v in callback.last_eval.items() if isinstance(v, float)) + f" -> {out}",
          flush=True)
    return final


class _StepRows(TrainerCallback):
    """Measures, clips and records every optimizer step of a Trainer, and evaluates at the plan's cadence."""

    def bind(self, *, trainer, setup, cfg, recorder, dropout_stream, loaders) -> None:
        """Give the callback what it writes with (after the Trainer exists)."""
        self.trainer, self.s, self.cfg, self.recorder = trainer, setup, cfg, recorder
        self.dropout_stream, self.loaders = dropout_stream, loaders
        self.optimizer_step = self.micro_step = self.examples_seen = self.real_tokens = self.clipped_steps = 0
        self.train_seconds = 0.0
        self.first_factor = math.nan
        self.last_eval: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._pre: dict[str, Any] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.dropout_stream is not None:
            # Trainer.__init__ reseeded torch; the first forward must draw from the stream the project's loop uses.
            torch.set_rng_state(self.dropout_stream)
            self.dropout_stream = None
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        from ..core.train import _grad_norms

        grad_norm, per_group = _grad_norms(model, self.s.groups)
        limit = self.cfg.max_grad_norm
        if limit and limit > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        self._pre = {"grad_norm": grad_norm, "grad_norm_groups": per_group,
                     "clipped": bool(limit and limit > 0 and grad_norm > limit),
                     "learning_rate": lr_scheduler.get_last_lr()[0]}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from ..core.train import _evaluate

        t = self.trainer._tally
        self.trainer._tally = _Tally()
        s, cfg = self.s, self.cfg
        seconds = time.perf_counter() - self._t0
        self.train_seconds += seconds
        self.optimizer_step += 1
        self.micro_step += t.micro_steps
        self.clipped_steps += bool(self._pre.get("clipped"))
        self.examples_seen += t.examples
        self.real_tokens += t.real_tokens
        step = self.optimizer_step
        epoch, k = divmod(step - 1, s.steps.steps_per_epoch)
        mean_loss = t.item_loss_sum / max(t.items, 1)
        factor = t.backprop_loss / mean_loss if mean_loss != 0 else math.nan
        if step == 1:
            self.first_factor = factor
        if not math.isfinite(t.backprop_loss):
            message = f"non-finite loss ({t.backprop_loss}) at optimizer step {step} (epoch {epoch}); run stopped"
            self.recorder.finish({"status": "non_finite_loss", "error": message, "optimizer_step": step})
            raise NonFiniteLossError(message)
        self.recorder.step({
            "loss": t.backprop_loss, "window_mean_loss": mean_loss, "loss_factor": factor, "items": t.items,
            "micro_items": t.micro_items,
            "examples": t.examples, "micro_steps": t.micro_steps, **self._pre, "real_tokens": t.real_tokens,
            "padded_tokens": t.padded_tokens, "optimizer_step": step, "micro_step": self.micro_step, "epoch": epoch,
            "window_in_epoch": k, "examples_seen": self.examples_seen, "seconds": round(seconds, 6),
            "micro_batch_size": s.micro_batch_size, "accumulation_steps": s.accumulation_steps, "num_processes": 1,
        })
        end_of_epoch = k + 1 == s.steps.steps_per_epoch
        if (s.steps.eval_every and step % s.steps.eval_every == 0) or end_of_epoch or step == s.steps.total:
            predictions: dict[str, list] = {}
            self.last_eval = _evaluate(model, self.loaders, s.task, s.kind, self.trainer.accelerator, cfg, s.dropout,
                                       predictions)
            self.last_eval.update(optimizer_step=step, epoch=epoch)
            self.recorder.evaluation(self.last_eval, predictions)
        if step in cfg.fingerprint_steps:
            self.recorder.fingerprint(step, model)
