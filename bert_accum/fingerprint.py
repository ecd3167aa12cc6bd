"""Compact parameter fingerprints: the same random projection of all parameters for every run.

A count sketch: element e of parameter `name` is added, with sign s(name, e), into bucket h(name, e) of a
`dim`-long vector. h and s come from a generator seeded by the parameter's name, so two runs of the same
architecture project identically, and E ||S(x) - S(y)||^2 = ||x - y||^2: the distance between two runs'
fingerprints estimates the distance between their parameters (relative spread about sqrt(2/dim), 3% at
dim=2048) without storing checkpoints.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch


def fingerprint(model: torch.nn.Module, dim: int = 2048) -> np.ndarray:
    """Count-sketch projection (float64) of every parameter of `model`."""
    out = torch.zeros(dim, dtype=torch.float64)
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1).to("cpu", torch.float64)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        buckets = torch.randint(dim, (flat.numel(),), generator=gen)
        signs = torch.randint(2, (flat.numel(),), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
        out.index_add_(0, buckets, flat * signs)
    return out.numpy()


class Fingerprinter:
    """Writes `fingerprints/step_<k>.npy` into a run folder."""

    def __init__(self, dim: int = 2048):
        self.dim = dim

    def record(self, run_dir: Path, step: int, model: torch.nn.Module) -> Path:
        """Store the fingerprint of `model` after optimizer step `step` (0 = initial weights)."""
        folder = Path(run_dir) / "fingerprints"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:07d}.npy"
        np.save(path, fingerprint(model, self.dim))
        return path


def load_fingerprints(run_dir: Path) -> dict[int, np.ndarray]:
    """All fingerprints of a run, keyed by optimizer step."""
    folder = Path(run_dir) / "fingerprints"
    return {int(p.stem.split("_")[1]): np.load(p) for p in sorted(folder.glob("step_*.npy"))}
