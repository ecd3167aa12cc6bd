"""Write the synthetic (not GLUE) sentiment task to <output_dir>/Synthetic/{train,dev}.tsv (SST-2 layout)."""

from __future__ import annotations

import os
import sys

from bert_accum.cli import ArgumentParser
from bert_accum.errors import BertAccumError
from bert_accum.core.synthetic import SYNTHETIC_DIRNAME, generate_synthetic_glue


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="GLUE-style data root; files go to <output_dir>/Synthetic/")
    parser.add_argument("--n_train", type=int, default=2000, help="training examples (default 2000)")
    parser.add_argument("--n_dev", type=int, default=400, help="dev examples (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; same seed, same bytes (default 0)")
    args = parser.parse_args(argv)
    try:
        root = generate_synthetic_glue(args.output_dir, n_train=args.n_train, n_dev=args.n_dev, seed=args.seed)
    except (BertAccumError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = os.path.join(root, SYNTHETIC_DIRNAME)
    print(f"wrote {args.n_train} train and {args.n_dev} dev examples (seed {args.seed}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
