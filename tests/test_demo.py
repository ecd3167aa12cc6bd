"""The offline demo study on a tiny model: both arms and the dropout-only floor run, the figure is written and the
printed answer says how far each (B, N) drifts against the floor."""

from bert_accum.core.records import read_jsonl
from bert_accum.study.demo import fingerprint_schedule, run_demo


def test_demo_report(tmp_path, tiny_model_dir):
    said = []
    report = run_demo(str(tmp_path / "demo"), grid=((8, 1), (4, 2), (2, 4)), n_train=32, n_dev=16, seed=1,
                      model_name_or_path=tiny_model_dir, learning_rate=1e-3, say=said.append)
    text = report.read_text()
    assert text.startswith("<!-- command: python ") and "git_commit: " in text and "synthetic" in text
    for b, n in ((8, 1), (4, 2), (2, 4)):
        assert f"| {b} | {n} | 8 |" in text
        assert len(read_jsonl(tmp_path / "demo" / "runs" / f"B{b}_N{n}" / "steps.jsonl")) == 4
        assert len(read_jsonl(tmp_path / "demo" / "runs" / "controlled" / f"B{b}_N{n}" / "steps.jsonl")) == 4
    # the reference compared with itself has zero difference at step 1
    assert "| 8 | 1 | 0.00e+00 |" in text
    assert (tmp_path / "demo" / "runs" / "dropout_floor" / "B8_N1" / "fingerprints").is_dir()
    assert (tmp_path / "demo" / "param_distance.png").stat().st_size > 0

    answer = said[said.index("") + 1:]
    assert len(answer) == 5, answer
    assert answer[0].startswith("Answer: ") and "effective batch 8, 4 optimizer steps" in answer[0]
    assert answer[1].startswith("Dropout-only floor: (8,1) with another --dropout_seed")
    assert answer[2].startswith("(4,2) vs (8,1): default arm") and answer[3].startswith("(2,4) vs (8,1): default arm")
    assert answer[4].startswith("So: the default loop drifts about as far as re-drawing the dropout masks")
    for line in answer[2:4]:
        default_ratio = float(line.split("default arm ")[1].split("(")[1].split("x")[0])
        controlled_ratio = float(line.split("controlled arm ")[1].split("(")[1].split("x")[0])
        assert 0.3 < default_ratio < 3 and controlled_ratio < 1e-3  # dropout sets the default arm's drift
    assert all(line in text for line in answer)


def test_fingerprints_are_dense_early_and_include_both_ends():
    assert fingerprint_schedule(5) == [0, 1, 2, 3, 4, 5]
    steps = fingerprint_schedule(24)
    assert steps[:4] == [0, 1, 2, 3] and steps[-1] == 24 and len(steps) <= 10
