"""Write a study report from run folders: REPORT.md, numbers.json, study/*.csv and study/figures/.

    python scripts/report.py runs/converged --grid configs/study_converged.yaml --early_csv results/study

A runs folder named by a grid file's runs_dir (--grid) is a converged study (TOST, floors, disagreement,
failures against the plan); other runs folders are early-training studies. --early_csv reads the committed
tables of an early study whose run folders are gone. The output goes to a new folder under reports/ unless
--output_dir says otherwise (`--output_dir results` replaces the committed report). The logic lives in
bert_accum.study.report.
"""

import argparse
import sys

from bert_accum.cli import ArgumentParser, guarded
from bert_accum.study.report import ReportInputs, build_report


def parse(argv=None) -> ReportInputs:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dirs", nargs="*", help="runs folders, one study each (runs/converged, runs/study, ...)")
    p.add_argument("--grid", action="append", default=[], metavar="GRID.yaml",
                   help="grid file of a converged study (repeatable); matched to the runs folder named like its runs_dir")
    p.add_argument("--early_csv", default=None,
                   help="folder of committed early-training tables (summary.csv, runs.csv, param_distance.csv), "
                        "e.g. results/study, for studies whose run folders are absent")
    p.add_argument("--probe_dir", default="results/probe", help="folder of probe tables (<name>/probe.csv); '' for none")
    p.add_argument("--batchnorm_dir", default="results/batchnorm", help="folder of the BatchNorm study; '' for none")
    p.add_argument("--glue_dir", default=None,
                   help="GLUE folder for the dev labels of the trivial baseline when a run's own data source is not here")
    p.add_argument("--output_dir", default=None,
                   help="where REPORT.md, numbers.json and study/ go (default: a new reports/<timestamp>/)")
    a = p.parse_args(argv)
    return ReportInputs(runs_dirs=a.runs_dirs, probe_dir=a.probe_dir or None, batchnorm_dir=a.batchnorm_dir or None,
                        output_dir=a.output_dir, grids=a.grid, early_csv=a.early_csv, glue_dir=a.glue_dir)


if __name__ == "__main__":
    sys.exit(guarded(lambda: print(f"[bert_accum] report: {build_report(parse())}")))
