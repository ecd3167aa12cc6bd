"""The `bert-accum` command and every tool's parser; user errors become one line on stderr and exit status 2.

    bert-accum finetune|grid|probe|report|demo|bench|norm-study|make-synthetic [flags]   (bert-accum TOOL --help)

`python -m bert_accum TOOL ...` is the same command; `python -m bert_accum.cli <finetune flags>` (also under
`accelerate launch -m bert_accum.cli`) runs `finetune`, and each `scripts/<tool>.py` calls the same function here.
"""

from __future__ import annotations

import argparse
import os
import shlex
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
    """Run `fn`; a BertAccumError or an OS error prints `error: <message>` and returns 2, success returns 0.

    OS errors (a folder that cannot be written, a file that cannot be read) are the environment's, not the
    program's, so they are reported like bad input: one line naming the path. A closed output pipe (`| head`)
    is no error: it ends quietly with 141, as SIGPIPE would.
    """
    from .errors import BertAccumError

    try:
        fn()
        sys.stdout.flush()  # a closed pipe must fail here, inside the handler, not in the interpreter's exit flush
    except BrokenPipeError:
        # `... --dry-run | head`: the reader has gone. Point stdout at /dev/null so the exit flush stays quiet,
        # and exit as a process killed by SIGPIPE would (128 + 13), without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
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


def _parser(prog: str | None, description: str) -> argparse.ArgumentParser:
    """Every tool's argument parser (one place to change how they all print usage and errors)."""
    return ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


# ----------------------------------------------------------------------------------------------- finetune
FINETUNE_HELP = """Fine-tune one (B, N) configuration and write a self-describing run folder.

    bert-accum finetune --task_name rte --glue_dir /path/to/glue --per_device_train_batch_size 8 \\
        --gradient_accumulation_steps 4 --output_dir runs/rte_B8_N4
    accelerate launch -m bert_accum.cli --task_name rte ...        (several processes)

The flags follow the Hugging Face GLUE example (run_glue_no_trainer.py). The logic lives in bert_accum.core.train.
"""


def finetune_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum finetune` (`scripts/finetune.py`): parse flags into a TrainConfig and run it."""
    from .core.config import parse_args

    def go() -> None:
        cfg = parse_args(argv, prog=prog, description=FINETUNE_HELP)
        _preflight(cfg)
        if cfg.backend == "bert_accum":
            from .core.train import run  # torch: only once the flags are known to be good
        else:  # the HF Trainer backends (imported only when asked for) write the same run folder
            from .integrations.backend import run_trainer as run
        run(cfg)

    def go_and_leave() -> None:
        try:
            go()
        finally:
            if "torch" in sys.modules:  # no group without torch; bad flags fail before it is imported
                    leave_process_group()

    return guarded(go_and_leave)


def leave_process_group() -> None:
    """Destroy the default process group, if this process joined one, before the interpreter exits.

    Under torchrun, a gloo rank that exits with its group alive can abort in its thread teardown ("terminate called
    without an active exception"): a completed run would end with a failed exit code for torchrun, SLURM and the
    grid runner. Done by the entry points, once per process: `run` itself may be called many times in one process.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


# ----------------------------------------------------------------------------------------------- probe
PROBE_HELP = """Gradient probe: accumulated gradient of every (B, N) of one effective batch against (E, 1), per drift switch.

    bert-accum probe --task_name rte --glue_dir /path/to/glue

Writes probe.csv and probe.md (and probe_steps.csv with --steps) to --output_dir (default
results/probe/<task>) and prints the table. The logic lives in bert_accum.study.probe.
"""


def parse_probe(argv: list[str] | None = None, prog: str | None = None):
    """`bert-accum probe` flags -> ProbeConfig."""
    from .study.probe import ARMS, TRAINER_ARMS, ProbeConfig

    p = _parser(prog, PROBE_HELP)
    p.add_argument("--task_name", required=True, help="GLUE task (cola, sst2, mrpc, ..., rte), 'synthetic' or 'custom'")
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
    return ProbeConfig(**vars(p.parse_args(argv)))


def probe_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum probe` (`scripts/probe.py`)."""
    from .study.probe import run_probe

    return guarded(lambda: run_probe(parse_probe(argv, prog)))


# ----------------------------------------------------------------------------------------------- report
REPORT_HELP = """Write a study report from run folders: REPORT.md, numbers.json, study/*.csv and study/figures/.

    bert-accum report runs/converged --grid configs/study_converged.yaml --early_csv results/study

A runs folder named by a grid file's runs_dir (--grid) is a converged study (TOST, floors, disagreement,
failures against the plan); other runs folders are early-training studies. --early_csv reads the committed
tables of an early study whose run folders are gone. The output goes to a new folder under reports/ unless
--output_dir says otherwise (`--output_dir results` replaces the committed report). The logic lives in
bert_accum.study.report.
"""


def parse_report(argv: list[str] | None = None, prog: str | None = None):
    """`bert-accum report` flags -> ReportInputs."""
    from .study.grid import find_grid_file
    from .study.report import ReportInputs

    p = _parser(prog, REPORT_HELP)
    p.add_argument("runs_dirs", nargs="*", help="runs folders, one study each (runs/converged, runs/study, ...)")
    p.add_argument("--grid", action="append", default=[], metavar="GRID.yaml",
                   help="grid file of a converged study (repeatable); matched to the runs folder named like its runs_dir")
    p.add_argument("--early_csv", default=None,
                   help="folder of committed early-training tables (summary.csv, runs.csv, param_distance.csv), "
                        "e.g. results/study, for studies whose run folders are absent")
    p.add_argument("--section", action="append", default=[], metavar="FILE.md",
                   help="a Markdown section written by another study script (e.g. results/trainer/trainer.md, headed by "
                        "its command and commit), included after the converged study; repeatable")
    p.add_argument("--biases", default=None, metavar="DIR",
                   help="output folder of bias-study (e.g. results/biases): its biases.md is included after the "
                        "converged study and its paired.csv answers, in the report's first lines, which biases remain "
                        "at the end of training")
    p.add_argument("--probe_dir", default="results/probe", help="folder of probe tables (<name>/probe.csv); '' for none")
    p.add_argument("--batchnorm_dir", default="results/batchnorm", help="folder of the BatchNorm study; '' for none")
    p.add_argument("--glue_dir", default=None,
                   help="GLUE folder for the dev labels of the trivial baseline when a run's own data source is not here")
    p.add_argument("--output_dir", default=None,
                   help="where REPORT.md, numbers.json and study/ go (default: a new reports/<timestamp>/)")
    a = p.parse_args(argv)
    return ReportInputs(runs_dirs=a.runs_dirs, probe_dir=a.probe_dir or None, batchnorm_dir=a.batchnorm_dir or None,
                        output_dir=a.output_dir, grids=[str(find_grid_file(g)) for g in a.grid], early_csv=a.early_csv,
                        glue_dir=a.glue_dir, sections=a.section, biases=a.biases)


def report_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum report` (`scripts/report.py`)."""
    from .study.report import build_report

    return guarded(lambda: print(f"[bert_accum] report: {build_report(parse_report(argv, prog))}"))


# ----------------------------------------------------------------------------------------------- demo
DEMO_HELP = """The offline demo study: does gradient accumulation drift from the large batch, and do the controls
remove it? The embedded all-MiniLM-L6-v2 on this project's synthetic task (not GLUE), effective batch 16:
(16,1), (8,2) and (4,4) in the default arm and the controlled arm (invariant dropout, window padding, global loss
normalisation), plus the dropout-only floor. Prints a five-line answer; writes param_distance.png and report.md.

    bert-accum demo            (or: python scripts/demo.py)
"""


def demo_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum demo` (`scripts/demo.py`)."""
    from .study.demo import DEFAULT_GRID, run_demo

    p = _parser(prog, DEMO_HELP)
    p.add_argument("--output_dir", default="demo_output", help="where the runs, report.md and the figure go")
    p.add_argument("--n_train", type=int, default=384, help="synthetic training examples (default 384: 24 optimizer steps)")
    p.add_argument("--n_dev", type=int, default=200, help="synthetic dev examples (default 200)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per configuration (default 1)")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--batches", nargs="+", metavar="BxN", default=[f"{b}x{n}" for b, n in DEFAULT_GRID],
                   help="(B, N) pairs of one effective batch E, including (E, 1) (default 16x1 8x2 4x4)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.add_argument("--model_name_or_path", default="embedded", help="model (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: the cores the load average leaves idle, at least 1; two threads on "
                        "two busy cores ran the demo 4x slower than one)")
    a = p.parse_args(argv)

    def go() -> None:
        import torch

        torch.set_num_threads(a.threads or idle_cores())
        run_demo(a.output_dir, grid=_pairs(a.batches), n_train=a.n_train, n_dev=a.n_dev, epochs=a.epochs,
                 seed=a.seed, learning_rate=a.learning_rate, model_name_or_path=a.model_name_or_path,
                 overwrite=a.overwrite)

    return guarded(go)


def idle_cores() -> int:
    """Cores not busy by the 1-minute load average, at least 1: the thread count at which torch's OpenMP threads
    do not wait on each other for cores other processes hold (on a shared machine that wait dominates)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, round(cores - load)))


def _pairs(values: list[str]) -> list[tuple[int, int]]:
    """['16x1', '8x2'] -> [(16, 1), (8, 2)]."""
    from .errors import BertAccumError

    try:
        return [(int(b), int(n)) for b, n in (v.lower().split("x") for v in values)]
    except ValueError:
        raise BertAccumError(f"(B, N) pairs are written BxN, e.g. 8x2; got {' '.join(values)}") from None


# ----------------------------------------------------------------------------------------------- bench
BENCH_HELP = """Throughput benchmark: bert_accum's training loop against a plain Hugging Face-style loop, in interleaved rounds.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 bert-accum bench --task_name rte --glue_dir /path/to/glue

Writes results/perf.md (--output): the command and git commit, examples/s and tokens/s of every contender
(mean +- std over rounds), paired per-round ratios (bert_accum / plain, record overhead, invariant-dropout and
window-padding overhead, bf16 speed-up), peak memory per (B, N), achieved FLOP/s against the measured matmul
peak. The logic (and what exactly is timed) is in bert_accum.study.bench.
"""

# Environment variables that change what a benchmark does; they are part of its recorded command.
_BENCH_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def parse_bench(argv: list[str] | None = None, prog: str | None = None):
    """`bert-accum bench` flags -> BenchConfig, with the command line (as `prog ARGS`) recorded in it."""
    from .study.bench import BenchConfig

    d = BenchConfig()
    p = _parser(prog, BENCH_HELP)
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
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in _BENCH_ENV if k in os.environ]
    command = " ".join([*env, prog or "bert-accum bench", *map(shlex.quote, argv)])
    return BenchConfig(**vars(a), command=command)


def bench_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum bench` (`scripts/bench.py`)."""
    from .study.bench import bench_main as run_bench_report

    return guarded(lambda: run_bench_report(parse_bench(argv, prog)))


# ----------------------------------------------------------------------------------------------- norm-study
NORM_STUDY_HELP = """BatchNorm under gradient accumulation: the same small MLP with BatchNorm, LayerNorm, GroupNorm or no
normalisation, accumulated gradient of (B, N) against one batch of E = B*N, running statistics, and a short
training run, on a synthetic task generated in code (CPU, under a minute with the defaults).

    bert-accum norm-study

Writes norm_study.csv, norm_study.md and norm_study.png to --output_dir (default results/batchnorm) and
prints the Markdown. The logic lives in bert_accum.study.normstudy.
"""


def parse_norm_study(argv: list[str] | None = None, prog: str | None = None):
    """`bert-accum norm-study` flags -> NormStudyConfig."""
    from .study.normstudy import PRECISIONS, VARIANTS, NormStudyConfig

    p = _parser(prog, NORM_STUDY_HELP)
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


def norm_study_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum norm-study` (`scripts/norm_study.py`)."""
    from .study.normstudy import run_norm_study

    return guarded(lambda: run_norm_study(parse_norm_study(argv, prog)))


# ----------------------------------------------------------------------------------------------- make-synthetic
MAKE_SYNTHETIC_HELP = """Write the synthetic (not GLUE) sentiment task to <output_dir>/Synthetic/{train,dev}.tsv (SST-2 layout).

    bert-accum make-synthetic --output_dir data      (then: --task_name synthetic --glue_dir data)
"""


def make_synthetic_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum make-synthetic` (`scripts/make_synthetic.py`)."""
    from .core.synthetic import SYNTHETIC_DIRNAME, generate_synthetic_glue

    p = _parser(prog, MAKE_SYNTHETIC_HELP)
    p.add_argument("--output_dir", required=True, help="GLUE-style data root; files go to <output_dir>/Synthetic/")
    p.add_argument("--n_train", type=int, default=2000, help="training examples (default 2000)")
    p.add_argument("--n_dev", type=int, default=400, help="dev examples (default 400)")
    p.add_argument("--seed", type=int, default=0, help="generator seed; same seed, same bytes (default 0)")
    a = p.parse_args(argv)

    def go() -> None:
        from .errors import BertAccumError

        try:
            root = generate_synthetic_glue(a.output_dir, n_train=a.n_train, n_dev=a.n_dev, seed=a.seed)
        except OSError as exc:
            raise BertAccumError(str(exc)) from None
        folder = os.path.join(root, SYNTHETIC_DIRNAME)
        print(f"wrote {a.n_train} train and {a.n_dev} dev examples (seed {a.seed}) to {folder}")

    return guarded(go)


# ----------------------------------------------------------------------------------------------- trainer-study
TRAINER_STUDY_HELP = """The Hugging Face Trainer study: tables, figure and the Markdown section from the runs of
configs/study_trainer.yaml.

    bert-accum grid configs/study_trainer.yaml --glue_dir /path/to/glue --parallel 2
    bert-accum trainer-study

Reads --runs_dir and the probe's Trainer tables below --probe_dir, writes final_metrics.csv,
paired_differences.csv, grad_norms.csv, grad_norms.png and trainer.md to --output_dir. The logic lives in
bert_accum.study.trainer_study.
"""


def trainer_study_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum trainer-study` (`scripts/trainer_study.py`)."""
    p = _parser(prog, TRAINER_STUDY_HELP)
    p.add_argument("--runs_dir", default="results/trainer/runs", help="run folders of the grid")
    p.add_argument("--probe_dir", default="results/trainer/probe", help="folders holding probe_trainer.csv")
    p.add_argument("--output_dir", default="results/trainer", help="where the tables, figure and trainer.md go")
    a = p.parse_args(argv)

    def go() -> None:
        from pathlib import Path

        from .study.trainer_study import run_study

        for path in run_study(Path(a.runs_dir), Path(a.output_dir), Path(a.probe_dir)).values():
            print(path)

    return guarded(go)


# ----------------------------------------------------------------------------------------------- bias-study
BIAS_STUDY_HELP = """The real biases at convergence: paired tables, learning-rate and learning-curve figures and the
Markdown section from grids that declare `comparisons` (each arm against its reference arm).

    bert-accum grid configs/study_bugs_converged.yaml --glue_dir /path/to/glue --parallel 2
    bert-accum grid configs/study_mlm_converged.yaml --glue_dir /path/to/glue --parallel 2
    bert-accum bias-study --study results/runs/bugs_converged configs/study_bugs_converged.yaml \\
                          --study results/runs/mlm_converged configs/study_mlm_converged.yaml \\
                          --glue_dir /path/to/glue

Writes paired.csv, lr.csv, lr.png, curves.csv, curves.png and biases.md to --output_dir (include them in the
report with `report.py --biases DIR`). The logic lives in bert_accum.study.bias_study.
"""


def bias_study_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum bias-study` (`scripts/bias_study.py`)."""
    p = _parser(prog, BIAS_STUDY_HELP)
    p.add_argument("--study", nargs=2, action="append", required=True, metavar=("RUNS_DIR", "GRID"),
                   help="a grid's runs folder and its grid file (repeat for several grids)")
    p.add_argument("--output_dir", default="results/biases", help="where the tables, figures and biases.md go")
    p.add_argument("--glue_dir", default=None,
                   help="GLUE folder for the dev data of the trivial baselines (majority class, most frequent "
                        "masked token) when a run's own data source is not here")
    a = p.parse_args(argv)

    def go() -> None:
        from pathlib import Path

        from .study.bias_study import run_study

        for path in run_study([(Path(d), Path(g)) for d, g in a.study], Path(a.output_dir),
                              glue_dir=a.glue_dir).values():
            print(path)

    return guarded(go)


# ----------------------------------------------------------------------------------------------- bert-accum
def _grid_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`bert-accum grid`: `study.grid.grid_main`, imported when asked for."""
    from .study.grid import grid_main

    return grid_main(argv, prog)


TOOLS: dict[str, tuple[Callable[..., int], str]] = {
    "finetune": (finetune_main, "fine-tune one (B, N) configuration into a run folder"),
    "grid": (_grid_main, "run, count, list or check a YAML grid of cells (study_main, study_bugs, ... ship with it)"),
    "probe": (probe_main, "one-step gradient drift of every (B, N) against (E, 1), per drift switch"),
    "report": (report_main, "REPORT.md, tables and figures from grid run folders"),
    "demo": (demo_main, "the offline demo study: the answer in a few minutes on a CPU"),
    "bench": (bench_main, "throughput against a plain Hugging Face-style loop"),
    "norm-study": (norm_study_main, "BatchNorm vs LayerNorm/GroupNorm under accumulation"),
    "make-synthetic": (make_synthetic_main, "write the synthetic task in the GLUE layout"),
    "trainer-study": (trainer_study_main, "the HF Trainer study's tables, figure and section from its runs"),
    "bias-study": (bias_study_main, "each bias of accumulation against its fix at convergence, from grid runs"),
}


def usage() -> str:
    """`bert-accum --help`: the tools, one line each."""
    width = max(map(len, TOOLS))
    lines = ["usage: bert-accum TOOL [flags]     (bert-accum TOOL --help for a tool's flags)", "",
             "Why gradient accumulation drifts from the large batch when fine-tuning BERT: runs, controls, studies.", "",
             "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`bert-accum TOOL ...`: dispatch to the tool's main with the rest of the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"bert-accum {__version__}")
        return 0
    name = args[0].replace("_", "-")
    if name not in TOOLS:
        print(f"error: unknown tool {args[0]!r}; choose one of: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    return TOOLS[name][0](args[1:], f"bert-accum {name}")


def script_main(tool: str, script: str) -> int:
    """`scripts/<tool>.py`: run the tool with the script's own name in its usage line and recorded command."""
    return TOOLS[tool][0](None, script)


if __name__ == "__main__":
    # `python -m bert_accum.cli <flags>` is what the grid runner launches (also under `accelerate launch -m`).
    sys.exit(finetune_main(prog="python -m bert_accum.cli"))
