"""Tests for bert_accum.core.data: GLUE folder layouts, user files, the (faked) Hub route and errors.

Every fixture file is written here, in tmp_path, in the official layout of its task; nothing is
read from the shared GLUE copy and nothing touches the network.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import datasets
import pytest

from bert_accum.core.data import glue_folder_name, infer_task, load_eval_labels, load_raw_splits, write_glue_tsv
from bert_accum.errors import BertAccumError
from bert_accum.core.tasks import TASKS, get_task

# Text opening with a double quote, as in the real MRPC/RTE files: with CSV quoting on, a reader
# takes it for a quoted field, drops the quotes and (when unbalanced) swallows the following tabs
# and rows, so both must come back verbatim.
Q = '" he said "hi'
Q2 = '"bye" she replied'

MNLI_TRAIN_HEADER = [
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
]  # fmt: skip
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = [
    "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score",
]  # fmt: skip
PAIR_HEADER = ["index", "sentence1", "sentence2", "label"]  # RTE, WNLI
QNLI_HEADER = ["index", "question", "sentence", "label"]
QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def _mnli_row(i: int, s1: str, s2: str, gold: str, dev: bool) -> list[str]:
    labels = [gold] * (5 if dev else 1)
    return [str(i), "1", f"{i}n", "fiction", "( ( x ) )", "( ( y ) )", "(ROOT x)", "(ROOT y)", s1, s2, *labels, gold]


def _stsb_row(i: int, s1: str, s2: str, score: str) -> list[str]:
    return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1, s2, score]


def write_glue_fixture(root: Path) -> None:
    """Write one small folder per task in the official GLUE layout, quirks included."""
    # CoLA: no header; columns source, label, original label (often empty), sentence.
    cola_train = [["gj04", "1", "", Q], ["gj04", "0", "*", "Him left."], ["cj99", "1", "", "NA"]]
    write_glue_tsv(root / "CoLA" / "train.tsv", None, cola_train)
    write_glue_tsv(root / "CoLA" / "dev.tsv", None, [["gj04", "0", "*", "The more you eat, the fatter."]])
    # SST-2: header `sentence label`; sentences keep their trailing space.
    write_glue_tsv(root / "SST-2" / "train.tsv", ["sentence", "label"], [["a charming journey . ", "1"], [Q, "0"]])
    write_glue_tsv(root / "SST-2" / "dev.tsv", ["sentence", "label"], [["null", "0"], ["great fun ", "1"]])
    # MRPC: byte-order mark, label column "Quality".
    write_glue_tsv(
        root / "MRPC" / "train.tsv",
        MRPC_HEADER,
        [
            ["1", "702876", "702977", 'he called " the witness " ,', Q],
            ["0", "2108705", "2108831", "Yucaipa owned it .", "It bought it ."],
        ],
        bom=True,
    )
    write_glue_tsv(root / "MRPC" / "dev.tsv", MRPC_HEADER, [["0", "1", "2", Q2, "b ."]], bom=True)
    # QQP: the train file has a question broken by a newline, leaving two rows with 4 and 3 fields.
    write_glue_tsv(
        root / "QQP" / "train.tsv",
        QQP_HEADER,
        [
            ["0", "1", "2", "How do I learn?", Q, "0"],
            ["1", "3", "4", "Why is the sky blue? Could you describe your own"],
            ["experiences?", "Is it?", "1"],
            ["2", "5", "6", "What is AI?", "What is A.I.?", "1"],
        ],
    )
    write_glue_tsv(root / "QQP" / "dev.tsv", QQP_HEADER, [["9", "7", "8", "q1?", "q2?", "1"]])
    # STS-B: ten columns, float scores.
    write_glue_tsv(
        root / "STS-B" / "train.tsv",
        STSB_HEADER,
        [_stsb_row(0, "A plane is taking off.", Q, "5.000"), _stsb_row(1, "A man plays.", "A man sings.", "3.800")],
    )
    write_glue_tsv(root / "STS-B" / "dev.tsv", STSB_HEADER, [_stsb_row(0, "x", "y", "0.000")])
    # MNLI: many parse columns, string gold labels, two dev files.
    write_glue_tsv(
        root / "MNLI" / "train.tsv",
        MNLI_TRAIN_HEADER,
        [
            _mnli_row(0, "Cream skimming.", Q, "neutral", False),
            _mnli_row(1, "You know.", "You don't.", "contradiction", False),
        ],
    )
    write_glue_tsv(root / "MNLI" / "dev_matched.tsv", MNLI_DEV_HEADER, [_mnli_row(0, "m1", "m2", "entailment", True)])
    write_glue_tsv(
        root / "MNLI" / "dev_mismatched.tsv",
        MNLI_DEV_HEADER,
        [_mnli_row(0, "mm1", "mm2", "contradiction", True), _mnli_row(1, "mm3", Q2, "neutral", True)],
    )
    # QNLI and RTE: string labels.
    write_glue_tsv(
        root / "QNLI" / "train.tsv",
        QNLI_HEADER,
        [["0", "When?", Q, "not_entailment"], ["1", "Who?", "Me.", "entailment"]],
    )
    write_glue_tsv(root / "QNLI" / "dev.tsv", QNLI_HEADER, [["0", "Why?", "So.", "entailment"]])
    write_glue_tsv(
        root / "RTE" / "train.tsv",
        PAIR_HEADER,
        [["0", "No weapons found.", "Weapons found.", "not_entailment"], ["1", Q, Q2, "entailment"]],
    )
    write_glue_tsv(root / "RTE" / "dev.tsv", PAIR_HEADER, [["0", "a", "b", "not_entailment"]])
    # WNLI: integer labels.
    write_glue_tsv(root / "WNLI" / "train.tsv", PAIR_HEADER, [["0", Q, "It fit.", "1"]])
    write_glue_tsv(root / "WNLI" / "dev.tsv", PAIR_HEADER, [["0", "c", "d", "0"]])
    # Synthetic: this project's task, SST-2 layout.
    write_glue_tsv(root / "Synthetic" / "train.tsv", ["sentence", "label"], [["w1 w2", "1"], [Q, "0"], ["w3", "1"]])
    write_glue_tsv(root / "Synthetic" / "dev.tsv", ["sentence", "label"], [["w4", "0"]])


# Expected rows per task and split: (sentence1, label) or (sentence1, sentence2, label).
EXPECTED = {
    "cola": {"train": [(Q, 1), ("Him left.", 0), ("NA", 1)], "validation": [("The more you eat, the fatter.", 0)]},
    "sst2": {"train": [("a charming journey . ", 1), (Q, 0)], "validation": [("null", 0), ("great fun ", 1)]},
    "mrpc": {
        "train": [('he called " the witness " ,', Q, 1), ("Yucaipa owned it .", "It bought it .", 0)],
        "validation": [(Q2, "b .", 0)],
    },
    "qqp": {
        "train": [("How do I learn?", Q, 0), ("What is AI?", "What is A.I.?", 1)],
        "validation": [("q1?", "q2?", 1)],
    },
    "stsb": {
        "train": [("A plane is taking off.", Q, 5.0), ("A man plays.", "A man sings.", 3.8)],
        "validation": [("x", "y", 0.0)],
    },
    "mnli": {
        "train": [("Cream skimming.", Q, 1), ("You know.", "You don't.", 2)],
        "validation_matched": [("m1", "m2", 0)],
        "validation_mismatched": [("mm1", "mm2", 2), ("mm3", Q2, 1)],
    },
    "qnli": {"train": [("When?", Q, 1), ("Who?", "Me.", 0)], "validation": [("Why?", "So.", 0)]},
    "rte": {"train": [("No weapons found.", "Weapons found.", 1), (Q, Q2, 0)], "validation": [("a", "b", 1)]},
    "wnli": {"train": [(Q, "It fit.", 1)], "validation": [("c", "d", 0)]},
    "synthetic": {"train": [("w1 w2", 1), (Q, 0), ("w3", 1)], "validation": [("w4", 0)]},
}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # Anything that forgets cache_dir still must not write into the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "default_hf_cache"))


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    root = tmp_path / "glue"
    write_glue_fixture(root)
    return root


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "hf_cache")


def rows_of(ds: datasets.Dataset, is_pair: bool) -> list[tuple]:
    cols = ["sentence1", "sentence2", "label"] if is_pair else ["sentence1", "label"]
    data = ds.to_dict()
    return list(zip(*(data[c] for c in cols)))


def assert_normalised(dd: datasets.DatasetDict, task_name: str, expected: dict[str, list[tuple]]) -> None:
    task = get_task(task_name)
    assert list(dd) == ["train", *task.eval_splits]
    for split, rows in expected.items():
        ds = dd[split]
        columns = ["sentence1", "sentence2", "label", "idx"] if task.is_pair else ["sentence1", "label", "idx"]
        assert ds.column_names == columns
        assert ds.features["label"].dtype == ("float32" if task.is_regression else "int64")
        assert ds.features["idx"].dtype == "int64"
        assert ds.features["sentence1"].dtype == "string"
        got = rows_of(ds, task.is_pair)
        if task.is_regression:
            assert [r[:-1] for r in got] == [r[:-1] for r in rows]
            assert [r[-1] for r in got] == pytest.approx([r[-1] for r in rows])
        else:
            assert got == rows
        assert ds.to_dict()["idx"] == list(range(len(rows)))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def test_glue_folder_names():
    assert {name: glue_folder_name(task) for name, task in TASKS.items()} == {
        "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B",
        "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "synthetic": "Synthetic",
    }  # fmt: skip


def test_write_glue_tsv_is_unquoted_with_optional_bom(tmp_path):
    path = write_glue_tsv(tmp_path / "a" / "x.tsv", ["Quality", "#1 String"], [["1", Q], ["0"]], bom=True)
    assert path.read_bytes() == b'\xef\xbb\xbfQuality\t#1 String\n1\t" he said "hi\n0\n'
    write_glue_tsv(tmp_path / "y.tsv", None, [["gj04", "1", "", "x"]])
    assert (tmp_path / "y.tsv").read_bytes() == b"gj04\t1\t\tx\n"
    with pytest.raises(ValueError):
        write_glue_tsv(tmp_path / "z.tsv", None, [["a\tb"]])


# --------------------------------------------------------------------------------------------
# Source 1: GLUE folders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_name", list(EXPECTED))
def test_glue_layout_per_task(task_name, glue_dir, cache_dir):
    dd = load_raw_splits(get_task(task_name), glue_dir=str(glue_dir), cache_dir=cache_dir)
    assert_normalised(dd, task_name, EXPECTED[task_name])


def test_eval_labels_without_building_datasets(glue_dir):
    """The report's trivial baseline reads the dev labels as load_raw_splits parses them."""
    assert load_eval_labels(get_task("sst2"), glue_dir=str(glue_dir)) == {"validation": [0, 1]}
    mnli = load_eval_labels(get_task("mnli"), glue_dir=str(glue_dir))
    assert mnli == {"validation_matched": [0], "validation_mismatched": [2, 1]}
    with pytest.raises(BertAccumError):
        load_eval_labels(get_task("sst2"))


def test_qqp_malformed_rows_skipped_with_warning(glue_dir, cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="bert_accum.core.data"):
        dd = load_raw_splits(get_task("qqp"), glue_dir=str(glue_dir), cache_dir=cache_dir)
    assert dd["train"].num_rows == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 malformed" in warnings[0] and "train.tsv" in warnings[0]


def test_task_folder_found_case_insensitively(tmp_path, cache_dir):
    write_glue_tsv(tmp_path / "g" / "sst-2" / "train.tsv", ["sentence", "label"], [["ok", "1"]])
    write_glue_tsv(tmp_path / "g" / "sst-2" / "dev.tsv", ["sentence", "label"], [["no", "0"]])
    dd = load_raw_splits(get_task("SST-2"), glue_dir=str(tmp_path / "g"), cache_dir=cache_dir)
    assert rows_of(dd["train"], False) == [("ok", 1)]
    assert rows_of(dd["validation"], False) == [("no", 0)]


def test_crlf_line_endings_do_not_leak_into_values(tmp_path, cache_dir):
    folder = tmp_path / "g" / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_bytes(b'index\tsentence1\tsentence2\tlabel\r\n0\t" he said "hi\tb\tentailment\r\n')
    (folder / "dev.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\r\n0\tc\td\tnot_entailment\r\n")
    dd = load_raw_splits(get_task("rte"), glue_dir=str(tmp_path / "g"), cache_dir=cache_dir)
    assert rows_of(dd["train"], True) == [(Q, "b", 0)]
    assert rows_of(dd["validation"], True) == [("c", "d", 1)]


def test_cache_reused_for_same_content_and_refreshed_for_edits(glue_dir, cache_dir):
    task = get_task("sst2")
    first = load_raw_splits(task, glue_dir=str(glue_dir), cache_dir=cache_dir)
    again = load_raw_splits(task, glue_dir=str(glue_dir), cache_dir=cache_dir)
    assert again["train"]._fingerprint == first["train"]._fingerprint
    assert all(f["filename"].startswith(cache_dir) for f in again["train"].cache_files)
    # Same path, new content: the content fingerprint must not serve the stale cache.
    write_glue_tsv(glue_dir / "SST-2" / "train.tsv", ["sentence", "label"], [["changed", "0"]])
    edited = load_raw_splits(task, glue_dir=str(glue_dir), cache_dir=cache_dir)
    assert rows_of(edited["train"], False) == [("changed", 0)]
    assert edited["train"]._fingerprint != first["train"]._fingerprint
    assert edited["validation"]._fingerprint == first["validation"]._fingerprint


# --------------------------------------------------------------------------------------------
# GLUE-folder errors
# --------------------------------------------------------------------------------------------


def load_error(task_name: str, **kwargs) -> str:
    with pytest.raises(BertAccumError) as info:
        load_raw_splits(get_task(task_name), **kwargs)
    message = str(info.value)
    assert "\n" not in message  # user errors are one line
    return message


def test_missing_glue_dir(tmp_path):
    message = load_error("rte", glue_dir=str(tmp_path / "nowhere"))
    assert "GLUE folder not found" in message and "nowhere" in message


def test_missing_task_folder(glue_dir):
    (glue_dir / "RTE" / "train.tsv").unlink()
    (glue_dir / "RTE" / "dev.tsv").unlink()
    (glue_dir / "RTE").rmdir()
    message = load_error("rte", glue_dir=str(glue_dir))
    assert "no RTE folder" in message and str(glue_dir) in message


@pytest.mark.parametrize(
    ("task_name", "folder", "filename"),
    [("rte", "RTE", "dev.tsv"), ("mnli", "MNLI", "dev_mismatched.tsv"), ("cola", "CoLA", "train.tsv")],
)
def test_missing_split_file(glue_dir, task_name, folder, filename):
    (glue_dir / folder / filename).unlink()
    message = load_error(task_name, glue_dir=str(glue_dir))
    assert str(glue_dir / folder / filename) in message and task_name in message


def test_wrong_field_count_is_an_error_outside_qqp(glue_dir):
    rows = [["0", "a", "b", "entailment"], ["1", "a b", "entailment"]]
    write_glue_tsv(glue_dir / "RTE" / "train.tsv", PAIR_HEADER, rows)
    message = load_error("rte", glue_dir=str(glue_dir))
    assert f"{glue_dir / 'RTE' / 'train.tsv'} line 3" in message and "expected 4" in message and "found 3" in message


def test_headerless_cola_with_wrong_field_count(glue_dir):
    rows = [["gj04", "1", "", "ok"], ["gj04", "1", "missing source column"]]
    write_glue_tsv(glue_dir / "CoLA" / "dev.tsv", None, rows)
    message = load_error("cola", glue_dir=str(glue_dir))
    assert "dev.tsv line 2" in message and "found 3" in message


def test_header_without_expected_column(glue_dir):
    header = ["Label", *MRPC_HEADER[1:]]
    write_glue_tsv(glue_dir / "MRPC" / "dev.tsv", header, [["0", "1", "2", "a", "b"]], bom=True)
    message = load_error("mrpc", glue_dir=str(glue_dir))
    assert "dev.tsv" in message and "'Quality'" in message


@pytest.mark.parametrize("score", ["abc", "", "nan"])
def test_unparsable_stsb_score(glue_dir, score):
    rows = [_stsb_row(0, "a", "b", "1.0"), _stsb_row(1, "a", "b", score)]
    write_glue_tsv(glue_dir / "STS-B" / "dev.tsv", STSB_HEADER, rows)
    message = load_error("stsb", glue_dir=str(glue_dir))
    assert "dev.tsv line 3" in message and repr(score) in message and "number" in message


@pytest.mark.parametrize(
    ("task_name", "folder", "bad"), [("rte", "RTE", "maybe"), ("sst2", "SST-2", "2"), ("wnli", "WNLI", "-1")]
)
def test_label_outside_label_set(glue_dir, task_name, folder, bad):
    if task_name == "sst2":
        write_glue_tsv(glue_dir / folder / "dev.tsv", ["sentence", "label"], [["a", "1"], ["b", bad]])
        line = 3
    else:
        write_glue_tsv(glue_dir / folder / "dev.tsv", PAIR_HEADER, [["0", "a", "b", bad]])
        line = 2
    message = load_error(task_name, glue_dir=str(glue_dir))
    assert f"dev.tsv line {line}" in message and repr(bad) in message and task_name in message


def test_empty_split_header_only(glue_dir):
    write_glue_tsv(glue_dir / "SST-2" / "dev.tsv", ["sentence", "label"], [])
    message = load_error("sst2", glue_dir=str(glue_dir))
    assert "no data rows" in message and "dev.tsv" in message and "'validation'" in message


def test_empty_file(glue_dir):
    (glue_dir / "SST-2" / "train.tsv").write_text("")
    message = load_error("sst2", glue_dir=str(glue_dir))
    assert "empty file" in message and "train.tsv" in message


def test_qqp_with_only_malformed_rows_is_empty(glue_dir):
    write_glue_tsv(glue_dir / "QQP" / "dev.tsv", QQP_HEADER, [["1", "2", "3", "q?"]])
    message = load_error("qqp", glue_dir=str(glue_dir))
    assert "no data rows" in message and "1 malformed rows skipped" in message


# --------------------------------------------------------------------------------------------
# Source 2: user files
# --------------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_csv_with_quoting_and_string_labels(tmp_path, cache_dir):
    tricky = 'a, "quoted" sentence\nover two lines'
    rows = [[tricky, Q, "entailment"], ["x", "y", "1"]]
    train = write_csv(tmp_path / "train.csv", ["sentence1", "sentence2", "label"], rows)
    dev = write_csv(tmp_path / "dev.csv", ["label", "sentence2", "sentence1"], [["not_entailment", "q", "p"]])
    dd = load_raw_splits(get_task("rte"), train_file=train, validation_file=dev, cache_dir=cache_dir)
    assert_normalised(dd, "rte", {"train": [(tricky, Q, 0), ("x", "y", 1)], "validation": [("p", "q", 1)]})


def test_tsv_is_read_with_quoting_off_and_skips_numeric_columns(tmp_path, cache_dir):
    header = ["id", "label", "text"]
    train = write_glue_tsv(tmp_path / "train.tsv", header, [["17", "1", Q], ["18", "0", "NA"]])
    dev = write_glue_tsv(tmp_path / "dev.tsv", header, [["19", "positive", Q2]])
    dd = load_raw_splits(get_task("sst2"), train_file=str(train), validation_file=str(dev), cache_dir=cache_dir)
    assert_normalised(dd, "sst2", {"train": [(Q, 1), ("NA", 0)], "validation": [(Q2, 1)]})


def test_jsonl_picks_first_two_text_columns(tmp_path, cache_dir):
    recs = [
        {"id": 3, "premise": "p1", "hypothesis": Q, "label": "contradiction"},
        {"id": 4, "premise": "p2", "hypothesis": "h2", "label": 0},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", recs)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"premise": "p3", "hypothesis": "h3", "label": "neutral"}])
    dd = load_raw_splits(get_task("mnli"), train_file=train, validation_file=dev, cache_dir=cache_dir)
    expected_dev = [("p3", "h3", 1)]
    # One validation file serves both MNLI evaluation splits.
    expected = {
        "train": [("p1", Q, 2), ("p2", "h2", 0)],
        "validation_matched": expected_dev,
        "validation_mismatched": expected_dev,
    }
    assert_normalised(dd, "mnli", expected)


def test_json_array_prefers_sentence1_sentence2(tmp_path, cache_dir):
    recs = [{"extra": "ignore me", "sentence2": "s2", "sentence1": "s1", "label": 1}]
    (tmp_path / "train.json").write_text(json.dumps(recs, indent=2), encoding="utf-8")
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps([{"sentence1": "d1", "sentence2": "d2", "label": 0.0}]), encoding="utf-8")
    train = str(tmp_path / "train.json")
    dd = load_raw_splits(get_task("mrpc"), train_file=train, validation_file=str(dev), cache_dir=cache_dir)
    assert_normalised(dd, "mrpc", {"train": [("s1", "s2", 1)], "validation": [("d1", "d2", 0)]})


def test_named_text_and_label_columns_regression(tmp_path, cache_dir):
    header = ["a", "b", "gold"]
    train = write_csv(tmp_path / "train.csv", header, [["first", "second", "4.25"], ["x", "y", "0"]])
    dev = write_csv(tmp_path / "dev.csv", header, [["u", "v", "2.5"]])
    dd = load_raw_splits(
        get_task("stsb"),
        train_file=train,
        validation_file=dev,
        text_column_names=["b", "a"],
        label_column_name="gold",
        cache_dir=cache_dir,
    )
    expected = {"train": [("second", "first", 4.25), ("y", "x", 0.0)], "validation": [("v", "u", 2.5)]}
    assert_normalised(dd, "stsb", expected)


@pytest.mark.parametrize("given", ["train_file", "validation_file"])
def test_only_one_user_file_is_an_error(tmp_path, given):
    path = write_csv(tmp_path / "f.csv", ["sentence", "label"], [["a", "1"]])
    message = load_error("sst2", **{given: path})
    assert "both --train_file and --validation_file" in message and given in message


def test_glue_dir_and_files_together_is_an_error(tmp_path, glue_dir):
    path = write_csv(tmp_path / "f.csv", ["sentence", "label"], [["a", "1"]])
    message = load_error("sst2", glue_dir=str(glue_dir), train_file=path, validation_file=path)
    assert "not both" in message


def test_column_options_without_files_are_an_error(glue_dir):
    message = load_error("sst2", glue_dir=str(glue_dir), label_column_name="y")
    assert "--label_column_name" in message


def test_user_file_errors(tmp_path):
    good = write_csv(tmp_path / "good.csv", ["sentence", "label"], [["a", "1"]])
    assert "file not found" in load_error("sst2", train_file=str(tmp_path / "nope.csv"), validation_file=good)
    (tmp_path / "data.txt").write_text("sentence,label\na,1\n")
    message = load_error("sst2", train_file=str(tmp_path / "data.txt"), validation_file=good)
    assert "unsupported file type '.txt'" in message
    bad_label = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 3}])
    message = load_error("sst2", train_file=good, validation_file=bad_label)
    assert "bad.jsonl line 2" in message and "label 3" in message
    no_label = write_csv(tmp_path / "nolabel.csv", ["sentence", "y"], [["a", "1"]])
    assert "no label column 'label'" in load_error("sst2", train_file=good, validation_file=no_label)
    other_text = write_csv(tmp_path / "other.csv", ["text", "label"], [["a", "1"]])
    message = load_error("sst2", train_file=good, validation_file=other_text)
    assert "other.csv" in message and "no text column 'sentence'" in message
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sentence,label\na,1\nb,0,extra\n")
    assert "ragged.csv line 3" in load_error("sst2", train_file=good, validation_file=str(ragged))
    (tmp_path / "broken.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    message = load_error("sst2", train_file=good, validation_file=str(tmp_path / "broken.jsonl"))
    assert "broken.jsonl line 2: invalid JSON" in message
    empty = write_csv(tmp_path / "empty.csv", ["sentence", "label"], [])
    assert "no data rows" in load_error("sst2", train_file=good, validation_file=empty)


def test_text_column_count_and_discovery_errors(tmp_path):
    one_text = write_csv(tmp_path / "one.csv", ["id", "text", "label"], [["1", "a", "entailment"]])
    message = load_error("rte", train_file=one_text, validation_file=one_text)
    assert "needs 2 text column(s)" in message and "--text_column_names" in message
    message = load_error("rte", train_file=one_text, validation_file=one_text, text_column_names=["text"])
    assert "needs 2 text column(s)" in message


# --------------------------------------------------------------------------------------------
# Source 3: the Hub (faked; there is no network)
# --------------------------------------------------------------------------------------------


def fake_hub_split(task_name: str, text: dict[str, list[str]], labels: list) -> datasets.Dataset:
    task = get_task(task_name)
    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    columns = {**{c: datasets.Value("string") for c in text}, "label": label, "idx": datasets.Value("int32")}
    features = datasets.Features(columns)
    return datasets.Dataset.from_dict({**text, "label": labels, "idx": list(range(len(labels)))}, features=features)


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    tables = {
        "sst2": {
            "train": ({"sentence": ["good ", Q]}, [1, 0]),
            "validation": ({"sentence": ["bad"]}, [0]),
            "test": ({"sentence": ["?"]}, [-1]),  # the Hub's unlabelled test split must be left out
        },
        "qnli": {
            "train": ({"question": ["q?"], "sentence": [Q]}, [1]),
            "validation": ({"question": ["w?"], "sentence": ["s"]}, [0]),
        },
        "qqp": {
            "train": ({"question1": ["a?"], "question2": ["b?"]}, [1]),
            "validation": ({"question1": ["c?"], "question2": ["d?"]}, [0]),
        },
        "stsb": {
            "train": ({"sentence1": ["a"], "sentence2": ["b"]}, [3.2]),
            "validation": ({"sentence1": ["c"], "sentence2": ["d"]}, [0.5]),
        },
        "mnli": {
            "train": ({"premise": ["p", "p2"], "hypothesis": ["h", Q]}, [2, 1]),
            "validation_matched": ({"premise": ["pm"], "hypothesis": ["hm"]}, [0]),
            "validation_mismatched": ({"premise": ["px"], "hypothesis": ["hx"]}, [1]),
        },
    }

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict({split: fake_hub_split(name, *spec) for split, spec in tables[name].items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    ("task_name", "expected"),
    [
        ("sst2", {"train": [("good ", 1), (Q, 0)], "validation": [("bad", 0)]}),
        ("qnli", {"train": [("q?", Q, 1)], "validation": [("w?", "s", 0)]}),
        ("qqp", {"train": [("a?", "b?", 1)], "validation": [("c?", "d?", 0)]}),
        ("stsb", {"train": [("a", "b", 3.2)], "validation": [("c", "d", 0.5)]}),
        (
            "mnli",
            {
                "train": [("p", "h", 2), ("p2", Q, 1)],
                "validation_matched": [("pm", "hm", 0)],
                "validation_mismatched": [("px", "hx", 1)],
            },
        ),
    ],
)
def test_hub_columns_are_normalised(fake_hub, cache_dir, task_name, expected):
    dd = load_raw_splits(get_task(task_name), cache_dir=cache_dir)
    assert fake_hub == [("nyu-mll/glue", task_name, {"cache_dir": cache_dir})]
    assert_normalised(dd, task_name, expected)


def test_hub_unreachable_is_a_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = load_error("rte")
    assert "unreachable" in message and "--glue_dir" in message and "--train_file/--validation_file" in message
    assert "ConnectionError" in message


def test_hub_label_outside_label_set(monkeypatch):
    def load_dataset(path, name=None, **kwargs):
        return datasets.DatasetDict(
            {
                "train": fake_hub_split("rte", {"sentence1": ["a"], "sentence2": ["b"]}, [0]),
                "validation": fake_hub_split("rte", {"sentence1": ["a", "c"], "sentence2": ["b", "d"]}, [1, -1]),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    message = load_error("rte")
    assert "'validation' row 1" in message and "label -1" in message


def test_synthetic_has_no_hub_route(monkeypatch):
    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset called for synthetic")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    message = load_error("synthetic")
    assert "scripts/make_synthetic.py" in message and "--glue_dir" in message


# --------------------------------------------------------------------------------------------
# A user's own labels: the `custom` task inferred from the training file (as the HF example does)
# --------------------------------------------------------------------------------------------


def test_own_string_labels_are_inferred_sorted_and_loaded(tmp_path, cache_dir):
    rows = [["a fine film", "pos", "17"], ["a dull film", "neg", "18"], ["so so", "pos", "19"]]
    train = write_csv(tmp_path / "train.csv", ["review", "sentiment", "id"], rows)
    dev = write_csv(tmp_path / "dev.csv", ["id", "sentiment", "review"], [["20", "neg", "bad"]])
    task = infer_task(train, label_column_name="sentiment")
    assert (task.name, task.label_names, task.is_pair, task.from_data) == ("custom", ("neg", "pos"), False, True)
    assert task.metric_config == "sst2" and task.main_metric == "accuracy"  # accuracy, like the HF example
    dd = load_raw_splits(task, train_file=train, validation_file=dev, label_column_name="sentiment", cache_dir=cache_dir)
    assert dd["train"]["label"] == [1, 0, 1] and dd["validation"]["label"] == [0]
    assert dd["train"]["sentence1"] == ["a fine film", "a dull film", "so so"]  # "id" is numeric, not text


def test_integer_labels_are_classes_by_value_not_positions(tmp_path, cache_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 3}, {"text": "y", "label": 1},
                                                   {"text": "z", "label": 2}])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "w", "label": 1.0}])
    task = infer_task(train)
    assert task.label_names == ("1", "2", "3")
    dd = load_raw_splits(task, train_file=train, validation_file=dev, cache_dir=cache_dir)
    assert dd["train"]["label"] == [2, 0, 1] and dd["validation"]["label"] == [0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "w", "label": 0}])  # 0 is no class of this file
    with pytest.raises(BertAccumError, match="label 0 is not among the labels of the training file"):
        load_raw_splits(task, train_file=train, validation_file=bad, cache_dir=cache_dir)


def test_float_labels_mean_regression_and_two_text_columns_a_pair(tmp_path, cache_dir):
    train = write_csv(tmp_path / "train.csv", ["premise", "hypothesis", "score"], [["a", "b", "4.5"], ["c", "d", "1"]])
    dev = write_csv(tmp_path / "dev.csv", ["premise", "hypothesis", "score"], [["e", "f", "2.25"]])
    task = infer_task(train, label_column_name="score")
    assert task.is_regression and task.is_pair and task.metric_config == "stsb" and task.main_metric == "pearson"
    dd = load_raw_splits(task, train_file=train, validation_file=dev, label_column_name="score", cache_dir=cache_dir)
    assert dd["train"]["label"] == [4.5, 1.0] and dd["train"]["sentence2"] == ["b", "d"]
    assert infer_task(train, text_column_names=["premise"], label_column_name="score").is_pair is False


@pytest.mark.parametrize("rows,extra,message", [
    ([["a", "pos"], ["b", "pos"]], {}, "single value (pos); a classifier needs two or more classes"),
    ([["a", "pos"], ["b", ""]], {}, "line 3: missing label"),
    ([["a", "pos"], ["b", "neg"]], {"label_column_name": "sentiment"}, "no label column 'sentiment'"),
])
def test_inference_errors_are_one_line(tmp_path, rows, extra, message):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    with pytest.raises(BertAccumError) as info:
        infer_task(train, **extra)
    assert message in str(info.value) and "\n" not in str(info.value)
