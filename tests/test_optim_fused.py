"""--optim adamw_torch_fused: the same AdamW update as adamw_torch (up to float round-off), and it resumes exactly."""
import json

import pytest

from bert_accum.core.config import TrainConfig
from bert_accum.core.train import run


def _cfg(model, glue, out, optim, **kw):
    return TrainConfig(task_name="synthetic", glue_dir=glue, model_name_or_path=model, max_length=32,
                       per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=6,
                       learning_rate=1e-3, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=1.0, optim=optim,
                       seed=3, output_dir=str(out), disable_progress_bar=True, **kw)


def _rows(folder):
    return [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]


def test_fused_adamw_follows_adamw_step_by_step(tiny_model_dir, synthetic_glue_dir, tmp_path):
    for optim in ("adamw_torch", "adamw_torch_fused"):
        run(_cfg(tiny_model_dir, synthetic_glue_dir, tmp_path / optim, optim))
    plain, fused = _rows(tmp_path / "adamw_torch"), _rows(tmp_path / "adamw_torch_fused")
    assert len(plain) == len(fused) == 6
    for a, b in zip(plain, fused):
        assert a["learning_rate"] == b["learning_rate"]
        # the gradient of step k depends on the k-1 updates before it: equal norms mean equal updates
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert json.loads((tmp_path / "adamw_torch_fused" / "config.json").read_text())["optim"] == "adamw_torch_fused"


def test_fused_adamw_resumes_to_identical_records(tiny_model_dir, synthetic_glue_dir, tmp_path):
    """Killed after step 4 with a checkpoint at 3: the fused optimizer state comes back exactly."""
    run(_cfg(tiny_model_dir, synthetic_glue_dir, tmp_path / "whole", "adamw_torch_fused", checkpointing_steps="3"))

    def kill_at_5(model, step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tiny_model_dir, synthetic_glue_dir, tmp_path / "cut", "adamw_torch_fused", checkpointing_steps="3"),
            before_optimizer_step=kill_at_5)
    run(_cfg(tiny_model_dir, synthetic_glue_dir, tmp_path / "cut", "adamw_torch_fused", checkpointing_steps="3",
             resume_from_checkpoint="latest"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "cut")) == strip(_rows(tmp_path / "whole"))


def test_fused_name_builds_the_fused_kernel_and_plain_name_does_not():
    import torch

    from bert_accum.core.setup import build_optimizer

    model = torch.nn.Linear(3, 2)
    assert build_optimizer(model, TrainConfig(task_name="sst2", optim="adamw_torch_fused")).defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig(task_name="sst2", optim="adamw_torch")).defaults["fused"]
