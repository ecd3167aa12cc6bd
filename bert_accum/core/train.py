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
from typing import Any

import torch
import torch.nn.functional as F

from ..controls.bugs import BugModes
from ..controls.loss import micro_loss_scale, per_item_loss
from .checkpoint import (TrainingProgress, check_resume_config, load_checkpoint, prune_checkpoints, resolve_checkpoint,
                         save_checkpoint)
from .config import TrainConfig, total_steps
from ..errors import BertAccumError, NonFiniteLossError
from .records import JsonlWriter, create_output_dir, environment, prepare_output_dir, write_json
from .tasks import get_task
from .windows import WindowPlan, window_examples


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


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights, as in the HF examples."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grouped = [
        {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(grouped, lr=cfg.learning_rate, eps=cfg.adam_epsilon)


def run(cfg: TrainConfig, accelerator=None, before_optimizer_step=None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics written to final_metrics.json.

    `before_optimizer_step(model, optimizer_step)`, if given, is called once per window with the
    accumulated (clipped) gradient in place, before the optimizer uses it: tests and probes read it there.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from .data import load_raw_splits
    from ..controls.dropout import DropoutController
    from .features import Collator, InMemorySplit, tokenize_splits
    from .fingerprint import Fingerprinter
    from .modeling import load_tokenizer_and_model, parameter_group, resolve_model_path

    cfg.validate()
    task = get_task(cfg.task_name)
    bugs = BugModes.parse(cfg.bug_modes)
    if cfg.output_dir is None:
        raise BertAccumError("--output_dir is required")
    if cfg.precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise BertAccumError("--precision fp16 needs a CUDA GPU; use bf16 on the CPU")
    resuming = cfg.resume_from_checkpoint is not None
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming)

    if accelerator is None:
        mixed = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.precision, "no")
        kwargs: dict[str, Any] = {"mixed_precision": mixed, "cpu": cfg.cpu}
        if cfg.with_tracking:
            kwargs.update(log_with=cfg.report_to, project_dir=str(out))
        accelerator = Accelerator(**kwargs)
    W = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if W == 1 and launched > 1:
        # torchrun / accelerate launch started several processes, but accelerate found no distributed backend
        # (on a CPU-only machine it needs cpu=True): each process would train alone, on the same output_dir.
        raise BertAccumError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate sees 1; on a CPU-only machine pass "
            "--cpu or set ACCELERATE_USE_CPU=1 so the processes join one gloo group"
        )
    N = cfg.accumulation_steps_for(W)
    B = cfg.per_device_train_batch_size
    main = accelerator.is_main_process
    say = accelerator.print

    # --- model, data: every check that can fail happens before the run folder is written ------------
    set_seed(cfg.seed)  # the fresh classification head is the same for every (B, N) of a seed
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer, model = load_tokenizer_and_model(model_path, task, cfg.objective, cfg.cache_dir)
    if cfg.dropout_seed is not None:
        # Standard dropout draws from torch's stream, which set_seed(seed) started before the head was
        # initialised; an explicit dropout seed restarts it here, so the masks no longer depend on --seed
        # (an initialisation-only floor keeps them) and the head stays the seed's.
        set_seed(cfg.dropout_seed)
    max_pos = model.config.max_position_embeddings
    if cfg.max_length > max_pos:
        raise BertAccumError(f"--max_length {cfg.max_length} exceeds the model's {max_pos} positions")
    with accelerator.main_process_first():
        raw = load_raw_splits(
            task, glue_dir=cfg.glue_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
            text_column_names=cfg.text_column_names, label_column_name=cfg.label_column_name, cache_dir=cfg.cache_dir,
        )
        if cfg.max_train_samples is not None:
            raw["train"] = raw["train"].select(range(min(cfg.max_train_samples, len(raw["train"]))))
        if cfg.max_eval_samples is not None:
            for split in task.eval_splits:
                raw[split] = raw[split].select(range(min(cfg.max_eval_samples, len(raw[split]))))
        tokenized = tokenize_splits(raw, tokenizer, cfg.max_length, task.is_pair)
    train = InMemorySplit.from_dataset(tokenized["train"])
    kind = "mlm" if cfg.objective == "mlm" else ("regression" if task.is_regression else "classification")

    plan = WindowPlan(
        num_examples=len(train), micro_batch_size=B, accumulation_steps=N, num_processes=W, seed=cfg.resolved_data_seed,
        drop_last_window=cfg.drop_last_window, step_mod_boundaries=bugs.step_mod_boundaries,
    )
    steps_per_epoch = plan.num_windows_per_epoch()
    max_steps, epochs = total_steps(steps_per_epoch, cfg.num_train_epochs, cfg.max_train_steps,
                                    cfg.max_train_examples, plan.effective_batch_size)
    eval_every = cfg.eval_every(max_steps)
    if cfg.num_warmup_steps:
        warmup = cfg.num_warmup_steps
    else:
        warmup = math.ceil(cfg.warmup_ratio * max_steps)
    sched_scale = bugs.schedule_scale(N)
    E = plan.effective_batch_size
    last = len(train) % E
    say(
        f"[bert_accum] task {task.name} ({kind}) | train examples {len(train)} | "
        f"B={B} x N={N} x W={W} -> effective batch {E}\n"
        f"[bert_accum] optimizer steps per epoch = ceil({len(train)}/{E}) = {steps_per_epoch}"
        + (f" (last window {last} examples{', dropped' if cfg.drop_last_window else ''})" if last else "")
        + f" | epochs {epochs} | total optimizer steps {max_steps} | micro-steps per step {N}"
        f" | warmup {warmup} steps | schedule sized in {'MICRO-steps (bug mode)' if sched_scale > 1 else 'optimizer steps'}"
    )

    # --- dropout controls go on the bare model, before accelerate wraps it -------------------------
    if cfg.precision == "fp64":
        model = model.double()
    dropout = DropoutController(model, cfg.dropout, cfg.resolved_dropout_seed)
    groups = {n: parameter_group(n) for n, _ in model.named_parameters()}
    optimizer = _optimizer(model, cfg)
    # The scheduler is NOT passed to accelerator.prepare: AcceleratedScheduler steps W times per call
    # unless batches are split, which would size the schedule in process-steps. We step it ourselves.
    scheduler = get_scheduler(
        cfg.lr_scheduler_type, optimizer=optimizer,
        num_warmup_steps=warmup * sched_scale, num_training_steps=max_steps * sched_scale,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = TrainingProgress()

    collate = Collator(train, tokenizer, cfg.padding, cfg.max_length, mlm=cfg.objective == "mlm",
                       mlm_probability=cfg.mlm_probability, seed=cfg.resolved_data_seed)
    eval_loaders = _eval_loaders(tokenized, task, tokenizer, cfg, accelerator)

    resume_path = None
    if resuming:
        resume_path = resolve_checkpoint(out, cfg.resume_from_checkpoint, quiet=not main)
        check_resume_config(out, resume_path, cfg, W)

    # --- the run folder ---------------------------------------------------------------------------
    if main:
        create_output_dir(out, cfg.overwrite_output_dir, resuming)
    accelerator.wait_for_everyone()
    if resume_path is not None:
        load_checkpoint(resume_path, accelerator, model, optimizer, scheduler, progress)
        say(f"[bert_accum] resumed from {resume_path} at optimizer step {progress.optimizer_step}")
    derived = {
        "micro_batch_size": B, "accumulation_steps": N, "num_processes": W, "effective_batch_size": E,
        "optimizer_steps_per_epoch": steps_per_epoch, "total_optimizer_steps": max_steps, "epochs": epochs,
        "num_warmup_steps": warmup, "train_examples": len(train), "model_path": model_path, "task": task.name,
        "synthetic_data": task.name == "synthetic",
        "seeds": {"seed": cfg.seed, "data_seed": cfg.resolved_data_seed, "dropout_seed": cfg.resolved_dropout_seed},
    }
    fingerprinter = Fingerprinter(cfg.fingerprint_dim) if cfg.fingerprint_steps else None
    keep = progress.optimizer_step if resuming else None
    steps_log = evals_log = None
    if main:
        write_json(out / "config.json", {**cfg.to_dict(), "derived": derived})
        write_json(out / "environment.json", environment(str(accelerator.device), W, cfg.precision))
        steps_log = JsonlWriter(out / "steps.jsonl", keep_up_to_step=keep if resuming else 0)
        evals_log = JsonlWriter(out / "eval.jsonl", keep_up_to_step=keep if resuming else 0)
        if cfg.with_tracking:
            accelerator.init_trackers("bert_accum", config=_flat_for_tracker({**cfg.to_dict(), **derived}))
    if fingerprinter is not None and main and 0 in cfg.fingerprint_steps and progress.optimizer_step == 0:
        fingerprinter.record(out, 0, accelerator.unwrap_model(model))

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=progress.optimizer_step, desc="train", unit="step",
               disable=not main or cfg.disable_progress_bar)
    ckpt_every = int(cfg.checkpointing_steps) if cfg.checkpointing_steps and cfg.checkpointing_steps.isdigit() else None
    last_eval: dict[str, Any] = {}
    status = "completed"
    compute_dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    model.train()
    try:
        while progress.optimizer_step < max_steps:
            epoch, k = divmod(progress.optimizer_step, steps_per_epoch)
            windows = plan.windows(epoch)
            for window in windows[k:]:
                if progress.optimizer_step >= max_steps:
                    break
                t0 = time.perf_counter()
                row = _train_window(
                    window, epoch, model, optimizer, scheduler, accelerator, collate, dropout, cfg, kind,
                    compute_dtype, N, W, groups, progress, before_optimizer_step,
                )
                progress.optimizer_step += 1
                progress.examples_seen += row["examples"]
                progress.real_tokens_seen += row["real_tokens"]
                seconds = time.perf_counter() - t0
                progress.train_seconds += seconds
                row.update(optimizer_step=progress.optimizer_step, epoch=epoch, window_in_epoch=k,
                           examples_seen=progress.examples_seen, seconds=round(seconds, 6), num_processes=W)
                k += 1
                if main:
                    steps_log.write(row)
                    if cfg.with_tracking:
                        accelerator.log({"train/loss": row["loss"], "train/grad_norm": row["grad_norm"],
                                         "train/learning_rate": row["learning_rate"]}, step=progress.optimizer_step)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}")
                end_of_epoch = k == len(windows)
                step = progress.optimizer_step
                if (eval_every and step % eval_every == 0) or end_of_epoch or step == max_steps:
                    last_eval = _evaluate(model, eval_loaders, task, kind, accelerator, cfg, dropout)
                    last_eval.update(optimizer_step=step, epoch=epoch)
                    if main:
                        evals_log.write(last_eval)
                        if cfg.with_tracking:
                            accelerator.log({f"eval/{k_}": v for k_, v in last_eval.items() if isinstance(v, float)}, step=step)
                if fingerprinter is not None and step in cfg.fingerprint_steps and main:
                    fingerprinter.record(out, step, accelerator.unwrap_model(model))
                if (ckpt_every and step % ckpt_every == 0) or (cfg.checkpointing_steps == "epoch" and end_of_epoch):
                    save_checkpoint(accelerator, out / "checkpoints", step, model, optimizer, scheduler, progress)
                    if main and cfg.checkpoints_total_limit:
                        prune_checkpoints(out, cfg.checkpoints_total_limit)
    except NonFiniteLossError as exc:
        status = "non_finite_loss"
        if main:
            write_json(out / "final_metrics.json", {"status": status, "error": str(exc), "optimizer_step": progress.optimizer_step + 1})
        raise
    finally:
        bar.close()
        if main and steps_log is not None:
            steps_log.close()
            evals_log.close()

    if not last_eval:
        # Resumed from the checkpoint of the last step (killed after it, before final_metrics.json): the
        # final evaluation is recomputed; its eval.jsonl row survived the truncation, so it is not written twice.
        last_eval = _evaluate(model, eval_loaders, task, kind, accelerator, cfg, dropout)
        last_eval.update(optimizer_step=progress.optimizer_step, epoch=(progress.optimizer_step - 1) // steps_per_epoch)
    seconds = max(progress.train_seconds, 1e-9)
    final = {
        "status": status,
        "task": task.name,
        "synthetic_data": task.name == "synthetic",
        **derived,
        "optimizer_steps": progress.optimizer_step,
        "examples_seen": progress.examples_seen,
        "train_seconds": round(progress.train_seconds, 3),
        "examples_per_second": progress.examples_seen / seconds,
        "tokens_per_second": progress.real_tokens_seen / seconds,
        "device": str(accelerator.device),
        "precision": cfg.precision,
        "eval": last_eval,
        "main_metric": task.main_metric if kind != "mlm" else "masked_accuracy",
    }
    if cfg.save_final_model:
        accelerator.wait_for_everyone()
        if main:
            accelerator.unwrap_model(model).save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
    if main:
        write_json(out / "final_metrics.json", final)
    if cfg.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    say(f"[bert_accum] done: {progress.optimizer_step} optimizer steps, "
        f"{final['examples_per_second']:.1f} examples/s, eval {_short(last_eval)} -> {out}")
    return final


def _short(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float))


def _flat_for_tracker(d: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def count_items(micro_batches: list[dict[str, torch.Tensor]], kind: str) -> int:
    """Items of collated micro-batches: examples, or predicted (label != -100) tokens for MLM."""
    return sum(int((b["labels"] != -100).sum()) if kind == "mlm" else len(b["labels"]) for b in micro_batches)


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
                logits = model(**batch).logits
            loss_sum, micro_items = per_item_loss(logits, labels, kind, compute_dtype)
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
    local_items = count_items(micro_batches, kind)
    window_items = local_items
    if W > 1:
        window_items = int(accelerator.reduce(torch.tensor(local_items, device=accelerator.device), "sum"))
    if window_items == 0:
        raise BertAccumError(f"accumulation window at optimizer step {progress.optimizer_step + 1} has no items to predict")
    n_micro = len(window)
    bugs = BugModes.parse(cfg.bug_modes)
    one_over_n = bugs.one_over_n
    after_backward = None
    if bugs.clip_per_micro_batch and cfg.max_grad_norm and cfg.max_grad_norm > 0:
        def after_backward():
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
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
    clipped = False
    if cfg.max_grad_norm and cfg.max_grad_norm > 0 and not bugs.clip_per_micro_batch:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        clipped = grad_norm > cfg.max_grad_norm
    lr = scheduler.get_last_lr()[0]
    if before_optimizer_step is not None:
        before_optimizer_step(accelerator.unwrap_model(model), progress.optimizer_step + 1)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": window_loss,
        "items": window_items,
        "examples": int(stats[3]),
        "micro_steps": n_micro,
        "grad_norm": grad_norm,
        "grad_norm_groups": per_group,
        "clipped": bool(clipped),
        "learning_rate": lr,
        "real_tokens": int(stats[1]),
        "padded_tokens": int(stats[2]),
    }


def _eval_loaders(tokenized, task, tokenizer, cfg, accelerator) -> dict[str, Any]:
    """Prepared evaluation loaders; accelerate shards them and `gather_for_metrics` drops duplicates."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from .features import Collator, InMemorySplit

    loaders = {}
    cols = [c for c in ("input_ids", "token_type_ids", "attention_mask", "label", "idx") if c in tokenized["train"].column_names]
    for split in task.eval_splits:
        ds = tokenized[split].select_columns(cols)
        if cfg.objective == "mlm":
            mem = InMemorySplit.from_dataset(ds)
            loaders[split] = ("mlm", Collator(mem, tokenizer, "dynamic", cfg.max_length, mlm=True,
                                              mlm_probability=cfg.mlm_probability, seed=cfg.seed))
            continue
        collator = DataCollatorWithPadding(tokenizer)

        def collate(features, _c=collator):
            return _c([{k: v for k, v in f.items() if k != "idx"} for f in features])

        loaders[split] = ("cls", accelerator.prepare(DataLoader(ds, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)))
    return loaders


@torch.no_grad()
def _evaluate(model, loaders, task, kind, accelerator, cfg, dropout) -> dict[str, Any]:
    """Metrics on every evaluation split; the torch RNG is forked so evaluation never shifts dropout masks."""
    from tqdm.auto import tqdm

    from .metrics import compute_metrics

    results: dict[str, Any] = {}
    model.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for split, (mode, loader) in loaders.items():
            prefix = "" if len(loaders) == 1 else f"{split}/"
            if mode == "mlm":
                results.update({f"{prefix}{k}": v for k, v in _evaluate_mlm(model, loader, accelerator, cfg).items()})
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
            predictions = torch.cat(preds).tolist()
            references = torch.cat(refs).tolist()
            metrics = compute_metrics(task, predictions, references)
            results.update({f"{prefix}{k}": float(v) for k, v in metrics.items()})
            results[f"{prefix}num_examples"] = len(predictions)
    model.train()
    return results


def _evaluate_mlm(model, collate, accelerator, cfg) -> dict[str, float]:
    """Masked-LM loss per predicted token and accuracy, with the masks of epoch 0 (fixed per example).

    Process r evaluates chunks r, r+W, r+2W, ... so every example is counted once; sums are all-reduced.
    """
    n = len(collate.split)
    size = cfg.per_device_eval_batch_size
    chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, tokens
    for chunk in chunks[accelerator.process_index :: accelerator.num_processes]:
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, chunk, epoch=0).items()}
        labels = batch.pop("labels")
        batch.pop("example_ids")
        logits = model(**batch).logits.float()
        mask = labels != -100
        totals[0] += F.cross_entropy(logits[mask], labels[mask], reduction="sum").double()
        totals[1] += (logits[mask].argmax(-1) == labels[mask]).sum()
        totals[2] += mask.sum()
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    loss = float(totals[0] / totals[2])
    return {"mlm_loss": loss, "masked_accuracy": float(totals[1] / totals[2]), "perplexity": math.exp(min(loss, 50.0)),
            "num_examples": n}
