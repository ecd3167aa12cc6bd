"""Gradient probe: accumulated gradient of every (B, N) of one effective batch against (E, 1), per drift switch.

    python scripts/probe.py --task_name rte --glue_dir /path/to/glue

Writes probe.csv and probe.md (and probe_steps.csv with --steps; probe_trainer.csv and probe_trainer.md with
--trainer_arms) to --output_dir (default results/probe/<task>) and prints the table. The logic lives in bert_accum.study.probe.
"""

import argparse
import sys

from bert_accum.cli import guarded
from bert_accum.study.probe import ARMS, TRAINER_ARMS, ProbeConfig, run_probe


def parse(argv=None) -> ProbeConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True, help="GLUE task (cola, sst2, mrpc, ..., rte) or 'synthetic'")
    p.add_argument("--glue_dir", help="folder in the official GLUE layout")
    p.add_argument("--train_file", help="csv/tsv/json training file (with --validation_file)")
    p.add_argument("--validation_file", help="csv/tsv/json validation file (with --train_file)")
    p.add_argument("--text_column_names", nargs="+", help="text columns of --train_file")
    p.add_argument("--label_column_name", help="label column of --train_file")
    p.add_argument("--model_name_or_path", default="embedded", help="model (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--max_length", type=int, default=128, help="truncation length (default 128)")
    p.add_argument("--effective_batch_size", type=int, default=32, help="E = B*N (default 32)")
    p.add_argument("--micro_batch_sizes", type=int, nargs="+",
                   help="micro batch sizes B, each dividing E (default E, E/2, ..., E/16: 32 16 8 4 2 for E = 32)")
    p.add_argument("--arms", nargs="+", metavar="ARM",
                   help="switch settings to probe (default: all, without controlled_bf16 on a CPU that has no bf16 "
                        "matrix instructions): " + ", ".join(ARMS))
    p.add_argument("--trainer_arms", nargs="*", metavar="ARM",
                   help="also probe the Hugging Face Trainer (probe_trainer.csv / .md): the stock Trainer and "
                        "ExactAccumulationTrainer beside the project's loop, with the gradient-norm ratio; no ARM "
                        "given = all of " + ", ".join(TRAINER_ARMS) + ". Without --arms only these run")
    p.add_argument("--objective", choices=["classification", "mlm"], default="classification")
    p.add_argument("--mlm_probability", type=float, default=0.15, help="masked fraction for --objective mlm")
    p.add_argument("--seed", type=int, default=42, help="head init, data order, dropout and MLM masks (default 42)")
    p.add_argument("--steps", type=int, default=0, help="also run K AdamW steps per configuration (default 0)")
    p.add_argument("--learning_rate", type=float, default=5e-5, help="AdamW learning rate for --steps (default 5e-5)")
    p.add_argument("--output_dir", help="where probe.csv / probe.md go (default results/probe/<task>)")
    p.add_argument("--max_train_samples", type=int, help="use only the first n training examples")
    p.add_argument("--cache_dir", help="datasets / model cache folder")
    a = p.parse_args(argv)
    return ProbeConfig(**vars(a))


if __name__ == "__main__":
    sys.exit(guarded(lambda: run_probe(parse())))
