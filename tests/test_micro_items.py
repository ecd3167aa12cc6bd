"""Every step row records the items of each micro-batch (`micro_items`), summing to the window's `items`."""
from bert_accum.core.config import TrainConfig
from bert_accum.core.records import read_jsonl
from bert_accum.core.train import run


def test_micro_items_are_examples_or_masked_tokens_and_sum_to_the_window(tiny_model_dir, synthetic_glue_dir, tmp_path):
    common = dict(task_name="synthetic", glue_dir=synthetic_glue_dir, model_name_or_path=tiny_model_dir, max_length=32,
                  per_device_train_batch_size=3, gradient_accumulation_steps=4, max_train_steps=3,
                  disable_progress_bar=True)
    run(TrainConfig(**common, output_dir=str(tmp_path / "cls")))
    for row in read_jsonl(tmp_path / "cls" / "steps.jsonl"):
        assert row["micro_items"] == [3, 3, 3, 3] and row["items"] == 12
    run(TrainConfig(**common, objective="mlm", output_dir=str(tmp_path / "mlm")))
    rows = read_jsonl(tmp_path / "mlm" / "steps.jsonl")
    assert all(len(r["micro_items"]) == 4 and sum(r["micro_items"]) == r["items"] for r in rows)
    # masked-token counts differ between micro-batches of one window: what makes a mean of means a bias
    assert any(len(set(r["micro_items"])) > 1 for r in rows)
