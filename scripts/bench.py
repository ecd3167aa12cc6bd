"""Throughput benchmark: bert_accum's training loop against a plain Hugging Face-style loop, in interleaved rounds.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench.py --task_name rte --glue_dir /path/to/glue

Writes results/perf.md (--output): the command and git commit, examples/s and tokens/s of every contender
(mean +- std over rounds), paired per-round ratios (bert_accum / plain, record overhead, invariant-dropout and
window-padding overhead, bf16 speed-up), peak memory per (B, N), achieved FLOP/s against the measured matmul
peak. The logic (and what exactly is timed) is in bert_accum.study.bench.
"""

import argparse
import os
import shlex
import sys

from bert_accum.study.bench import BenchConfig, bench_main
from bert_accum.cli import ArgumentParser, guarded

# Environment variables that change what a run does; they are part of the recorded command.
_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def parse(argv=None) -> BenchConfig:
    d = BenchConfig()
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", default=d.task_name, help=f"GLUE task or 'synthetic' (default {d.task_name})")
    p.add_argument("--glue_dir", help="folder in the official GLUE layout (<glue_dir>/RTE/train.tsv, ...)")
    p.add_argument("--train_file", help="csv/tsv/json training file (with --validation_file)")
    p.add_argument("--validation_file", help="csv/tsv/json validation file (with --train_file)")
    p.add_argument("--model_name_or_path", default=d.model_name_or_path, help="model (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--max_length", type=int, default=d.max_length, help=f"truncation length (default {d.max_length})")
    p.add_argument("--micro_batch_size", "--per_device_train_batch_size", dest="micro_batch_size", type=int,
                   default=d.micro_batch_size, help=f"micro-batch size B (default {d.micro_batch_size})")
    p.add_argument("--accumulation_steps", "--gradient_accumulation_steps", dest="accumulation_steps", type=int,
                   default=d.accumulation_steps, help=f"accumulation steps N (default {d.accumulation_steps})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"timed rounds per contender (default {d.rounds})")
    p.add_argument("--low_precision_rounds", type=int,
                   help="run the bf16/fp16 contenders only in the first this-many rounds (default: every round)")
    p.add_argument("--steps_per_round", type=int, default=d.steps_per_round,
                   help=f"optimizer steps per contender per round (default {d.steps_per_round})")
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps,
                   help=f"untimed optimizer steps per contender before the rounds (default {d.warmup_steps})")
    p.add_argument("--precisions", nargs="+", default=d.precisions, choices=["fp32", "bf16", "fp16"],
                   help="precisions of the plain and bert_accum contenders; the first one also gets the light, "
                        "invariant-dropout and window-padding variants (default: fp32 bf16)")
    p.add_argument("--memory_configs", nargs="*", metavar="BxN",
                   help="(B, N) pairs whose peak memory is measured, e.g. 16x1 8x2 (default: (B*N)x1 and BxN; "
                        "give the flag with no value to skip)")
    p.add_argument("--memory_windows", type=int, default=d.memory_windows,
                   help=f"windows trained by each memory probe (default {d.memory_windows})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of data order and head init (default {d.seed})")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate,
                   help=f"AdamW learning rate (default {d.learning_rate})")
    p.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help=f"clipping norm (default {d.max_grad_norm})")
    p.add_argument("--max_train_samples", type=int, help="use only the first n training examples")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--matmul_size", type=int, help="n of the n x n matmul peak (default 2048 on the CPU, 8192 on a GPU)")
    p.add_argument("--matmul_reps", type=int, default=d.matmul_reps, help=f"timed matmuls (default {d.matmul_reps})")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--output", default=d.output, help=f"markdown report to write (default {d.output})")
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in _ENV if k in os.environ]
    command = " ".join([*env, "python", "scripts/bench.py", *map(shlex.quote, argv)])
    return BenchConfig(**vars(a), command=command)


if __name__ == "__main__":
    sys.exit(guarded(lambda: bench_main(parse())))
