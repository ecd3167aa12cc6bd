"""Checkpoints of a run: the training position, atomic saves into `checkpoints/step_*`, pruning, and `latest`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BertAccumError


class TrainingProgress:
    """Position in training, saved in every checkpoint so a resumed run continues at the next window."""

    def __init__(self) -> None:
        self.optimizer_step = 0
        self.micro_step = 0
        self.clipped_steps = 0
        self.examples_seen = 0
        self.real_tokens_seen = 0
        self.train_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Plain state for accelerate's checkpointing."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint."""
        vars(self).update(state)


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """accelerate `save_state` into a scratch folder renamed into place, so a kill mid-save never leaves a
    half-written `step_*` checkpoint for `--resume_from_checkpoint latest` to pick."""
    import os
    import shutil

    final = folder / f"step_{step:07d}"
    scratch = folder / f"partial_step_{step:07d}"
    if accelerator.is_main_process and scratch.exists():
        shutil.rmtree(scratch)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    accelerator.wait_for_everyone()


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (each one holds weights plus AdamW state: 3x the model)."""
    import shutil

    for old in sorted((output_dir / "checkpoints").glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: Path) -> Path:
    """The newest `checkpoints/step_*` folder of a run folder."""
    ckpts = sorted((output_dir / "checkpoints").glob("step_*"))
    if not ckpts:
        raise BertAccumError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'}")
    return ckpts[-1]
