"""Entry-point plumbing: user errors become one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``error: <prog>: <reason> (see --help)``, not a usage block.

    Every script then prints exactly one ``error:`` line for any bad input, whether argparse or the program
    itself rejects it; `--help` still prints the full usage and exits 0.
    """

    def error(self, message: str) -> NoReturn:
        """Print the one line and exit with status 2, as argparse does."""
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse `type` for a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def guarded(fn: Callable[[], object]) -> int:
    """Run `fn`; a BertAccumError or an OS error prints `error: <message>` and returns 2.

    OS errors (a folder that cannot be written, a file that cannot be read) are the environment's, not the
    program's, so they are reported like bad input: one line naming the path.
    """
    from .errors import BertAccumError

    try:
        fn()
    except BertAccumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def finetune_main(argv: list[str] | None = None) -> int:
    """`scripts/finetune.py`: parse flags into a TrainConfig and run it."""

    def go() -> None:
        from .core.config import parse_args

        cfg = parse_args(argv)
        _preflight(cfg)
        from .core.train import run

        run(cfg)

    return guarded(go)


def _preflight(cfg) -> None:
    """The checks of `run` that need the file system but not torch, done before torch is imported (seconds on a
    busy machine), so bad input fails at once: the output folder, a resume's checkpoint and settings, and
    whether the data files can be opened. `run` repeats them for callers that do not come through here."""
    from .core.checkpoint import check_resume_config, resolve_checkpoint
    from .core.records import prepare_output_dir
    from .errors import BertAccumError

    if cfg.output_dir is None:
        raise BertAccumError("--output_dir is required")
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, cfg.resume_from_checkpoint is not None)
    if cfg.resume_from_checkpoint is not None:
        # quiet: `run` prints the warnings about skipped checkpoints, once.
        check_resume_config(out, resolve_checkpoint(out, cfg.resume_from_checkpoint, quiet=True), cfg)
    for flag in ("train_file", "validation_file"):
        path = getattr(cfg, flag)
        if path is not None and os.path.isfile(path):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise BertAccumError(f"--{flag} {path}: cannot be read ({exc.strerror or exc})") from None


if __name__ == "__main__":
    # `python -m bert_accum.cli <flags>` is what the grid runner launches (also under `accelerate launch -m`).
    sys.exit(finetune_main())
