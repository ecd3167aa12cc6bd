"""The synthetic (not GLUE) task: deterministic files, balanced labels, an exact rule no bag of words learns."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest

from bert_accum.errors import BertAccumError
from bert_accum.core.synthetic import (
    MAX_WORDS,
    MIN_WORDS,
    NEGATIONS,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    SYNTHETIC_DIRNAME,
    generate_synthetic_glue,
    synthetic_label,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(root, split):
    path = os.path.join(root, SYNTHETIC_DIRNAME, f"{split}.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    assert lines[0] == "sentence\tlabel"
    assert lines[-1] == ""  # trailing newline, no blank rows
    rows = [line.split("\t") for line in lines[1:-1]]
    assert all(len(r) == 2 for r in rows)
    return [s for s, _ in rows], [int(label) for _, label in rows]


def _bytes(root):
    return {
        split: open(os.path.join(root, SYNTHETIC_DIRNAME, f"{split}.tsv"), "rb").read() for split in ("train", "dev")
    }


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    assert generate_synthetic_glue(root) == root
    return root


def test_layout_and_sizes(default_data):
    assert sorted(os.listdir(os.path.join(default_data, SYNTHETIC_DIRNAME))) == ["dev.tsv", "train.tsv"]
    train, _ = _read(default_data, "train")
    dev, _ = _read(default_data, "dev")
    assert (len(train), len(dev)) == (2000, 400)
    assert not any(b"\r" in data for data in _bytes(default_data).values())


def test_same_seed_same_bytes(tmp_path):
    a = generate_synthetic_glue(str(tmp_path / "a"), n_train=300, n_dev=60, seed=7)
    b = generate_synthetic_glue(str(tmp_path / "b"), n_train=300, n_dev=60, seed=7)
    assert _bytes(a) == _bytes(b)
    # Regenerating in place overwrites with the same bytes.
    before = _bytes(a)
    generate_synthetic_glue(a, n_train=300, n_dev=60, seed=7)
    assert _bytes(a) == before


def test_pinned_bytes_for_seed_0(tmp_path):
    """Guards platform/Python-version independence: update only when the generator changes on purpose."""
    root = generate_synthetic_glue(str(tmp_path), n_train=20, n_dev=10, seed=0)
    digest = hashlib.sha256(b"".join(_bytes(root)[s] for s in ("train", "dev"))).hexdigest()
    assert digest == PINNED_SHA256


def test_different_seeds_differ(tmp_path):
    a = generate_synthetic_glue(str(tmp_path / "a"), n_train=100, n_dev=20, seed=0)
    b = generate_synthetic_glue(str(tmp_path / "b"), n_train=100, n_dev=20, seed=1)
    assert _bytes(a)["train"] != _bytes(b)["train"]
    assert _bytes(a)["dev"] != _bytes(b)["dev"]


def test_labels_balanced(default_data, tmp_path):
    for split, n in (("train", 2000), ("dev", 400)):
        _, labels = _read(default_data, split)
        assert Counter(labels) == {0: n // 2, 1: n // 2}
    _, labels = _read(generate_synthetic_glue(str(tmp_path), n_train=11, n_dev=3), "train")
    assert sorted(Counter(labels).values()) == [5, 6]


def test_rule_is_exact_and_sentences_unique(default_data):
    train, y_train = _read(default_data, "train")
    dev, y_dev = _read(default_data, "dev")
    polar = set(POSITIVE_ADJECTIVES) | set(NEGATIVE_ADJECTIVES)
    for sentence, label in zip(train + dev, y_train + y_dev):
        words = sentence.split()
        assert sum(w in polar for w in words) == 1
        assert sum(w in NEGATIONS for w in words) <= 1
        assert synthetic_label(sentence) == label
    assert len(set(train + dev)) == len(train) + len(dev)
    # Hand-checked instances of the rule.
    assert synthetic_label("the movie was not bad .") == 1
    assert synthetic_label("the movie was hardly great .") == 0
    assert synthetic_label("i would never say that the plot is dull .") == 1
    assert synthetic_label("the plot is truly superb , in the end .") == 1


def test_unigrams_appear_in_both_classes(default_data):
    train, labels = _read(default_data, "train")
    counts = {0: Counter(), 1: Counter()}
    for sentence, label in zip(train, labels):
        counts[label].update(set(sentence.split()))
    for word in POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEGATIONS:
        assert counts[0][word] > 0 and counts[1][word] > 0, word
    # Negated sentences and positive adjectives are each about half of both classes.
    for label in (0, 1):
        n = labels.count(label)
        negated = sum(counts[label][w] for w in NEGATIONS)
        positive = sum(counts[label][w] for w in POSITIVE_ADJECTIVES)
        assert 0.4 < negated / n < 0.6
        assert 0.4 < positive / n < 0.6


def test_bag_of_words_is_near_chance(default_data):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, y_train = _read(default_data, "train")
    dev, y_dev = _read(default_data, "dev")
    vectorizer = CountVectorizer(token_pattern=r"\S+")
    clf = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train), y_train)
    accuracy = clf.score(vectorizer.transform(dev), y_dev)
    assert accuracy < 0.65, accuracy
    # The two rule features, combined by XOR, are exact.
    rule = [synthetic_label(s) for s in dev]
    assert rule == y_dev


def test_lengths_vary(default_data):
    train, _ = _read(default_data, "train")
    lengths = [sum(w not in {",", "."} for w in s.split()) for s in train]
    assert MIN_WORDS <= min(lengths) <= 7
    assert 25 <= max(lengths) <= MAX_WORDS
    assert len(set(lengths)) >= 15


def test_invalid_sizes_raise(tmp_path):
    with pytest.raises(BertAccumError, match="n_train"):
        generate_synthetic_glue(str(tmp_path), n_train=1)
    with pytest.raises(BertAccumError, match="n_dev"):
        generate_synthetic_glue(str(tmp_path), n_dev=0)
    with pytest.raises(BertAccumError, match="not a synthetic sentence"):
        synthetic_label("the movie was good and bad .")


def test_script_writes_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "glue"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "scripts", "make_synthetic.py"), "--output_dir", str(out)]
    proc = subprocess.run(
        cmd + ["--n_train", "40", "--n_dev", "10", "--seed", "3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out / SYNTHETIC_DIRNAME) in proc.stdout
    assert _bytes(str(out)) == _bytes(generate_synthetic_glue(str(tmp_path / "lib"), n_train=40, n_dev=10, seed=3))
    bad = subprocess.run(cmd + ["--n_train", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


PINNED_SHA256 = "deab4fa165981cdedb056fd7c59ff690fea7532661d279af48c9e5132badcb54"
