"""A round's updates copied to the aggregator's own file as they arrive, for strategies that merge at the end.

FedAlign-MoE compares every pair of clients expert by expert, so it keeps each
update's reader from ``add`` to ``finish``. Over the object store those readers
are zero-copy views, and a viewed object is pinned: once the cohort outgrows the
store, the clients' next updates wait for spilling or go to Ray's fallback
files, and the round runs at twice its compute (docs/scale.md). A
``CohortSpool`` copies each update's delta into one unlinked temporary file as
it is folded and keeps its small fields and routing statistics in memory (the
statistics the strategy reads anyway), so the object can go at once. Reading a
slice back is one ``pread`` of exactly its bytes: the values are the update's,
bit for bit, and no page of the file stays in the process. ``update.delta`` is a
read-only map of the same bytes, for code that checks its shape or reads it whole.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields, replace

import numpy as np

from aggregation.messages import ClientUpdate
from aggregation.payload import PAYLOAD_DTYPE
from aggregation.routing_stats import RoutingStats
from aggregation.strategy import UpdateReader

# the delta is copied in pieces of this many values (64 MiB of float32), so a large update is never read whole
_CHUNK = 16 * 2**20


def _owned(stats: RoutingStats) -> RoutingStats:
    """A copy of ``stats`` whose arrays own their memory (an object-store view would pin its object)."""
    return type(stats)(*(np.array(getattr(stats, f.name), copy=True) for f in fields(stats)))


@dataclass(frozen=True, slots=True)
class SpooledReader:
    """Reader over one update whose delta lies in a ``CohortSpool``'s file (``update.delta`` maps it, read-only)."""

    update: ClientUpdate
    fd: int
    offset: int  # the file offset of the delta's first value
    size: int  # the delta's length in values

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` of the delta, read from the file into a new array."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"client {self.update.client_id}: read [{start}, {stop}) of a delta of {self.size}")
        out = np.empty(stop - start, dtype=PAYLOAD_DTYPE)
        done = os.preadv(self.fd, [out.data], self.offset + start * out.itemsize) if out.nbytes else 0
        if done != out.nbytes:
            raise OSError(f"client {self.update.client_id}: the cohort spool returned {done} of {out.nbytes} bytes")
        return out


class CohortSpool:
    """One round's deltas in one temporary file, unlinked from the start (it goes when closed or the process ends).

    ``directory``: where the file lives; None: the system's temporary directory (``TMPDIR``).
    """

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="fedsim-cohort-", dir=directory)
        self._end = 0

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return self._end

    def keep(self, reader: UpdateReader) -> SpooledReader:
        """Copy ``reader``'s delta to the file; the returned reader holds no view of the original."""
        u = reader.update
        size, offset, fd = len(u.delta), self._end, self._file.fileno()
        for start in range(0, size, _CHUNK):
            piece = np.ascontiguousarray(reader.read(start, min(start + _CHUNK, size)), dtype=PAYLOAD_DTYPE)
            at = offset + start * piece.itemsize
            written = 0
            while written < piece.nbytes:  # a write to a regular file may be short (a full disk shows as OSError)
                written += os.pwrite(fd, piece.data.cast("B")[written:], at + written)
        self._end += size * np.dtype(PAYLOAD_DTYPE).itemsize
        mapped = np.memmap(self._file, dtype=PAYLOAD_DTYPE, mode="r", offset=offset, shape=(size,)) if size else \
            np.empty(0, dtype=PAYLOAD_DTYPE)
        small = replace(u, delta=mapped, routing=tuple(_owned(s) for s in u.routing), residual=None)
        return SpooledReader(small, fd, offset, size)

    def close(self) -> None:
        """Drop the file; its readers cannot read after this."""
        self._file.close()
