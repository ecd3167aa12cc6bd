"""The exact accumulation kit: the pieces that make any PyTorch/accelerate loop give the large batch's gradient.

A loop that accumulates N micro-batches of B examples on W processes reproduces one batch of B*N*W only if
four things do not depend on (B, N, W): which examples form a window (:class:`WindowSampler`), the padded
length of every micro-batch (:class:`WindowCollator` in ``window`` mode), the dropout masks
(:func:`install_invariant_dropout`) and the weight of each micro-batch in the window loss
(:func:`window_loss_scales`). :func:`check_accelerator` refuses the one accelerate setting that silently
undoes the scaling. Each piece reuses what the project's own loop (``bert_accum.core.train``) runs, so a
seed gives the same windows, masks and loss factors here as there.

Sketch (one window per optimizer step)::

    sampler = WindowSampler(len(train), B, N, num_processes=acc.num_processes,
                            process_index=acc.process_index, seed=42)
    collator = WindowCollator(tokenizer)                 # pads to the window's longest example
    dropout = install_invariant_dropout(model, seed=42)  # before accelerator.prepare
    for window in sampler:
        micro = collator.collate_window(train, window)
        for j, (batch, scale) in enumerate(zip(micro, window_loss_scales(micro, accelerator=acc))):
            ids = batch.pop("example_ids")
            with acc.no_sync(model) if j < len(micro) - 1 else nullcontext(), dropout.batch(ids, window.epoch):
                acc.backward(model(**batch).loss * scale)
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _KIT_NAMES
from .controls.dropout import DropoutController
from .controls.loss import count_items, micro_loss_scale
from .core.windows import Window, WindowPlan, window_examples
from .errors import BertAccumError, DoubleDivisionError

# The names are listed once, in the package, which has to know them without importing this module (torch).
__all__ = list(_KIT_NAMES)

PADDING_MODES = ("window", "dynamic")
NORMALIZATIONS = ("mean_of_means", "global")
ITEMS = ("examples", "tokens")
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class AccumulationWindow:
    """One optimizer step's worth of examples, as seen by one process.

    ``micro_batches`` are this process's dataset indices, one list per micro-step (a short last window
    has fewer micro-steps than N); ``examples`` are all indices of the window over every process, which
    ``window`` padding needs (every process pads to the longest of them, so shapes do not depend on W).
    """

    epoch: int
    index: int
    micro_batches: list[list[int]]
    examples: list[int]

    @property
    def num_micro_batches(self) -> int:
        """Micro-steps of this window (N, or fewer for a short last window)."""
        return len(self.micro_batches)


class WindowSampler:
    """Accumulation windows of a dataset of ``num_examples`` rows, independent of B, N and W, resumable.

    Window k of an epoch holds examples [k*E, (k+1)*E) of one permutation drawn from (seed, epoch),
    E = B*N*W (:class:`~bert_accum.core.windows.WindowPlan`, the plan of the project's own loop). Iterating
    the sampler yields the current epoch's windows from ``next_window`` on and advances ``next_window``
    as each window is handed out, so ``state_dict()`` taken after a window's optimizer step resumes at
    the following window. ``state_dict``/``load_state_dict`` make it a checkpointable object for
    ``accelerator.register_for_checkpointing``. A state may be loaded into a sampler with other B, N or
    W as long as E, the seed and the dataset size are the same: the windows are then the same.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, accumulation_steps: int, *,
                 num_processes: int = 1, process_index: int = 0, seed: int = 0, drop_last_window: bool = False):
        for name, value in (("num_examples", num_examples), ("micro_batch_size", micro_batch_size),
                            ("accumulation_steps", accumulation_steps), ("num_processes", num_processes)):
            if int(value) < 1:
                raise BertAccumError(f"WindowSampler: {name} must be at least 1, got {value}")
        if not 0 <= process_index < num_processes:
            raise BertAccumError(f"WindowSampler: process_index {process_index} outside [0, {num_processes})")
        self.plan = WindowPlan(num_examples=int(num_examples), micro_batch_size=int(micro_batch_size),
                               accumulation_steps=int(accumulation_steps), num_processes=int(num_processes),
                               seed=int(seed), drop_last_window=bool(drop_last_window))
        self.process_index = int(process_index)
        self.epoch = 0
        self.next_window = 0
        # The plan draws a whole epoch's permutation; keep the latest epoch so iterating is not O(n) per window.
        self._cached: tuple[int, list[Window]] | None = None

    def _plan_windows(self, epoch: int) -> list[Window]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.plan.windows(epoch))
        return self._cached[1]

    @property
    def num_windows(self) -> int:
        """Windows (optimizer steps) per epoch: size the LR schedule with it."""
        return len(self._plan_windows(self.epoch))

    def __len__(self) -> int:
        return self.num_windows

    def windows(self, epoch: int, start_window: int = 0) -> Iterator[AccumulationWindow]:
        """This process's view of the epoch's windows from ``start_window`` on (does not touch the state)."""
        for k, window in enumerate(self._plan_windows(epoch)):
            if k >= start_window:
                yield AccumulationWindow(epoch=epoch, index=k, examples=window_examples(window),
                                         micro_batches=[micro[self.process_index] for micro in window])

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its first window; the current epoch keeps its position (so a resumed
        sampler continues where it stopped when the loop calls ``set_epoch`` for that epoch again)."""
        if int(epoch) != self.epoch:
            self.epoch, self.next_window = int(epoch), 0

    def __iter__(self) -> Iterator[AccumulationWindow]:
        for window in self.windows(self.epoch, self.next_window):
            # Advanced before the yield: while the loop trains this window, the state already points past it.
            self.next_window = window.index + 1
            yield window

    def _identity(self) -> dict[str, Any]:
        return {"num_examples": self.plan.num_examples, "effective_batch_size": self.plan.effective_batch_size,
                "seed": self.plan.seed, "drop_last_window": self.plan.drop_last_window}

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, next window) plus what fixes the windows, checked again on loading."""
        return {"epoch": self.epoch, "next_window": self.next_window, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state whose windows would differ from this sampler's."""
        mine = self._identity()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k} saved {a} now {b}" for k, (a, b) in differ.items())
            raise BertAccumError(f"WindowSampler state is from other windows ({detail}); resuming would mix orders")
        self.epoch, self.next_window = int(state["epoch"]), int(state["next_window"])


class WindowCollator:
    """Pads Hugging Face features (``input_ids``, optional ``token_type_ids``/``attention_mask``,
    ``label``/``labels``, an example id under ``id_key``) into micro-batch tensors plus ``example_ids``.

    ``padding="window"`` pads every micro-batch of a window to the window's longest example (over all
    processes), so (B, N, W) runs of one window see the same tensor shapes and the same round-off;
    ``"dynamic"`` pads each micro-batch to its own longest. Padding is always on the right: invariant
    dropout counts positions from an example's first token, and right padding never moves a real token.
    Token-level labels (lists) are padded with ``label_pad_id`` (-100, ignored by the loss).
    """

    def __init__(self, tokenizer, padding: str = "window", *, id_key: str = "idx", label_pad_id: int = -100):
        if padding not in PADDING_MODES:
            raise BertAccumError(f"WindowCollator: padding must be one of {PADDING_MODES}, got {padding!r}")
        self.tokenizer = tokenizer
        self.padding = padding
        self.id_key = id_key
        self.label_pad_id = label_pad_id
        self.input_names = tuple(getattr(tokenizer, "model_input_names", ("input_ids", "attention_mask")))

    def __call__(self, features: Sequence[dict[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch; ``pad_to`` is the window's longest example (required in ``window`` mode)."""
        if not features:
            raise BertAccumError("WindowCollator: empty micro-batch")
        missing = [i for i, f in enumerate(features) if self.id_key not in f]
        if missing:
            raise BertAccumError(
                f"WindowCollator: feature {missing[0]} has no example id {self.id_key!r}; add one "
                f"(dataset.map(lambda e, i: {{{self.id_key!r}: i}}, with_indices=True)) or set id_key"
            )
        longest = max(len(f["input_ids"]) for f in features)
        if self.padding == "window":
            if pad_to is None:
                raise BertAccumError("WindowCollator: window padding needs pad_to (the window's longest example); "
                                     "use collate_window(dataset, window)")
            if pad_to < longest:
                raise BertAccumError(f"WindowCollator: pad_to={pad_to} is shorter than an example of {longest} tokens")
        length = pad_to if self.padding == "window" else longest
        # Only the tokenizer's own inputs go through tokenizer.pad: text columns or ids would make it fail.
        inputs = [{k: f[k] for k in self.input_names if k in f} for f in features]
        batch = dict(self.tokenizer.pad(inputs, padding="max_length", max_length=length, padding_side="right",
                                        return_tensors="pt"))
        batch["example_ids"] = torch.tensor([int(f[self.id_key]) for f in features], dtype=torch.long)
        labels = self._labels(features, length)
        if labels is not None:
            batch["labels"] = labels
        return batch

    def _labels(self, features: Sequence[dict[str, Any]], length: int) -> torch.Tensor | None:
        key = "labels" if "labels" in features[0] else "label" if "label" in features[0] else None
        if key is None:
            return None
        # as_tensor keeps the kind of label: Python and torch-formatted floats (regression) stay floating point.
        values = [torch.as_tensor(f[key]) for f in features]
        if values[0].dim() == 0:
            stacked = torch.stack(values)
            return stacked.float() if stacked.is_floating_point() else stacked.long()
        padded = torch.full((len(values), length), self.label_pad_id, dtype=torch.long)
        for row, v in enumerate(values):
            padded[row, : v.numel()] = v.long()
        return padded

    def collate_window(self, dataset, window: AccumulationWindow,
                       lengths: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of ``window`` from an indexable ``dataset`` (a ``datasets.Dataset``
        or a list of feature dicts). ``lengths`` (token count per row) saves reading the other processes'
        rows just to learn the window's longest example."""
        features = [[dataset[i] for i in micro] for micro in window.micro_batches]
        pad_to = None
        if self.padding == "window":
            if lengths is not None:
                pad_to = max(int(lengths[i]) for i in window.examples)
            else:
                local = {i: len(f["input_ids"]) for micro, fs in zip(window.micro_batches, features)
                         for i, f in zip(micro, fs)}
                others = [len(dataset[i]["input_ids"]) for i in window.examples if i not in local]
                pad_to = max([*local.values(), *others])
        return [self(fs, pad_to=pad_to) for fs in features]


def install_invariant_dropout(model: nn.Module, seed: int = 0, *, strict: bool = True) -> DropoutController:
    """Make every dropout of a BERT-family model a pure function of (seed, example id, epoch, site, position).

    Replaces each ``nn.Dropout`` and switches the attention to an implementation whose probability dropout
    is invariant too (:class:`~bert_accum.controls.dropout.DropoutController`, mode ``invariant``). Install
    it before ``accelerator.prepare``; a model already wrapped in DDP is unwrapped. Tell the returned
    controller each training batch's ids: ``with controller.batch(example_ids, epoch): model(...).backward``
    (keep the backward inside, so gradient checkpointing recomputes the same masks). ``controller.remove()``
    restores the model. With ``strict`` a second forward without new ids raises rather than reusing them.
    """
    inner = model
    # DDP/accelerate wrappers keep the transformers model (the one with .config) under .module.
    while not hasattr(inner, "config") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    return DropoutController(inner, "invariant", seed=seed, strict=strict)


def _world_totals(items: int, examples: int) -> tuple[int, int, int]:
    """(window items, window examples, processes) summed over processes when torch.distributed is up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return items, examples, 1
    backend = str(dist.get_backend())
    # NCCL only reduces CUDA tensors; gloo (and the CPU) takes host tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    counts = torch.tensor([items, examples], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1]), dist.get_world_size()


def window_loss_scales(micro_batches: Sequence[dict[str, torch.Tensor]], *, normalization: str = "mean_of_means",
                       items: str = "examples", reduction: str = "mean", accelerator=None) -> list[float]:
    """One factor per micro-batch of a window: ``loss_j * factor_j`` summed over j is the window loss.

    ``micro_batches`` are this process's collated micro-batches of the window (with ``labels``).
    ``reduction="mean"``: ``loss_j`` is the micro-batch mean, what ``model(**batch).loss`` returns;
    ``"sum"``: the summed per-item loss (needed when a micro-batch may hold no item, whose mean is NaN).
    ``items``: ``examples``, or ``tokens`` (labels != -100, masked-LM / token classification).

    * ``mean_of_means``: each micro-batch mean weighted by its share of the window's examples (1/N for
      a full window, the real share for a short last one); what ``loss / N`` means in most loops.
    * ``global``: the window's summed loss over its item count, equal to the large batch's loss whatever
      the micro-batches hold (they differ for token items: micro-batches carry unequal token counts).

    Counts are all-reduced when torch.distributed is initialised, and every factor is multiplied by W,
    because DDP (FSDP, DeepSpeed) average gradients over processes. Passing ``accelerator`` also runs
    :func:`check_accelerator`, so an accelerator that divides again is refused before the first backward.
    """
    if normalization not in NORMALIZATIONS:
        raise BertAccumError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if items not in ITEMS:
        raise BertAccumError(f"items must be one of {ITEMS}, got {items!r}")
    if reduction not in REDUCTIONS:
        raise BertAccumError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if accelerator is not None:
        check_accelerator(accelerator)
    if any("labels" not in b for b in micro_batches):
        raise BertAccumError("window_loss_scales: every micro-batch needs its labels")
    kind = "mlm" if items == "tokens" else "classification"  # count_items' kinds: tokens or rows
    local_items = [count_items([b], kind) for b in micro_batches]
    local_examples = [len(b["labels"]) for b in micro_batches]
    window_items, window_examples, world = _world_totals(sum(local_items), sum(local_examples))
    if window_items == 0:
        raise BertAccumError("window_loss_scales: the window has no items (every label is -100)")
    factors = []
    for n_items, n_examples in zip(local_items, local_examples):
        scale = micro_loss_scale(
            normalization=normalization, micro_items=max(n_items, 1), micro_examples=n_examples,
            window_items=window_items, window_examples=window_examples,
            accumulation_steps=len(micro_batches), num_processes=world, one_over_n=False,
        )
        # micro_loss_scale scales a summed loss; a mean already carries 1/items, so multiply it back.
        factors.append(scale * n_items if reduction == "mean" else scale)
    return factors


def check_accelerator(accelerator) -> None:
    """Refuse an ``accelerate.Accelerator`` built with ``gradient_accumulation_steps > 1``.

    ``accelerator.backward(loss)`` divides every loss by ``accelerator.gradient_accumulation_steps``
    (accelerate 1.x); the kit's factors already make the window loss, so the gradient would be N times
    too small, and silently so, since Adam hides a constant factor until epsilon or clipping matter.
    """
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps != 1:
        raise DoubleDivisionError(
            f"the Accelerator was built with gradient_accumulation_steps={steps}: accelerator.backward divides "
            f"every loss by {steps} on top of the kit's window scaling; build Accelerator() with the default 1 "
            "and give N to WindowSampler instead"
        )
