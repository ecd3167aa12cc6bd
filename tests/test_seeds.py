"""--seed, --data_seed and --dropout_seed each control one source of randomness and nothing else."""

from __future__ import annotations

import json

import torch

from bert_accum.core.config import TrainConfig
from bert_accum.core.records import read_jsonl
from bert_accum.core.train import run


def _run(tmp_path, name, model_dir, glue_dir, **overrides):
    """(per-step losses, the head's initial weights, the examples' token counts per step) of a 3-step run."""
    seen = {}

    def grab(model, step):
        if step == 1:  # before the first optimizer step: the weights are still the initial ones
            seen["head"] = model.classifier.weight.detach().clone()
            seen["rng"] = torch.get_rng_state()  # the standard-dropout stream after the first window's masks

    values = dict(task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, max_length=48,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=3,
                  learning_rate=1e-3, seed=3, disable_progress_bar=True, output_dir=str(tmp_path / name))
    values.update(overrides)
    run(TrainConfig(**values), before_optimizer_step=grab)
    rows = read_jsonl(tmp_path / name / "steps.jsonl")
    return [r["loss"] for r in rows], seen["head"], [r["real_tokens"] for r in rows], seen["rng"]


def test_dropout_seed_changes_only_the_dropout_masks(tmp_path, tiny_model_dir, synthetic_glue_dir):
    base = _run(tmp_path, "base", tiny_model_dir, synthetic_glue_dir)
    other = _run(tmp_path, "other", tiny_model_dir, synthetic_glue_dir, dropout_seed=11)
    assert torch.equal(base[1], other[1])  # same head
    assert base[2] == other[2]  # same examples in every window
    assert base[0] != other[0]  # other masks

    off = _run(tmp_path, "off", tiny_model_dir, synthetic_glue_dir, dropout="off")
    off_other = _run(tmp_path, "off_other", tiny_model_dir, synthetic_glue_dir, dropout="off", dropout_seed=11)
    assert off[0] == off_other[0]  # with no dropout the dropout seed changes nothing at all

    inv = _run(tmp_path, "inv", tiny_model_dir, synthetic_glue_dir, dropout="invariant")
    inv_other = _run(tmp_path, "inv_other", tiny_model_dir, synthetic_glue_dir, dropout="invariant", dropout_seed=11)
    assert torch.equal(inv[1], inv_other[1]) and inv[2] == inv_other[2] and inv[0] != inv_other[0]


def test_data_seed_changes_only_the_order_and_seed_only_the_head(tmp_path, tiny_model_dir, synthetic_glue_dir):
    base = _run(tmp_path, "base", tiny_model_dir, synthetic_glue_dir, dropout="off")
    order = _run(tmp_path, "order", tiny_model_dir, synthetic_glue_dir, dropout="off", data_seed=11)
    assert torch.equal(base[1], order[1]) and base[2] != order[2]

    head = _run(tmp_path, "head", tiny_model_dir, synthetic_glue_dir, dropout="off", seed=11, data_seed=3)
    assert not torch.equal(base[1], head[1]) and base[2] == head[2]


def test_an_explicit_dropout_seed_frees_the_masks_from_the_head_seed(tmp_path, tiny_model_dir, synthetic_glue_dir):
    """Standard dropout: with --dropout_seed given, another --seed changes the head but not the masks, which is
    what an initialisation-only floor needs; without it the masks continue the head's stream (today's records)."""
    ref = _run(tmp_path, "ref", tiny_model_dir, synthetic_glue_dir, data_seed=3, dropout_seed=3)
    init = _run(tmp_path, "init", tiny_model_dir, synthetic_glue_dir, seed=11, data_seed=3, dropout_seed=3)
    assert not torch.equal(ref[1], init[1]) and ref[2] == init[2]
    assert torch.equal(ref[3], init[3])  # the same mask stream, drawn the same number of times
    base = _run(tmp_path, "base", tiny_model_dir, synthetic_glue_dir)
    assert torch.equal(base[1], ref[1]) and not torch.equal(base[3], ref[3])
    derived = json.loads((tmp_path / "ref" / "config.json").read_text())["derived"]
    assert derived["seeds"] == {"seed": 3, "data_seed": 3, "dropout_seed": 3}
