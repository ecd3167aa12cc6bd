"""The offline demo study: `python scripts/demo.py` (a (B, N) grid of the embedded model on the synthetic task)."""

import sys

from bert_accum.cli import ArgumentParser, guarded
from bert_accum.study.demo import run_demo

if __name__ == "__main__":
    p = ArgumentParser(description=__doc__)
    p.add_argument("--output_dir", default="demo_output", help="where the runs and report.md go")
    p.add_argument("--n_train", type=int, default=480, help="synthetic training examples")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per configuration")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--model_name_or_path", default="embedded", help="model (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = p.parse_args()
    sys.exit(guarded(lambda: run_demo(a.output_dir, n_train=a.n_train, epochs=a.epochs, seed=a.seed,
                                      model_name_or_path=a.model_name_or_path, overwrite=a.overwrite)))
