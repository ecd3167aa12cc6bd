"""Raw data loading: GLUE folders, user csv/tsv/json files, or the Hugging Face Hub.

Every source ends in the same normalised shape (see ``bert_accum.core.tasks``): a ``DatasetDict`` with
``train`` plus the task's evaluation splits, each with exactly the columns ``sentence1``
(``sentence2`` for pair tasks), ``label`` (int64 class index in ``task.label_names`` order, or
float32 for regression) and ``idx`` (int64, the row's 0-based position in its split).
Tokenisation happens elsewhere.

Local files are parsed here in Python rather than by pandas/the ``datasets`` csv builder because
the official GLUE files need things those readers do not give reliably: quoting must be off
(sentences contain unbalanced ``"``), text such as ``NA`` or ``null`` must stay text, QQP's
malformed rows must be counted and skipped, and every error should name the file and line.
The parsed rows are then written into the ``datasets`` Arrow cache with a fingerprint computed
from their content, so the splits are memory-mapped and later ``.map`` calls (tokenisation)
get stable fingerprints and are cached across runs.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ..errors import BertAccumError
from .tasks import CUSTOM_TASK, TaskSpec, custom_task

logger = logging.getLogger(__name__)

# Bump when parsing or normalisation changes, so caches written by older code are not reused.
_CACHE_VERSION = "bert_accum.data/1"

_GLUE_FOLDERS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "qqp": "QQP",
    "stsb": "STS-B",
    "mnli": "MNLI",
    "qnli": "QNLI",
    "rte": "RTE",
    "wnli": "WNLI",
    "synthetic": "Synthetic",
}

# File of each split in the official GLUE layout.
_GLUE_SPLIT_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


@dataclass(frozen=True)
class _GlueLayout:
    """Where text and label live in one task's official TSV files."""

    text_columns: tuple[str, ...]
    label_column: str
    # Column names for a file without a header row (CoLA); None means the first line is a header
    # and columns are found by name (robust to MNLI's many extra parse columns).
    fixed_columns: tuple[str, ...] | None = None
    # QQP's official train file has a few rows broken by stray newlines inside questions; they
    # carry no usable label, so they are skipped (and counted) instead of failing the load.
    skip_malformed: bool = False


_GLUE_LAYOUTS = {
    "cola": _GlueLayout(("sentence",), "label", fixed_columns=("source", "label", "original_label", "sentence")),
    "sst2": _GlueLayout(("sentence",), "label"),
    "synthetic": _GlueLayout(("sentence",), "label"),
    "mrpc": _GlueLayout(("#1 String", "#2 String"), "Quality"),
    "qqp": _GlueLayout(("question1", "question2"), "is_duplicate", skip_malformed=True),
    "stsb": _GlueLayout(("sentence1", "sentence2"), "score"),
    "mnli": _GlueLayout(("sentence1", "sentence2"), "gold_label"),
    "qnli": _GlueLayout(("question", "sentence"), "label"),
    "rte": _GlueLayout(("sentence1", "sentence2"), "label"),
    "wnli": _GlueLayout(("sentence1", "sentence2"), "label"),
}

_HUB_REPO = "nyu-mll/glue"
# The Hub's text column names per config (the config name equals our task name).
_HUB_TEXT_COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

_MISSING = object()  # a JSON record without the key (distinct from an explicit null)


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def glue_folder_name(task: TaskSpec) -> str:
    """Return the task's folder name in the official GLUE layout (e.g. ``SST-2``, ``STS-B``)."""
    try:
        return _GLUE_FOLDERS[task.name]
    except KeyError:
        raise BertAccumError(f"task {task.name!r} has no GLUE folder layout") from None


def write_glue_tsv(
    path: str | os.PathLike, header: list[str] | None, rows: list[list[str]], bom: bool = False
) -> Path:
    """Write a TSV file in the official GLUE format and return its path.

    Fields are joined by tabs with no quoting at all (a ``"`` is written as-is, as in the GLUE
    files), one row per ``\\n``-terminated line. ``header=None`` writes no header line (CoLA);
    ``bom=True`` starts the file with a UTF-8 byte-order mark (MRPC). Rows may have differing
    lengths so tests can write malformed files. Parent folders are created.

    Raises ``ValueError`` for a field containing a tab or line break, since without quoting it
    would silently change the file's row/column structure.
    """
    path = Path(path)
    lines = []
    for row in ([header] if header is not None else []) + list(rows):
        for field in row:
            if any(ch in field for ch in "\t\n\r"):
                raise ValueError(f"field {field!r} contains a tab or line break; unquoted TSV cannot hold it")
        lines.append("\t".join(row) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.writelines(lines)
    return path


def load_raw_splits(
    task: TaskSpec,
    *,
    glue_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column_names: list[str] | None = None,
    label_column_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load a task's raw train and evaluation splits in the normalised column layout.

    Sources, exactly one of:

    * ``glue_dir``: a folder in the official GLUE distribution layout,
      ``<glue_dir>/<TASKDIR>/train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` and
      ``dev_mismatched.tsv``); ``TASKDIR`` is :func:`glue_folder_name`, matched case-insensitively.
      Files are read tab-separated with quoting off. For QQP, rows with the wrong number of fields
      are skipped with a logged warning; for every other task they are an error.
    * ``train_file`` and ``validation_file`` (both required): ``.csv`` (normal CSV quoting),
      ``.tsv`` (quoting off, like GLUE) or ``.json``/``.jsonl`` (JSON Lines, or one JSON array of
      objects), each with a header/keys. Text columns are ``text_column_names`` if given, else
      ``sentence1``/``sentence2`` if present, else the first one (single-sentence task) or two
      (pair task) non-label text columns of the train file. The label column is
      ``label_column_name`` or ``label``; labels may be names from ``task.label_names`` or class
      indices (for the ``custom`` task of :func:`infer_task`: only the training file's own values). The validation file serves every evaluation split of the task, so for MNLI
      ``validation_matched`` and ``validation_mismatched`` hold the same rows (a warning says so).
    * neither: the Hub dataset ``nyu-mll/glue`` (not available for ``synthetic``).

    ``cache_dir`` is the ``datasets`` cache folder (default: the ``datasets`` default cache).

    Returns a ``DatasetDict`` with ``train`` and every split in ``task.eval_splits``; see the
    module docstring for the columns. ``idx`` is the position among the rows kept.

    Raises ``BertAccumError`` (one line naming the file, task and line where possible) for a
    missing folder or file, a malformed file, an unparsable score, a label outside the task's
    label set, an empty split, conflicting or incomplete source options, or an unreachable Hub.
    """
    if glue_dir is not None and (train_file is not None or validation_file is not None):
        raise BertAccumError("pass either --glue_dir or --train_file/--validation_file, not both")
    if (train_file is None) != (validation_file is None):
        given = "--train_file" if train_file is not None else "--validation_file"
        raise BertAccumError(f"pass both --train_file and --validation_file (only {given} was given)")
    if train_file is None and (text_column_names is not None or label_column_name is not None):
        raise BertAccumError("--text_column_names/--label_column_name apply only with --train_file/--validation_file")

    if glue_dir is not None:
        splits = _load_glue_dir(task, glue_dir)
    elif train_file is not None:
        splits = _load_user_files(task, train_file, validation_file, text_column_names, label_column_name)
    else:
        splits = _load_hub(task, cache_dir)

    return datasets.DatasetDict(
        {split: _build_split(task, split, columns, cache_dir) for split, columns in splits.items()}
    )


def load_eval_labels(task: TaskSpec, *, glue_dir: str | None = None, train_file: str | None = None,
                     validation_file: str | None = None, label_column_name: str | None = None) -> dict[str, list]:
    """The labels of each evaluation split in file order, parsed as `load_raw_splits` parses them, from a GLUE
    folder or user files (never the Hub, no cache written): the study report's trivial-baseline input."""
    if glue_dir is not None:
        folder = _find_task_folder(task, glue_dir)
        out = {}
        for split in task.eval_splits:
            path = folder / _GLUE_SPLIT_FILES[split]
            if not path.is_file():
                raise BertAccumError(f"missing GLUE file {path} (split {split!r} of task {task.name})")
            out[split] = _read_glue_file(task, _GLUE_LAYOUTS[task.name], path, split)["label"]
        return out
    if train_file is not None and validation_file is not None:
        splits = _load_user_files(task, train_file, validation_file, None, label_column_name)
        return {split: splits[split]["label"] for split in task.eval_splits}
    raise BertAccumError(f"dev labels of task {task.name} need a GLUE folder or --train_file/--validation_file")


# --------------------------------------------------------------------------------------------
# Normalisation shared by all sources
# --------------------------------------------------------------------------------------------


def _features(task: TaskSpec) -> datasets.Features:
    feats = {"sentence1": datasets.Value("string")}
    if task.is_pair:
        feats["sentence2"] = datasets.Value("string")
    feats["label"] = datasets.Value("float32" if task.is_regression else "int64")
    feats["idx"] = datasets.Value("int64")
    return datasets.Features(feats)


class _Normaliser:
    """Accumulates rows as normalised column lists, validating text and label of each."""

    def __init__(self, task: TaskSpec):
        self.task = task
        self.text_names = ["sentence1", "sentence2"] if task.is_pair else ["sentence1"]
        self.columns: dict[str, list] = {name: [] for name in self.text_names}
        self.columns["label"] = []
        if task.label_names is not None:
            self._label_map = {name: i for i, name in enumerate(task.label_names)}
            if not task.from_data:
                # Accept both label names and class indices ("0", "1", ...): GLUE uses names for
                # RTE/QNLI/MNLI and indices elsewhere, and user files may use either. Labels inferred
                # from a file are its own values, so there an index would be ambiguous ("1" of 1, 2, 3).
                self._label_map.update({str(i): i for i in range(len(task.label_names))})

    def add(self, texts: Sequence[Any], label: Any, where: str) -> None:
        """Append one example; `where` names its line or record in the error raised for a bad value."""
        for name, value in zip(self.text_names, texts):
            if not isinstance(value, str):
                raise BertAccumError(f"{where}: text value {value!r} is not a string (task {self.task.name})")
            self.columns[name].append(value)
        self.columns["label"].append(self._label(label, where))

    def _label(self, raw: Any, where: str) -> int | float:
        task = self.task
        if raw is _MISSING or raw is None:
            raise BertAccumError(f"{where}: missing label (task {task.name})")
        if task.label_names is None:
            # bool is an int subclass; a true/false "score" is surely a wrong column.
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise BertAccumError(f"{where}: score {raw!r} is not a number (task {task.name})")
            try:
                value = float(raw.strip() if isinstance(raw, str) else raw)
            except ValueError:
                raise BertAccumError(f"{where}: score {raw!r} is not a number (task {task.name})") from None
            if not math.isfinite(value):
                raise BertAccumError(f"{where}: score {raw!r} is not a finite number (task {task.name})")
            return value
        if task.from_data:
            index = self._label_map.get(_label_key(raw))
            if index is None:
                raise BertAccumError(
                    f"{where}: label {raw!r} is not among the labels of the training file ({', '.join(task.label_names)})"
                )
            return index
        index = None
        if isinstance(raw, str):
            index = self._label_map.get(raw.strip())
        elif isinstance(raw, int) and not isinstance(raw, bool):
            index = raw if 0 <= raw < len(task.label_names) else None
        elif isinstance(raw, float) and raw.is_integer() and 0 <= raw < len(task.label_names):
            index = int(raw)  # JSON written by pandas may store class indices as 1.0
        if index is None:
            allowed = ", ".join(task.label_names)
            raise BertAccumError(
                f"{where}: label {raw!r} is not in the label set of task {task.name} "
                f"({allowed}, or 0..{len(task.label_names) - 1})"
            )
        return index


def _iter_rows(columns: dict[str, list]) -> Iterator[dict[str, Any]]:
    names = list(columns)
    for idx, values in enumerate(zip(*(columns[n] for n in names))):
        row = dict(zip(names, values))
        row["idx"] = idx
        yield row


def _build_split(task: TaskSpec, split: str, columns: dict[str, list], cache_dir: str | None) -> datasets.Dataset:
    # Fingerprint = hash of the normalised content, not of file paths/mtimes: an edited file gets
    # a fresh cache entry, an unchanged one (wherever it lives) reuses the Arrow file, and the
    # stable fingerprint lets downstream .map (tokenisation) hit its own cache on later runs.
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, task.name, split, list(_features(task))]).encode())
    digest.update(json.dumps(columns).encode())  # ensure_ascii: lone surrogates cannot break it
    return datasets.Dataset.from_generator(
        functools.partial(_iter_rows, columns),
        features=_features(task),
        cache_dir=cache_dir,
        split=datasets.NamedSplit(split),
        fingerprint=digest.hexdigest()[:32],
    )


def _check_not_empty(task: TaskSpec, split: str, columns: dict[str, list], source: str, note: str = "") -> None:
    if not columns["label"]:
        raise BertAccumError(f"{source}: no data rows for split {split!r} of task {task.name}{note}")


# --------------------------------------------------------------------------------------------
# Source 1: official GLUE folder layout
# --------------------------------------------------------------------------------------------


def _find_task_folder(task: TaskSpec, glue_dir: str) -> Path:
    root = Path(glue_dir)
    if not root.is_dir():
        raise BertAccumError(f"GLUE folder not found: {root}")
    wanted = glue_folder_name(task)
    if (root / wanted).is_dir():
        return root / wanted
    # Case-insensitive fallback: people unpack GLUE as "sst-2", "cola", ...
    matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() == wanted.lower())
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise BertAccumError(f"GLUE folder {root} has several folders for task {task.name} ({names}); keep one")
    raise BertAccumError(f"no {wanted} folder for task {task.name} in GLUE folder {root}")


def _load_glue_dir(task: TaskSpec, glue_dir: str) -> dict[str, dict[str, list]]:
    folder = _find_task_folder(task, glue_dir)
    layout = _GLUE_LAYOUTS[task.name]
    splits = {}
    for split in ("train", *task.eval_splits):
        path = folder / _GLUE_SPLIT_FILES[split]
        if not path.is_file():
            raise BertAccumError(f"missing GLUE file {path} (split {split!r} of task {task.name})")
        splits[split] = _read_glue_file(task, layout, path, split)
    return splits


def _open_text(path: Path):
    # utf-8-sig strips MRPC's byte-order mark (and any other file's); newline="" as csv requires.
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:  # no permission, a folder where a file should be, ...
        raise BertAccumError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_glue_file(task: TaskSpec, layout: _GlueLayout, path: Path, split: str) -> dict[str, list]:
    norm = _Normaliser(task)
    folder = path.parent.name
    skipped = 0
    try:
        with _open_text(path) as f:
            # QUOTE_NONE: a '"' is an ordinary character in GLUE text, never a field delimiter.
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if layout.fixed_columns is None:
                header = next(reader, None)
                if header is None:
                    raise BertAccumError(f"{path}: empty file (expected a header line; task {task.name})")
                header = [h.strip() for h in header]
                missing = [c for c in (*layout.text_columns, layout.label_column) if c not in header]
                if missing:
                    raise BertAccumError(
                        f"{path}: header has no column {missing[0]!r} expected in the {folder} layout "
                        f"(found: {', '.join(header)})"
                    )
            else:
                header = list(layout.fixed_columns)
            width = len(header)
            text_pos = [header.index(c) for c in layout.text_columns]
            label_pos = header.index(layout.label_column)
            for fields in reader:
                if not fields:
                    continue  # a blank line holds no example
                if len(fields) != width:
                    if layout.skip_malformed:
                        skipped += 1
                        continue
                    raise BertAccumError(
                        f"{path} line {reader.line_num}: expected {width} tab-separated fields "
                        f"({', '.join(header)}), found {len(fields)}"
                    )
                norm.add([fields[p] for p in text_pos], fields[label_pos], f"{path} line {reader.line_num}")
    except UnicodeDecodeError as exc:
        raise BertAccumError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise BertAccumError(f"{path}: unreadable TSV ({exc})") from None
    if skipped:
        logger.warning(
            "%s: skipped %d malformed row(s) with the wrong number of fields (expected %d)", path, skipped, width
        )
    note = f" ({skipped} malformed rows skipped)" if skipped else ""
    _check_not_empty(task, split, norm.columns, str(path), note)
    return norm.columns


# --------------------------------------------------------------------------------------------
# Source 2: user csv / tsv / json files
# --------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """A user file read into columns, with each row's line (or record) number for messages."""

    path: Path
    names: list[str]
    data: dict[str, list[Any]]
    positions: list[int]
    unit: str  # "line" or "record"
    textual: bool  # csv/tsv: every value is a string, so numbers must be recognised by parsing

    def where(self, row: int) -> str:
        """The file and line (or record) that row `row` came from, for error messages."""
        return f"{self.path} {self.unit} {self.positions[row]}"


def _read_user_file(path_str: str, task_name: str, split: str) -> _Table:
    path = Path(path_str)
    if not path.is_file():
        raise BertAccumError(f"file not found: {path} (split {split!r} of task {task_name})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, suffix)
        if suffix in (".json", ".jsonl"):
            return _read_json(path)
    except UnicodeDecodeError as exc:
        raise BertAccumError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    raise BertAccumError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv, .tsv, .json or .jsonl")


def _read_delimited(path: Path, suffix: str) -> _Table:
    with _open_text(path) as f:
        if suffix == ".tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)  # standard CSV: quoted fields may hold commas, quotes, newlines
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise BertAccumError(f"{path}: empty file (expected a header line)")
            names = [h.strip() for h in header]
            data: dict[str, list[Any]] = {n: [] for n in names}
            columns = [data[n] for n in names]
            positions = []
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(names):
                    raise BertAccumError(
                        f"{path} line {reader.line_num}: expected {len(names)} fields "
                        f"({', '.join(names)}), found {len(fields)}"
                    )
                for column, value in zip(columns, fields):
                    column.append(value)
                positions.append(reader.line_num)
        except csv.Error as exc:
            raise BertAccumError(f"{path} line {reader.line_num}: unreadable {suffix[1:].upper()} ({exc})") from None
    return _Table(path, names, data, positions, "line", textual=True)


def _read_json(path: Path) -> _Table:
    with _open_text(path) as f:
        text = f.read()
    records: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BertAccumError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        records = [(i + 1, item) for i, item in enumerate(items)]
        unit = "record"
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BertAccumError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
        unit = "line"
    names: list[str] = []
    seen: set[str] = set()
    for pos, record in records:
        if not isinstance(record, dict):
            raise BertAccumError(f"{path} {unit} {pos}: expected a JSON object, found {type(record).__name__}")
        for key in record:
            if key not in seen:
                seen.add(key)
                names.append(key)
    data = {n: [record.get(n, _MISSING) for _, record in records] for n in names}
    return _Table(path, names, data, [pos for pos, _ in records], unit, textual=False)


def _is_number_text(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _is_text_column(values: list[Any], textual: bool) -> bool:
    """True when a column holds text (what pandas/datasets would infer as a string column)."""
    has_text = False
    for value in values:
        if value is _MISSING or value is None or value == "":
            continue
        if not isinstance(value, str):
            return False
        if not has_text and not (textual and _is_number_text(value)):
            has_text = True
    return has_text


def _choose_text_columns(
    task: TaskSpec, table: _Table, text_column_names: list[str] | None, label_column: str
) -> list[str]:
    wanted = 2 if task.is_pair else 1
    if text_column_names is not None:
        if len(text_column_names) != wanted:
            raise BertAccumError(
                f"task {task.name} needs {wanted} text column(s), but {len(text_column_names)} were named: "
                f"{', '.join(text_column_names)}"
            )
        return list(text_column_names)
    default = ["sentence1", "sentence2"][:wanted]
    if all(name in table.names for name in default):
        return default
    # Same rule as the Hugging Face run_glue example: the first non-label text column(s).
    candidates = [
        n for n in table.names if n not in (label_column, "idx") and _is_text_column(table.data[n], table.textual)
    ]
    if len(candidates) < wanted:
        raise BertAccumError(
            f"{table.path}: task {task.name} needs {wanted} text column(s) but found "
            f"{len(candidates)} ({', '.join(candidates) or 'none'}); name them with --text_column_names"
        )
    return candidates[:wanted]


def _normalise_table(
    task: TaskSpec, table: _Table, text_columns: list[str], label_column: str, split: str
) -> dict[str, list]:
    for name in (*text_columns, label_column):
        if name not in table.names:
            kind = "label" if name == label_column else "text"
            raise BertAccumError(
                f"{table.path}: no {kind} column {name!r} (found: {', '.join(table.names) or 'none'})"
            )
    norm = _Normaliser(task)
    texts = [table.data[n] for n in text_columns]
    labels = table.data[label_column]
    for row in range(len(labels)):
        values = [column[row] for column in texts]
        for name, value in zip(text_columns, values):
            if value is _MISSING or value is None:
                raise BertAccumError(f"{table.where(row)}: missing value in text column {name!r}")
        norm.add(values, labels[row], table.where(row))
    _check_not_empty(task, split, norm.columns, str(table.path))
    return norm.columns


def _load_user_files(
    task: TaskSpec,
    train_file: str,
    validation_file: str,
    text_column_names: list[str] | None,
    label_column_name: str | None,
) -> dict[str, dict[str, list]]:
    label_column = label_column_name or "label"
    train = _read_user_file(train_file, task.name, "train")
    validation = _read_user_file(validation_file, task.name, "validation")
    # Chosen on the train file and then required in the validation file, so both splits feed the
    # same fields to the model even if column order differs between the files.
    text_columns = _choose_text_columns(task, train, text_column_names, label_column)
    splits = {"train": _normalise_table(task, train, text_columns, label_column, "train")}
    eval_columns = _normalise_table(task, validation, text_columns, label_column, task.eval_splits[0])
    if len(task.eval_splits) > 1:
        logger.warning(
            "%s serves all evaluation splits of task %s (%s): their results will be identical",
            validation.path,
            task.name,
            ", ".join(task.eval_splits),
        )
    for split in task.eval_splits:
        splits[split] = eval_columns
    return splits


def _label_key(value: Any) -> str:
    """A label value as the name it gets in an inferred label set: text stripped, an integral number as its
    integer (so JSON 1, 1.0 and CSV "1" are one class)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_int_text(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def infer_task(
    train_file: str, text_column_names: list[str] | None = None, label_column_name: str | None = None
) -> TaskSpec:
    """The `custom` task of a user's training file, inferred as the Hugging Face GLUE example infers it.

    * Regression when every label is a number and at least one is written as a float (``3.5``, ``2.0``,
      JSON ``1.0``: what pandas reads as a float column); otherwise classification over the sorted distinct
      labels (numerically when all are integers), which become the model's ``id2label``.
    * Two text columns with ``--text_column_names a b``, with ``sentence1`` and ``sentence2``, or when the file
      has two or more text columns besides the label (the first two are used, as in the HF example); one
      otherwise.

    Raises ``BertAccumError`` for a missing label column or value and for fewer than two classes.
    """
    table = _read_user_file(train_file, CUSTOM_TASK, "train")
    label_column = label_column_name or "label"
    if label_column not in table.names:
        raise BertAccumError(
            f"{table.path}: no label column {label_column!r} (found: {', '.join(table.names) or 'none'}); "
            "name it with --label_column_name"
        )
    values = table.data[label_column]
    for row, value in enumerate(values):
        if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
            raise BertAccumError(f"{table.where(row)}: missing label")
    numbers = [v for v in values if (isinstance(v, (int, float)) and not isinstance(v, bool))
               or (table.textual and isinstance(v, str) and _is_number_text(v))]
    floats = [v for v in numbers if isinstance(v, float) or (isinstance(v, str) and not _is_int_text(v))]
    if len(numbers) == len(values) and floats:
        label_names = None
    else:
        keys = {_label_key(v) for v in values}
        integral = all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and _is_int_text(v)
                       for v in values)
        label_names = tuple(sorted(keys, key=int) if integral else sorted(keys))
        if len(label_names) < 2:
            raise BertAccumError(
                f"{table.path}: label column {label_column!r} has a single value ({label_names[0]}); a classifier "
                "needs two or more classes"
            )
    if text_column_names is not None:
        if not 1 <= len(text_column_names) <= 2:
            raise BertAccumError(f"--text_column_names takes one or two column names, got {len(text_column_names)}")
        is_pair = len(text_column_names) == 2
    elif "sentence1" in table.names and "sentence2" in table.names:
        is_pair = True
    else:
        candidates = [n for n in table.names
                      if n not in (label_column, "idx") and _is_text_column(table.data[n], table.textual)]
        if not candidates:
            raise BertAccumError(f"{table.path}: no text column besides {label_column!r}; name it with --text_column_names")
        is_pair = len(candidates) >= 2
    return custom_task(label_names, is_pair)


# --------------------------------------------------------------------------------------------
# Source 3: the Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _load_hub(task: TaskSpec, cache_dir: str | None) -> dict[str, dict[str, list]]:
    if task.name not in _HUB_TEXT_COLUMNS:
        raise BertAccumError(
            f"task {task.name} is not on the Hub; generate it with `python scripts/make_synthetic.py` "
            "and pass --glue_dir"
        )
    try:
        raw = datasets.load_dataset(_HUB_REPO, task.name, cache_dir=cache_dir)
    except Exception as exc:  # offline failures surface as many types (connection, OS, hub errors)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BertAccumError(
            f"could not load {_HUB_REPO} ({task.name}) from the Hugging Face Hub, which looks unreachable "
            f"({type(exc).__name__}: {detail}); pass --glue_dir or --train_file/--validation_file"
        ) from exc
    source = f"Hub dataset {_HUB_REPO} ({task.name})"
    text_columns = _HUB_TEXT_COLUMNS[task.name]
    splits = {}
    for split in ("train", *task.eval_splits):
        if split not in raw:
            raise BertAccumError(f"{source} has no split {split!r} (found: {', '.join(raw)})")
        ds = raw[split]
        missing = [c for c in (*text_columns, "label") if c not in ds.column_names]
        if missing:
            raise BertAccumError(
                f"{source} split {split!r} has no column {missing[0]!r} (found: {', '.join(ds.column_names)})"
            )
        label_feature = ds.features["label"]
        # The indices are only meaningful if the Hub's class order is ours.
        if isinstance(label_feature, datasets.ClassLabel) and tuple(label_feature.names) != task.label_names:
            raise BertAccumError(
                f"{source} label names {label_feature.names} differ from task {task.name}'s {list(task.label_names)}"
            )
        values = ds.select_columns([*text_columns, "label"]).to_dict()
        norm = _Normaliser(task)
        for row, fields in enumerate(zip(*(values[c] for c in text_columns), values["label"])):
            norm.add(fields[:-1], fields[-1], f"{source} split {split!r} row {row}")
        _check_not_empty(task, split, norm.columns, source)
        splits[split] = norm.columns
    return splits
