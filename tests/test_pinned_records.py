"""Refactors preserve numbers: fixed tiny configurations must write the same per-step records as the commit
that pinned them (`tests/data/pinned_records.json`).

Regenerate the file only when a change of numbers is intended and explained in its commit:
`python tests/test_pinned_records.py --regenerate` (needs the repository's test fixtures, built in a temp folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bert_accum.core.config import TrainConfig
from bert_accum.core.records import read_jsonl
from bert_accum.core.train import run

PINNED = Path(__file__).parent / "data" / "pinned_records.json"
FIELDS = ("loss", "grad_norm", "grad_norm_groups", "learning_rate", "items", "examples", "micro_steps",
          "real_tokens", "padded_tokens", "clipped", "optimizer_step", "epoch", "examples_seen")
# Per-step records are compared to 1e-5 relative: a different dropout mask, order or normalisation moves
# them by 1e-2 or more, while another CPU's vector width may move float32 sums in the 7th digit.
RTOL = 1e-5

CONFIGS = {
    "standard_dropout": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=4),
    "controlled": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_train_steps=4,
                       dropout="invariant", padding="window", loss_normalization="global"),
    "mlm_invariant": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=3,
                          dropout="invariant", objective="mlm"),
    "short_last_window": dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, num_train_epochs=1,
                              max_grad_norm=0.05, warmup_ratio=0.25),
}


def _records(name: str, model_dir: str, glue_dir: str, out: Path) -> list[dict]:
    cfg = TrainConfig(task_name="synthetic", glue_dir=glue_dir, model_name_or_path=model_dir, max_length=48,
                      learning_rate=1e-3, seed=7, disable_progress_bar=True, output_dir=str(out / name),
                      **CONFIGS[name])
    run(cfg)
    return [{k: r[k] for k in FIELDS} for r in read_jsonl(out / name / "steps.jsonl")]


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=RTOL, abs=1e-12)
    return a == b


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_records_match_the_pinned_ones(name, tmp_path, tiny_model_dir, synthetic_glue_dir):
    expected = json.loads(PINNED.read_text())[name]
    got = _records(name, tiny_model_dir, synthetic_glue_dir, tmp_path)
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        assert _close(g, e), f"{name}, optimizer step {step}: {g} != pinned {e}"


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_model

    from bert_accum.core.synthetic import generate_synthetic_glue

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny_bert")
        glue_dir = generate_synthetic_glue(str(Path(tmp) / "glue"), n_train=60, n_dev=24, seed=0)
        pinned = {name: _records(name, model_dir, glue_dir, Path(tmp) / "runs") for name in sorted(CONFIGS)}
    PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}")
