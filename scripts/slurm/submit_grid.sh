#!/bin/bash
# Submit every cell of a grid as one SLURM job array, one array task per cell (see grid_array.sbatch).
#
#   scripts/slurm/submit_grid.sh GRID.yaml [sbatch options...] [-- scripts/grid.py options...]
#   scripts/slurm/submit_grid.sh configs/study_main.yaml --gpus=1 --time=01:00:00 -- --glue_dir /data/glue
#
# The cells are counted with `scripts/grid.py GRID.yaml --count` (which also validates every cell) and
# the array is 0..n-1. Environment: ARRAY_LIMIT=k runs at most k cells at a time (--array=0-<n-1>%k);
# PYTHON (default python); DRY_RUN=1 prints the sbatch command instead of submitting it.

set -euo pipefail

die() { echo "submit_grid.sh: $*" >&2; exit 2; }
quote() { local out=() a; for a in "$@"; do out+=("$(printf '%q' "$a")"); done; echo "${out[*]}"; }

[[ $# -ge 1 && "$1" != -* ]] || die "usage: submit_grid.sh GRID.yaml [sbatch options...] [-- scripts/grid.py options...]"
GRID=$1
shift
sbatch_args=()
grid_args=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == -- ]]; then
    shift
    grid_args=("$@")
    break
  fi
  sbatch_args+=("$1")
  shift
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# The array tasks find scripts/grid.py through this (sbatch passes the environment on).
export BERT_ACCUM_DIR=${BERT_ACCUM_DIR:-$(cd "$HERE/../.." && pwd -P)}
# ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4, still common on clusters.
n=$("${PYTHON:-python}" "$BERT_ACCUM_DIR/scripts/grid.py" "$GRID" --count ${grid_args[@]+"${grid_args[@]}"})
[[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] || die "scripts/grid.py $GRID --count gave '$n', not a positive number of cells"

cmd=(sbatch "--array=0-$((n - 1))${ARRAY_LIMIT:+%$ARRAY_LIMIT}" ${sbatch_args[@]+"${sbatch_args[@]}"}
     "$HERE/grid_array.sbatch" "$GRID" ${grid_args[@]+"${grid_args[@]}"})
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  quote "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
