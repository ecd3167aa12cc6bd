"""BatchNorm under gradient accumulation: the same small MLP with BatchNorm, LayerNorm, GroupNorm or no
normalisation, accumulated gradient of (B, N) against one batch of E = B*N, running statistics, and a short
training run, on a synthetic task generated in code (CPU, under a minute with the defaults).

    python scripts/norm_study.py

Writes norm_study.csv, norm_study.md and norm_study.png to --output_dir (default results/batchnorm) and
prints the Markdown. The logic lives in bert_accum.study.normstudy.
"""

import argparse
import sys

from bert_accum.cli import ArgumentParser, guarded
from bert_accum.study.normstudy import PRECISIONS, VARIANTS, NormStudyConfig, run_norm_study


def parse(argv=None) -> NormStudyConfig:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--effective_batch_size", type=int, default=32, help="E = B*N (default 32)")
    p.add_argument("--micro_batch_sizes", type=int, nargs="+",
                   help="micro batch sizes B, each dividing E (default E, E/2, ..., E/16, at least 2: 32 16 8 4 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="normalisation layers")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="initial weights and data order (default 0 1 2)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of the training run, 0 to skip (default 50)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--learning_rate", type=float, default=1e-2, help="constant learning rate (default 1e-2)")
    p.add_argument("--n_train", type=int, default=512, help="synthetic training examples (default 512)")
    p.add_argument("--n_heldout", type=int, default=512, help="synthetic held-out examples (default 512)")
    p.add_argument("--input_dim", type=int, default=16)
    p.add_argument("--hidden_dim", type=int, default=64)
    p.add_argument("--num_classes", type=int, default=4)
    p.add_argument("--num_groups", type=int, default=8, help="GroupNorm groups (must divide --hidden_dim)")
    p.add_argument("--data_seed", type=int, default=1234, help="seed of the synthetic data set (default 1234)")
    p.add_argument("--output_dir", default="results/batchnorm", help="default results/batchnorm")
    p.add_argument("--no_plot", dest="plot", action="store_false", help="do not write norm_study.png")
    p.add_argument("--num_threads", type=int, default=1, help="torch intra-op threads (default 1: the model is tiny)")
    return NormStudyConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(guarded(lambda: run_norm_study(parse())))
