"""The study tools' shared plumbing: one provenance header for every results file, one CSV writer, one
statistics helper and one number format, so every file in `results/` says the same things the same way.
"""

from __future__ import annotations

import csv
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

from ..core.records import git_commit


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user would retype it: `python <script relative to cwd> <args>`,
    `bert-accum <tool> <args>` or `python -m bert_accum <tool> <args>`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "bert-accum":
        return shlex.join(["bert-accum", *argv[1:]])
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bert_accum":
        return shlex.join(["python", "-m", "bert_accum", *argv[1:]])
    if argv and argv[0]:
        script = Path(argv[0])
        try:
            argv[0] = str(script.resolve().relative_to(Path.cwd()))
        except ValueError:
            argv[0] = str(script)
    return shlex.join(["python", *argv])


def provenance(command: str | None = None, commit: str | None = None) -> str:
    """`command: <command> | git_commit: <commit>`: what heads every results file (command line default:
    the running one; commit default: this checkout's, '+dirty' when it has uncommitted changes)."""
    return f"command: {command or command_line()} | git_commit: {commit or git_commit() or 'unknown'}"


def header(text: str, markdown: bool) -> str:
    """The provenance line as a Markdown comment (`<!-- ... -->`) or a CSV comment (`# ...`)."""
    return f"<!-- {text} -->" if markdown else f"# {text}"


def write_csv(path: Path, rows: Iterable[dict[str, Any]], provenance_text: str,
              columns: Iterable[str] | None = None) -> None:
    """CSV headed by the provenance comment; floats written exactly (repr), NaN as an empty cell."""
    rows = list(rows)
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        fh.write(header(provenance_text, markdown=False) + "\n")
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else repr(v) if isinstance(v, float)
                                 else v) for k, v in row.items()})


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the non-NaN values; NaN where undefined (std of one value)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval of the mean of paired differences (NaN for fewer than 2)."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    m, s = statistics.fmean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return m - half, m + half


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table: '—' for NaN, scientific below 1e-3 or from 1e5, else `digits` decimals."""
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)
