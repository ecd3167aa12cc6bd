"""Which examples form each accumulation window, micro-step and process.

The contract that makes (B, N, W) runs of one effective batch comparable:

* each epoch has ONE permutation of the training examples, drawn from (seed, epoch) only, so it does
  not depend on B, N or W;
* accumulation window k holds examples [k*E, (k+1)*E) of that permutation, E = B*N*W;
* inside a window, micro-step j of process r gets the j*W + r-th of n*W consecutive, equal slices.
  A full window has n = N and slices of exactly B; a short last window (R < E examples) has
  n = ceil(R / (B*W)) micro-steps over R examples, and is trained on (weighted by its real size) unless
  `drop_last_window` is set.

Because every process computes the plan from the same numbers, no communication is needed to agree
on it, and each process also knows the whole window (used for `window` padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A window is a list of micro-steps; a micro-step is a list of W slices (one per process) of example indices.
Window = list[list[list[int]]]


@dataclass(frozen=True)
class WindowPlan:
    """Deterministic split of each epoch into accumulation windows, micro-steps and process slices."""

    num_examples: int
    micro_batch_size: int
    accumulation_steps: int
    num_processes: int = 1
    seed: int = 0
    drop_last_window: bool = False
    step_mod_boundaries: bool = False
    """Known bug: window boundaries at `micro_step % N == 0` as in many hand-written loops, which puts an
    optimizer step after the first micro-batch of every epoch and shifts every later window by one."""

    @property
    def effective_batch_size(self) -> int:
        """E = B * N * W examples per optimizer step."""
        return self.micro_batch_size * self.accumulation_steps * self.num_processes

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of example indices; a function of (seed, epoch) alone."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_examples)

    def windows(self, epoch: int) -> list[Window]:
        """All windows of an epoch, in training order."""
        order = self.order(epoch).tolist()
        w = self.num_processes
        if self.step_mod_boundaries:
            return self._buggy_windows(order)
        e = self.effective_batch_size
        out: list[Window] = []
        for start in range(0, len(order), e):
            examples = order[start : start + e]
            if len(examples) < e and self.drop_last_window:
                break
            n = math.ceil(len(examples) / (self.micro_batch_size * w))
            window = self._split(examples, n)
            if window is not None:
                out.append(window)
        return out

    def _split(self, examples: list[int], n_micro: int) -> Window | None:
        """n_micro micro-steps x W slices, as equal as possible; None if a process would get nothing."""
        w = self.num_processes
        slices = [s.tolist() for s in np.array_split(np.asarray(examples, dtype=np.int64), n_micro * w)]
        if any(len(s) == 0 for s in slices):
            # Fewer examples than processes: DDP needs every rank to run a backward, so this tail is skipped.
            return None
        return [slices[j * w : (j + 1) * w] for j in range(n_micro)]

    def _buggy_windows(self, order: list[int]) -> list[Window]:
        """Windows as `if micro_step % N == 0: optimizer.step()` (micro_step counted from 0) produces them."""
        per_micro = self.micro_batch_size * self.num_processes
        micro = [order[i : i + per_micro] for i in range(0, len(order), per_micro)]
        out: list[Window] = []
        current: Window = []
        for i, examples in enumerate(micro):
            split = self._split(examples, 1)
            if split is not None:
                current.extend(split)
            if i % self.accumulation_steps == 0 or i == len(micro) - 1:
                if current:
                    out.append(current)
                current = []
        return out

    def num_windows_per_epoch(self) -> int:
        """Optimizer steps per epoch (the same for every epoch)."""
        return len(self.windows(0))


def window_examples(window: Window) -> list[int]:
    """All example indices of a window, over micro-steps and processes."""
    return [i for micro in window for piece in micro for i in piece]
