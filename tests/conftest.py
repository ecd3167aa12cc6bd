"""Shared fixtures: a tiny BERT (built from a BertConfig, random weights) with a tiny WordPiece vocabulary,
and a small synthetic GLUE-format task, all in temporary folders: no downloads, seconds to build."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test model is tiny: one intra-op thread is fastest, and on busy shared cores extra threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vocab() -> list[str]:
    from bert_accum.core import synthetic

    words = set()
    for name in dir(synthetic):
        value = getattr(synthetic, name)
        if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            for phrase in value:
                words.update(phrase.lower().split())
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + sorted(w for w in words if w.isalpha()) + list("abcdefghijklmnopqrstuvwxyz")


def build_tiny_model(folder, dropout: float = 0.1, layers: int = 2) -> str:
    """Save a 2-layer, 32-hidden BERT and its tokenizer to `folder`; returns the folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as fh:
        fh.write("\n".join(_vocab()) + "\n")
    tok = BertTokenizer(vocab=vocab_file, do_lower_case=True)  # transformers 5 ignores vocab_file= here
    tok.save_pretrained(folder)
    import torch

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny BERT folder that `from_pretrained` loads (dropout 0.1)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def synthetic_glue_dir(tmp_path_factory) -> str:
    """A GLUE-layout folder holding the synthetic task (60 train / 24 dev examples)."""
    from bert_accum.core.synthetic import generate_synthetic_glue

    return generate_synthetic_glue(str(tmp_path_factory.mktemp("glue")), n_train=60, n_dev=24, seed=0)


class Boom:
    """Unpickling this runs a shell command that creates `marker`: what a pickle planted in a run folder could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_old_format(checkpoint: Path, marker: Path) -> None:
    """Make `checkpoint` look like one written by accelerate's save_state, with pickles that would create `marker`."""
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(Boom(marker)))
