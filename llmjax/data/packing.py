"""Fixed-length packed rows over a token stream, and a resumable shuffled batch iterator.

Row ``r`` is the window ``stream[r*T : r*T + T + 1]``: its first ``T`` ids are the inputs and its
last ``T`` the targets, so no token is wasted on padding. Each input token carries the id of its
document *within the row* (``segment_ids``, from 1) and its position inside that document
(``positions``); attention never crosses a segment. A target from another document (an ``eos``
followed by the next ``bos``) gets ``loss_mask`` 0.

The iterator's whole state is ``(epoch, index)``: the order of epoch ``e`` is a permutation drawn
from ``(seed, e)``, so a run resumed from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmjax.data.sources import DataError
from llmjax.data.tokens import TokenStream

Batch = dict[
    str, np.ndarray
]  # tokens, targets, positions, segment_ids: int32 [B, T]; loss_mask f32


@dataclass(frozen=True)
class PackedRows:
    stream: TokenStream
    seq_len: int

    def __post_init__(self):
        if self.seq_len < 2:
            raise DataError(f"seq_len={self.seq_len}: must be at least 2")

    def __len__(self) -> int:
        return max(self.stream.num_tokens - 1, 0) // self.seq_len

    def rows(self, idx: np.ndarray) -> Batch:
        """The packed rows ``idx`` as a batch of int32 arrays, each ``[len(idx), seq_len]``."""
        T = self.seq_len
        starts = np.asarray(idx, np.int64)[:, None] * T
        pos_BT1 = starts + np.arange(T + 1)[None, :]  # absolute stream positions, one extra
        window = np.asarray(self.stream.tokens[pos_BT1], np.int32)
        offsets = self.stream.offsets
        doc_BT1 = np.searchsorted(offsets, pos_BT1, side="right") - 1
        doc_BT, tgt_doc_BT = doc_BT1[:, :-1], doc_BT1[:, 1:]
        # A document cut at the row start restarts at position 0: rows are independent samples.
        doc_start_BT = np.maximum(offsets[doc_BT], starts)
        return {
            "tokens": window[:, :-1],
            "targets": window[:, 1:],
            "positions": (pos_BT1[:, :-1] - doc_start_BT).astype(np.int32),
            "segment_ids": (doc_BT - doc_BT[:, :1] + 1).astype(np.int32),
            "loss_mask": (doc_BT == tgt_doc_BT).astype(np.float32),
        }


class BatchIterator:
    """Endless shuffled batches of packed rows; ``state()`` / ``restore()`` make it resumable.

    Each epoch visits ``len(rows) // batch_size`` whole batches; the remainder rows of an epoch's
    permutation are skipped that epoch (a different remainder each epoch).
    """

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: must be positive")
        if len(rows) < batch_size:
            raise DataError(
                f"the corpus packs into {len(rows)} rows of {rows.seq_len} tokens, fewer than one "
                f"batch of {batch_size}; add data or lower the batch size or sequence length"
            )
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None
        # In a multi-process job each process reads only its rows of every global batch.
        self.local_rows = slice(None)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.rows)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        i = self.index * self.batch_size
        batch = self.rows.rows(self._epoch_order()[i : i + self.batch_size][self.local_rows])
        self.index += 1
        return batch

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_rows": len(self.rows),
            "batch_size": self.batch_size,
        }

    def restore(self, state: dict) -> None:
        mine = self.state()
        changed = [k for k in ("seed", "num_rows", "batch_size") if state.get(k) != mine[k]]
        if changed:
            raise DataError(
                "the checkpoint's data iterator does not match this data: "
                + ", ".join(f"{k} was {state.get(k)} now {mine[k]}" for k in changed)
                + " (resume with the same data, seq_len and batch size, or start a new --out)"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int | None = None):
    """The held-out rows in order, in whole batches (at least one row must exist)."""
    n = len(rows)
    if n == 0:
        raise DataError("the held-out split is shorter than one sequence; lower seq_len")
    bs = min(batch_size, n)
    count = n // bs if max_batches is None else min(n // bs, max_batches)
    for b in range(count):
        yield rows.rows(np.arange(b * bs, (b + 1) * bs))
