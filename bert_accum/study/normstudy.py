"""BatchNorm under gradient accumulation: a measurement, against per-example normalisation.

The remark this answers: accumulation over N micro-batches of B equals one batch of E = B*N only if the
model has no batch-dependent layers. BatchNorm (in training mode) normalises every example with the mean
and variance of *its micro-batch*, so (B, N) and (E, 1) compute different functions of the same E
examples, and BatchNorm also updates its running statistics once per forward pass, i.e. N times per
optimizer step instead of once. LayerNorm and GroupNorm (BERT uses LayerNorm) normalise each example by
itself, so accumulation is exact for them, as for a model with no normalisation at all.

The study builds one small MLP on a synthetic classification task generated in code (no downloads):

    input (d) -> Linear -> NORM -> ReLU -> Linear -> NORM -> ReLU -> Linear -> classes

with NORM one of ``batchnorm`` (BatchNorm1d), ``layernorm``, ``groupnorm`` (GroupNorm over the hidden
units) or ``none`` (identity). The Linear layers are created first-to-last from the same seed and the
normalisation layers draw no random numbers (their weights start at 1, biases at 0), so every variant
starts from the same Linear weights. There is no dropout, so the only batch dependence is BatchNorm's.

For every variant, precision (fp64, fp32), seed and micro batch size B (N = E / B):

* the accumulated gradient of one window (the first window of epoch 0 of
  :class:`~bert_accum.core.windows.WindowPlan`, whose order does not depend on B) with exact accumulation:
  each micro-batch's summed cross-entropy times :func:`~bert_accum.core.train.micro_loss_scale`, i.e. its
  mean loss times B / E, so the N parts add up to the window mean; compared with the (E, 1) gradient by
  ``grad_rel_l2`` = ||g - g_ref|| / ||g_ref|| and ``grad_cosine`` (in float64);
* BatchNorm's running statistics after that window, ``running_mean_rel`` and ``running_var_rel`` (the
  same relative L2 difference, over all BatchNorm layers; empty for variants without running statistics);
* ``steps`` optimizer steps (Adam or SGD, constant learning rate) over consecutive windows from the same
  initial weights, then the training-set loss, held-out loss and accuracy (evaluation mode: BatchNorm uses
  its running statistics), their differences to the (E, 1) run of the same seed, and
  ``param_rel_distance`` = ||theta - theta_ref|| / ||theta_ref - theta_0||: the distance to the (E, 1)
  run's parameters relative to that run's whole update.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BertAccumError
from ..controls.loss import micro_loss_scale
from .plumbing import mean_std
from ..core.windows import WindowPlan

__all__ = [
    "VARIANTS",
    "PRECISIONS",
    "COLUMNS",
    "NormStudyConfig",
    "NormStudyResult",
    "SyntheticData",
    "make_data",
    "build_model",
    "accumulate_window",
    "window_gradient",
    "running_stats",
    "relative_l2",
    "study_rows",
    "summarize",
    "write_outputs",
    "run_norm_study",
]

VARIANTS = ("batchnorm", "layernorm", "groupnorm", "none")
PRECISIONS = {"fp64": torch.float64, "fp32": torch.float32}
OPTIMIZERS = {"adam": "Adam", "sgd": "SGD"}

COLUMNS = ("variant", "precision", "seed", "micro_batch_size", "accumulation_steps", "effective_batch_size",
           "grad_rel_l2", "grad_cosine", "running_mean_rel", "running_var_rel", "steps", "train_loss",
           "heldout_loss", "heldout_accuracy", "heldout_loss_diff", "heldout_accuracy_diff", "param_rel_distance")
"""One row per (variant, precision, seed, B); the B = E row is the reference (its differences are 0)."""

_TRAINING_COLUMNS = ("train_loss", "heldout_loss", "heldout_accuracy", "heldout_loss_diff",
                     "heldout_accuracy_diff", "param_rel_distance")


@dataclass
class NormStudyConfig:
    """What one study measures; `scripts/norm_study.py` builds it from its flags."""

    effective_batch_size: int = 32
    micro_batch_sizes: list[int] | None = None
    """Micro batch sizes B; default E, E/2, ..., E/16 (the whole ones, at least 2): 32 16 8 4 2 for E = 32."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Each seed draws the initial weights and the data order; the data set itself comes from data_seed."""
    steps: int = 50
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    n_train: int = 512
    n_heldout: int = 512
    input_dim: int = 16
    hidden_dim: int = 64
    num_classes: int = 4
    num_groups: int = 8
    data_seed: int = 1234
    output_dir: str = "results/batchnorm"
    plot: bool = True
    num_threads: int = 1
    """Intra-op threads while the study runs: the model is tiny, so one thread is fastest."""
    command: str | None = None
    """Command line written in the output files' header (default: reconstructed from sys.argv)."""
    quiet: bool = False

    def batch_sizes(self) -> list[int]:
        """The micro batch sizes asked for (largest first), or the default halvings of E down to 2."""
        e = self.effective_batch_size
        sizes = self.micro_batch_sizes if self.micro_batch_sizes is not None else [
            e // 2**k for k in range(5) if e % 2**k == 0 and e // 2**k >= 2]
        return sorted(set(sizes), reverse=True)

    def validate(self) -> None:
        """One-line BertAccumError for anything that cannot make a study."""
        e = self.effective_batch_size
        if e < 2:
            raise BertAccumError(f"--effective_batch_size must be >= 2, got {e}")
        if self.micro_batch_sizes is not None and not self.micro_batch_sizes:
            raise BertAccumError("--micro_batch_sizes needs at least one size")
        for b in self.batch_sizes():
            if b < 1 or e % b:
                raise BertAccumError(f"micro batch size {b} does not divide the effective batch size {e}")
            if b < 2 and "batchnorm" in self.variants:
                # BatchNorm1d in training mode cannot normalise one example (its variance is 0/0).
                raise BertAccumError("micro batch size 1 is undefined for batchnorm (needs >= 2 examples)")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or unknown:
            raise BertAccumError(
                f"--variants: choose from {', '.join(VARIANTS)} (got {', '.join(self.variants) or 'none'})")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if not self.precisions or unknown:
            raise BertAccumError(
                f"--precisions: choose from {', '.join(PRECISIONS)} (got {', '.join(self.precisions) or 'none'})")
        if not self.seeds:
            raise BertAccumError("--seeds needs at least one seed")
        if self.steps < 0:
            raise BertAccumError(f"--steps must be >= 0, got {self.steps}")
        if self.optimizer not in OPTIMIZERS:
            raise BertAccumError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.learning_rate <= 0:
            raise BertAccumError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.n_train < e:
            raise BertAccumError(f"--n_train ({self.n_train}) must hold at least one window of {e} examples")
        if self.n_heldout < 1:
            raise BertAccumError(f"--n_heldout must be >= 1, got {self.n_heldout}")
        if min(self.input_dim, self.hidden_dim) < 1 or self.num_classes < 2:
            raise BertAccumError("--input_dim and --hidden_dim must be >= 1 and --num_classes >= 2")
        if "groupnorm" in self.variants and (self.num_groups < 1 or self.hidden_dim % self.num_groups):
            raise BertAccumError(f"--num_groups ({self.num_groups}) must divide --hidden_dim ({self.hidden_dim})")
        if self.num_threads < 1:
            raise BertAccumError(f"--num_threads must be >= 1, got {self.num_threads}")


@dataclass
class NormStudyResult:
    """Rows of norm_study.csv, the per-(variant, precision, B) summary, the files written and the wall time."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    files: dict[str, Path]
    seconds: float
    markdown: str


# ----------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticData:
    """Training and held-out examples (float64 features, int64 labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor


def make_data(n_train: int, n_heldout: int, input_dim: int, num_classes: int, seed: int) -> SyntheticData:
    """A deterministic classification task: labels from a random two-layer teacher on standard-normal z.

    The features the model sees are z on scales from 0.1 to 10 with offsets of a few units (raw features
    usually look like this), so the normalisation layers have something to normalise.
    """
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_heldout
    z = torch.randn(n, input_dim, generator=g, dtype=torch.float64)
    teacher_in = torch.randn(input_dim, 32, generator=g, dtype=torch.float64)
    teacher_out = torch.randn(32, num_classes, generator=g, dtype=torch.float64)
    labels = (torch.tanh(z @ teacher_in / math.sqrt(input_dim)) @ teacher_out).argmax(dim=1)
    scales = torch.logspace(-1, 1, input_dim, dtype=torch.float64)
    offsets = 3 * torch.randn(input_dim, generator=g, dtype=torch.float64)
    x = z * scales + offsets
    return SyntheticData(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:])


def _norm(variant: str, width: int, num_groups: int) -> nn.Module:
    if variant == "batchnorm":
        return nn.BatchNorm1d(width)
    if variant == "layernorm":
        return nn.LayerNorm(width)
    if variant == "groupnorm":
        return nn.GroupNorm(num_groups, width)
    if variant == "none":
        return nn.Identity()
    raise BertAccumError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def build_model(variant: str, *, seed: int, input_dim: int = 16, hidden_dim: int = 64, num_classes: int = 4,
                num_groups: int = 8) -> nn.Sequential:
    """The MLP Linear-NORM-ReLU-Linear-NORM-ReLU-Linear in float32, Linear weights drawn from `seed`.

    Only the Linear layers draw random numbers, in the same order for every variant, so all variants
    start from identical Linear weights; the global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(input_dim, hidden_dim), _norm(variant, hidden_dim, num_groups), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), _norm(variant, hidden_dim, num_groups), nn.ReLU(),
            nn.Linear(hidden_dim, num_classes),
        )


# ----------------------------------------------------------------------------------------------
# One window
# ----------------------------------------------------------------------------------------------
def accumulate_window(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int) -> float:
    """Zero the gradients, then accumulate the window (x, y) in micro-batches of `micro_batch_size`.

    Each micro-batch contributes its summed cross-entropy times the training loop's own
    `micro_loss_scale` (mean_of_means): (sum / B) * B / E, so the N = E / B contributions add up to the
    window mean, the loss of the (E, 1) batch. The model runs in training mode (BatchNorm normalises with
    the micro-batch's statistics and updates its running statistics). Returns the window loss.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    e = len(y)
    n = math.ceil(e / micro_batch_size)
    window_loss = 0.0
    for start in range(0, e, micro_batch_size):
        xb, yb = x[start:start + micro_batch_size], y[start:start + micro_batch_size]
        scale = micro_loss_scale(normalization="mean_of_means", micro_items=len(yb), micro_examples=len(yb),
                                 window_items=e, window_examples=e, accumulation_steps=n, num_processes=1,
                                 one_over_n=False)
        loss = F.cross_entropy(model(xb), yb, reduction="sum") * scale
        loss.backward()
        window_loss += float(loss.detach())
    return window_loss


def window_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """The accumulated gradient of the window as one float64 vector (parameters in model order)."""
    accumulate_window(model, x, y, micro_batch_size)
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running_mean and running_var of all layers, each concatenated into one float64 vector.

    Empty dict for a model without running statistics (LayerNorm, GroupNorm, none).
    """
    means, variances = [], []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            means.append(module.running_mean.double())
            variances.append(module.running_var.double())
    if not means:
        return {}
    return {"running_mean": torch.cat(means), "running_var": torch.cat(variances)}


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float64 (nan for a zero reference)."""
    ref_norm = float(reference.double().norm())
    if ref_norm == 0:
        return math.nan
    return float((value.double() - reference.double()).norm()) / ref_norm


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm()) * float(b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in evaluation mode: BatchNorm uses its running statistics."""
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(dim=1) == y).double().mean())


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int, cfg: NormStudyConfig,
           seed: int) -> None:
    """cfg.steps optimizer steps over consecutive windows of WindowPlan (the order depends on seed only)."""
    e = cfg.effective_batch_size
    plan = WindowPlan(num_examples=len(y), micro_batch_size=micro_batch_size,
                      accumulation_steps=e // micro_batch_size, seed=seed, drop_last_window=True)
    per_epoch = plan.num_windows_per_epoch()
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    windows: list = []
    for step in range(cfg.steps):
        epoch, k = divmod(step, per_epoch)
        if k == 0:
            windows = plan.windows(epoch)
        idx = torch.tensor([i for micro in windows[k] for piece in micro for i in piece])
        # The window's examples in micro-step order: accumulate_window slices them into the same micro-batches.
        accumulate_window(model, x[idx], y[idx], micro_batch_size)
        opt.step()


def _first_window(n_train: int, e: int, seed: int) -> torch.Tensor:
    """Indices of window 0 of epoch 0 (the order is a function of (seed, epoch) alone, not of B)."""
    plan = WindowPlan(num_examples=n_train, micro_batch_size=e, accumulation_steps=1, seed=seed,
                      drop_last_window=True)
    return torch.tensor(plan.order(0)[:e].tolist())


def study_rows(cfg: NormStudyConfig, data: SyntheticData | None = None,
               say: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """All measurements: one row per (variant, precision, seed, B), columns COLUMNS.

    Training columns are nan when cfg.steps is 0; running-statistics columns are nan for variants
    without running statistics.
    """
    cfg.validate()
    if data is None:
        data = make_data(cfg.n_train, cfg.n_heldout, cfg.input_dim, cfg.num_classes, cfg.data_seed)
    e = cfg.effective_batch_size
    sizes = [e] + [b for b in cfg.batch_sizes() if b != e]  # the reference (E, 1) first
    rows: list[dict[str, Any]] = []
    for variant in cfg.variants:
        for precision in cfg.precisions:
            dtype = PRECISIONS[precision]
            t0 = time.perf_counter()
            x_train, x_held = data.x_train.to(dtype), data.x_heldout.to(dtype)
            for seed in cfg.seeds:
                initial = build_model(variant, seed=seed, input_dim=cfg.input_dim, hidden_dim=cfg.hidden_dim,
                                      num_classes=cfg.num_classes, num_groups=cfg.num_groups).to(dtype)
                idx = _first_window(cfg.n_train, e, seed)
                ref: dict[str, Any] = {}
                for b in sizes:
                    model = copy.deepcopy(initial)
                    grad = window_gradient(model, x_train[idx], data.y_train[idx], b)
                    stats = running_stats(model)
                    if b == e:
                        ref = {"grad": grad, "stats": stats}
                    row = {"variant": variant, "precision": precision, "seed": seed, "micro_batch_size": b,
                           "accumulation_steps": e // b, "effective_batch_size": e,
                           "grad_rel_l2": relative_l2(grad, ref["grad"]), "grad_cosine": _cosine(grad, ref["grad"]),
                           "running_mean_rel": relative_l2(stats["running_mean"], ref["stats"]["running_mean"])
                           if stats else math.nan,
                           "running_var_rel": relative_l2(stats["running_var"], ref["stats"]["running_var"])
                           if stats else math.nan,
                           "steps": cfg.steps, **{c: math.nan for c in _TRAINING_COLUMNS}}
                    if cfg.steps:
                        model = copy.deepcopy(initial)
                        _train(model, x_train, data.y_train, b, cfg, seed)
                        theta = _params(model)
                        train_loss, _ = _evaluate(model, x_train, data.y_train)
                        held_loss, held_acc = _evaluate(model, x_held, data.y_heldout)
                        if b == e:
                            ref.update(theta=theta, held_loss=held_loss, held_acc=held_acc,
                                       update=float((theta - _params(initial)).norm()))
                        row.update(train_loss=train_loss, heldout_loss=held_loss, heldout_accuracy=held_acc,
                                   heldout_loss_diff=held_loss - ref["held_loss"],
                                   heldout_accuracy_diff=held_acc - ref["held_acc"],
                                   param_rel_distance=float((theta - ref["theta"]).norm()) / ref["update"]
                                   if ref["update"] > 0 else math.nan)
                    rows.append(row)
            say(f"[norm_study] {variant} {precision}: {time.perf_counter() - t0:.1f} s")
    return rows


# ----------------------------------------------------------------------------------------------
# Summary and output
# ----------------------------------------------------------------------------------------------
_SUMMARY_METRICS = ("grad_rel_l2", "grad_cosine", "running_mean_rel", "running_var_rel") + _TRAINING_COLUMNS


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, precision, B): n seeds, mean and std of every metric, and the largest grad_rel_l2."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["precision"], r["micro_batch_size"]), []).append(r)
    out = []
    for (variant, precision, b), rs in groups.items():
        s: dict[str, Any] = {"variant": variant, "precision": precision, "micro_batch_size": b,
                             "accumulation_steps": rs[0]["accumulation_steps"],
                             "effective_batch_size": rs[0]["effective_batch_size"], "n": len(rs),
                             "grad_rel_l2_max": max(r["grad_rel_l2"] for r in rs)}
        for m in _SUMMARY_METRICS:
            s[f"{m}_mean"], s[f"{m}_std"] = mean_std([r[m] for r in rs])
        out.append(s)
    return out


def _e(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2e}"


def _pm(s: dict[str, Any], metric: str, fmt: str = ".2e") -> str:
    mean, std = s[f"{metric}_mean"], s[f"{metric}_std"]
    # the sign belongs to the mean only: a standard deviation is never negative
    return "—" if math.isnan(mean) else f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}"


def _gradient_table(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | precision | B | N | grad rel L2 (mean ± std) | grad rel L2 (max) | cosine (mean) "
             "| running_mean rel | running_var rel |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["accumulation_steps"] == 1:
            continue
        lines.append(f"| {s['variant']} | {s['precision']} | {s['micro_batch_size']} | {s['accumulation_steps']} | "
                     f"{_pm(s, 'grad_rel_l2')} | {_e(s['grad_rel_l2_max'])} | {s['grad_cosine_mean']:.12f} | "
                     f"{_pm(s, 'running_mean_rel')} | {_pm(s, 'running_var_rel')} |")
    return lines


def _training_table(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | precision | B | N | held-out accuracy | Δ accuracy vs (E, 1) | held-out loss "
             "| Δ loss vs (E, 1) | training loss | param distance / update |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['precision']} | {s['micro_batch_size']} | {s['accumulation_steps']} | "
                     f"{_pm(s, 'heldout_accuracy', '.4f')} | {_pm(s, 'heldout_accuracy_diff', '+.4f')} | "
                     f"{_pm(s, 'heldout_loss', '.4f')} | {_pm(s, 'heldout_loss_diff', '+.2e')} | "
                     f"{_pm(s, 'train_loss', '.4f')} | {_pm(s, 'param_rel_distance')} |")
    return lines


def _at_roundoff(rel: float, precision: str) -> bool:
    """Whether a relative difference is within 100 machine epsilons (fp64 2.2e-16 -> 2.2e-14, fp32 1.2e-7 -> 1.2e-5)."""
    return rel <= 100 * torch.finfo(PRECISIONS[precision]).eps


def _interpretation(summary: list[dict[str, Any]], cfg: NormStudyConfig) -> str:
    """2-4 plain sentences, every number taken from the summary."""
    e = cfg.effective_batch_size
    acc = [s for s in summary if s["accumulation_steps"] > 1]
    if not acc:
        return f"Only ({e}, 1) was run, so there is nothing to compare."
    sentences = []
    prec = "fp64" if "fp64" in cfg.precisions else cfg.precisions[0]
    train_prec = "fp32" if "fp32" in cfg.precisions else cfg.precisions[0]
    others = [v for v in cfg.variants if v != "batchnorm"]
    bn = sorted((s for s in acc if s["variant"] == "batchnorm" and s["precision"] == prec),
                key=lambda s: -s["micro_batch_size"])
    if others:
        worst = max((s["grad_rel_l2_max"] for s in acc if s["variant"] in others and s["precision"] == prec))
        if _at_roundoff(worst, prec):
            sentences.append(
                f"In {prec}, the accumulated gradient of {', '.join(others)} equals the ({e}, 1) gradient to "
                f"round-off (largest rel L2 {worst:.1e} over every B and seed): they normalise each example by "
                "itself, so accumulation is exact for them.")
        else:
            sentences.append(
                f"In {prec}, the accumulated gradient of {', '.join(others)} differs from the ({e}, 1) gradient by "
                f"up to {worst:.1e} (rel L2), more than round-off: something other than normalisation depends on "
                "the batch here.")
    if bn:
        grads = [s["grad_rel_l2_mean"] for s in bn]
        monotone = all(a < b for a, b in zip(grads, grads[1:]))
        trend = "growing as B shrinks" if monotone else "not monotonically in B"
        kind = ("(B, N) computes a different function" if not all(_at_roundoff(g, prec) for g in grads)
                else "the difference stays at round-off here")
        sentences.append(
            f"With BatchNorm, {kind}: its gradient differs from the ({e}, 1) one by a relative L2 of "
            + ", ".join(f"{s['grad_rel_l2_mean']:.2g} (B={s['micro_batch_size']})" for s in bn)
            + f" (mean of {bn[0]['n']} seeds, {trend}), because each micro-batch is normalised with its own "
            f"mean and variance; its running statistics after the one window differ too (relative L2: running_mean "
            f"by "
            f"{min(s['running_mean_rel_mean'] for s in bn):.2g}–{max(s['running_mean_rel_mean'] for s in bn):.2g}, "
            f"running_var by {min(s['running_var_rel_mean'] for s in bn):.2g}–"
            f"{max(s['running_var_rel_mean'] for s in bn):.2g}), since they are updated with momentum on every "
            f"micro-batch, N times per optimizer step instead of once.")
    if bn and others and "fp32" in cfg.precisions and prec != "fp32":
        worst32 = max(s["grad_rel_l2_max"] for s in acc if s["variant"] in others and s["precision"] == "fp32")
        bn32 = [s for s in acc if s["variant"] == "batchnorm" and s["precision"] == "fp32"]
        gap = max(abs(a["grad_rel_l2_mean"] - b["grad_rel_l2_mean"]) / b["grad_rel_l2_mean"]
                  for a in bn32 for b in bn if a["micro_batch_size"] == b["micro_batch_size"])
        state = "sit at float32 round-off" if _at_roundoff(worst32, "fp32") else "differ beyond float32 round-off"
        sentences.append(
            f"In fp32 the per-example variants {state} (at most {worst32:.1e}), while BatchNorm's "
            f"differences are those of fp64 to within {gap:.1e} (relative): precision is not the issue.")
    if cfg.steps:
        bn_t = sorted((s for s in acc if s["variant"] == "batchnorm" and s["precision"] == train_prec),
                      key=lambda s: -s["micro_batch_size"])
        ref_bn = [s for s in summary if s["variant"] == "batchnorm" and s["precision"] == train_prec
                  and s["accumulation_steps"] == 1]
        if bn_t and ref_bn:
            small = bn_t[-1]
            spread = ref_bn[0]["heldout_accuracy_std"]
            beyond = [s["micro_batch_size"] for s in bn_t if abs(s["heldout_accuracy_diff_mean"]) > spread]
            verdict = (f"so B = {', '.join(map(str, beyond))} change{'s' if len(beyond) == 1 else ''} the outcome "
                       "by more than the seed-to-seed spread" if beyond else
                       "all within the seed-to-seed spread")
            text = (f"After {cfg.steps} {OPTIMIZERS[cfg.optimizer]} steps in {train_prec}, BatchNorm's held-out "
                    f"accuracy differs from the ({e}, 1) run of the same seed by "
                    + ", ".join(f"{s['heldout_accuracy_diff_mean']:+.3f} ± {s['heldout_accuracy_diff_std']:.3f} "
                                f"(B={s['micro_batch_size']})" for s in bn_t)
                    + f" (n={small['n']}), against a seed-to-seed spread (std) of {spread:.3f} for ({e}, 1), "
                    f"{verdict}, and at B={small['micro_batch_size']} its parameters end "
                    f"{small['param_rel_distance_mean']:.2g} ± {small['param_rel_distance_std']:.2g} times the "
                    f"({e}, 1) run's whole update away from it")
            if others:
                other_t = [s for s in acc if s["variant"] in others and s["precision"] == train_prec]
                worst_acc = max(abs(s["heldout_accuracy_diff_mean"]) for s in other_t)
                text += (f"; for {', '.join(others)} that distance is at most "
                         f"{max(s['param_rel_distance_mean'] for s in other_t):.1e} and the held-out accuracy "
                         + ("is identical" if worst_acc == 0 else f"changes by at most {worst_acc:.3f}"))
            sentences.append(text + ".")
    return " ".join(sentences)


def write_outputs(rows: list[dict[str, Any]], cfg: NormStudyConfig, seconds: float,
                  header: str | None = None) -> tuple[dict[str, Path], list[dict[str, Any]], str]:
    """Write norm_study.csv, norm_study.md (and norm_study.png) headed by the command and git commit.

    Returns (files, summary, markdown).
    """
    from .plumbing import header as comment
    from .plumbing import provenance, write_csv

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = header or provenance(cfg.command)
    files = {"csv": out / "norm_study.csv", "md": out / "norm_study.md"}
    write_csv(files["csv"], rows, header, COLUMNS)
    summary = summarize(rows)
    markdown = _markdown(summary, cfg, seconds)
    files["md"].write_text(comment(header, markdown=True) + "\n" + markdown)
    if cfg.plot and any(s["accumulation_steps"] > 1 for s in summary):
        files["png"] = _plot(summary, cfg, out / "norm_study.png")
    return files, summary, markdown


def _markdown(summary: list[dict[str, Any]], cfg: NormStudyConfig, seconds: float) -> str:
    e = cfg.effective_batch_size
    n = len(cfg.seeds)
    lines = [
        "# BatchNorm under gradient accumulation",
        "",
        f"MLP {cfg.input_dim}-{cfg.hidden_dim}-{cfg.hidden_dim}-{cfg.num_classes} (Linear-NORM-ReLU twice, no "
        f"dropout) on a synthetic {cfg.num_classes}-class task ({cfg.n_train} training, {cfg.n_heldout} held-out "
        f"examples, data seed {cfg.data_seed}); NORM is BatchNorm1d, LayerNorm, GroupNorm({cfg.num_groups} groups) "
        f"or none, with identical Linear weights per seed. Effective batch E = {e}; seeds "
        f"{', '.join(map(str, cfg.seeds))} (n = {n}; ± is the sample standard deviation over seeds).",
        "",
        "## Interpretation",
        "",
        _interpretation(summary, cfg),
        "",
        f"## Gradient of one window: (B, N) against ({e}, 1)",
        "",
        "The first window of epoch 0, from the initial weights, exact accumulation (each micro-batch's mean "
        f"loss × B / {e}). rel L2 = ||g - g_ref|| / ||g_ref||; running_mean / running_var rel = the same for "
        "BatchNorm's running statistics after the window (— : the variant has none).",
        "",
        *_gradient_table(summary),
    ]
    if cfg.steps:
        lines += [
            "",
            f"## After {cfg.steps} {OPTIMIZERS[cfg.optimizer]} steps (learning rate {cfg.learning_rate:g})",
            "",
            "Consecutive windows of one data order per seed; held-out and training loss in evaluation mode "
            f"(BatchNorm uses its running statistics). Δ = (B, N) minus ({e}, 1) of the same seed; param distance "
            f"/ update = ||θ - θ_ref|| / ||θ_ref - θ_0||.",
            "",
            *_training_table(summary),
        ]
    lines += ["", f"Wall time {seconds:.1f} s.", ""]
    return "\n".join(lines)


# Distinct markers and dashes: the three per-example variants lie on top of each other.
_STYLES = {"batchnorm": ("o", "-"), "layernorm": ("s", "--"), "groupnorm": ("^", ":"), "none": ("x", "-.")}


def _plot(summary: list[dict[str, Any]], cfg: NormStudyConfig, path: Path) -> Path:
    """rel L2 of the window gradient against B, one line per variant, one panel per precision (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # An exact zero has no place on a log axis: it is drawn at this floor (below fp64 round-off, 1.1e-16).
    floor = 1e-18
    fig, axes = plt.subplots(1, len(cfg.precisions), figsize=(5 * len(cfg.precisions), 4), squeeze=False,
                             sharey=True)
    for ax, precision in zip(axes[0], cfg.precisions):
        for variant in cfg.variants:
            pts = sorted((s["micro_batch_size"], s["grad_rel_l2_mean"]) for s in summary
                         if s["variant"] == variant and s["precision"] == precision and s["accumulation_steps"] > 1)
            style = _STYLES.get(variant, ("o", "-"))
            ax.plot([b for b, _ in pts], [max(v, floor) for _, v in pts], marker=style[0], linestyle=style[1],
                    label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({s["micro_batch_size"] for s in summary if s["accumulation_steps"] > 1})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel(f"micro batch B (N = {cfg.effective_batch_size} / B)")
        ax.set_title(precision)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"rel L2 of accumulated gradient vs ({cfg.effective_batch_size}, 1)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_norm_study(cfg: NormStudyConfig) -> NormStudyResult:
    """Run the whole study, write the outputs to cfg.output_dir and print the Markdown; returns the rows."""
    started = time.perf_counter()
    cfg.validate()
    say = (lambda s: None) if cfg.quiet else (lambda s: print(s, flush=True))
    with _threads(cfg.num_threads):
        rows = study_rows(cfg, say=say)
    seconds = time.perf_counter() - started
    files, summary, markdown = write_outputs(rows, cfg, seconds)
    say(markdown)
    say(f"[norm_study] total wall time {time.perf_counter() - started:.1f} s -> {cfg.output_dir}")
    return NormStudyResult(rows=rows, summary=summary, files=files, seconds=seconds, markdown=markdown)
