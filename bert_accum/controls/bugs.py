"""Known bugs of hand-written accumulation loops, reproduced on purpose so their effect can be measured.

`BugModes.parse(cfg.bug_modes)` turns the configured names into one object that the loop asks, instead of
string checks scattered over the code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import BertAccumError

BUG_MODES = (
    "step_mod_boundaries",
    "schedule_sized_in_micro_batches",
    "scheduler_stepped_per_micro_batch",
    "last_window_1_over_n",
    "clip_per_micro_batch",
)
# Earlier names, still accepted (run folders and grid files written before the rename use them).
_RENAMED = {"scheduler_in_micro_steps": "schedule_sized_in_micro_batches"}


def canonical_bug_names(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Bug names with earlier spellings replaced by today's."""
    return [_RENAMED.get(n, n) for n in names or []]


@dataclass(frozen=True)
class BugModes:
    """Which known loop bugs a run reproduces (all False: the exact loop)."""

    step_mod_boundaries: bool = False
    """Windows end where `micro_step % N == 0` (counted from 0): a one-micro-batch step opens every epoch."""
    schedule_sized_in_micro_batches: bool = False
    """The LR schedule (warmup and length) is sized in micro-batches but stepped once per optimizer step, so it
    runs N times too slowly: the LR ends at about 1 - 1/N of its peak instead of near 0."""
    scheduler_stepped_per_micro_batch: bool = False
    """`scheduler.step()` inside the micro-batch loop: the schedule (sized in optimizer steps) runs N times too
    fast, so optimizer step k uses the LR of step k*N - 1 and the LR reaches its end after 1/N of training."""
    last_window_1_over_n: bool = False
    """Every micro-batch loss is divided by N, also in a short last window (which then counts too little)."""
    clip_per_micro_batch: bool = False
    """Each micro-batch's gradient contribution is clipped, instead of the accumulated gradient once."""

    @classmethod
    def parse(cls, names: list[str] | tuple[str, ...] | None) -> "BugModes":
        """From the `--bug_modes` names; an unknown name is a one-line error."""
        names = canonical_bug_names(names)
        unknown = [n for n in names if n not in BUG_MODES]
        if unknown:
            raise BertAccumError(f"unknown bug mode {unknown[0]!r}; choose from {', '.join(BUG_MODES)}")
        return cls(**{n: True for n in names})

    @property
    def one_over_n(self) -> bool:
        """Micro-batch losses weighted 1/N whatever the window holds (both bugs that produce short windows do)."""
        return self.last_window_1_over_n or self.step_mod_boundaries

    def schedule_scale(self, accumulation_steps: int) -> int:
        """Factor on the schedule's warmup and length: N when it is sized in micro-steps, else 1."""
        return accumulation_steps if self.schedule_sized_in_micro_batches else 1

    @property
    def names(self) -> list[str]:
        """The active bug names, in `BUG_MODES` order."""
        return [f.name for f in fields(self) if getattr(self, f.name)]
