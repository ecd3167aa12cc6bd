"""The gradient probe (bert_accum.study.probe, scripts/probe.py) on a tiny BERT with dropout 0.1 and the synthetic task."""

from __future__ import annotations

import csv
import os
import runpy
import sys
from pathlib import Path

import pytest

from bert_accum.cli import guarded
from bert_accum.study.probe import ARMS, COLUMNS, STEP_COLUMNS, ProbeConfig, run_probe

from conftest import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
GRID_B = [8, 4, 2, 1]  # E = 8: (8,1) is the reference, (4,2), (2,4), (1,8) are compared with it


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory) -> str:
    """`build_tiny_model` (dropout 0.1, 2 layers) whose tokenizer knows the synthetic task's words.

    Under transformers 5 `BertTokenizerFast(vocab_file=...)` ignores the file and keeps only the five
    special tokens, so every word becomes [UNK] and MLM has nothing to mask (special tokens, [UNK]
    included, are never masked). If that happens, the tokenizer is rebuilt from the same vocab.txt and
    the model re-created with the matching vocabulary size.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny_words"), dropout=0.1, layers=2)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.unk_token_id in tok("the plot remains lovely")["input_ids"]:
        tok = BertTokenizer(vocab=os.path.join(folder, "vocab.txt"), do_lower_case=True)
        assert tok.unk_token_id not in tok("the plot remains lovely")["input_ids"]
        tok.save_pretrained(folder)
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1)
        BertModel(config).save_pretrained(folder)
    return folder


def _probe(tmp_path, model_dir, glue_dir, **kw):
    cfg = ProbeConfig(task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, effective_batch_size=8,
                      micro_batch_sizes=GRID_B, max_length=48, seed=3, output_dir=str(tmp_path / "probe"), quiet=True,
                      command="test", **kw)
    return run_probe(cfg)


def _rows(result, arm):
    rows = [r for r in result.rows if r["arm"] == arm]
    assert [(r["micro_batch_size"], r["accumulation_steps"]) for r in rows] == [(4, 2), (2, 4), (1, 8)]
    return rows


def test_controlled_arm_matches_the_full_batch_with_dropout_on(tmp_path, word_model_dir, synthetic_glue_dir):
    """Invariant dropout (p=0.1), window padding, global loss: (4,2), (2,4), (1,8) reproduce (8,1)."""
    result = _probe(tmp_path, word_model_dir, synthetic_glue_dir, arms=["controlled", "controlled_fp64"])
    for row in _rows(result, "controlled"):
        assert row["rel_l2"] < 1e-5 and row["cosine"] > 1 - 1e-9 and row["max_group_rel"] < 1e-4
        assert row["seed_floor_rel_l2"] > 1e-2  # dropout is really on: another dropout seed moves the gradient
        assert row["ratio_to_floor"] < 1e-3
    for row in _rows(result, "controlled_fp64"):
        assert row["rel_l2"] < 1e-10 and row["max_group_rel"] < 1e-9
        assert row["max_group"] in {"embeddings", "layer_0", "layer_1", "head"}


def test_standard_dropout_difference_is_the_size_of_the_seed_floor(tmp_path, word_model_dir, synthetic_glue_dir):
    """With torch-RNG dropout, accumulating differs from (8,1) about as much as another dropout seed does."""
    result = _probe(tmp_path, word_model_dir, synthetic_glue_dir, arms=["default", "controlled_dropout_standard"])
    for arm in ("default", "controlled_dropout_standard"):
        for row in _rows(result, arm):
            assert row["rel_l2"] > 1e-2
            assert 0.3 < row["ratio_to_floor"] < 3, row


def _masked_counts(model_dir, glue_dir, b, n):
    """Predicted tokens per micro-batch of the probed window (the probe's own data pieces, seed 3)."""
    from datasets import DatasetDict

    from bert_accum.core.data import load_raw_splits
    from bert_accum.core.features import Collator, InMemorySplit, tokenize_splits
    from bert_accum.core.modeling import load_tokenizer_and_model
    from bert_accum.core.tasks import get_task
    from bert_accum.core.windows import WindowPlan, window_examples

    task = get_task("synthetic")
    tokenizer, _ = load_tokenizer_and_model(model_dir, task, "mlm")
    raw = load_raw_splits(task, glue_dir=glue_dir)
    split = InMemorySplit.from_dataset(tokenize_splits(DatasetDict({"train": raw["train"]}), tokenizer, 48, False)["train"])
    window = WindowPlan(num_examples=len(split), micro_batch_size=b, accumulation_steps=n, seed=3).windows(0)[0]
    collate = Collator(split, tokenizer, "window", 48, mlm=True, seed=3)
    return [int((collate(m[0], window_examples(window), 0)["labels"] != -100).sum()) for m in window]


def test_mlm_global_normalisation_matches_and_mean_of_means_does_not(tmp_path, word_model_dir, synthetic_glue_dir):
    """Items are tokens: micro-batches hold different numbers of masked tokens, so the mean of micro-batch
    means weights tokens unequally, while the global token mean reproduces the full batch."""
    counts = _masked_counts(word_model_dir, synthetic_glue_dir, 2, 4)
    assert len(set(counts)) > 1, counts
    result = _probe(tmp_path, word_model_dir, synthetic_glue_dir, arms=["controlled", "controlled_loss_mean_of_means"],
                    objective="mlm")
    assert all(r["objective"] == "mlm" for r in result.rows)
    for row in _rows(result, "controlled"):
        assert row["rel_l2"] < 1e-5
    for row in _rows(result, "controlled_loss_mean_of_means"):
        assert row["rel_l2"] > 1e-3


def _read_csv(path):
    lines = path.read_text().splitlines()
    return lines[0], list(csv.DictReader(lines[1:]))


def test_script_writes_csv_and_markdown_with_header(tmp_path, word_model_dir, synthetic_glue_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["probe.py", "--task_name", "synthetic", "--glue_dir", synthetic_glue_dir, "--model_name_or_path",
            word_model_dir, "--effective_batch_size", "8", "--micro_batch_sizes", "8", "4", "2", "--max_length", "48",
            "--arms", "controlled", "controlled_bf16", "controlled_padding_dynamic", "--steps", "2",
            "--learning_rate", "1e-3", "--output_dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "scripts" / "probe.py"), run_name="__main__")
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "| task | objective | arm |" in printed and "total wall time" in printed

    header, rows = _read_csv(out / "probe.csv")
    assert header.startswith("# command: python ") and "--task_name synthetic" in header and "git_commit: " in header
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["arm"], r["micro_batch_size"], r["accumulation_steps"]) for r in rows] == [
        (arm, b, n) for arm in ("controlled", "controlled_bf16", "controlled_padding_dynamic") for b, n in (("4", "2"), ("2", "4"))]
    bf16 = [float(r["rel_l2"]) for r in rows if r["arm"] == "controlled_bf16"]
    assert all(0 < v < 0.1 for v in bf16)  # bf16 round-off: nonzero, far below a dropout reseed
    md = (out / "probe.md").read_text().splitlines()
    assert md[0].startswith("<!-- command: python ") and "git_commit: " in md[0] and md[0].endswith("-->")
    assert md[1] == "| " + " | ".join(COLUMNS) + " |"

    header, steps = _read_csv(out / "probe_steps.csv")
    assert header.startswith("# command: ") and list(steps[0]) == list(STEP_COLUMNS)
    assert {int(r["optimizer_step"]) for r in steps} == {1, 2}
    for r in steps:
        assert float(r["seed_floor_param_l2"]) > 0
        if r["arm"] == "controlled":
            assert float(r["rel_to_update"]) < 1e-3


@pytest.mark.parametrize("extra,message", [
    (["--micro_batch_sizes", "3"], "does not divide the effective batch size 8"),
    (["--arms", "nonsense"], "unknown arm(s) nonsense"),
])
def test_bad_input_is_one_line_error(tmp_path, word_model_dir, synthetic_glue_dir, capsys, extra, message):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import probe as script
    finally:
        sys.path.pop(0)
    argv = ["--task_name", "synthetic", "--glue_dir", synthetic_glue_dir, "--model_name_or_path", word_model_dir,
            "--effective_batch_size", "8", "--output_dir", str(tmp_path / "o"), *extra]  # default B: 8 4 2 1
    assert guarded(lambda: run_probe(script.parse(argv))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_every_arm_is_defined_once():
    assert {"default", "controlled", "controlled_dropout_standard", "controlled_padding_dynamic",
            "controlled_loss_mean_of_means", "controlled_fp64", "controlled_bf16"} <= set(ARMS)
    assert ARMS["controlled"].dropout == "invariant" and ARMS["default"].dropout == "standard"


def test_default_arms_leave_out_bf16_only_where_it_would_be_emulated(monkeypatch):
    from bert_accum.study import probe

    monkeypatch.setattr(probe, "cpu_has_bf16_matmul", lambda: False)
    assert probe.default_arms() == [a for a in probe.ARMS if a != "controlled_bf16"]
    monkeypatch.setattr(probe, "cpu_has_bf16_matmul", lambda: True)
    assert probe.default_arms() == list(probe.ARMS)
    assert ProbeConfig(task_name="rte").arms is None  # resolved when the probe runs
