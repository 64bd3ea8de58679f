"""Packed sequences: several documents in one row, described by ``cu_seqlens``.

``cu_seqlens`` (int32 or int64, ``[n_docs + 1]``) holds the cumulative document lengths over the
row-major token stream of a ``[B, S]`` batch, as flash-attention's varlen API does: document d
spans the flattened tokens ``cu_seqlens[d] <= t < cu_seqlens[d + 1]``; it starts at 0, rises
strictly and ends at ``B * S``. A document may not cross a row (each multiple of S is a
boundary), since attention never crosses rows. Each token's position restarts at 0 in its
document, and its segment id (the document's index) keeps attention inside the document.

Everything here is tensor arithmetic on the device: no host sync, and `torch.compile` traces it.
The value checks (`check_cu_seqlens`) read the tensor on the host, so they run eagerly only.
"""
from typing import Optional

import torch
from torch import Tensor


def check_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int, device=None) -> None:
    """Raise a ValueError naming ``cu_seqlens`` unless it describes documents covering a
    ``[batch, seq_len]`` batch (see the module docstring). The dtype / device / rank checks are
    always made; the value checks (one host read) only outside `torch.compile`."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries (0 and the token count), "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, the tokens on {torch.device(device)}")
    if torch.compiler.is_compiling():
        return
    cu = cu_seqlens.tolist()
    total = batch * seq_len
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty document), but "
                         f"cu_seqlens[{bad}] = {cu[bad]} <= cu_seqlens[{bad - 1}] = {cu[bad - 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the token count {batch} x {seq_len} = {total}, "
                         f"got {cu[-1]}")
    if batch > 1:
        starts = set(cu)
        row = next((r for r in range(1, batch) if r * seq_len not in starts), None)
        if row is not None:
            raise ValueError(f"cu_seqlens: a document crosses from row {row - 1} to row {row} (token "
                             f"{row * seq_len} is not a boundary); documents may not span rows")


def _documents(cu_seqlens: Tensor, batch: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """(position in its document, document index) of every flattened token, int64 ``[B * S]``."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(batch * seq_len, device=cu.device, dtype=torch.int64)
    seg = torch.searchsorted(cu[1:].contiguous(), t, right=True)
    return t - cu[seg], seg


def segment_ids(cu_seqlens: Tensor, batch: int, seq_len: int) -> Tensor:
    """The document index of every token, int32 ``[batch, seq_len]``."""
    return _documents(cu_seqlens, batch, seq_len)[1].to(torch.int32).view(batch, seq_len)


def positions(cu_seqlens: Tensor, batch: int, seq_len: int) -> Tensor:
    """Each token's position in its document, int64 ``[batch, seq_len]`` (0 at each start)."""
    return _documents(cu_seqlens, batch, seq_len)[0].view(batch, seq_len)


def unpack(cu_seqlens: Tensor, batch: int, seq_len: int, device=None) -> tuple[Tensor, Tensor]:
    """`check_cu_seqlens`, then `positions` and `segment_ids` from one search: what a model
    or an attention layer given ``cu_seqlens`` needs."""
    check_cu_seqlens(cu_seqlens, batch, seq_len, device)
    pos, seg = _documents(cu_seqlens, batch, seq_len)
    return pos.view(batch, seq_len), seg.to(torch.int32).view(batch, seq_len)


def segments_from_position_ids(position_ids: Tensor) -> Tensor:
    """Segment ids int32 ``[B, S]`` of a packed batch given by position ids that restart: a
    document starts wherever a position is not its predecessor's plus one (as transformers'
    ``find_packed_sequence_indices`` reads a flattened batch). ``[S]`` ids serve every row."""
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    step = torch.ones_like(pos, dtype=torch.int32)
    step[:, 0] = 0
    step[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).to(torch.int32)
    return step.cumsum(-1, dtype=torch.int32)


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """The ``cu_seqlens`` (int32) of a ``[B, S]`` batch whose position ids restart at each
    document (a host read: for data loading, not inside a compiled step)."""
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    b, s = pos.shape
    seg = segments_from_position_ids(pos)
    new_doc = torch.ones_like(seg, dtype=torch.bool)
    new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = torch.nonzero(new_doc.reshape(-1)).flatten()
    end = torch.tensor([b * s], device=pos.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def boundary_targets(labels_shifted: Tensor, segments: Tensor, ignore_index: int = -100) -> Tensor:
    """``labels_shifted`` (position t holds the target of t, i.e. label t + 1) with every target
    that crosses into the next document set to ``ignore_index``: the last token of a document
    predicts nothing."""
    crosses = torch.zeros_like(segments, dtype=torch.bool)
    crosses[:, :-1] = segments[:, 1:] != segments[:, :-1]
    return labels_shifted.masked_fill(crosses, ignore_index)


def pack_documents(docs: list, seq_len: Optional[int] = None, pad_id: int = 0,
                   device=None) -> tuple[Tensor, Tensor]:
    """Token lists (or 1-D tensors) packed back to back into one row ``[1, T]`` (``seq_len``:
    pad the row to that length with one last padding document), with its int32 ``cu_seqlens``.
    For tests and examples; a data loader packs its own way."""
    rows = [torch.as_tensor(d, dtype=torch.long).flatten() for d in docs]
    lengths = [len(r) for r in rows]
    if any(n == 0 for n in lengths):
        raise ValueError("pack_documents: empty document")
    total = sum(lengths)
    if seq_len is not None and seq_len > total:
        rows.append(torch.full((seq_len - total,), pad_id, dtype=torch.long))
        lengths.append(seq_len - total)
    elif seq_len is not None and seq_len < total:
        raise ValueError(f"pack_documents: {total} tokens do not fit seq_len={seq_len}")
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return torch.cat(rows)[None].to(device), cu.to(device)
