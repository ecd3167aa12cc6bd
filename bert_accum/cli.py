"""Entry-point plumbing: user errors become one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable


def guarded(fn: Callable[[], object]) -> int:
    """Run `fn`; a BertAccumError prints `error: <message>` and returns 2, success returns 0."""
    from .errors import BertAccumError

    try:
        fn()
    except BertAccumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def finetune_main(argv: list[str] | None = None) -> int:
    """`scripts/finetune.py`: parse flags into a TrainConfig and run it with its --backend."""
    from .core.config import parse_args

    def main() -> None:
        cfg = parse_args(argv)
        if cfg.backend == "bert_accum":
            from .core.train import run
        else:  # the HF Trainer backends (imported only when asked for) write the same run folder
            from .integrations.backend import run_trainer as run
        run(cfg)

    return guarded(main)


if __name__ == "__main__":
    # `python -m bert_accum.cli <flags>` is what the grid runner launches (also under `accelerate launch -m`).
    sys.exit(finetune_main())
