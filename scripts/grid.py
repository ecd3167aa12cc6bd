"""Run a YAML grid of (task, arm, B, N, seed) cells: `python scripts/grid.py configs/study_main.yaml --glue_dir DIR`.

Finished cells are skipped, interrupted ones resume from their last checkpoint; `--dry-run` prints the
cells. The logic lives in bert_accum.study.grid.
"""

import sys

from bert_accum.study.grid import grid_main

if __name__ == "__main__":
    sys.exit(grid_main())
