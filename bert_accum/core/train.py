"""One fine-tuning run with exact accumulation semantics and a record of every optimizer step.

What "exact" means here (and where the usual hand-written loops differ):

* windows come from `WindowPlan`: one permutation per epoch, window k = examples [k*E, (k+1)*E);
* the loss of a window is the mean over its examples (or, with `global` normalisation, over its
  items: tokens for MLM), also for a short last window, weighted by its real count rather than 1/N;
* optimizer step, scheduler step and zero_grad happen once per window, and the LR schedule is sized
  in optimizer steps, so every (B, N) with equal B*N sees the same LR sequence;
* clipping acts on the accumulated gradient only, and with several processes the micro-steps before
  the last of a window run under `accelerator.no_sync`, so gradients are all-reduced once per window.

DDP averages gradients over the W processes; each process therefore multiplies its contribution by W,
so the all-reduced gradient is the window mean itself: sum_r (W * g_r) / W = sum_r g_r.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..controls.bugs import BugModes
from ..controls.loss import count_items, micro_loss_scale, per_item_loss
from .checkpoint import (TrainingProgress, check_resume_config, load_checkpoint, prune_checkpoints, resolve_checkpoint,
                         save_checkpoint)
from .config import TrainConfig
from ..errors import BertAccumError, NonFiniteLossError
from .modeling import masked_lm_logits
from .records import RunRecorder, create_output_dir, prepare_output_dir
from .setup import RunSetup, final_metrics, setup
from .windows import window_examples


def _grad_norms(model: torch.nn.Module, groups: dict[str, str]) -> tuple[float, dict[str, float]]:
    """L2 norm of the (synchronised, unscaled) gradient, total and per parameter group."""
    sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = groups[name]
        # Norms of rows (a few hundred elements each) in the gradient's own dtype, their squares summed in
        # float64: as accurate as a float64 copy of the whole gradient (1e-10 relative on MiniLM) at a
        # quarter of the time, where one fp32 norm over the 11.7M-element word-embedding gradient would
        # lose about 1e-4 to accumulated rounding.
        grad = p.grad.detach()
        rows = grad.reshape(grad.shape[0], -1) if grad.dim() >= 2 else grad.reshape(1, -1)
        val = torch.linalg.vector_norm(rows, dim=1).double().square().sum()
        sq[g] = sq[g] + val if g in sq else val
    per = {g: math.sqrt(float(v)) for g, v in sq.items()}
    return math.sqrt(sum(v * v for v in per.values())), per


def make_accelerator(cfg: TrainConfig, project_dir: Path | None = None):
    """The Accelerator a run uses when none is given: its precision and trackers from the config."""
    from accelerate import Accelerator

    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.precision, "no")
    kwargs: dict[str, Any] = {"mixed_precision": mixed, "cpu": cfg.cpu}
    if cfg.with_tracking:
        kwargs.update(log_with=cfg.report_to, project_dir=str(project_dir))
    return Accelerator(**kwargs)


def run(cfg: TrainConfig, accelerator=None, before_optimizer_step=None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics written to final_metrics.json.

    setup (model, data, plan, optimizer: `setup.setup`) -> run folder (`RunRecorder`) -> the loop (`fit`).
    `before_optimizer_step(model, optimizer_step)`, if given, is called once per window with the
    accumulated (clipped) gradient in place, before the optimizer uses it: tests and probes read it there.
    """
    cfg.validate()
    if cfg.output_dir is None:
        raise BertAccumError("--output_dir is required")
    if cfg.precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise BertAccumError("--precision fp16 needs a CUDA GPU; use bf16 on the CPU")
    resuming = cfg.resume_from_checkpoint is not None
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming)
    if accelerator is None:
        accelerator = make_accelerator(cfg, out)
    W = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if W == 1 and launched > 1:
        # torchrun / accelerate launch started several processes, but accelerate found no distributed backend
        # (on a CPU-only machine it needs cpu=True): each process would train alone, on the same output_dir.
        raise BertAccumError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate sees 1; on a CPU-only machine pass "
            "--cpu or set ACCELERATE_USE_CPU=1 so the processes join one gloo group"
        )
    cfg.accumulation_steps_for(W)  # a non-dividing effective batch fails here, before any loading

    # Every check that can fail happens before the run folder is written.
    s = setup(cfg, W, accelerator)
    accelerator.print(s.arithmetic())
    model, optimizer = accelerator.prepare(s.model, s.optimizer)
    progress = TrainingProgress()
    eval_loaders = _eval_loaders(s.tokenized, s.task, s.tokenizer, cfg, accelerator)

    resume_path = None
    if resuming:
        resume_path = resolve_checkpoint(out, cfg.resume_from_checkpoint, quiet=not accelerator.is_main_process)
        check_resume_config(out, resume_path, cfg, W)

    if accelerator.is_main_process:
        create_output_dir(out, cfg.overwrite_output_dir, resuming)
    accelerator.wait_for_everyone()
    if resume_path is not None:
        load_checkpoint(resume_path, accelerator, model, optimizer, s.scheduler, progress)
        accelerator.print(f"[bert_accum] resumed from {resume_path} at optimizer step {progress.optimizer_step}")
    recorder = RunRecorder(out, accelerator, cfg, s.derived(), resume_at=progress.optimizer_step if resuming else None)
    if recorder.fingerprinter is not None and 0 in cfg.fingerprint_steps and progress.optimizer_step == 0:
        recorder.fingerprint(0, accelerator.unwrap_model(model))
    try:
        last_eval = fit(s, model, optimizer, accelerator, progress, eval_loaders, recorder, before_optimizer_step)
    finally:
        recorder.close()
    final = final_metrics(s, optimizer_steps=progress.optimizer_step, clipped_steps=progress.clipped_steps,
                          examples_seen=progress.examples_seen, real_tokens=progress.real_tokens_seen,
                          train_seconds=progress.train_seconds, device=str(accelerator.device), last_eval=last_eval)
    if cfg.save_final_model:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(out / "model")
            s.tokenizer.save_pretrained(out / "model")
    recorder.finish(final)
    accelerator.wait_for_everyone()
    accelerator.print(f"[bert_accum] done: {progress.optimizer_step} optimizer steps, "
                      f"{final['examples_per_second']:.1f} examples/s, eval {_short(last_eval)} -> {out}")
    return final


def fit(s: RunSetup, model, optimizer, accelerator, progress: TrainingProgress, eval_loaders: dict[str, Any] | None,
        recorder: RunRecorder | None = None, before_optimizer_step=None) -> dict[str, Any]:
    """The loop: from `progress` to the last optimizer step, one exact window at a time.

    `model` and `optimizer` are the accelerate-prepared ones of setup `s`. With a `recorder`, every step is
    written to the run folder, evaluated at the configured cadence, fingerprinted and checkpointed; without
    one (the benchmark's light loop) nothing is recorded or evaluated. Returns the last evaluation.
    """
    cfg, steps = s.cfg, s.steps
    from tqdm.auto import tqdm

    bar = tqdm(total=steps.total, initial=progress.optimizer_step, desc="train", unit="step",
               disable=not accelerator.is_main_process or cfg.disable_progress_bar or recorder is None)
    ckpt_every = int(cfg.checkpointing_steps) if cfg.checkpointing_steps and cfg.checkpointing_steps.isdigit() else None
    last_eval: dict[str, Any] = {}
    compute_dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    model.train()
    try:
        while progress.optimizer_step < steps.total:
            epoch, k = divmod(progress.optimizer_step, steps.steps_per_epoch)
            windows = s.plan.windows(epoch)
            for window in windows[k:]:
                if progress.optimizer_step >= steps.total:
                    break
                t0 = time.perf_counter()
                row = _train_window(
                    window, epoch, model, optimizer, s.scheduler, accelerator, s.collator, s.dropout, cfg, s.kind,
                    compute_dtype, s.accumulation_steps, s.num_processes, s.groups, progress, before_optimizer_step,
                )
                progress.optimizer_step += 1
                progress.micro_step += row["micro_steps"]
                progress.clipped_steps += row["clipped"]
                progress.examples_seen += row["examples"]
                progress.real_tokens_seen += row["real_tokens"]
                seconds = time.perf_counter() - t0
                progress.train_seconds += seconds
                row.update(optimizer_step=progress.optimizer_step, micro_step=progress.micro_step, epoch=epoch,
                           window_in_epoch=k, examples_seen=progress.examples_seen, seconds=round(seconds, 6),
                           micro_batch_size=s.micro_batch_size, accumulation_steps=s.accumulation_steps,
                           num_processes=s.num_processes)
                k += 1
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}")
                if recorder is None:
                    continue
                recorder.step(row)
                end_of_epoch = k == len(windows)
                step = progress.optimizer_step
                if (steps.eval_every and step % steps.eval_every == 0) or end_of_epoch or step == steps.total:
                    predictions: dict[str, list] = {}
                    last_eval = _evaluate(model, eval_loaders, s.task, s.kind, accelerator, cfg, s.dropout, predictions)
                    last_eval.update(optimizer_step=step, epoch=epoch)
                    recorder.evaluation(last_eval, predictions)
                if step in cfg.fingerprint_steps:
                    recorder.fingerprint(step, accelerator.unwrap_model(model))
                if (ckpt_every and step % ckpt_every == 0) or (cfg.checkpointing_steps == "epoch" and end_of_epoch):
                    save_checkpoint(accelerator, recorder.out / "checkpoints", step, model, optimizer, s.scheduler, progress)
                    if accelerator.is_main_process and cfg.checkpoints_total_limit:
                        prune_checkpoints(recorder.out, cfg.checkpoints_total_limit)
    except NonFiniteLossError as exc:
        if recorder is not None:
            recorder.finish({"status": "non_finite_loss", "error": str(exc), "optimizer_step": progress.optimizer_step + 1})
        raise
    finally:
        bar.close()
    if not last_eval and recorder is not None:
        # Resumed from the checkpoint of the last step (killed after it, before final_metrics.json): the
        # final evaluation is recomputed; its eval.jsonl row survived the truncation, so it is not written twice.
        predictions = {}
        last_eval = _evaluate(model, eval_loaders, s.task, s.kind, accelerator, cfg, s.dropout, predictions)
        last_eval.update(optimizer_step=progress.optimizer_step, epoch=(progress.optimizer_step - 1) // steps.steps_per_epoch)
        recorder.predictions(progress.optimizer_step, predictions)
    return last_eval


def _short(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float))


def accumulate_window(model, micro_batches, *, epoch: int, dropout, kind: str, loss_normalization: str,
                      window_items: int, window_examples: int, accumulation_steps: int, num_processes: int = 1,
                      one_over_n: bool = False, compute_dtype: torch.dtype = torch.float32, device=None,
                      backward=None, no_sync=None, after_backward=None, autocast=None) -> dict[str, Any]:
    """Forward/backward every micro-batch of one window, leaving the window's gradient summed in `.grad`.

    `micro_batches` are this process's collated micro-batches (Collator output, with `labels` and
    `example_ids`). Each micro-batch's summed per-item loss is scaled by `micro_loss_scale`, so the
    accumulated gradient is the gradient of the window loss. `dropout.set_batch(example_ids, epoch)`
    precedes every forward. Hooks for the training loop (all optional):
    `backward(loss)` (default `loss.backward()`; accelerate's), `no_sync()` (a context for every
    micro-step but the last), `after_backward()` (after each micro-step's backward) and `autocast()`
    (a context around the model forward only; the loss is computed in `compute_dtype` outside it).
    Returns the window loss (float64 tensor, already divided by W), real and padded token counts, and
    the index of the first micro-step with a non-finite loss (or None).
    """
    if device is None:
        device = next(model.parameters()).device
    n_micro = len(micro_batches)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    real_tokens = padded_tokens = 0
    first_bad_micro = None
    for j, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        example_ids = batch.pop("example_ids")
        dropout.set_batch(example_ids, epoch)
        sync = j == n_micro - 1
        ctx = contextlib.nullcontext() if sync or no_sync is None else no_sync()
        with ctx:
            with autocast() if autocast is not None else contextlib.nullcontext():
                if kind == "mlm":
                    logits, scored = masked_lm_logits(model, batch, labels)
                else:
                    logits, scored = model(**batch).logits, labels
            loss_sum, micro_items = per_item_loss(logits, scored, kind, compute_dtype)
            scale = micro_loss_scale(
                normalization=loss_normalization, micro_items=max(micro_items, 1), micro_examples=len(labels),
                window_items=window_items, window_examples=window_examples, accumulation_steps=accumulation_steps,
                num_processes=num_processes, one_over_n=one_over_n,
            )
            loss = loss_sum * scale
            if not torch.isfinite(loss) and first_bad_micro is None:
                first_bad_micro = j
            if backward is None:
                loss.backward()
            else:
                backward(loss)
            if after_backward is not None:
                after_backward()
        loss_total += loss.detach().double() / num_processes
        real_tokens += int(batch["attention_mask"].sum())
        padded_tokens += batch["attention_mask"].numel()
    return {"loss": loss_total, "real_tokens": real_tokens, "padded_tokens": padded_tokens,
            "first_bad_micro": first_bad_micro}


def _train_window(window, epoch, model, optimizer, scheduler, accelerator, collate, dropout, cfg, kind,
                  compute_dtype, N, W, groups, progress, before_optimizer_step=None) -> dict[str, Any]:
    """Forward/backward every micro-step of one window (`accumulate_window`), then one clipped optimizer step."""
    rank = accelerator.process_index
    everyone = window_examples(window)
    micro_batches = [collate(micro[rank], everyone, epoch) for micro in window]
    # Items per micro-batch (examples, or masked tokens for MLM): how unequal the micro-batches a mean of
    # means weights equally are.
    micro_items = [count_items([m], kind) for m in micro_batches]
    local_items = sum(micro_items)
    window_items = local_items
    if W > 1:
        window_items = int(accelerator.reduce(torch.tensor(local_items, device=accelerator.device), "sum"))
    if window_items == 0:
        raise BertAccumError(f"accumulation window at optimizer step {progress.optimizer_step + 1} has no items to predict")
    n_micro = len(window)
    bugs = BugModes.parse(cfg.bug_modes)
    one_over_n = bugs.one_over_n
    after_backward = None
    micro_clips: list[bool] = []
    if bugs.clip_per_micro_batch and cfg.max_grad_norm and cfg.max_grad_norm > 0:
        def after_backward():
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            micro_clips.append(float(norm) > cfg.max_grad_norm)
    acc = accumulate_window(
        model, micro_batches, epoch=epoch, dropout=dropout, kind=kind, loss_normalization=cfg.loss_normalization,
        window_items=window_items, window_examples=len(everyone), accumulation_steps=N, num_processes=W,
        one_over_n=one_over_n, compute_dtype=compute_dtype, device=accelerator.device,
        backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model), after_backward=after_backward,
    )
    loss_total, real_tokens, padded_tokens = acc["loss"], acc["real_tokens"], acc["padded_tokens"]
    first_bad_micro = acc["first_bad_micro"]
    stats = torch.tensor([float(loss_total), real_tokens, padded_tokens, sum(len(m[rank]) for m in window)],
                         dtype=torch.float64, device=accelerator.device)
    if W > 1:
        stats = accelerator.reduce(stats, "sum")
    window_loss = float(stats[0])
    if not math.isfinite(window_loss):
        where = f"micro-step {first_bad_micro + 1} of {n_micro}" if first_bad_micro is not None else "another process"
        raise NonFiniteLossError(
            f"non-finite loss ({window_loss}) at optimizer step {progress.optimizer_step + 1} (epoch {epoch}, {where}); run stopped"
        )
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()
    # `groups` is keyed by the bare model's parameter names; under DDP `model` is the wrapper ("module." prefix).
    grad_norm, per_group = _grad_norms(accelerator.unwrap_model(model), groups)
    clipped = any(micro_clips)  # clip_per_micro_batch: clipping acted on some micro-batch of the window
    if cfg.max_grad_norm and cfg.max_grad_norm > 0 and not bugs.clip_per_micro_batch:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        clipped = grad_norm > cfg.max_grad_norm
    if bugs.scheduler_stepped_per_micro_batch:
        # The micro-steps of this window stepped the schedule too: all but the last before the update.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(n_micro - 1):
                scheduler.step()
    lr = scheduler.get_last_lr()[0]
    if before_optimizer_step is not None:
        before_optimizer_step(accelerator.unwrap_model(model), progress.optimizer_step + 1)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": window_loss,
        "items": window_items,
        "micro_items": micro_items,
        "examples": int(stats[3]),
        "micro_steps": n_micro,
        "grad_norm": grad_norm,
        "grad_norm_groups": per_group,
        "clipped": bool(clipped),
        "learning_rate": lr,
        "real_tokens": int(stats[1]),
        "padded_tokens": int(stats[2]),
    }


_EVAL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "label", "idx")


def _eval_loaders(tokenized, task, tokenizer, cfg, accelerator) -> dict[str, Any]:
    """Prepared evaluation loaders; accelerate shards them and `gather_for_metrics` drops duplicates.

    Evaluation batches hold examples of similar length (the split sorted by token count, ties in dev order), so a
    batch pads little: on SST-2's dev set 23.5k instead of 44.4k token positions at 64 per batch. Each split comes
    with `order`, the dev index of every sorted position, and `_evaluate` puts the predictions back in dev order.
    """
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from .features import InMemorySplit

    loaders = {}
    cols = [c for c in _EVAL_COLUMNS if c in tokenized["train"].column_names]
    for split in task.eval_splits:
        ds = tokenized[split].select_columns(cols)
        lengths = [len(x) for x in ds["input_ids"]]
        order = sorted(range(len(ds)), key=lengths.__getitem__)  # stable: ties keep dev order
        if cfg.objective == "mlm":
            loaders[split] = ("mlm", _mlm_eval_collator(cfg, tokenizer, InMemorySplit.from_dataset(ds)), order)
            continue
        ds = ds.select(order)
        collator = DataCollatorWithPadding(tokenizer)

        def collate(features, _c=collator):
            return _c([{k: v for k, v in f.items() if k != "idx"} for f in features])

        loaders[split] = ("cls", accelerator.prepare(DataLoader(ds, batch_size=cfg.per_device_eval_batch_size,
                                                                collate_fn=collate)), order)
    return loaders


def _mlm_eval_collator(cfg, tokenizer, split):
    """The masked-LM evaluation's collator: masks from `cfg.seed` and the example's dev index, epoch 0, so every run
    of a seed scores the same masked tokens whatever its (B, N)."""
    from .features import Collator

    return Collator(split, tokenizer, "dynamic", cfg.max_length, mlm=True, mlm_probability=cfg.mlm_probability,
                    seed=cfg.seed)


def mlm_eval_targets(cfg, tokenizer, tokenized_split) -> list[int]:
    """The token ids the masked-LM evaluation predicts on one tokenised split, in dev order: the labels of the
    masks the run's evaluation scores (the trivial baseline's input: always predicting the most frequent of them)."""
    from .features import InMemorySplit

    cols = [c for c in _EVAL_COLUMNS if c in tokenized_split.column_names]
    collate = _mlm_eval_collator(cfg, tokenizer, InMemorySplit.from_dataset(tokenized_split.select_columns(cols)))
    everything = list(range(len(collate.split)))
    labels = collate(everything, everything, epoch=0)["labels"]
    return labels[labels != -100].tolist()


@torch.no_grad()
def _evaluate(model, loaders, task, kind, accelerator, cfg, dropout,
              predictions_out: dict[str, list] | None = None) -> dict[str, Any]:
    """Metrics on every evaluation split; the torch RNG is forked so evaluation never shifts dropout masks.

    `predictions_out`, if given, receives each classification/regression split's predictions in dev-set order
    (the study compares them between paired runs: how many dev examples two runs label differently).
    """
    from tqdm.auto import tqdm

    from .metrics import compute_metrics

    results: dict[str, Any] = {}
    model.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for split, (mode, loader, order) in loaders.items():
            prefix = "" if len(loaders) == 1 else f"{split}/"
            if mode == "mlm":
                results.update({f"{prefix}{k}": v for k, v in _evaluate_mlm(model, loader, order, accelerator, cfg).items()})
                continue
            preds, refs = [], []
            for batch in tqdm(loader, desc=f"eval {split}", leave=False,
                              disable=not accelerator.is_main_process or cfg.disable_progress_bar):
                labels = batch.pop("labels")
                logits = model(**batch).logits
                out = logits.squeeze(-1) if kind == "regression" else logits.argmax(-1)
                out, labels = accelerator.gather_for_metrics((out, labels))
                preds.append(out.float().cpu() if kind == "regression" else out.cpu())
                refs.append(labels.cpu())
            # back from length order to dev order
            predictions, references = [None] * len(order), [None] * len(order)
            for position, (p, r) in enumerate(zip(torch.cat(preds).tolist(), torch.cat(refs).tolist())):
                predictions[order[position]], references[order[position]] = p, r
            metrics = compute_metrics(task, predictions, references)
            results.update({f"{prefix}{k}": float(v) for k, v in metrics.items()})
            results[f"{prefix}num_examples"] = len(predictions)
            if predictions_out is not None:
                predictions_out[split] = predictions
    model.train()
    return results


def _evaluate_mlm(model, collate, order, accelerator, cfg) -> dict[str, float]:
    """Masked-LM loss per predicted token and accuracy, with the masks of epoch 0 (fixed per example).

    Chunks follow `order` (examples of similar length together); process r evaluates chunks r, r+W, r+2W, ... so
    every example is counted once; sums are all-reduced.
    """
    n = len(collate.split)
    size = cfg.per_device_eval_batch_size
    chunks = [order[i:i + size] for i in range(0, n, size)]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, tokens
    for chunk in chunks[accelerator.process_index :: accelerator.num_processes]:
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, chunk, epoch=0).items()}
        labels = batch.pop("labels")
        batch.pop("example_ids")
        logits, labels = masked_lm_logits(model, batch, labels)
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == labels).sum()
        totals[2] += labels.numel()
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    loss = float(totals[0] / totals[2])
    return {"mlm_loss": loss, "masked_accuracy": float(totals[1] / totals[2]), "perplexity": math.exp(min(loss, 50.0)),
            "num_examples": n}
