"""Check that a multi-process launch is really distributed and that its first optimizer step matches W=1.

Run it under a launcher that starts several processes, for example two gloo ranks on the CPU::

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 --master_port 29511 \\
        -m bert_accum.study.distcheck --spec spec.json --record_dir records

``spec.json`` maps a name to a :class:`~bert_accum.core.config.TrainConfig` dict (each with its own
``output_dir``). Every process trains each configuration with :func:`bert_accum.core.train.run`, in the
order given, and then:

* the main process saves the accumulated gradient of optimizer step 1 (after DDP's all-reduce, as
  the optimizer sees it) to ``<record_dir>/<name>.grad.pt`` (parameter name -> tensor);
* every process writes ``<record_dir>/<name>.rank<r>.json`` with its rank, world size, backend,
  device, process id and a checksum of the step-1 gradient it holds.

A caller then checks that W files with distinct ranks exist, that all of them hold the same
checksum (the gradients really were all-reduced), and compares the saved gradient with a W=1 run of
the same effective batch (:func:`first_step_gradient` in-process, :func:`relative_l2`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..core.config import TrainConfig
from ..errors import BertAccumError


def first_step_gradient(cfg: TrainConfig, accelerator=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train `cfg` with `train.run`; return (gradient of optimizer step 1 by parameter name, final metrics).

    The gradient is taken where `run` hands it to the optimizer: accumulated over the window,
    synchronised over processes and clipped. Copies live on the CPU.
    """
    from ..core.train import run

    captured: dict[str, torch.Tensor] = {}

    def grab(model: torch.nn.Module, optimizer_step: int) -> None:
        if optimizer_step == 1:
            captured.update({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None})

    final = run(cfg, accelerator=accelerator, before_optimizer_step=grab)
    if not captured:
        raise BertAccumError(f"run {cfg.output_dir} made no optimizer step, so there is no gradient to compare")
    return captured, final


def flatten(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """All gradients as one float64 vector, in sorted parameter-name order."""
    return torch.cat([grads[n].double().flatten() for n in sorted(grads)])


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters; the two must hold the same parameter names."""
    if sorted(a) != sorted(b):
        raise BertAccumError(f"gradients of different parameters: {sorted(set(a) ^ set(b))}")
    fa, fb = flatten(a), flatten(b)
    return float((fa - fb).norm() / fb.norm())


def _process_record(grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Who this process is, as the launcher and torch.distributed see it, plus a gradient checksum."""
    from accelerate import PartialState

    state = PartialState()
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    flat = flatten(grads)
    return {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "torch_distributed_rank": dist.get_rank() if initialized else None,
        "torch_distributed_world_size": dist.get_world_size() if initialized else None,
        "backend": dist.get_backend() if initialized else None,
        "distributed_type": str(state.distributed_type),
        "device": str(state.device),
        "pid": os.getpid(),
        "env_rank": os.environ.get("RANK"),
        "grad_sum": float(flat.sum()),
        "grad_norm": float(flat.norm()),
    }


def check_all(spec: dict[str, dict[str, Any]], record_dir: str) -> None:
    """Run every configuration of `spec` in this process group and write the records described above."""
    from accelerate import PartialState

    out = Path(record_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, values in spec.items():
        cfg = TrainConfig.from_dict(values)
        grads, _ = first_step_gradient(cfg)
        record = _process_record(grads)
        if PartialState().is_main_process:
            torch.save(grads, out / f"{name}.grad.pt")
        (out / f"{name}.rank{record['rank']}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m bert_accum.study.distcheck --spec SPEC.json --record_dir DIR` (under torchrun or accelerate launch)."""
    from ..cli import guarded, leave_process_group

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON file: {name: TrainConfig dict, ...}")
    parser.add_argument("--record_dir", required=True, help="Folder for the gradients and per-process records.")
    args = parser.parse_args(argv)

    def go() -> None:
        try:
            spec = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            raise BertAccumError(f"cannot read --spec {args.spec}: {exc}") from exc
        try:
            check_all(spec, args.record_dir)
        finally:
            leave_process_group()

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
