"""The offline demo study on a tiny model: every configuration runs and the report has their numbers."""

from bert_accum.study.demo import run_demo
from bert_accum.core.records import read_jsonl


def test_demo_report(tmp_path, tiny_model_dir):
    report = run_demo(str(tmp_path / "demo"), grid=((8, 1), (4, 2), (2, 4)), n_train=32, n_dev=16, seed=1,
                      model_name_or_path=tiny_model_dir)
    text = report.read_text()
    assert text.startswith("<!-- command: python ") and "git_commit: " in text and "synthetic" in text
    for b, n in ((8, 1), (4, 2), (2, 4)):
        assert f"| {b} | {n} | 8 |" in text
        assert len(read_jsonl(tmp_path / "demo" / "runs" / f"B{b}_N{n}" / "steps.jsonl")) == 4
    # the reference compared with itself has zero difference at step 1
    assert "| 8 | 1 | 0.00e+00 |" in text
