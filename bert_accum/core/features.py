"""Tokenisation (cached by `datasets`), micro-batch collation under each padding mode, and MLM masking.

MLM masks are drawn per example from (seed, example id, epoch), not from a shared RNG stream, so an
example is masked the same way whatever micro-batch, (B, N) or process it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BertAccumError

FEATURE_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


def tokenize_splits(raw, tokenizer, max_length: int, is_pair: bool):
    """Tokenise every split without padding (padding is a per-micro-batch decision) and add `length`."""

    def encode(batch):
        args = (batch["sentence1"], batch["sentence2"]) if is_pair else (batch["sentence1"],)
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    keep = {"label", "idx"}
    tokenized = raw.map(
        encode,
        batched=True,
        remove_columns=[c for c in raw["train"].column_names if c not in keep],
        desc="tokenizing",
    )
    for name, split in tokenized.items():
        if len(split) == 0:
            raise BertAccumError(f"split {name!r} is empty")
    return tokenized


@dataclass
class InMemorySplit:
    """A tokenised split as Python lists, so building a micro-batch is indexing, not Arrow reads."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list
    idx: list[int]

    @classmethod
    def from_dataset(cls, ds) -> "InMemorySplit":
        """Materialise the columns needed for training."""
        cols = [c for c in ("input_ids", "token_type_ids", "label", "idx") if c in ds.column_names]
        data = ds.select_columns(cols).to_dict()
        return cls(
            input_ids=data["input_ids"],
            token_type_ids=data.get("token_type_ids"),
            labels=data["label"],
            idx=data["idx"],
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def length(self, i: int) -> int:
        """Token count of example i (before padding)."""
        return len(self.input_ids[i])


def mlm_mask_example(ids: list[int], special: list[int], *, seed: int, example_id: int, epoch: int,
                     probability: float, mask_token_id: int, vocab_size: int) -> tuple[list[int], list[int]]:
    """BERT masking of one example from its own RNG: (masked input ids, labels with -100 where not predicted).

    15% of non-special tokens are chosen; of those 80% become [MASK], 10% a random token, 10% stay.
    At least one token is chosen so that every example contributes to the per-token loss.
    """
    rng = np.random.default_rng([seed, 0x4D4C4D, example_id, epoch])  # 0x4D4C4D = "MLM": its own stream
    ids_arr = np.asarray(ids, dtype=np.int64)
    candidates = np.flatnonzero(np.asarray(special) == 0)
    chosen = candidates[rng.random(candidates.size) < probability]
    if chosen.size == 0 and candidates.size:
        chosen = candidates[[rng.integers(candidates.size)]]
    labels = np.full_like(ids_arr, -100)
    labels[chosen] = ids_arr[chosen]
    action = rng.random(chosen.size)
    masked = ids_arr.copy()
    masked[chosen[action < 0.8]] = mask_token_id
    rand_pos = chosen[(action >= 0.8) & (action < 0.9)]
    masked[rand_pos] = rng.integers(vocab_size, size=rand_pos.size)
    return masked.tolist(), labels.tolist()


class Collator:
    """Turns a list of example indices into padded tensors for one micro-batch."""

    def __init__(self, split: InMemorySplit, tokenizer, padding: str, max_length: int, *,
                 mlm: bool = False, mlm_probability: float = 0.15, seed: int = 0):
        self.split = split
        self.pad_id = tokenizer.pad_token_id
        self.padding = padding
        self.max_length = max_length
        self.mlm = mlm
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.tokenizer = tokenizer

    def pad_length(self, micro: list[int], window: list[int]) -> int:
        """Padded length of a micro-batch: its own longest, its window's longest, or max_length."""
        if self.padding == "max_length":
            return self.max_length
        members = window if self.padding == "window" else micro
        return max(self.split.length(i) for i in members)

    def __call__(self, micro: list[int], window: list[int], epoch: int) -> dict[str, torch.Tensor]:
        """Tensors for `micro`; `window` is every example of its accumulation window (all processes)."""
        length = self.pad_length(micro, window)
        s = self.split
        n = len(micro)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        token_type = torch.zeros((n, length), dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        mlm_labels = torch.full((n, length), -100, dtype=torch.long) if self.mlm else None
        for row, i in enumerate(micro):
            ids = s.input_ids[i]
            if self.mlm:
                special = self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                ids, labels = mlm_mask_example(
                    ids, special, seed=self.seed, example_id=s.idx[i], epoch=epoch,
                    probability=self.mlm_probability, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                )
                mlm_labels[row, : len(labels)] = torch.tensor(labels)
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            if s.token_type_ids is not None:
                token_type[row, : len(ids)] = torch.tensor(s.token_type_ids[i])
        batch = {
            "input_ids": input_ids,
            "token_type_ids": token_type,
            "attention_mask": attention,
            "example_ids": torch.tensor([s.idx[i] for i in micro], dtype=torch.long),
        }
        if self.mlm:
            batch["labels"] = mlm_labels
        else:
            label_dtype = torch.float32 if isinstance(s.labels[micro[0]], float) else torch.long
            batch["labels"] = torch.tensor([s.labels[i] for i in micro], dtype=label_dtype)
        return batch
