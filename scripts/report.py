"""Write results/REPORT.md and results/study/ from run folders: `python scripts/report.py runs/study runs/study_bugs`.

Reads the run folders written by scripts/grid.py (and the probe / BatchNorm tables); the logic lives in
bert_accum.study.report.
"""

import argparse
import sys

from bert_accum.cli import ArgumentParser, guarded
from bert_accum.study.report import ReportInputs, build_report


def parse(argv=None) -> ReportInputs:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dirs", nargs="+", help="grid runs folders (each one study: runs/study, runs/study_bugs, ...)")
    p.add_argument("--probe_dir", default="results/probe", help="folder of probe tables (<task>/probe.csv); '' for none")
    p.add_argument("--batchnorm_dir", default="results/batchnorm", help="folder of the BatchNorm study; '' for none")
    p.add_argument("--output_dir", default="results", help="where REPORT.md and study/ go (default results)")
    a = p.parse_args(argv)
    return ReportInputs(runs_dirs=a.runs_dirs, probe_dir=a.probe_dir or None, batchnorm_dir=a.batchnorm_dir or None,
                        output_dir=a.output_dir)


if __name__ == "__main__":
    sys.exit(guarded(lambda: print(f"[bert_accum] report: {build_report(parse())}")))
