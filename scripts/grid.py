"""Run a YAML grid of (task, arm, B, N, seed) cells: `python scripts/grid.py configs/study_main.yaml --glue_dir DIR`
(the same as `bert-accum grid`; the parser and the logic live in the package: bert_accum.study.grid)."""
import sys
from bert_accum.cli import script_main
if __name__ == "__main__":
    sys.exit(script_main("grid", "python scripts/grid.py"))
