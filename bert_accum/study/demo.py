"""The offline demo study: a small (B, N) grid of the embedded model on the synthetic task.

Needs no network and no GLUE files: it generates this project's synthetic GLUE-format task (not GLUE),
fine-tunes all-MiniLM-L6-v2 at one effective batch for several (B, N), and writes `report.md` with the
final metric per configuration and a per-step gradient-norm comparison against (B*N, 1).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..core.config import TrainConfig
from ..core.records import check_writable_dir, read_jsonl
from .plumbing import header, provenance

DEFAULT_GRID = ((16, 1), (8, 2), (4, 4))


def run_demo(output_dir: str, grid: tuple[tuple[int, int], ...] = DEFAULT_GRID, n_train: int = 480, n_dev: int = 200,
             epochs: int = 1, seed: int = 0, max_length: int = 48, overwrite: bool = False,
             model_name_or_path: str = "embedded", learning_rate: float = 5e-5) -> Path:
    """Run the grid and write `<output_dir>/report.md`; returns the report's path."""
    from ..errors import BertAccumError
    from ..core.synthetic import generate_synthetic_glue

    out = Path(output_dir)
    sizes = {b * n for b, n in grid}
    if len(sizes) != 1:
        raise BertAccumError(f"every demo configuration must have the same effective batch, got {sorted(sizes)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BertAccumError(f"{out} exists and is not empty; pass --overwrite")
    if not isinstance(epochs, int) or epochs < 1:
        raise BertAccumError(f"epochs must be an integer >= 1, got {epochs!r}")
    check_writable_dir(out, "--output_dir")
    # No mkdir here: generate_synthetic_glue checks its sizes before it creates the folder, so bad input leaves none.
    data_dir = generate_synthetic_glue(str(out / "data"), n_train=n_train, n_dev=n_dev, seed=seed)
    from ..core.train import run  # torch: only once the input is known to be good

    finals = {}
    started = time.perf_counter()
    for b, n in grid:
        cfg = TrainConfig(
            task_name="synthetic", glue_dir=data_dir, model_name_or_path=model_name_or_path,
            per_device_train_batch_size=b, gradient_accumulation_steps=n, num_train_epochs=epochs,
            max_length=max_length, learning_rate=learning_rate, seed=seed, output_dir=str(out / "runs" / f"B{b}_N{n}"),
            overwrite_output_dir=True, disable_progress_bar=True, fingerprint_steps=[],
        )
        finals[(b, n)] = run(cfg)
    elapsed = time.perf_counter() - started
    report = out / "report.md"
    report.write_text(render_report(out / "runs", grid, elapsed))
    print(f"[bert_accum] demo finished in {elapsed:.0f} s; report: {report}")
    return report


def render_report(runs_dir: Path, grid, elapsed: float) -> str:
    """Markdown: final metric per (B, N) and how each run's per-step gradient norm departs from (B*N, 1)."""
    rows = {}
    for b, n in grid:
        run_dir = Path(runs_dir) / f"B{b}_N{n}"
        rows[(b, n)] = {
            "final": json.loads((run_dir / "final_metrics.json").read_text()),
            "steps": read_jsonl(run_dir / "steps.jsonl"),
        }
    ref_key = max(grid, key=lambda bn: bn[0])  # (B*N, 1): the largest micro-batch
    ref_steps = rows[ref_key]["steps"]
    e = ref_key[0] * ref_key[1]
    any_final = rows[ref_key]["final"]
    metric = any_final["main_metric"]
    lines = [
        header(provenance(), markdown=True),
        "# bert_accum demo: gradient accumulation on the synthetic task",
        "",
        f"Data: this project's **synthetic** GLUE-format task (not GLUE; {any_final['train_examples']} train examples), "
        f"model `{any_final['model_path']}`, effective batch {e}, {any_final['optimizer_steps']} optimizer steps, "
        f"default controls (standard dropout, dynamic padding, mean-of-means loss), device {any_final['device']}, "
        f"wall time {elapsed:.0f} s for the whole grid.",
        "",
        f"## Final {metric} per configuration",
        "",
        f"| micro_batch_size | accumulation_steps | effective_batch_size | {metric} | final loss | examples/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (b, n), r in rows.items():
        ev = r["final"]["eval"]
        lines.append(
            f"| {b} | {n} | {b * n} | {ev.get(metric, float('nan')):.4f} | {r['steps'][-1]['loss']:.4f} | "
            f"{r['final']['examples_per_second']:.1f} |"
        )
    lines += [
        "",
        f"## Gradient norm per optimizer step, relative to ({e}, 1)",
        "",
        "Relative difference |g(B,N) - g(E,1)| / g(E,1) of the total gradient norm before clipping, summarised over steps. "
        "Step 1 starts from identical weights and examples, so its difference is the one-step drift "
        "(dropout masks and padding shapes differ by micro-batch); later steps add the drift of the weights.",
        "",
        "| micro_batch_size | accumulation_steps | step 1 | median | max | mean grad norm |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (b, n), r in rows.items():
        rel = [abs(s["grad_norm"] - t["grad_norm"]) / t["grad_norm"] for s, t in zip(r["steps"], ref_steps)]
        lines.append(
            f"| {b} | {n} | {rel[0]:.2e} | {statistics.median(rel):.2e} | {max(rel):.2e} | "
            f"{statistics.fmean(s['grad_norm'] for s in r['steps']):.3f} |"
        )
    lines += [
        "",
        "Per-step records (loss, gradient norm per layer group, learning rate, tokens) are in `runs/B*_N*/steps.jsonl`.",
        "",
    ]
    return "\n".join(lines)

