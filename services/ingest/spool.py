"""A bounded on-disk spool for records the broker has not acknowledged: those it could not take
(broker away), or, with ``VISITORSTATS_PUBLISH_ACK=spool``, every record on its way to it.

Segments are append-only files ``NNNNNNNNNN.spool`` of length-prefixed records; the oldest is
drained first, so order per visitor is kept. A segment is deleted once every record in it was
acknowledged by the broker; ``head`` notes how many of the oldest segment's were, so a
restarted process takes back only the others. Records are written with ``write()`` (no
fsync): they survive a crash of the process, like Kafka's own page-cache durability; not a
power loss of the machine. A crash in the middle of a drain may send some records twice (those
sent since ``head`` was last written): the aggregate service counts an ``event_id`` once, so
that changes no count.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import struct
import time
from collections import deque
from pathlib import Path

from services import metrics
from services.ingest.publish_types import OutRecord

_HEADER = struct.Struct(">IHI")  # shard, key length, value length
_SEGMENT_BYTES = 4 * 1024 * 1024


class SpoolFullError(Exception):
    pass


def _lock(directory: Path) -> int | None:
    """The exclusive lock of a spool directory (held while its file descriptor is open), or
    ``None`` when a living process holds it."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Spool:
    @classmethod
    def claim(cls, root: Path, max_bytes: int, metered: bool = True) -> Spool:
        """Take the first free ``root/worker-N`` (an exclusive lock held while the process
        lives), so a restarted process drains what a crashed one spooled. ``metered``: its
        depth and size are the ``visitorstats_spool_*`` gauges."""
        root.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            directory = root / f"worker-{n}"
            directory.mkdir(exist_ok=True)
            fd = _lock(directory)
            if fd is None:
                n += 1
                continue
            spool = cls(directory, max_bytes, metered)
            spool._lock_fd = fd
            return spool

    @classmethod
    def orphans(cls, root: Path) -> list[Spool]:
        """The spools under ``root`` that hold records and that no living process has claimed:
        left by processes that are gone and not replaced (fewer workers after a restart).
        Each is locked (``close`` lets it go) and not metered."""
        found = []
        for directory in sorted(root.glob("worker-*")):
            if not directory.is_dir() or not any(directory.glob("*.spool")):
                continue
            fd = _lock(directory)
            if fd is None:
                continue
            spool = cls(directory, 1 << 62, metered=False)
            spool._lock_fd = fd
            if spool.empty():
                spool.close()
                continue
            found.append(spool)
        return found

    @property
    def root(self) -> Path:
        """Where the spools of the service's processes are (``claim``'s ``root``)."""
        return self._dir.parent

    def __init__(self, directory: Path, max_bytes: int, metered: bool = True) -> None:
        self._lock_fd: int | None = None
        self._head_fd: int | None = None
        self._metered = metered
        self._dir = directory
        self._max = max_bytes
        self._dir.mkdir(parents=True, exist_ok=True)
        # (segment number, record) for every record not yet acknowledged
        self._records: deque[tuple[int, OutRecord]] = deque()
        self._bytes = 0
        self._refused = False
        self._tail: int = 0
        self._tail_file: int | None = None
        self._tail_size = 0
        # the oldest segment still held, and how many of its records were popped: kept in
        # ``head`` so that a restarted process does not take them back
        self._head_segment, self._head_popped = self._read_head()
        for path in sorted(self._dir.glob("*.spool")):
            segment = int(path.stem)
            if segment < self._head_segment:
                path.unlink()  # every record popped; the process died before deleting it
                continue
            self._load(path, self._head_popped if segment == self._head_segment else 0)
        if self._records and self._records[0][0] != self._head_segment:
            self._head_segment, self._head_popped = self._records[0][0], 0
        # new segments come after the head, even when every earlier one was popped and deleted
        self._tail = max(self._tail, self._head_segment)
        self._update_metrics()

    def _read_head(self) -> tuple[int, int]:
        try:
            segment, popped = (self._dir / "head").read_text().split()
            return int(segment), int(popped)
        except (OSError, ValueError):
            return 0, 0

    def _write_head(self) -> None:
        """One ``pwrite`` of a fixed-width line over the last: a crash of the process cannot
        tear it (a torn or unreadable head only makes a restart send some records twice)."""
        if self._head_fd is None:
            self._head_fd = os.open(self._dir / "head", os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self._head_fd, b"%020d %020d\n" % (self._head_segment, self._head_popped), 0)

    def _load(self, path: Path, skip: int) -> None:
        """The records of one segment, but its first ``skip`` (popped before a restart)."""
        segment = int(path.stem)
        data = path.read_bytes()
        pos = 0
        while pos + _HEADER.size <= len(data):
            shard, klen, vlen = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + klen + vlen
            if end > len(data):
                break  # a torn last write: that record was never acknowledged to a client
            if skip:
                skip -= 1
            else:
                key = data[pos + _HEADER.size : pos + _HEADER.size + klen]
                value = data[pos + _HEADER.size + klen : end]
                self._records.append((segment, OutRecord(key, value, shard)))
                self._bytes += end - pos
            pos = end
        self._tail = max(self._tail, segment + 1)

    def empty(self) -> bool:
        return not self._records

    def full(self) -> bool:
        """True once an append was refused, until something was drained: the spool cannot take
        a typical flush any more (not only once the very last byte is used)."""
        return self._refused or self._bytes >= self._max

    def __len__(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        return self._bytes

    def oldest_age(self) -> float:
        """Seconds since the oldest record held was accepted (or loaded from disk); 0 if none."""
        if not self._records:
            return 0.0
        return max(0.0, time.monotonic() - self._records[0][1].accepted_at)

    def append(self, records: list[OutRecord]) -> None:
        """Write records durably to the tail segment; all or none."""
        chunks = []
        for rec in records:
            chunks.append(_HEADER.pack(rec.shard, len(rec.key), len(rec.value)))
            chunks.append(rec.key)
            chunks.append(rec.value)
        blob = b"".join(chunks)
        # once refused, refused until something was drained: answers and readiness agree
        if self._refused or self._bytes + len(blob) > self._max:
            self._refused = True
            raise SpoolFullError(f"spool full ({self._bytes} bytes)")
        if self._tail_file is None or self._tail_size + len(blob) > _SEGMENT_BYTES:
            self._open_tail()
        assert self._tail_file is not None
        os.write(self._tail_file, blob)
        self._tail_size += len(blob)
        self._bytes += len(blob)
        segment = self._tail - 1
        self._records.extend((segment, rec) for rec in records)
        self._update_metrics()

    def _open_tail(self) -> None:
        if self._tail_file is not None:
            os.close(self._tail_file)
        path = self._dir / f"{self._tail:010d}.spool"
        self._tail_file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._tail += 1
        self._tail_size = 0

    def peek(self, n: int) -> list[OutRecord]:
        return [rec for _, rec in itertools.islice(self._records, n)]

    def pop(self, n: int) -> None:
        """Forget the oldest ``n`` records: they were acknowledged by the broker (or stored).
        Noted in ``head`` too, so that a restarted process does not take them back."""
        self._refused = False
        n = min(n, len(self._records))
        for _ in range(n):
            segment, rec = self._records.popleft()
            self._bytes -= _HEADER.size + len(rec.key) + len(rec.value)
            if segment != self._head_segment:
                self._head_segment, self._head_popped = segment, 0
            self._head_popped += 1
            if not self._records or self._records[0][0] != segment:
                self._drop_segment(segment)
                self._head_segment = self._records[0][0] if self._records else self._tail
                self._head_popped = 0
        if n:
            self._write_head()
        self._update_metrics()

    def _drop_segment(self, segment: int) -> None:
        if self._tail_file is not None and segment == self._tail - 1:
            os.close(self._tail_file)
            self._tail_file = None
        (self._dir / f"{segment:010d}.spool").unlink(missing_ok=True)

    def close(self) -> None:
        if self._tail_file is not None:
            os.close(self._tail_file)
            self._tail_file = None
        if self._head_fd is not None:
            os.close(self._head_fd)
            self._head_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _update_metrics(self) -> None:
        if not self._metered:
            return
        metrics.SPOOL_DEPTH.set(len(self._records))
        metrics.SPOOL_BYTES.set(self._bytes)
