"""Byte-level text data for the ablations: the corpus, a fixed held-out split, and batches.

Default corpus: the English help text that ships with Python (``pydoc_data.topics``, ~465 KB),
so a run needs no download. Tokens are the UTF-8 bytes (vocabulary 256)."""
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

VOCAB_SIZE = 256
VAL_FRACTION = 0.1  # the last 10% of the bytes, never trained on


class DataError(ValueError):
    """The text given with --data cannot be used; the message says why."""


def default_corpus() -> bytes:
    from pydoc_data.topics import topics

    # Sorted by topic name so the text, and so the split, is the same on every Python build.
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def read_corpus(path: Optional[str]) -> tuple[bytes, str]:
    """The corpus bytes and a short description. ``path``: None (the default corpus), a text
    file, or a folder whose ``*.txt`` files (recursively, sorted by path) are joined."""
    if path is None:
        return default_corpus(), "pydoc_data.topics (Python's bundled help text)"
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        if not files:
            raise DataError(f"--data {path}: the folder holds no .txt files")
        parts = []
        for f in files:
            with open(f, "rb") as fh:
                parts.append(fh.read())
        return b"\n\n".join(parts), f"{len(files)} .txt files under {path}"
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return fh.read(), path
    raise DataError(f"--data {path}: no such file or folder")


@dataclass
class Corpus:
    train: Tensor       # [N_train] uint8 byte ids
    val: Tensor         # [N_val]
    description: str
    fingerprint: str    # sha256 prefix of the bytes: results are only reused on the same data

    @property
    def unigram_loss(self) -> float:
        """Held-out cross-entropy (nats/byte) of the training split's byte frequencies (add-one
        smoothed): the loss of a model that learned nothing but which bytes are common."""
        counts = torch.bincount(self.train.long(), minlength=VOCAB_SIZE).double() + 1
        logp = (counts / counts.sum()).log()
        return float(-logp[self.val.long()].mean())

    @classmethod
    def load(cls, path: Optional[str], min_len: int) -> "Corpus":
        raw, desc = read_corpus(path)
        n_val = int(len(raw) * VAL_FRACTION)
        if len(raw) - n_val <= min_len or n_val <= min_len:
            raise DataError(f"corpus {desc} has {len(raw)} bytes: too short for sequences of "
                             f"{min_len} tokens with a {VAL_FRACTION:.0%} held-out split")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return cls(train=data[: len(raw) - n_val], val=data[len(raw) - n_val:], description=desc,
                   fingerprint=hashlib.sha256(raw).hexdigest()[:16])


class BatchSampler:
    """Random windows of ``seq_len`` bytes; the labels are the inputs (the model shifts them
    inside: position t predicts t + 1). Seeded, so every variant sees the same batches."""

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> Tensor:
        hi = len(self.data) - self.seq_len
        starts = torch.randint(0, hi, (self.batch_size,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len)[None, :]
        return self.data[idx].long()  # [B, S]


def document_starts(data: Tensor) -> Tensor:
    """Where each document of the byte stream starts (int64): at 0 and after every blank line
    ("\\n\\n", which ends the document before it). The default corpus's help topics and their
    paragraphs are the documents."""
    nl = data == 10
    after_blank = torch.nonzero(nl[:-1] & nl[1:]).flatten() + 2
    starts = torch.cat([torch.zeros(1, dtype=torch.long), after_blank[after_blank < len(data)]])
    return torch.unique_consecutive(starts)


class PackedSampler:
    """Rows of ``seq_len`` bytes packed with whole documents back to back (padding-free
    training): each row starts at a random document and takes the ones after it; the last is
    cut at the row's end. ``next()`` returns the batch ``[B, S]`` and its int32 ``cu_seqlens``
    (`archext.ops.packing`), so attention stays in each document and positions restart."""

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.starts = document_starts(data)
        self.ends = torch.cat([self.starts[1:], torch.tensor([len(data)])])
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        rows, cu = [], [0]
        first = torch.randint(0, len(self.starts), (self.batch_size,), generator=self.gen).tolist()
        for r, d in enumerate(first):
            row, filled = [], 0
            while filled < self.seq_len:
                s, e = int(self.starts[d % len(self.starts)]), int(self.ends[d % len(self.starts)])
                take = min(e - s, self.seq_len - filled)
                row.append(self.data[s:s + take])
                filled += take
                cu.append(r * self.seq_len + filled)
                d += 1
            rows.append(torch.cat(row))
        return torch.stack(rows).long(), torch.tensor(cu, dtype=torch.int32)


def val_batches(data: Tensor, batch_size: int, seq_len: int, max_batches: int) -> list[Tensor]:
    """Non-overlapping windows spread evenly over the held-out bytes; the same for every run."""
    n_windows = len(data) // seq_len
    n = min(n_windows, batch_size * max_batches)
    starts = torch.arange(n) * (n_windows // n) * seq_len
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    windows = data[idx].long()
    return [windows[i:i + batch_size] for i in range(0, n, batch_size)]
