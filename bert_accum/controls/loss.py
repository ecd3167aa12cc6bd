"""Loss normalisation over an accumulation window: how each micro-batch's summed per-item loss is scaled.

`mean_of_means` is what `loss / N` in a hand-written loop (and the HF examples) computes; `global` divides the
window's summed per-item loss by the window's item count (tokens for masked-LM), which makes the accumulated
gradient equal to the large batch's whatever the micro-batches hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def micro_loss_scale(*, normalization: str, micro_items: int, micro_examples: int, window_items: int,
                     window_examples: int, accumulation_steps: int, num_processes: int, one_over_n: bool) -> float:
    """Factor that turns a micro-batch's summed per-item loss into its share of the window loss.

    global:        sum / window_items                           (mean over all items of the window)
    mean_of_means: (sum / micro_items) * micro_examples / window_examples
                   (the micro-batch mean weighted by its share of examples: 1/N for full windows,
                   the real share for a short last window)
    one_over_n:    (sum / micro_items) / N whatever the window holds (the known bug)
    Every factor is multiplied by W to undo DDP's averaging over processes.
    """
    if normalization == "global":
        scale = 1.0 / window_items
    elif one_over_n:
        scale = 1.0 / (micro_items * accumulation_steps)
    else:
        scale = micro_examples / (micro_items * window_examples)
    return scale * num_processes


def per_item_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(sum of per-item losses, item count) of a micro-batch, computed in `dtype` (fp32 or fp64).

    Items are examples for classification/regression and predicted tokens for MLM.
    """
    logits = logits.to(dtype)
    if kind == "regression":
        losses = (logits.squeeze(-1) - labels.to(dtype)) ** 2
        return losses.sum(), labels.numel()
    if kind == "mlm":
        flat_labels = labels.reshape(-1)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels, reduction="sum", ignore_index=-100)
        return losses, int((flat_labels != -100).sum())
    return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()


def count_items(micro_batches: list[dict[str, torch.Tensor]], kind: str) -> int:
    """Items of collated micro-batches: examples, or predicted (label != -100) tokens for MLM."""
    return sum(int((b["labels"] != -100).sum()) if kind == "mlm" else len(b["labels"]) for b in micro_batches)
