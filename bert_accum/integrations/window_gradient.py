"""One accumulation window through a Trainer's own training step: the gradient the Trainer would hand its optimizer.

The gradient probe (`study.probe`, ``--trainer_arms``) compares this gradient at (B, N) with the one at (B·N, 1)
for the stock `transformers.Trainer` and for `ExactAccumulationTrainer`, beside the project's loop.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .trainer import ExactAccumulationTrainer

__all__ = ["trainer_window_gradient"]


class _MicroBatches(torch.utils.data.Dataset):
    """Ready micro-batches, served one per DataLoader batch in order."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


class _InOrder:
    """Batch sampler: micro-batch 0, 1, ..., N-1."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter([[i] for i in range(self.n)])

    def __len__(self) -> int:
        return self.n


class _Capture(TrainerCallback):
    """Restarts torch's RNG at the first micro-step and copies the accumulated gradient before the optimizer."""

    def __init__(self, dropout_seed: int):
        self.dropout_seed = dropout_seed
        self.grads: list[torch.Tensor] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            torch.manual_seed(self.dropout_seed)  # every (B, N) draws standard dropout from the same stream

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for p in model.parameters()]


def trainer_window_gradient(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], *,
                            backend: str = "trainer", dropout_seed: int = 0, seed: int = 0,
                            **exact_kwargs) -> list[torch.Tensor]:
    """The accumulated gradient of one window, one tensor per parameter of `model` (in `parameters()` order).

    `micro_batches` (the window's N micro-batches, collated, with ``labels`` and ``example_ids``) go through
    ``Trainer.train`` for one optimizer step with ``gradient_accumulation_steps=N``: ``backend="trainer"`` is the
    stock Trainer (the example ids are dropped), ``"exact_trainer"`` is `ExactAccumulationTrainer` with
    `exact_kwargs` (``dropout``, ``padding``, ``loss_normalization``; ids from ``example_ids``). The gradient is
    copied in ``on_pre_optimizer_step``, before any clipping (the Trainer's is off) or optimizer step; torch's RNG
    is seeded with `dropout_seed` right before the first micro-step. `model` is trained in place (with a zero
    learning rate) and, for the exact trainer, gets its dropout mode installed: pass a copy.
    """
    if backend not in ("trainer", "exact_trainer"):
        raise ValueError(f"backend must be 'trainer' or 'exact_trainer', got {backend!r}")
    exact = backend == "exact_trainer"
    batches = [b if exact else {k: v for k, v in b.items() if k != "example_ids"} for b in micro_batches]
    loader = torch.utils.data.DataLoader(_MicroBatches(batches), batch_sampler=_InOrder(len(batches)),
                                         collate_fn=lambda items: items[0], generator=torch.Generator())
    capture = _Capture(dropout_seed)
    with tempfile.TemporaryDirectory(prefix="window_gradient_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=len(batches[0]["labels"]),
            gradient_accumulation_steps=len(batches), max_steps=1, learning_rate=0.0, max_grad_norm=0.0, seed=seed,
            logging_strategy="no", eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0,
        )
        base = ExactAccumulationTrainer if exact else Trainer

        class _Window(base):
            def get_train_dataloader(self):
                return self.accelerator.prepare(loader)

        extra = {"example_id_column": "example_ids", "dropout_seed": dropout_seed, **exact_kwargs} if exact else {}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        trainer = _Window(model=model, args=args, optimizers=(optimizer, None), callbacks=[capture], **extra)
        trainer.train()
    if exact:
        trainer.dropout_control.remove()
    model.zero_grad(set_to_none=True)
    return capture.grads
