"""Gradient probe: how far does the accumulated gradient of (B, N) sit from one batch of E = B*N, per cause?

For one task and one effective batch E, every configuration (B, N) starts from identical weights (the
model is loaded once with a fixed seed; each computation restores that state) and sees the same E
examples: the first window of epoch 0 of :class:`~bert_accum.core.windows.WindowPlan`, whose order does not
depend on B or N. For each *arm* (a setting of the switches: dropout, padding, loss normalisation,
precision) the probe accumulates the window's gradient for every (B, N) with the training loop's own
code (:func:`~bert_accum.core.train.accumulate_window`) and compares it with the (E, 1) gradient of the
same arm:

* ``rel_l2`` = ||g - g_ref|| / ||g_ref||, ``cosine``, and the largest per-group relative difference
  (groups from :func:`~bert_accum.core.modeling.parameter_group`: embeddings, layer_i, head);
* ``seed_floor_rel_l2``: the same comparison between two dropout seeds of the (E, 1) run of that arm
  (standard dropout: torch is reseeded with ``seed`` / ``seed + 1`` before the micro-steps; invariant
  dropout: the DropoutController seed is ``seed`` / ``seed + 1``), and ``ratio_to_floor`` =
  rel_l2 / seed_floor_rel_l2. A ratio near 1 means the (B, N) gradient is as far from the (E, 1) one
  as a different dropout draw; a ratio near 0 means accumulation reproduces the batch.

Fairness of standard dropout: every configuration starts its micro-steps from ``torch.manual_seed(seed)``,
so the differences come from how masks are drawn per micro-batch, not from a seed offset.

Computations that are bitwise identical are done once and shared between arms: at N = 1 the
``window`` and ``dynamic`` paddings give the same tensors, and unless the objective is MLM with N > 1
``mean_of_means`` and ``global`` give the same scale factors (items are examples, and
``B / (B * E)`` rounds to the same float as ``1 / E``).

``trainer_arms`` adds the Hugging Face Trainer (`TRAINER_ARMS`, written to probe_trainer.csv / probe_trainer.md,
leaving probe.csv as it is): the same window through the stock ``transformers.Trainer`` and through
`ExactAccumulationTrainer` (`integrations.window_gradient`), beside the project's loop under the matching switches,
each against its own (E, 1) gradient, with ``norm_ratio`` = ||g|| / ||g_ref|| (N where the Trainer does not divide
the micro-batch means by N).

``steps > 0`` adds a short multi-step variant: K AdamW steps (constant learning rate, no clipping, no
weight decay) over consecutive windows from the same initial weights, reporting after each step the
parameter L2 distance to the (E, 1) run of the same arm, relative to the (E, 1) run's total update,
and the same seed floor.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import EMBEDDED_MODEL, MAX_SEED
from ..errors import BertAccumError

__all__ = [
    "ARMS",
    "TRAINER_ARMS",
    "TRAINER_COLUMNS",
    "Arm",
    "ProbeConfig",
    "ProbeResult",
    "run_probe",
    "COLUMNS",
    "STEP_COLUMNS",
]


@dataclass(frozen=True)
class Arm:
    """One setting of the drift switches."""

    name: str
    dropout: str  # standard | off | invariant
    padding: str  # dynamic | window | max_length
    loss_normalization: str  # mean_of_means | global
    precision: str  # fp32 | fp64 | bf16
    description: str = ""


_CONTROLLED = dict(dropout="invariant", padding="window", loss_normalization="global", precision="fp32")

ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("default", "standard", "dynamic", "mean_of_means", "fp32", "what a usual HF loop does"),
        Arm("controlled", **_CONTROLLED, description="every cause switched off (fp32)"),
        Arm("controlled_dropout_standard", **{**_CONTROLLED, "dropout": "standard"},
            description="controlled, but torch RNG dropout"),
        Arm("controlled_padding_dynamic", **{**_CONTROLLED, "padding": "dynamic"},
            description="controlled, but each micro-batch padded to its own longest"),
        Arm("controlled_loss_mean_of_means", **{**_CONTROLLED, "loss_normalization": "mean_of_means"},
            description="controlled, but mean of micro-batch means (differs only for MLM)"),
        Arm("controlled_fp64", **{**_CONTROLLED, "precision": "fp64"}, description="controlled, model.double()"),
        Arm("controlled_bf16", **{**_CONTROLLED, "precision": "bf16"},
            description="controlled, forward under bf16 autocast"),
    )
}


@dataclass(frozen=True)
class TrainerArm:
    """One training loop with its switches: the stock Trainer, the exact trainer, or the project's loop."""

    name: str
    backend: str  # trainer | exact_trainer | bert_accum
    dropout: str
    padding: str
    loss_normalization: str
    description: str = ""


TRAINER_ARMS: dict[str, TrainerArm] = {
    arm.name: arm
    for arm in (
        TrainerArm("trainer", "trainer", "standard", "dynamic", "mean_of_means", "the stock transformers.Trainer"),
        TrainerArm("trainer_dropout_off", "trainer", "off", "dynamic", "mean_of_means",
                   "the stock Trainer without dropout: only its loss normalisation differs"),
        TrainerArm("exact_trainer", "exact_trainer", "invariant", "window", "global",
                   "ExactAccumulationTrainer, every cause switched off"),
        TrainerArm("exact_trainer_dropout_standard", "exact_trainer", "standard", "dynamic", "global",
                   "ExactAccumulationTrainer with torch RNG dropout (the SST-2 grid's setting)"),
        TrainerArm("loop_default", "bert_accum", "standard", "dynamic", "mean_of_means",
                   "this project's loop, switches as the stock Trainer's"),
        TrainerArm("loop_controlled", "bert_accum", "invariant", "window", "global",
                   "this project's loop, every cause switched off"),
    )
}

TRAINER_COLUMNS = ("task", "objective", "arm", "backend", "micro_batch_size", "accumulation_steps",
                   "effective_batch_size", "rel_l2", "cosine", "norm_ratio", "max_group_rel", "max_group",
                   "seed_floor_rel_l2", "ratio_to_floor")

COLUMNS = ("task", "objective", "arm", "micro_batch_size", "accumulation_steps", "effective_batch_size", "rel_l2",
           "cosine", "max_group_rel", "max_group", "seed_floor_rel_l2", "ratio_to_floor")
STEP_COLUMNS = ("task", "objective", "arm", "micro_batch_size", "accumulation_steps", "effective_batch_size",
                "optimizer_step", "param_l2", "rel_to_update", "seed_floor_param_l2", "ratio_to_floor")


@dataclass
class ProbeConfig:
    """What one probe run measures; the CLI (`scripts/probe.py`) builds it from its flags."""

    task_name: str | None = None
    glue_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_column_names: list[str] | None = None
    label_column_name: str | None = None
    model_name_or_path: str = EMBEDDED_MODEL
    max_length: int = 128
    effective_batch_size: int = 32
    micro_batch_sizes: list[int] | None = None
    """Micro batch sizes B; default E, E/2, E/4, E/8, E/16 (the whole ones): 32 16 8 4 2 for E = 32."""
    trainer_arms: list[str] | None = None
    """Trainer arms (`TRAINER_ARMS`) to probe as well; [] means all of them. Given while `arms` is None, only the
    Trainer arms run (no probe.csv)."""
    arms: list[str] | None = None
    """Arms to probe; default (None): every arm, except `controlled_bf16` on a CPU without bf16 matrix
    instructions (there bf16 matmuls are emulated, about 8x slower than fp32, and the one arm would take
    longer than all the others together); name it in `arms` to run it anyway."""
    objective: str = "classification"
    mlm_probability: float = 0.15
    seed: int = 42
    steps: int = 0
    learning_rate: float = 5e-5
    output_dir: str | None = None
    max_train_samples: int | None = None
    cache_dir: str | None = None
    command: str | None = None
    """Command line written in the output files' header (default: reconstructed from sys.argv)."""
    quiet: bool = False

    def train_config(self):
        """The `TrainConfig` whose setup (model, head, data) the probe measures."""
        from ..core.config import TrainConfig

        return TrainConfig(
            task_name=self.task_name, glue_dir=self.glue_dir, train_file=self.train_file,
            validation_file=self.validation_file, text_column_names=self.text_column_names,
            label_column_name=self.label_column_name, model_name_or_path=self.model_name_or_path,
            max_length=self.max_length, objective=self.objective, mlm_probability=self.mlm_probability,
            seed=self.seed, max_train_samples=self.max_train_samples, cache_dir=self.cache_dir,
            learning_rate=self.learning_rate,
        )

    def validate(self) -> None:
        """One-line BertAccumError for anything that cannot make a probe."""
        if not self.task_name:
            raise BertAccumError("--task_name is required")
        if self.effective_batch_size < 1:
            raise BertAccumError(f"--effective_batch_size must be >= 1, got {self.effective_batch_size}")
        if self.micro_batch_sizes is not None and not self.micro_batch_sizes:
            raise BertAccumError("--micro_batch_sizes needs at least one size")
        for b in self.batch_sizes():
            if b < 1 or self.effective_batch_size % b:
                raise BertAccumError(
                    f"micro batch size {b} does not divide the effective batch size {self.effective_batch_size}")
        if self.arms is not None and not self.arms:
            raise BertAccumError("--arms needs at least one arm")
        unknown = [a for a in self.arms or [] if a not in ARMS]
        if unknown:
            raise BertAccumError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        unknown = [a for a in self.trainer_arms or [] if a not in TRAINER_ARMS]
        if unknown:
            raise BertAccumError(f"unknown trainer arm(s) {', '.join(unknown)}; choose from {', '.join(TRAINER_ARMS)}")
        if self.objective not in ("classification", "mlm"):
            raise BertAccumError(f"--objective must be classification or mlm, got {self.objective!r}")
        if self.steps < 0:
            raise BertAccumError(f"--steps must be >= 0, got {self.steps}")
        if self.max_length < 2:
            raise BertAccumError(f"--max_length must be >= 2, got {self.max_length}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise BertAccumError(f"--learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise BertAccumError(f"--mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 <= self.seed < MAX_SEED:  # the floor uses seed + 1
            raise BertAccumError(f"--seed must be in [0, {MAX_SEED - 1}], got {self.seed}")
        if (self.train_file is None) != (self.validation_file is None):
            raise BertAccumError("--train_file and --validation_file must be given together")
        if self.glue_dir is not None and self.train_file is not None:
            raise BertAccumError("give either --glue_dir or --train_file/--validation_file, not both")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise BertAccumError(f"--max_train_samples must be >= 1, got {self.max_train_samples}")
        from ..core.records import check_writable_dir
        from ..core.tasks import get_task

        get_task(self.task_name)
        # Checked now, not after the minutes the probe computes.
        check_writable_dir(self.resolved_output_dir(), "--output_dir")

    def batch_sizes(self) -> list[int]:
        """The micro batch sizes asked for, or the default halvings of E."""
        e = self.effective_batch_size
        if self.micro_batch_sizes is not None:
            return list(self.micro_batch_sizes)
        return [e // 2**k for k in range(5) if e % 2**k == 0]

    def configurations(self) -> list[tuple[int, int]]:
        """(B, N) pairs, largest B first, without duplicates."""
        e = self.effective_batch_size
        return [(b, e // b) for b in sorted(set(self.batch_sizes()), reverse=True)]

    def resolved_output_dir(self) -> Path:
        """--output_dir, or results/probe/<task>[-<objective>]."""
        if self.output_dir:
            return Path(self.output_dir)
        from ..core.tasks import get_task

        name = get_task(self.task_name).name
        return Path("results") / "probe" / (name if self.objective == "classification" else f"{name}-{self.objective}")


@dataclass
class ProbeResult:
    """Rows of probe.csv (and probe_steps.csv), the files written and the wall time."""

    rows: list[dict[str, Any]]
    step_rows: list[dict[str, Any]]
    files: dict[str, Path]
    seconds: float
    markdown: str
    trainer_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Computations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Comp:
    """Canonical description of one window computation; equal keys give bitwise-equal results."""

    dropout: str
    dropout_seed: int
    precision: str
    micro_batch_size: int
    accumulation_steps: int
    padding: str
    loss_normalization: str


def _comp(arm: Arm, b: int, n: int, kind: str, dropout_seed: int) -> _Comp:
    # one micro-batch: its own longest is its window's longest
    padding = "single" if n == 1 and arm.padding in ("dynamic", "window") else arm.padding
    loss = arm.loss_normalization if (kind == "mlm" and n > 1) else "global"
    return _Comp(arm.dropout, dropout_seed, arm.precision, b, n, padding, loss)


class _Flat:
    """A gradient as one float64 vector, with the squared norm of every parameter group (computed once)."""

    def __init__(self, tensors: list[torch.Tensor], groups: list[str]):
        self.vec = torch.cat([t.reshape(-1).double() for t in tensors])
        self.sizes = [t.numel() for t in tensors]
        self.groups = groups
        self.group_sq = _group_sums(self.vec.square(), self.sizes, groups)
        self.norm = math.sqrt(sum(self.group_sq.values()))


def _group_sums(values: torch.Tensor, sizes: list[int], groups: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for grp, part in zip(groups, torch.split(values, sizes)):
        out[grp] = out.get(grp, 0.0) + float(part.sum())
    return out


def _compare(g: list[torch.Tensor] | _Flat, ref: _Flat) -> dict[str, Any]:
    """rel_l2, cosine and the largest per-group relative difference, in float64."""
    vec = g.vec if isinstance(g, _Flat) else torch.cat([t.reshape(-1).double() for t in g])
    diff_sq = _group_sums((vec - ref.vec).square_(), ref.sizes, ref.groups)
    g_norm = float(vec.norm())
    rel = math.sqrt(sum(diff_sq.values())) / ref.norm if ref.norm > 0 else math.nan
    cos = float(vec @ ref.vec) / (g_norm * ref.norm) if g_norm > 0 and ref.norm > 0 else math.nan
    per = {k: (math.sqrt(diff_sq[k] / ref.group_sq[k]) if ref.group_sq[k] > 0 else (0.0 if diff_sq[k] == 0 else math.inf))
           for k in diff_sq}
    worst = max(per, key=lambda k: per[k])
    return {"rel_l2": rel, "cosine": cos, "max_group_rel": per[worst], "max_group": worst}


def _ratio(value: float, floor: float) -> float:
    if floor > 0:
        return value / floor
    return 0.0 if value == 0 else math.inf


class _Prober:
    """Model, data and caches of one probe run."""

    def __init__(self, cfg: ProbeConfig, say):
        from ..core.features import Collator, InMemorySplit
        from ..core.modeling import parameter_group
        from ..core.setup import load_model, load_raw, load_splits, task_kind
        from ..core.windows import WindowPlan

        self.cfg = cfg
        self.say = say
        train_cfg = cfg.train_config()
        # The same setup as `run`: the same fresh head for this seed, the same examples.
        self.task, tokenizer, model, _ = load_model(train_cfg)
        task = self.task
        self.kind = task_kind(train_cfg, task)
        self.base = model
        self.initial_state = copy.deepcopy(model.state_dict())
        self.groups = [parameter_group(n) for n, _ in model.named_parameters()]

        raw = load_raw(train_cfg, task)
        train_raw = raw["train"]
        self.num_examples = len(train_raw)
        E = cfg.effective_batch_size
        if self.num_examples < E:
            raise BertAccumError(f"the probe needs at least {E} training examples (one window), got {self.num_examples}")
        # Window k of the training order, the same for every (B, N); only those examples are tokenised.
        self.windows_per_epoch = math.ceil(self.num_examples / E)
        plans = {(b, n): WindowPlan(num_examples=self.num_examples, micro_batch_size=b, accumulation_steps=n,
                                    seed=cfg.seed) for b, n in [*cfg.configurations(), (E, 1)]}
        wanted = max(1, cfg.steps)
        self.windows: dict[tuple[int, int], list] = {}
        for key, plan in plans.items():
            out = []
            for epoch in range(math.ceil(wanted / self.windows_per_epoch)):
                out.extend((epoch, w) for w in plan.windows(epoch))
            self.windows[key] = out[:wanted]
        needed = sorted({i for ws in self.windows.values() for _, w in ws for m in w for p in m for i in p})
        position = {orig: k for k, orig in enumerate(needed)}
        self.windows = {key: [(epoch, [[[position[i] for i in p] for p in m] for m in w]) for epoch, w in ws]
                        for key, ws in self.windows.items()}
        from datasets import DatasetDict

        tokenized = load_splits(train_cfg, task, tokenizer, raw=DatasetDict({"train": train_raw.select(needed)}))
        self.split = InMemorySplit.from_dataset(tokenized["train"])  # idx keeps the example identity
        self.collators = {
            padding: Collator(self.split, tokenizer, padding, cfg.max_length, mlm=cfg.objective == "mlm",
                              mlm_probability=cfg.mlm_probability, seed=cfg.seed)
            for padding in ("dynamic", "window", "max_length")
        }
        self._models: dict[tuple, tuple[torch.nn.Module, Any]] = {}
        self._moved: set[tuple] = set()
        self.computations = 0
        self.compute_seconds = 0.0

    # -- models ---------------------------------------------------------------------------------
    def _model(self, comp: _Comp):
        """The model (and its dropout controller) for a computation, at the initial weights, without gradients."""
        from ..controls.dropout import DropoutController

        dtype = "fp64" if comp.precision == "fp64" else "fp32"
        key = (comp.dropout, comp.dropout_seed if comp.dropout == "invariant" else None, dtype)
        if key not in self._models:
            model = copy.deepcopy(self.base)
            if dtype == "fp64":
                model = model.double()
            ctl = DropoutController(model, comp.dropout, comp.dropout_seed)
            model.train()
            self._models[key] = (model, ctl)
        model, ctl = self._models[key]
        if key in self._moved:  # an optimizer changed the weights: back to the initial state
            model.load_state_dict(self.initial_state)
            self._moved.discard(key)
        model.zero_grad(set_to_none=True)
        return model, ctl, key

    def _micro_batches(self, comp: _Comp, epoch: int, window) -> list[dict[str, torch.Tensor]]:
        from ..core.windows import window_examples

        padding = "window" if comp.padding == "single" else comp.padding
        everyone = window_examples(window)
        return [self.collators[padding](micro[0], everyone, epoch) for micro in window]

    def _accumulate(self, model, ctl, comp: _Comp, epoch: int, window) -> None:
        from ..controls.loss import count_items
        from ..core.train import accumulate_window
        from ..core.windows import window_examples

        micro_batches = self._micro_batches(comp, epoch, window)
        items = count_items(micro_batches, self.kind)
        if items == 0:
            raise BertAccumError("the probed window has no items to predict")
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if comp.precision == "bf16" else None
        accumulate_window(
            model, micro_batches, epoch=epoch, dropout=ctl, kind=self.kind, loss_normalization=comp.loss_normalization,
            window_items=items, window_examples=len(window_examples(window)), accumulation_steps=len(window),
            compute_dtype=torch.float64 if comp.precision == "fp64" else torch.float32, device=torch.device("cpu"),
            autocast=autocast,
        )

    def gradient(self, comp: _Comp) -> list[torch.Tensor]:
        """The accumulated gradient of the first window (one tensor per parameter, native dtype)."""
        t0 = time.perf_counter()
        model, ctl, _ = self._model(comp)
        torch.manual_seed(comp.dropout_seed)  # every configuration starts from the same torch RNG state
        epoch, window = self.windows[(comp.micro_batch_size, comp.accumulation_steps)][0]
        self._accumulate(model, ctl, comp, epoch, window)
        # the .grad tensors themselves are handed over (set_to_none below detaches them from the model)
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        self.computations += 1
        self.compute_seconds += time.perf_counter() - t0
        return grads

    def trajectory(self, comp: _Comp, steps: int) -> list[torch.Tensor]:
        """Flat parameters before and after each of `steps` AdamW steps over consecutive windows."""
        t0 = time.perf_counter()
        model, ctl, key = self._model(comp)
        self._moved.add(key)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=0.0, eps=1e-8)
        torch.manual_seed(comp.dropout_seed)  # seeded once, as a training run is
        flat = [torch.cat([p.detach().reshape(-1) for p in params]).clone()]
        for epoch, window in self.windows[(comp.micro_batch_size, comp.accumulation_steps)][:steps]:
            self._accumulate(model, ctl, comp, epoch, window)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            flat.append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
        self.computations += steps
        self.compute_seconds += time.perf_counter() - t0
        return flat


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


# ----------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86 avx512_bf16 or AMX); False where it cannot be told."""
    from ..core.records import cpu_info

    flags = cpu_info()["flags"]
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def default_arms() -> list[str]:
    """Every arm, without `controlled_bf16` where bf16 would be emulated (see `ProbeConfig.arms`)."""
    return [a for a in ARMS if a != "controlled_bf16" or cpu_has_bf16_matmul()]


def run_probe(cfg: ProbeConfig) -> ProbeResult:
    """Run the probe, write probe.csv / probe.md (and probe_steps.csv), print the table; returns the rows."""
    from .plumbing import header as plumbing_header
    from .plumbing import provenance, write_csv

    started = time.perf_counter()
    cfg.validate()
    say = (lambda *a, **k: None) if cfg.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    trainer_arms = None if cfg.trainer_arms is None else (list(cfg.trainer_arms) or list(TRAINER_ARMS))
    if cfg.arms is None and trainer_arms is not None:
        cfg.arms = []  # only the Trainer arms were asked for
    if cfg.arms is None:
        cfg.arms = default_arms()
        if "controlled_bf16" not in cfg.arms:
            say("[probe] skipping controlled_bf16: this CPU has no bf16 matrix instructions (avx512_bf16/amx), so bf16 "
                "would be emulated; add it with --arms ... controlled_bf16")
    prober = _Prober(cfg, say)
    kind = prober.kind
    E = cfg.effective_batch_size
    configs = [(b, n) for b, n in cfg.configurations() if n > 1]
    seed, floor_seed = cfg.seed, cfg.seed + 1
    task = prober.task.name
    say(f"[probe] task {task} ({kind}) | effective batch {E} | configurations "
        + ", ".join(f"({b},{n})" for b, n in configs) + f" vs ({E},1) | arms {', '.join(cfg.arms)}"
        + (f" | {cfg.steps} optimizer steps" if cfg.steps else "")
        + (f" | trainer arms {', '.join(trainer_arms)}" if trainer_arms else ""))

    # Which reference gradients are needed, and by how many arms: kept only while still needed.
    refs_left: dict[_Comp, int] = {}
    for name in cfg.arms:
        ref = _comp(ARMS[name], E, 1, kind, seed)
        refs_left[ref] = refs_left.get(ref, 0) + 1
    ref_grads: dict[_Comp, _Flat] = {}
    metrics: dict[tuple[_Comp, _Comp], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for name in cfg.arms:
        arm = ARMS[name]
        t_arm = time.perf_counter()
        ref_c = _comp(arm, E, 1, kind, seed)
        floor_c = _comp(arm, E, 1, kind, floor_seed)
        if ref_c not in ref_grads:
            ref_grads[ref_c] = _Flat(prober.gradient(ref_c), prober.groups)
        ref = ref_grads[ref_c]
        if (floor_c, ref_c) not in metrics:
            metrics[(floor_c, ref_c)] = _compare(prober.gradient(floor_c), ref)
        floor = metrics[(floor_c, ref_c)]["rel_l2"]
        for b, n in configs:
            c = _comp(arm, b, n, kind, seed)
            if (c, ref_c) not in metrics:
                metrics[(c, ref_c)] = _compare(prober.gradient(c), ref)
            m = metrics[(c, ref_c)]
            rows.append({"task": task, "objective": cfg.objective, "arm": name, "micro_batch_size": b,
                         "accumulation_steps": n, "effective_batch_size": E, **m, "seed_floor_rel_l2": floor,
                         "ratio_to_floor": _ratio(m["rel_l2"], floor)})
        refs_left[ref_c] -= 1
        if refs_left[ref_c] == 0:
            del ref_grads[ref_c]
        say(f"[probe] arm {name}: {time.perf_counter() - t_arm:.1f} s")

    step_rows = _run_steps(cfg, prober, configs, kind, task, say) if cfg.steps and cfg.arms else []
    trainer_rows = _run_trainer_arms(trainer_arms, prober, configs, task, say) if trainer_arms else []

    seconds = time.perf_counter() - started
    out = cfg.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    header = provenance(cfg.command)
    files: dict[str, Path] = {}
    markdown = ""
    if cfg.arms:
        files.update(csv=out / "probe.csv", md=out / "probe.md")
        write_csv(files["csv"], rows, header, COLUMNS)
        markdown = _markdown(rows, cfg, prober, seconds)
        files["md"].write_text(plumbing_header(header, markdown=True) + "\n" + markdown)
    if trainer_rows:
        files.update(trainer_csv=out / "probe_trainer.csv", trainer_md=out / "probe_trainer.md")
        write_csv(files["trainer_csv"], trainer_rows, header, TRAINER_COLUMNS)
        trainer_md = _trainer_markdown(trainer_rows, trainer_arms, cfg, seconds)
        files["trainer_md"].write_text(plumbing_header(header, markdown=True) + "\n" + trainer_md)
        markdown += ("\n" if markdown else "") + trainer_md
    if step_rows:
        files["steps_csv"] = out / "probe_steps.csv"
        write_csv(files["steps_csv"], step_rows, header, STEP_COLUMNS)
    say(markdown)
    if step_rows:
        say(_steps_markdown(step_rows, cfg.steps))
    say(f"[probe] total wall time {seconds:.1f} s ({prober.computations} window computations, "
        f"{prober.compute_seconds:.1f} s of forward/backward) -> {out}")
    return ProbeResult(rows=rows, step_rows=step_rows, files=files, seconds=seconds, markdown=markdown,
                       trainer_rows=trainer_rows)


def _trainer_gradient(prober: _Prober, arm: TrainerArm, b: int, n: int, dropout_seed: int) -> list[torch.Tensor]:
    """The first window's accumulated gradient at (b, n) under a Trainer arm (a fresh copy of the initial model)."""
    from ..core.windows import window_examples
    from ..integrations.window_gradient import trainer_window_gradient

    t0 = time.perf_counter()
    epoch, window = prober.windows[(b, n)][0]
    everyone = window_examples(window)
    # Dynamic padding here: the exact trainer pads the window itself when its padding is "window".
    micro_batches = [prober.collators["dynamic"](micro[0], everyone, epoch) for micro in window]
    kwargs = {}
    if arm.backend == "exact_trainer":
        kwargs = dict(dropout=arm.dropout, padding=arm.padding, loss_normalization=arm.loss_normalization)
    model = copy.deepcopy(prober.base)
    if arm.backend == "trainer" and arm.dropout == "off":
        from ..controls.dropout import DropoutController

        DropoutController(model, "off")
    model.train()
    grads = trainer_window_gradient(model, micro_batches, backend=arm.backend, dropout_seed=dropout_seed,
                                    seed=prober.cfg.seed, **kwargs)
    prober.computations += 1
    prober.compute_seconds += time.perf_counter() - t0
    return grads


def _run_trainer_arms(names: list[str], prober: _Prober, configs, task: str, say) -> list[dict[str, Any]]:
    """Each Trainer arm's (B, N) gradients against its own (E, 1) gradient, with the norm ratio and a seed floor."""
    cfg, kind = prober.cfg, prober.kind
    E = cfg.effective_batch_size
    seed, floor_seed = cfg.seed, cfg.seed + 1
    rows: list[dict[str, Any]] = []
    for name in names:
        arm = TRAINER_ARMS[name]
        t_arm = time.perf_counter()
        if arm.backend == "bert_accum":
            loop_arm = Arm(name, arm.dropout, arm.padding, arm.loss_normalization, "fp32")

            def gradient(b, n, dropout_seed, _arm=loop_arm):
                return prober.gradient(_comp(_arm, b, n, kind, dropout_seed))
        else:
            def gradient(b, n, dropout_seed, _arm=arm):
                return _trainer_gradient(prober, _arm, b, n, dropout_seed)
        ref = _Flat(gradient(E, 1, seed), prober.groups)
        floor = _compare(gradient(E, 1, floor_seed), ref)["rel_l2"]
        for b, n in configs:
            g = _Flat(gradient(b, n, seed), prober.groups)
            m = _compare(g, ref)
            rows.append({"task": task, "objective": cfg.objective, "arm": name, "backend": arm.backend,
                         "micro_batch_size": b, "accumulation_steps": n, "effective_batch_size": E, **m,
                         "norm_ratio": g.norm / ref.norm if ref.norm > 0 else math.nan, "seed_floor_rel_l2": floor,
                         "ratio_to_floor": _ratio(m["rel_l2"], floor)})
        say(f"[probe] trainer arm {name}: {time.perf_counter() - t_arm:.1f} s")
    return rows


def _run_steps(cfg: ProbeConfig, prober: _Prober, configs, kind: str, task: str, say) -> list[dict[str, Any]]:
    """K AdamW steps per (arm, configuration); parameter distance to the (E, 1) run after each step."""
    E = cfg.effective_batch_size
    K = cfg.steps
    seed, floor_seed = cfg.seed, cfg.seed + 1
    cache: dict[tuple[_Comp, _Comp], list[float]] = {}
    rows: list[dict[str, Any]] = []
    for name in cfg.arms:
        arm = ARMS[name]
        t_arm = time.perf_counter()
        ref_c = _comp(arm, E, 1, kind, seed)
        floor_c = _comp(arm, E, 1, kind, floor_seed)
        needed = [(floor_c, ref_c)] + [(_comp(arm, b, n, kind, seed), ref_c) for b, n in configs]
        ref = None
        if any(k not in cache for k in needed):
            ref = prober.trajectory(ref_c, K)
            for c, _ in needed:
                if (c, ref_c) not in cache:
                    traj = prober.trajectory(c, K)
                    cache[(c, ref_c)] = [_distance(traj[k], ref[k]) for k in range(1, K + 1)]
                    del traj
            cache[("update", ref_c)] = [_distance(ref[k], ref[0]) for k in range(1, K + 1)]
            del ref
        floor = cache[(floor_c, ref_c)]
        update = cache[("update", ref_c)]
        for b, n in configs:
            dist = cache[(_comp(arm, b, n, kind, seed), ref_c)]
            for k in range(K):
                rows.append({"task": task, "objective": cfg.objective, "arm": name, "micro_batch_size": b,
                             "accumulation_steps": n, "effective_batch_size": E, "optimizer_step": k + 1,
                             "param_l2": dist[k], "rel_to_update": _ratio(dist[k], update[k]),
                             "seed_floor_param_l2": floor[k], "ratio_to_floor": _ratio(dist[k], floor[k])})
        say(f"[probe] steps, arm {name}: {time.perf_counter() - t_arm:.1f} s")
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _fmt(v: float, digits: int = 3) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}e}"


def _markdown(rows, cfg: ProbeConfig, prober: _Prober, seconds: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["task"], r["objective"], r["arm"], str(r["micro_batch_size"]), str(r["accumulation_steps"]),
                 str(r["effective_batch_size"]), _fmt(r["rel_l2"]), f"{r['cosine']:.10f}", _fmt(r["max_group_rel"]),
                 r["max_group"], _fmt(r["seed_floor_rel_l2"]), f"{r['ratio_to_floor']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    E = cfg.effective_batch_size
    legend = [
        "",
        f"Accumulated gradient of the first window of epoch 0 (seed {cfg.seed}, {E} examples) for each (B, N) "
        f"against ({E}, 1) under the same arm, from identical weights; model {cfg.model_name_or_path}, "
        f"max_length {cfg.max_length}. rel_l2 = ||g - g_ref|| / ||g_ref||; max_group_rel = largest per-group "
        "relative difference; seed_floor_rel_l2 = the same comparison between dropout seeds "
        f"{cfg.seed} and {cfg.seed + 1} of ({E}, 1); ratio_to_floor = rel_l2 / seed_floor_rel_l2. Bitwise-identical "
        "computations are done once and shared (at N = 1 window and dynamic padding coincide; unless the objective "
        "is MLM, mean_of_means and global normalisation give the same scale factors), so such rows repeat.",
        "",
        "Arms (dropout / padding / loss normalisation / precision):",
        "",
    ]
    for name in cfg.arms:
        a = ARMS[name]
        legend.append(f"- `{name}`: {a.dropout} / {a.padding} / {a.loss_normalization} / {a.precision} ({a.description})")
    legend += ["", f"Wall time {seconds:.1f} s, {prober.computations} window computations "
               f"({prober.compute_seconds:.1f} s forward/backward), {torch.get_num_threads()} torch threads.", ""]
    return "\n".join(lines + legend)


def _trainer_markdown(rows, names: list[str], cfg: ProbeConfig, seconds: float) -> str:
    import transformers

    lines = ["| " + " | ".join(TRAINER_COLUMNS) + " |", "|" + "---|" * len(TRAINER_COLUMNS)]
    for r in rows:
        cells = [r["task"], r["objective"], r["arm"], r["backend"], str(r["micro_batch_size"]),
                 str(r["accumulation_steps"]), str(r["effective_batch_size"]), _fmt(r["rel_l2"]), f"{r['cosine']:.10f}",
                 f"{r['norm_ratio']:.6f}", _fmt(r["max_group_rel"]), r["max_group"], _fmt(r["seed_floor_rel_l2"]),
                 f"{r['ratio_to_floor']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    E = cfg.effective_batch_size
    legend = [
        "",
        f"The Hugging Face Trainer (transformers {transformers.__version__}): the accumulated gradient of the first "
        f"window of epoch 0 (seed {cfg.seed}, {E} examples) for each (B, N) against ({E}, 1) under the same arm, from "
        f"identical weights; model {cfg.model_name_or_path}, max_length {cfg.max_length}. The Trainer arms run "
        "Trainer.train for one optimizer step (gradient copied before clipping and the optimizer); the loop arms are "
        "this project's loop. norm_ratio = ||g|| / ||g_ref||: N where the Trainer does not divide the micro-batch "
        "means by N. Standard dropout restarts torch's RNG from the seed before the first micro-step, as the loop "
        f"arms do; seed_floor_rel_l2 compares dropout seeds {cfg.seed} and {cfg.seed + 1} of ({E}, 1).",
        "",
        "Arms (backend: dropout / padding / loss normalisation):",
        "",
    ]
    for name in names:
        a = TRAINER_ARMS[name]
        legend.append(f"- `{name}`: {a.backend}: {a.dropout} / {a.padding} / {a.loss_normalization} ({a.description})")
    legend += ["", f"Wall time of the whole probe {seconds:.1f} s, {torch.get_num_threads()} torch threads.", ""]
    return "\n".join(lines + legend)


def _steps_markdown(step_rows, steps: int) -> str:
    cols = ("arm", "micro_batch_size", "accumulation_steps", "optimizer_step", "param_l2", "rel_to_update",
            "seed_floor_param_l2", "ratio_to_floor")
    lines = [f"Parameter distance to the (E, 1) run after optimizer step {steps}:", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in step_rows:
        if r["optimizer_step"] != steps:
            continue
        lines.append("| " + " | ".join([r["arm"], str(r["micro_batch_size"]), str(r["accumulation_steps"]),
                                        str(r["optimizer_step"]), _fmt(r["param_l2"]), _fmt(r["rel_to_update"]),
                                        _fmt(r["seed_floor_param_l2"]), f"{r['ratio_to_floor']:.3g}"]) + " |")
    return "\n".join(lines) + "\n"
