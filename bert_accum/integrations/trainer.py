"""`ExactAccumulationTrainer`: a `transformers.Trainer` whose accumulated gradient is the large batch's.

Why the stock Trainer drifts on BERT: when a model's ``forward`` takes ``**kwargs`` the Trainer assumes it
consumes ``num_items_in_batch`` and therefore skips dividing each micro-batch loss by N, but BERT's heads
ignore it and return a per-micro-batch mean, so the accumulated gradient is N times too large (upstream
transformers issue #47688). Even where the division happens, ``loss / N`` is a mean of means (wrong for
masked-LM, and whenever a window's micro-batches differ in size, as in a short last window), and dropout
masks depend on the micro-batch an example lands in.

This subclass computes the loss itself, as the project's own loop does (`core.train.accumulate_window`):
each micro-batch's summed per-item loss is scaled by `controls.loss.micro_loss_scale` with the window's
item count (all-reduced over processes), and invariant dropout masks come from each example's id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from ..controls.dropout import MODES as DROPOUT_MODES
from ..controls.dropout import DropoutController
from ..controls.loss import micro_loss_scale, per_item_loss
from ..core.modeling import masked_lm_logits
from ..errors import BertAccumError

__all__ = ["ExactAccumulationTrainer"]

PADDING_MODES = ("dynamic", "window")
LOSS_NORMALIZATIONS = ("mean_of_means", "global")

# Fill values for the per-token tensors that window padding extends (input_ids use the model's pad id).
_PAD_VALUES = {"labels": -100, "special_tokens_mask": 1}


@dataclass
class _Window:
    """What every micro-batch of the current accumulation window needs to scale its loss."""

    items: int  # predicted items (examples, or tokens for masked-LM) of the window, all processes
    examples: int  # examples of the window, all processes
    micro_steps: int  # this window's micro-batches (fewer than N for a short last window)
    epoch: int


class ExactAccumulationTrainer(Trainer):
    """A drop-in `transformers.Trainer` whose (B, N) accumulated gradient equals the (B·N, 1) gradient.

    Takes the Trainer's arguments plus:

    * ``dropout``: ``"invariant"`` (default; masks are a pure function of (seed, example id, epoch, site,
      position), see `controls.dropout`), ``"standard"`` (torch's RNG, as the stock Trainer) or ``"off"``.
    * ``padding``: ``"dynamic"`` (the collator's padding, default) or ``"window"`` (every micro-batch of a
      window padded to the window's longest sequence, so (B, N) see the shapes of the large batch).
    * ``loss_normalization``: ``"global"`` (default; window loss = mean over the window's items: examples,
      or predicted tokens for masked-LM) or ``"mean_of_means"`` (each micro-batch mean weighted by its share
      of the window's examples; equals ``global`` for classification, not for masked-LM).
    * ``dropout_seed``: seed of the invariant masks (default ``args.seed``).
    * ``example_id_column``: the dataset column of integer example ids (default ``"idx"``); needed with
      ``dropout="invariant"``, kept away from the model's forward.

    Supported heads: sequence classification, regression (``num_labels == 1``) and token-level labels
    with -100 for positions that are not predicted (masked-LM). The loss is computed here from the
    logits, so the result does not depend on whether the model consumes ``num_items_in_batch``. For
    masked-LM only the predicted positions are scored: in training, ``compute_loss(return_outputs=True)``
    returns ``{"logits": ...}`` of those positions alone, one row per label that is not -100. Logged
    ``loss`` is the window loss and ``grad_norm`` the norm of the accumulated gradient before clipping.
    Evaluation is the stock Trainer's.
    """

    # compute_loss returns each micro-batch's share of the window loss: the Trainer must not divide by N.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, dropout: str = "invariant", padding: str = "dynamic",
                 loss_normalization: str = "global", dropout_seed: int | None = None,
                 example_id_column: str = "idx", **kwargs):
        for name, value, allowed in (("dropout", dropout, DROPOUT_MODES), ("padding", padding, PADDING_MODES),
                                     ("loss_normalization", loss_normalization, LOSS_NORMALIZATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is not None or self.label_smoother is not None:
            raise ValueError("ExactAccumulationTrainer computes the loss itself: compute_loss_func and "
                             "label_smoothing_factor are not supported")
        self.dropout_mode = dropout
        self.padding = padding
        self.loss_normalization = loss_normalization
        self.dropout_seed = self.args.seed if dropout_seed is None else int(dropout_seed)
        self.example_id_column = example_id_column
        # The model's forward never sees num_items_in_batch (BERT would ignore it anyway); this also
        # stops the stock get_batch_samples from counting (and all-reducing) items we count ourselves.
        self.model_accepts_loss_kwargs = False
        self.dropout_control = DropoutController(self.model, dropout, seed=self.dropout_seed)
        self._window: _Window | None = None
        self._example_ids: torch.Tensor | None = None

    # -- one accumulation window --------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the window's micro-batches (the stock way), then check ids, pad and count the window."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.dropout_control.model is not self.model:
            # model_init (hyper-parameter search) builds a fresh model inside train()
            self.dropout_control = DropoutController(self.model, self.dropout_mode, seed=self.dropout_seed)
        if not batch_samples:
            return batch_samples, None
        if self.dropout_mode == "invariant":
            for batch in batch_samples:
                if self.example_id_column not in batch:
                    raise BertAccumError(self._missing_ids_message(batch))
        local = torch.tensor([
            sum(self._count_items(b["labels"]) for b in batch_samples),
            sum(len(b["labels"]) for b in batch_samples),
            max(b["input_ids"].shape[1] for b in batch_samples),
        ], device=device)
        if self.args.world_size > 1:
            # the window spans every process: its item count and longest sequence are global
            everyone = self.accelerator.gather(local).view(-1, 3)
            local = torch.stack([everyone[:, 0].sum(), everyone[:, 1].sum(), everyone[:, 2].max()])
        items, examples, longest = (int(v) for v in local)
        if self.padding == "window":
            batch_samples = [self._pad_to(b, longest) for b in batch_samples]
        # state.epoch counts completed fractions of epochs, so its floor is the epoch this window is in
        self._window = _Window(items=items, examples=examples, micro_steps=len(batch_samples),
                               epoch=int(self.state.epoch or 0))
        return batch_samples, items

    def _prepare_inputs(self, inputs):
        """The stock preparation, minus the example id column (kept for `compute_loss`, never given to forward).

        Every training and prediction step passes through here right before its forward.
        """
        inputs = super()._prepare_inputs(inputs)
        self._example_ids = inputs.pop(self.example_id_column, None)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: this micro-batch's share of the window loss (summed per-item loss x `micro_loss_scale`).

        Evaluation uses the stock loss.
        """
        if not model.training or self._window is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)
        window = self._window
        labels = inputs.pop("labels")
        kind, examples = self._loss_kind(labels), len(labels)
        if self.dropout_mode == "invariant":
            self.dropout_control.set_batch(self._example_ids, window.epoch)
        if kind == "mlm":
            # only the predicted positions are scored (the project's loop does the same): the vocabulary
            # projection of every other position is most of a masked-LM step's cost and changes nothing
            logits, labels = masked_lm_logits(model, inputs, labels)
            outputs = {"logits": logits}
        else:
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss_sum, micro_items = per_item_loss(logits, labels, kind, dtype)
        loss = loss_sum * micro_loss_scale(
            normalization=self.loss_normalization, micro_items=max(micro_items, 1), micro_examples=examples,
            window_items=max(window.items, 1), window_examples=window.examples,
            accumulation_steps=window.micro_steps, num_processes=self.accelerator.num_processes, one_over_n=False,
        )
        return (loss, outputs) if return_outputs else loss

    # -- helpers ------------------------------------------------------------------------------
    def _loss_kind(self, labels: torch.Tensor) -> str:
        if labels.dim() >= 2 and not labels.is_floating_point():
            return "mlm"  # token labels, -100 where nothing is predicted
        if self.model.config.num_labels == 1:
            return "regression"
        if labels.dim() == 1 and not labels.is_floating_point():
            return "classification"
        raise ValueError(f"ExactAccumulationTrainer supports classification, regression (num_labels == 1) and "
                         f"token labels with -100; got labels of shape {tuple(labels.shape)}, {labels.dtype}")

    def _count_items(self, labels: torch.Tensor) -> int:
        return int((labels != -100).sum()) if self._loss_kind(labels) == "mlm" else len(labels)

    def _pad_to(self, batch: dict, length: int) -> dict:
        """Right-pad every per-token tensor of `batch` (same [rows, seq] as input_ids) to `length`."""
        rows, seq = batch["input_ids"].shape[:2]
        if seq == length:
            return batch
        pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        out = dict(batch)
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (rows, seq):
                fill = pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
                extra = value.new_full((rows, length - seq, *value.shape[2:]), fill)
                out[key] = torch.cat([value, extra], dim=1)
        return out

    def _missing_ids_message(self, batch: dict) -> str:
        col = self.example_id_column
        removed = " (remove_unused_columns=True, the default, drops it)" if self.args.remove_unused_columns else ""
        return (f"ExactAccumulationTrainer(dropout='invariant') draws each example's dropout masks from its id, "
                f"but the training batch has no {col!r} column{removed}; it has {sorted(batch)}. Keep the "
                f"column: give the dataset an integer {col!r} column, pass TrainingArguments("
                f"remove_unused_columns=False) and use a data collator that passes {col!r} through "
                f"(or name another column with example_id_column=, or use dropout='standard')")
