"""`ExactAccumulationTrainer` against the stock `transformers.Trainer` on a tiny BERT built in code (CPU, seconds).

Each run trains a fresh copy of the same tiny model and captures the accumulated gradient of every optimizer
step (after the window's last backward, before the optimizer step and zero_grad). Runs are cached per
configuration, so the (8, 1) reference is trained once and shared by the tests.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments)

from bert_accum.errors import BertAccumError
from bert_accum.integrations import ExactAccumulationTrainer

GRID = [(8, 1), (4, 2), (2, 4), (1, 8)]
VOCAB, PAD, CLS, SEP, MASK = 40, 0, 2, 3, 4
TOL = 1e-5  # relative L2, fp32


def _dataset(n: int, mlm: bool = False, regression: bool = False) -> Dataset:
    """n examples of 4..13 tokens with ids 1000 + 7i; masked-LM rows predict 1..3 tokens each."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = [CLS] + torch.randint(5, VOCAB, (length - 2,), generator=g).tolist() + [SEP]
        row = {"idx": 1000 + 7 * i, "attention_mask": [1] * length}
        if mlm:
            labels = [-100] * length
            for pos in (torch.randperm(length - 2, generator=g)[: 1 + i % 3] + 1).tolist():
                labels[pos], ids[pos] = ids[pos], MASK
            row["labels"] = labels  # masked once, in the data: the comparison is of the same targets
        else:
            row["label"] = (i % 5) / 4 if regression else i % 2
        row["input_ids"] = ids
        rows.append(row)
    return Dataset.from_list(rows)


class _Collate:
    """Pads a micro-batch to its own longest row (dynamic padding) and records the example ids it saw."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)

        def pad(key, fill):
            return torch.tensor([f[key] + [fill] * (longest - len(f[key])) for f in features])

        batch = {"input_ids": pad("input_ids", PAD), "attention_mask": pad("attention_mask", 0)}
        mlm = "labels" in features[0]
        batch["labels"] = pad("labels", -100) if mlm else torch.tensor([f["label"] for f in features])
        if "idx" in features[0]:
            batch["idx"] = torch.tensor([f["idx"] for f in features])
            self.seen += batch["idx"].tolist()
        return batch


def _model(mlm: bool, p: float, regression: bool = False):
    torch.manual_seed(0)  # the same weights for every run
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=p,
                        attention_probs_dropout_prob=p, pad_token_id=PAD,
                        num_labels=1 if regression else 2)
    return (BertForMaskedLM if mlm else BertForSequenceClassification)(config)


class _GrabGradient(TrainerCallback):
    """The accumulated gradient of every optimizer step (clipping, if on, has already acted)."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten()
                                     for q in model.parameters()]).detach().clone())


@functools.lru_cache(maxsize=None)
def _run(b: int, n: int, *, stock: bool = False, mlm: bool = False, regression: bool = False, p: float = 0.1,
         examples: int = 8, seed: int = 0, max_grad_norm: float = 0.0, **options) -> dict:
    """Train one epoch of `examples` at (B, N) with SGD; return gradients, logs and the order of example ids."""
    grab, collate = _GrabGradient(), _Collate()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=b, gradient_accumulation_steps=n, num_train_epochs=1,
            optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=max_grad_norm, seed=seed,
            data_seed=0, logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0, save_strategy="no",
            remove_unused_columns=False, disable_tqdm=True,
        )
        cls, extra = (Trainer, {}) if stock else (ExactAccumulationTrainer, options)
        trainer = cls(model=_model(mlm, p, regression), args=args, train_dataset=_dataset(examples, mlm, regression),
                      data_collator=collate, callbacks=[grab], **extra)
        trainer.train()
    logs = [row for row in trainer.state.log_history if "grad_norm" in row]
    return {"grads": grab.grads, "logs": logs, "order": collate.seen[:examples], "seen": collate.seen}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _worst(runs: list[dict], step: int = 0) -> float:
    ref = runs[0]
    assert all(r["order"] == ref["order"] for r in runs), "the sampler gave (B, N) different examples"
    return max(_rel(r["grads"][step], ref["grads"][step]) for r in runs[1:])


def test_exact_trainer_with_standard_dropout_and_n_1_is_the_stock_trainer():
    """Only the accumulation arithmetic changes: at N = 1 with torch's dropout both trainers agree bit for bit."""
    assert torch.equal(_run(8, 1, dropout="standard")["grads"][0], _run(8, 1, stock=True)["grads"][0])


def test_stock_trainer_factor_is_recorded(record_property):
    """Stock Trainer, dropout 0: (2, 4) vs (8, 1). Upstream may fix it, so the factor is reported, not pinned."""
    big, acc = _run(8, 1, stock=True, p=0.0), _run(2, 4, stock=True, p=0.0)
    assert acc["order"] == big["order"]
    ratio = float(acc["grads"][0].norm() / big["grads"][0].norm())
    loss_ratio = acc["logs"][0]["loss"] / big["logs"][0]["loss"]
    record_property("stock_trainer_grad_ratio", ratio)
    record_property("transformers_version", transformers.__version__)
    print(f"\nstock Trainer (transformers {transformers.__version__}): |g(2,4)|/|g(8,1)| = {ratio:.6f}, "
          f"logged loss ratio {loss_ratio:.6f}")
    assert ratio == pytest.approx(1.0, rel=1e-4) or ratio == pytest.approx(4.0, rel=1e-4)
    assert loss_ratio == pytest.approx(ratio, rel=1e-4)  # the logged loss carries the same factor


def test_exact_trainer_matches_the_large_batch_with_invariant_dropout(record_property):
    worst = _worst([_run(b, n) for b, n in GRID])
    record_property("worst_rel_l2_classification", worst)
    print(f"\nclassification, invariant dropout 0.1, dynamic padding: worst relative L2 {worst:.2e}")
    assert worst < TOL


def test_exact_trainer_window_padding_matches_too():
    assert _worst([_run(8, 1, padding="window"), _run(2, 4, padding="window"), _run(1, 8, padding="window")]) < TOL


def test_short_last_window_is_weighted_by_its_real_size(record_property):
    """12 examples at B·N = 8: the second window holds 4; compare the gradient of step 2."""
    runs = [_run(b, n, examples=12) for b, n in GRID]
    assert all(len(r["grads"]) == 2 for r in runs)
    worst = max(_worst(runs, step=0), _worst(runs, step=1))
    record_property("worst_rel_l2_short_window", worst)
    print(f"\nshort last window (12 examples, E=8): worst relative L2 {worst:.2e}")
    assert worst < TOL


def test_masked_lm_global_normalisation_matches_and_mean_of_means_does_not(record_property):
    worst = _worst([_run(b, n, mlm=True) for b, n in GRID])
    mom = _worst([_run(8, 1, mlm=True, loss_normalization="mean_of_means"),
                  _run(2, 4, mlm=True, loss_normalization="mean_of_means")])
    record_property("worst_rel_l2_mlm_global", worst)
    record_property("rel_l2_mlm_mean_of_means", mom)
    print(f"\nmasked-LM: global worst relative L2 {worst:.2e}; mean_of_means (2,4) vs (8,1) {mom:.2e}")
    assert worst < TOL
    assert mom > 1e-2  # micro-batches predict different numbers of tokens


def test_regression_head_matches_too():
    assert _worst([_run(8, 1, regression=True), _run(2, 4, regression=True)]) < TOL


def test_standard_dropout_drifts_by_the_seed_floor():
    """With torch's dropout RNG the (2, 4) vs (8, 1) difference is as large as changing the dropout seed."""
    drift = _rel(_run(2, 4, dropout="standard")["grads"][0], _run(8, 1, dropout="standard")["grads"][0])
    floor = _rel(_run(8, 1, dropout="standard", seed=1)["grads"][0], _run(8, 1, dropout="standard")["grads"][0])
    print(f"\nstandard dropout: (2,4) vs (8,1) {drift:.3f}, two seeds of (8,1) {floor:.3f}")
    assert _run(8, 1, dropout="standard", seed=1)["order"] == _run(8, 1, dropout="standard")["order"]
    assert drift > 1e-3 and floor / 5 < drift < floor * 5


def test_logged_loss_and_grad_norm_are_the_windows():
    run = _run(2, 4)
    log = run["logs"][0]
    assert log["grad_norm"] == pytest.approx(float(run["grads"][0].norm()), rel=1e-6)
    # the window loss by hand: one forward of the 8 examples with the same invariant masks, mean over examples
    from bert_accum.controls.dropout import DropoutController

    model = _model(mlm=False, p=0.1).train()
    ctl = DropoutController(model, "invariant", seed=0)
    batch = _Collate()(_dataset(8).to_list())
    order = torch.tensor(run["order"])
    rows = [batch["idx"].tolist().index(i) for i in run["order"]]
    ctl.set_batch(order, 0)
    logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"][rows]).item()
    assert log["loss"] == pytest.approx(expected, rel=1e-5)


def test_logged_grad_norm_is_taken_before_clipping():
    clipped = _run(2, 4, max_grad_norm=1e-3)
    assert float(clipped["grads"][0].norm()) == pytest.approx(1e-3, rel=1e-4)
    assert clipped["logs"][0]["grad_norm"] == pytest.approx(_run(2, 4)["logs"][0]["grad_norm"], rel=1e-6)


def _trainer(out, dataset, remove_unused_columns: bool):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=remove_unused_columns)
    return ExactAccumulationTrainer(model=_model(False, 0.1), args=args, train_dataset=dataset, data_collator=_Collate())


@pytest.mark.parametrize("case", ["removed_by_trainer", "missing_from_dataset"])
def test_missing_id_column_gives_one_clear_error(tmp_path, case):
    data = _dataset(8)
    if case == "missing_from_dataset":
        data = data.remove_columns("idx")
    trainer = _trainer(tmp_path, data, remove_unused_columns=case == "removed_by_trainer")
    with pytest.raises(BertAccumError) as err:
        trainer.train()
    message = str(err.value)
    assert "'idx'" in message and "remove_unused_columns=False" in message
    if case == "removed_by_trainer":
        assert "remove_unused_columns=True" in message
    assert "\n" not in message


def test_id_column_never_reaches_the_forward_and_eval_works(tmp_path):
    trainer = _trainer(tmp_path, _dataset(8), remove_unused_columns=False)
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    trainer.train()
    metrics = trainer.evaluate(_dataset(4))
    assert seen and all("idx" not in keys for keys in seen)
    assert metrics["eval_loss"] > 0


def test_lazy_top_level_import():
    import bert_accum

    assert bert_accum.ExactAccumulationTrainer is ExactAccumulationTrainer
    code = "import sys, bert_accum; assert 'transformers' not in sys.modules, 'import bert_accum imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- two processes ------------------------------------------------------------------------------------------------
W2_RUNS = {"cls_short_window": {"examples": 12}, "mlm_global": {"mlm": True}}  # each at (B, N, W) = (2, 2, 2)


def test_two_processes_reproduce_one_process(tmp_path):
    """torchrun starts two gloo ranks (this file is the worker); (2, 2, W=2) must equal (8, 1, W=1) at every step."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    root = str(Path(__file__).resolve().parents[1])
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), __file__, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, options in W2_RUNS.items():
        single = _run(8, 1, **options)
        ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["world_size"] == 2 and ranks[0]["logs"] == ranks[1]["logs"]
        # the union of the ranks' first window is the single process's first window
        assert sorted(ranks[0]["seen"][:4] + ranks[1]["seen"][:4]) == sorted(single["order"][:8])
        grads = torch.load(tmp_path / f"{name}.grads.pt")
        assert len(grads) == len(single["grads"])
        for step, (g2, g1) in enumerate(zip(grads, single["grads"])):
            assert _rel(g2, g1) < TOL, (name, step)
            for key in ("loss", "grad_norm"):  # logged on rank 0 from the all-reduced window
                assert ranks[0]["logs"][step][key] == pytest.approx(single["logs"][step][key], rel=1e-5)


if __name__ == "__main__":  # the worker of test_two_processes_reproduce_one_process, one per rank
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for name, options in W2_RUNS.items():
        run = _run(2, 2, **options)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        record = {"world_size": world, "logs": run["logs"], "seen": run["seen"]}
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            torch.save(run["grads"], out / f"{name}.grads.pt")
    torch.distributed.destroy_process_group()  # a rank that exits with the gloo group alive can abort at teardown
