"""The Hugging Face Trainer study: tables, figure and the Markdown section from the runs of configs/study_trainer.yaml.

    python scripts/grid.py configs/study_trainer.yaml --glue_dir /path/to/glue --parallel 2
    python scripts/trainer_study.py

Reads --runs_dir (default results/trainer/runs) and the probe's Trainer tables below --probe_dir (default
results/trainer/probe), writes final_metrics.csv, paired_differences.csv, grad_norms.csv, grad_norms.png and
trainer.md to --output_dir (default results/trainer). The logic lives in bert_accum.study.trainer_study.
"""

import argparse
import sys
from pathlib import Path

from bert_accum.cli import guarded
from bert_accum.study.trainer_study import run_study


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs_dir", default="results/trainer/runs", help="run folders of the grid")
    p.add_argument("--probe_dir", default="results/trainer/probe", help="folders holding probe_trainer.csv")
    p.add_argument("--output_dir", default="results/trainer", help="where the tables, figure and trainer.md go")
    a = p.parse_args(argv)

    def go() -> None:
        for path in run_study(Path(a.runs_dir), Path(a.output_dir), Path(a.probe_dir)).values():
            print(path)

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
