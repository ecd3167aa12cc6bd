"""`scripts/finetune.py` end to end (in-process), resume equality, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from bert_accum.cli import finetune_main
from bert_accum.core.config import TrainConfig
from bert_accum.errors import BertAccumError
from bert_accum.core.data import write_glue_tsv
from bert_accum.core.records import read_jsonl
from bert_accum.core.train import run

REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds"}


def _args(model_dir, glue_dir, out, *extra):
    return ["--task_name", "synthetic", "--glue_dir", glue_dir, "--model_name_or_path", model_dir,
            "--output_dir", str(out), "--max_length", "48", "--disable_progress_bar", *extra]


def test_finetune_script_writes_self_describing_run_folder(tmp_path, tiny_model_dir, synthetic_glue_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["finetune.py", *_args(tiny_model_dir, synthetic_glue_dir, out, "--per_device_train_batch_size", "4",
                                  "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--eval_steps", "2")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "scripts" / "finetune.py"), run_name="__main__")
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "effective batch 8" in printed and "optimizer steps per epoch = ceil(60/8) = 8" in printed
    assert "total optimizer steps 5" in printed

    steps = read_jsonl(out / "steps.jsonl")
    assert [r["optimizer_step"] for r in steps] == [1, 2, 3, 4, 5]
    row = steps[0]
    assert row["micro_steps"] == 2 and row["examples"] == 8 and row["examples_seen"] == 8
    assert set(row["grad_norm_groups"]) == {"embeddings", "layer_0", "layer_1", "head"}
    total = sum(v * v for v in row["grad_norm_groups"].values()) ** 0.5
    assert row["grad_norm"] == pytest.approx(total)
    assert 0 < row["real_tokens"] <= row["padded_tokens"]
    assert [r["optimizer_step"] for r in read_jsonl(out / "eval.jsonl")] == [2, 4, 5]

    config = json.loads((out / "config.json").read_text())
    assert config["derived"]["effective_batch_size"] == 8 and config["derived"]["accumulation_steps"] == 2
    env = json.loads((out / "environment.json").read_text())
    assert env["num_processes"] == 1 and env["device"] == "cpu" and env["precision"] == "fp32"
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    # the CPU that ran it, as the kernels torch picked depend on it
    import torch
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu"]["logical_cpus"] >= 1 and env["cpu"]["model"] and "avx512_bf16" in env["cpu"]["flags"]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["synthetic_data"] is True
    assert final["examples_per_second"] > 0 and final["tokens_per_second"] > 0
    assert 0.0 <= final["eval"]["accuracy"] <= 1.0 and final["eval"]["num_examples"] == 24
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["optimizer_step"] == 5 and len(predictions["splits"]["validation"]) == 24
    assert set(predictions["splits"]["validation"]) <= {0, 1}


def test_effective_batch_size_derives_n(tmp_path, tiny_model_dir, synthetic_glue_dir):
    out = tmp_path / "run"
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--per_device_train_batch_size", "2",
                               "--effective_batch_size", "8", "--max_train_steps", "2")) == 0
    assert json.loads((out / "config.json").read_text())["derived"]["accumulation_steps"] == 4
    assert read_jsonl(out / "steps.jsonl")[0]["micro_steps"] == 4


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_writes_the_same_records_as_an_uninterrupted_run(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Standard (RNG) dropout on, so the RNG state must be restored too; killed after step 5, checkpoint at 4."""
    common = dict(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, max_length=48,
                  learning_rate=1e-3, checkpointing_steps="4", eval_steps=3, disable_progress_bar=True)
    run(TrainConfig(**common, output_dir=str(tmp_path / "full")))

    def kill_at_6(model, step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**common, output_dir=str(tmp_path / "cut")), before_optimizer_step=kill_at_6)
    assert len(read_jsonl(tmp_path / "cut" / "steps.jsonl")) == 5
    run(TrainConfig(**common, output_dir=str(tmp_path / "cut"), resume_from_checkpoint="latest"))

    full, cut = read_jsonl(tmp_path / "full" / "steps.jsonl"), read_jsonl(tmp_path / "cut" / "steps.jsonl")
    assert [r["optimizer_step"] for r in cut] == list(range(1, 17))
    assert _strip(cut) == _strip(full)
    assert read_jsonl(tmp_path / "cut" / "eval.jsonl") == read_jsonl(tmp_path / "full" / "eval.jsonl")


@pytest.fixture
def bad_glue(tmp_path):
    """A GLUE folder whose RTE train file has a label outside the task's label set."""
    root = tmp_path / "badglue"
    header = ["index", "sentence1", "sentence2", "label"]
    write_glue_tsv(str(root / "RTE" / "train.tsv"), header, [["0", "a b", "c d", "entailment"], ["1", "e", "f", "maybe"]])
    write_glue_tsv(str(root / "RTE" / "dev.tsv"), header, [["0", "a b", "c d", "entailment"]])
    write_glue_tsv(str(root / "SST-2" / "train.tsv"), ["sentence", "label"], [])
    write_glue_tsv(str(root / "SST-2" / "dev.tsv"), ["sentence", "label"], [["good", "1"]])
    return str(root)


BAD = {
    "unknown task": (["--task_name", "nope"], "unknown task"),
    "B below 1": (["--per_device_train_batch_size", "0"], "micro batch size B must be >= 1"),
    "N below 1": (["--gradient_accumulation_steps", "0"], "accumulation steps N must be >= 1"),
    "effective batch not divisible": (["--per_device_train_batch_size", "3", "--effective_batch_size", "8"], "not divisible"),
    "missing data folder": (["--glue_dir", "/nonexistent/glue"], "/nonexistent/glue"),
    "missing model folder": (["--model_name_or_path", "/nonexistent/model"], "model folder not found"),
    "max_length beyond positions": (["--max_length", "4096"], "exceeds the model's 128 positions"),
    "label outside set": (["--task_name", "rte", "GLUE"], "maybe"),
    "empty split": (["--task_name", "sst2", "GLUE"], "no data rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, tiny_model_dir, synthetic_glue_dir, bad_glue, capsys):
    extra, expected = BAD[case]
    glue = bad_glue if "GLUE" in extra else synthetic_glue_dir
    extra = [e for e in extra if e != "GLUE"]
    out = tmp_path / "out"
    args = _args(tiny_model_dir, glue, out, "--max_train_steps", "2")
    # later flags win in argparse, so the bad value overrides the good default above
    code = finetune_main(args + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and expected in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_existing_output_dir_needs_overwrite(tmp_path, tiny_model_dir, synthetic_glue_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--max_train_steps", "1")) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--max_train_steps", "1", "--overwrite_output_dir")) == 0
    assert not (out / "keep.txt").exists()


def test_malformed_data_file(tmp_path, tiny_model_dir, capsys):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("sentence,label\nfine,1\n")
    dev.write_text("sentence,label\nfine,notalabel\n")
    code = finetune_main(["--task_name", "sst2", "--train_file", str(train), "--validation_file", str(dev),
                          "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"), "--max_length", "32"])
    assert code == 2 and "notalabel" in capsys.readouterr().err


def test_non_finite_loss_stops_and_records_where(tmp_path, tiny_model_dir, synthetic_glue_dir, capsys):
    out = tmp_path / "nan"
    code = finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--learning_rate", "1e30",
                               "--max_grad_norm", "0", "--max_train_steps", "6", "--per_device_train_batch_size", "4",
                               "--gradient_accumulation_steps", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss" in err and "optimizer step" in err
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["status"] == "non_finite_loss"
    assert final["optimizer_step"] == len(read_jsonl(out / "steps.jsonl")) + 1


def test_script_error_has_no_traceback(tmp_path):
    """The real entry point in a subprocess: one line on stderr, exit status 2."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), "--task_name", "nope", "--output_dir",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown task 'nope'; choose one of: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, synthetic"]


def test_tensorboard_tracking(tmp_path, tiny_model_dir, synthetic_glue_dir):
    out = tmp_path / "tracked"
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--max_train_steps", "2", "--with_tracking",
                               "--report_to", "tensorboard")) == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


def test_max_train_examples_sizes_steps_by_effective_batch_and_eval_steps_fraction(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """20 examples: 5 steps at E=4, 3 at E=8 (ceil); eval_steps 0.5 evaluates half-way and at the end."""
    for b, n, steps, evals in ((4, 1, 5, [3, 5]), (2, 4, 3, [2, 3])):
        out = tmp_path / f"B{b}_N{n}"
        assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--per_device_train_batch_size", str(b),
                                   "--gradient_accumulation_steps", str(n), "--max_train_examples", "20",
                                   "--eval_steps", "0.5")) == 0
        assert [r["optimizer_step"] for r in read_jsonl(out / "steps.jsonl")] == list(range(1, steps + 1))
        assert [r["optimizer_step"] for r in read_jsonl(out / "eval.jsonl")] == evals
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, tmp_path / "x", "--max_train_examples", "20",
                               "--max_train_steps", "2")) == 2
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, tmp_path / "y", "--eval_steps", "2.5")) == 2


def test_study_names_are_flags_yaml_keys_and_record_columns(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """--micro_batch_size/--accumulation_steps work as the HF flags do; each step row names B, N, W and the
    cumulative micro_step."""
    out = tmp_path / "run"
    assert finetune_main(_args(tiny_model_dir, synthetic_glue_dir, out, "--micro_batch_size", "2",
                               "--accumulation_steps", "3", "--max_train_steps", "2")) == 0
    rows = read_jsonl(out / "steps.jsonl")
    assert [(r["micro_batch_size"], r["accumulation_steps"], r["num_processes"]) for r in rows] == [(2, 3, 1)] * 2
    assert [r["micro_step"] for r in rows] == [3, 6]
    assert TrainConfig.from_dict({"micro_batch_size": 4, "accumulation_steps": 2}).per_device_train_batch_size == 4
    with pytest.raises(BertAccumError):
        TrainConfig.from_dict({"micro_batch_size": 4, "per_device_train_batch_size": 8})


def test_own_csv_with_own_labels_trains_without_task_name(tmp_path, tiny_model_dir, capsys):
    """A user's CSV with a `sentiment: pos/neg` column: labels inferred from the training file, no --task_name,
    the saved model names its classes."""
    rows = [("the movie was good", "pos"), ("the plot was bad", "neg"), ("the cast was great", "pos"),
            ("the ending was dull", "neg")] * 4
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("review,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows))
    dev.write_text("review,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows[:4]))
    out = tmp_path / "own"
    assert finetune_main(["--train_file", str(train), "--validation_file", str(dev), "--label_column_name", "sentiment",
                          "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--max_length", "16",
                          "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--save_final_model",
                          "--disable_progress_bar"]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["task"] == "custom" and final["label_names"] == ["neg", "pos"] and final["main_metric"] == "accuracy"
    assert final["eval"]["num_examples"] == 4
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}
    # the same file under --task_name sst2 is refused: its labels are not SST-2's
    assert finetune_main(["--task_name", "sst2", "--train_file", str(train), "--validation_file", str(dev),
                          "--label_column_name", "sentiment", "--model_name_or_path", tiny_model_dir,
                          "--output_dir", str(tmp_path / "sst2")]) == 2
    assert "not in the label set of task sst2" in capsys.readouterr().err


def test_no_task_name_and_no_files_is_still_an_error(capsys):
    assert finetune_main(["--output_dir", "/tmp/never"]) == 2
    assert "--task_name is required (or give --train_file/--validation_file" in capsys.readouterr().err


@pytest.mark.parametrize("env,flags,expected", [
    (None, [], "fp32"),
    ("bf16", [], "bf16"),                       # accelerate launch --mixed_precision bf16, or a bf16 config
    ("no", [], "fp32"),
    ("bf16", ["--precision", "fp32"], "fp32"),  # the flag wins, with a note
    (None, ["--mixed_precision", "bf16"], "bf16"),
])
def test_precision_follows_accelerate_unless_given(monkeypatch, capsys, env, flags, expected):
    from bert_accum.core.config import parse_args

    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    assert parse_args(["--task_name", "rte", *flags]).precision == expected
    assert ("overrides accelerate's mixed precision" in capsys.readouterr().err) == (flags == ["--precision", "fp32"])


def test_unsupported_accelerate_precision_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert finetune_main(["--task_name", "rte", "--output_dir", "/tmp/never"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ACCELERATE_MIXED_PRECISION=fp8")


def test_accelerate_launch_bf16_is_obeyed_and_recorded(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """`accelerate launch --mixed_precision bf16 -m bert_accum.cli ...`: the run is bf16 and says so."""
    out = tmp_path / "bf16"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "bert_accum.cli",
           *_args(tiny_model_dir, synthetic_glue_dir, out, "--max_train_steps", "1", "--token", "hf_secret123")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    environment = json.loads((out / "environment.json").read_text())
    assert environment["precision"] == "bf16" and environment["accelerate_mixed_precision"] == "bf16"
    assert "hf_secret123" not in "".join(p.read_text() for p in out.glob("*.json"))  # --token never recorded


def test_disable_progress_bar_silences_every_bar(tmp_path, tiny_model_dir, synthetic_glue_dir, capfd):
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    common = _args(tiny_model_dir, synthetic_glue_dir, tmp_path / "a", "--max_train_steps", "1")
    common.remove("--disable_progress_bar")
    assert finetune_main(common + ["--cache_dir", str(tmp_path / "c1")]) == 0
    shown = capfd.readouterr().err
    assert "Loading weights" in shown and "tokenizing" in shown  # the bars the flag must silence do exist
    quiet = _args(tiny_model_dir, synthetic_glue_dir, tmp_path / "b", "--max_train_steps", "1", "--cache_dir",
                  str(tmp_path / "c2"))
    assert finetune_main(quiet) == 0
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s" not in err and "examples/s" not in err, err


@pytest.mark.parametrize("objective", ["classification", "mlm"])
def test_evaluation_batches_by_length_and_reports_in_dev_order(objective, tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Evaluation sorts the dev set by length so that batches pad little; predictions come back in dev order;
    masked-LM totals do not depend on the batching."""
    from types import SimpleNamespace

    import torch

    from bert_accum.core.setup import setup
    from bert_accum.core.train import _eval_loaders, _evaluate, make_accelerator

    cfg = TrainConfig(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir, max_length=48,
                      seed=3, objective=objective, per_device_eval_batch_size=5, output_dir=str(tmp_path / "run"))
    accelerator = make_accelerator(cfg)
    s = setup(cfg, 1, accelerator)
    loaders = _eval_loaders(s.tokenized, s.task, s.tokenizer, cfg, accelerator)
    (split, (_, _, order)), = loaders.items()
    dev = s.tokenized[split]
    lengths = [len(x) for x in dev["input_ids"]]
    assert order != list(range(len(dev))) and [lengths[i] for i in order] == sorted(lengths)
    if objective == "mlm":
        # the same totals as from the dev set in file order, five at a time
        metrics = _evaluate(s.model, loaders, s.task, s.kind, accelerator, cfg, s.dropout)
        file_order = {split: ("mlm", loaders[split][1], list(range(len(dev))))}
        again = _evaluate(s.model, file_order, s.task, s.kind, accelerator, cfg, s.dropout)
        assert again["masked_accuracy"] == metrics["masked_accuracy"]
        assert again["mlm_loss"] == pytest.approx(metrics["mlm_loss"], rel=1e-6)
        return

    class LengthParity(torch.nn.Module):
        """Predicts the parity of an example's token count: any mix-up of the order shows."""

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            n = attention_mask.sum(-1)
            return SimpleNamespace(logits=torch.stack([(n % 2 == 0).float(), (n % 2).float()], -1))

    predictions: dict[str, list] = {}
    _evaluate(LengthParity(), loaders, s.task, s.kind, accelerator, cfg, s.dropout, predictions)
    assert predictions[split] == [n % 2 for n in lengths] and len(set(predictions[split])) == 2



@pytest.mark.parametrize("outcome", ["completed", "bad_input"])
def test_finetune_leaves_the_process_group_it_ran_in(tmp_path, tiny_model_dir, synthetic_glue_dir, outcome):
    """A launched rank ends with its process group destroyed, after a completed run and after an error: a gloo rank
    that exits with the group alive can abort at teardown and turn a completed run into a failed exit code."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        extra = ("--max_train_steps", "1") if outcome == "completed" else ("--learning_rate", "nan")
        code = finetune_main(_args(tiny_model_dir, synthetic_glue_dir, tmp_path / "run", *extra))
        assert code == (0 if outcome == "completed" else 2)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
