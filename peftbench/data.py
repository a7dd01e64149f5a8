"""Length-grouped batching and dynamic padding (tokenisation belongs to the task kinds)."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length, so dynamic padding pads little.

    Each epoch: a random permutation, cut into windows of ``window`` batches, each
    window sorted by length and cut into batches, then the batch order shuffled.
    Deterministic in (seed, epoch); call ``set_epoch`` before each epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True, window: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        if self.group_by_length:
            span = self.batch_size * self.window
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s : s + span], key=lambda i: self.lengths[i], reverse=True)]
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return iter(batches)


class Collator:
    """Pads a list of encoded examples to the longest in the batch.

    A batch is ``{"inputs": model inputs, "labels", "id", "num_tokens"}`` (+ ``char_index`` for
    token classification): ``num_tokens`` counts real, non-pad tokens on the host before any
    transfer, and ``id`` traces predictions to records. Token labels are padded with -100 and
    ``char_index`` with -1.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: list[dict], width: int = 0) -> dict:
        """``width``: pad to at least this length (batches collated apart and joined)."""
        longest = max(width, *(len(ex["input_ids"]) for ex in examples))
        width = math.ceil(longest / self.multiple) * self.multiple

        def padded(key, fill):
            return torch.tensor([ex[key] + [fill] * (width - len(ex[key])) for ex in examples], dtype=torch.long)

        present = [key for key in MODEL_INPUTS if key in examples[0]]
        batch = {"inputs": {key: padded(key, self.pad_id if key == "input_ids" else 0) for key in present}}
        if "char_index" in examples[0]:
            batch.update(labels=padded("labels", -100), char_index=padded("char_index", -1))
        else:
            batch["labels"] = torch.tensor([ex["labels"] for ex in examples], dtype=torch.long)
        batch["id"] = torch.tensor([ex["id"] for ex in examples], dtype=torch.long)
        batch["num_tokens"] = sum(len(ex["input_ids"]) for ex in examples)
        return batch


def train_loader(ds: Dataset, collator: Collator, batch_size: int, seed: int, group_by_length: bool,
                 pin_memory: bool = False) -> DataLoader:
    sampler = LengthGroupedBatchSampler(list(ds["length"]), batch_size, seed, group_by_length)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collator, pin_memory=pin_memory)


def eval_loader(ds: Dataset, collator: Collator, batch_size: int, pin_memory: bool = False) -> DataLoader:
    """Sequential batches over the split sorted by length (less padding); ``id`` maps back."""
    lengths = list(ds["length"])
    order = sorted(range(len(ds)), key=lengths.__getitem__, reverse=True)
    return DataLoader(ds.select(order), batch_size=batch_size, shuffle=False, collate_fn=collator,
                      pin_memory=pin_memory)
