"""The throughput benchmark (bert_accum.study.bench, scripts/bench.py) on a tiny BERT and the synthetic task.

One benchmark run (2 rounds x 2 optimizer steps, B=2, N=2) is shared by the tests below; they check
the report's header and rows, and that the contenders really did comparable work in every round.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import runpy
import sys
from pathlib import Path

import pytest

from bert_accum.study.bench import BenchConfig, fit_flop_model, count_training_flops, render_markdown, run_bench
from bert_accum.errors import BertAccumError
from bert_accum.core.records import git_commit

REPO = Path(__file__).resolve().parents[1]
B, N, S, ROUNDS, LOW = 2, 2, 2, 2, 1  # LOW: rounds of the bf16 contenders


@pytest.fixture(scope="module")
def bench(tiny_model_dir, synthetic_glue_dir):
    """(BenchResult, markdown) of one small benchmark: fp32 and bf16, memory probes at (4, 1)."""
    cfg = BenchConfig(
        task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir, max_length=32,
        micro_batch_size=B, accumulation_steps=N, rounds=ROUNDS, low_precision_rounds=LOW, steps_per_round=S, warmup_steps=1,
        precisions=["fp32", "bf16"], memory_configs=["4x1"], matmul_size=128, matmul_reps=2, threads=1,
        cpu=True, command="python scripts/bench.py --test",
    )
    result = run_bench(cfg, log=lambda msg: None)
    return result, render_markdown(result)


def test_report_header_names_command_commit_and_machine(bench):
    _, md = bench
    head = md.splitlines()[:12]
    assert head[0].startswith("# ")
    assert "- command: `python scripts/bench.py --test`" in head
    assert f"- git commit: `{git_commit() or 'unknown'}`" in head
    device = next(line for line in head if line.startswith("- device:"))
    assert "CPU:" in device and "torch threads: 1" in device
    assert any(line.startswith("- torch ") for line in head)
    assert any("avx512_bf16" in line and "amx_bf16" in line for line in head)


def test_report_has_every_required_row_with_finite_numbers(bench):
    result, md = bench
    summary = md.split("## Summary", 1)[1].split("## Contenders", 1)[0]
    for row in ("| bert_accum / plain, records on, fp32 |", "| record overhead |", "| invariant-dropout overhead |",
                "| window-padding overhead |", "| bf16 speed-up, bert_accum |", "| bf16 speed-up, plain |",
                "| achieved FLOP/s", "| matmul peak, fp32 |", "| peak memory"):
        assert row in summary, row
    for section in ("## What is timed", "## Contenders", "## Peak memory per (B, N)", "## FLOPs", "## Rounds"):
        assert section in md
    assert not re.search(r"\b(nan|inf)\b", md, re.IGNORECASE)
    for comp in result.comparisons:
        assert len(comp.values) == (LOW if "bf16" in comp.quantity else ROUNDS), comp.quantity
        assert all(math.isfinite(v) for v in comp.values), comp.quantity
    ratios = [c for c in result.comparisons if c.unit == "ratio"]
    assert all(v > 0 for c in ratios for v in c.values)
    assert all(v["best_gflops"] > 0 and math.isfinite(v["best_gflops"]) for v in result.matmul.values())
    assert [(m.loop, m.micro_batch_size, m.accumulation_steps) for m in result.memory] == [("bert_accum", 4, 1), ("plain", 4, 1)]
    assert all(m.peak_rss_mb >= m.baseline_rss_mb > 0 for m in result.memory)
    for res in result.contenders:
        assert len(res.rounds) == (LOW if "bf16" in res.contender.name else ROUNDS), res.contender.name
        assert [rec.round for rec in res.rounds] == list(range(len(res.rounds)))  # the first rounds, paired by index
        for rec in res.rounds:
            for value in (rec.seconds, rec.examples_per_second, rec.tokens_per_second, rec.flops_per_second):
                assert value > 0 and math.isfinite(value), res.contender.name


def test_every_contender_trains_the_same_examples_and_tokens_per_round(bench):
    result, _ = bench
    assert not multiprocessing.active_children()  # every contender's and probe's process has ended
    names = {res.contender.name for res in result.contenders}
    assert {"plain fp32", "bert_accum fp32", "bert_accum light fp32", "plain bf16", "bert_accum bf16",
            "bert_accum fp32 dropout=invariant", "bert_accum fp32 padding=window"} == names
    for r in range(ROUNDS):
        recs = {res.contender.name: res.rounds[r] for res in result.contenders if r < len(res.rounds)}
        assert {rec.examples for rec in recs.values()} == {S * B * N}
        assert len({rec.real_tokens for rec in recs.values()}) == 1  # the same examples, however grouped
        # window padding pads every micro-batch to its window's longest example, dynamic to its own
        assert recs["bert_accum fp32 padding=window"].padded_tokens >= recs["bert_accum fp32"].padded_tokens
    # successive rounds cover different windows of the plan
    first = result.result("bert_accum fp32").rounds
    assert first[0].shapes != first[1].shapes or first[0].real_tokens != first[1].real_tokens


def test_plain_loop_takes_one_optimizer_step_per_n_micro_steps(bench):
    result, _ = bench
    for res in result.contenders:
        for rec in res.rounds:
            assert rec.optimizer_steps == S, res.contender.name  # updates counted by an optimizer step hook
            assert rec.micro_steps == N * rec.optimizer_steps, res.contender.name
            assert all(b == B for b, _ in rec.shapes)


def test_rounds_alternate_order_and_flops_are_counted_exactly(bench, tiny_model_dir):
    result, _ = bench
    # round 2 runs the fp32 contenders only (LOW = 1), in the reverse order of round 1
    assert result.orders[1] == [name for name in result.orders[0][::-1] if "bf16" not in name]
    fm = result.flop_models["main"]
    assert fm.verified
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, attn_implementation="eager")
    assert count_training_flops(model, 2, 40) == pytest.approx(fm(2, 40), rel=1e-12)
    for res in result.contenders:
        for rec in res.rounds:
            assert rec.flops == pytest.approx(sum(fm(b, length) for b, length in rec.shapes))


def test_flop_polynomial_has_per_token_and_attention_terms(tiny_model_dir):
    fm = fit_flop_model(tiny_model_dir, num_labels=2)
    # tiny BERT: hidden 32, intermediate 64, 2 layers. Dense matmuls per token per layer, forward:
    # 2 * (4*32*32 + 2*32*64) = 16384 FLOPs; training is 3x forward, over 2 layers -> 98304 per token.
    assert fm.alpha == 98304
    # attention: q.k^T and p.v are 2 * 2 * L^2 * 32 FLOPs forward per layer -> 3 * 2 * 128 = 768 per token pair
    assert fm.beta == 768


def test_config_rejects_bad_memory_configs_and_too_many_rounds(tiny_model_dir, synthetic_glue_dir):
    with pytest.raises(BertAccumError, match="8x4"):
        BenchConfig(memory_configs=["8by4"]).validate()
    cfg = BenchConfig(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir,
                      micro_batch_size=8, accumulation_steps=4, rounds=3, steps_per_round=1, precisions=["fp32"],
                      memory_configs=[], matmul_size=64, matmul_reps=1, cpu=True)
    # 60 training examples hold one full window of 32: not enough for a warm-up step and three rounds
    with pytest.raises(BertAccumError, match="full windows"):
        run_bench(cfg, log=lambda msg: None)


def test_script_records_the_command_and_accepts_hf_flag_names(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py"])
    module = runpy.run_path(str(REPO / "scripts" / "bench.py"), run_name="bench_script")
    cfg = module["parse"](["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8",
                           "--memory_configs", "--output", "/tmp/x.md"])
    assert (cfg.micro_batch_size, cfg.accumulation_steps, cfg.memory_configs) == (4, 8, [])
    assert cfg.command.endswith("python scripts/bench.py --per_device_train_batch_size 4 "
                                "--gradient_accumulation_steps 8 --memory_configs --output /tmp/x.md")
