"""Write results/REPORT.md and results/study/ from run folders: `python scripts/report.py runs/study runs/study_bugs`
(the same as `bert-accum report`; the parser and the logic live in the package: bert_accum.cli, bert_accum.study.report)."""
import functools
import sys
from bert_accum.cli import parse_report, script_main
parse = functools.partial(parse_report, prog="python scripts/report.py")
if __name__ == "__main__":
    sys.exit(script_main("report", "python scripts/report.py"))
