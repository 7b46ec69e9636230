"""A bounded on-disk spool for records the broker has not acknowledged: those it could not take
(broker away), or, with ``VISITORSTATS_PUBLISH_ACK=spool``, every record on its way to it.

Segments are append-only files ``NNNNNNNNNN.spool``: a magic, then records, each a marker, a
CRC-32 of the rest, and the length-prefixed record; the oldest is drained first, so order per
visitor is kept. A segment is deleted once every record in it was
acknowledged by the broker; ``head`` notes how many of the oldest segment's were, so a
restarted process takes back only the others. Records are written with ``write()`` (no
fsync): they survive a crash of the process, like Kafka's own page-cache durability; not a
power loss of the machine. A crash in the middle of a drain may send some records twice (those
sent since ``head`` was last written): the aggregate service counts an ``event_id`` once, so
that changes no count.

Damage found on load: the end of the newest segment cut short (or zero-filled) is a write the
crash cut, never answered, and is dropped quietly. Anything else that does not check (a record
whose CRC or marker is wrong, bytes between records, a cut in an older segment) is damage:
the records around it are kept (the loader finds the next record that checks), the skipped
bytes are logged with the file and the byte range, counted
(``visitorstats_spool_damaged_total``), and the segment is copied beside itself as
``NNNNNNNNNN.spool.damaged`` before it is drained and deleted. Segments written before the
checksums (no magic) are read as they were written.

Room kept free: a spool takes no record that would leave less than its reserve free on its
disk (``VISITORSTATS_DISK_RESERVE_BYTES``; unset, 256 MiB or a tenth of the disk, whichever
is less, and for ``run``'s journal at least the room ClickHouse asks to write two batches of
its records: with less, ClickHouse refuses the batch that would drain the journal, and
neither ever moves again), and what the embedded ClickHouse has reserved on it (``hold``).
The journal of ``visitorstats run`` shares its disk with the embedded ClickHouse, which
reserves room before it writes a part but then writes it whole: chDB commits a part whose
files a full disk cut short as if written (and merged parts too), and its rows cannot be read
again. The beacons are refused instead (503), before the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import struct
import time
import zlib
from collections import deque
from pathlib import Path

from services import metrics
from services.ingest.publish_types import OutRecord

_HEADER = struct.Struct(">IHI")  # shard, key length, value length
# A record: marker, CRC-32 of (header, key, value), header; then the key and the value.
_CHECKED = struct.Struct(">HI")
_MARK = 0xA55A
_MARK_BYTES = _CHECKED.pack(_MARK, 0)[:2]
_RECORD_HEAD = _CHECKED.size + _HEADER.size
# The first bytes of a segment with checked records (one of before has none: its first
# bytes are a shard number, below 2**24)
_MAGIC = b"VSSPOOL\x02"
_SEGMENT_BYTES = 4 * 1024 * 1024
# After a write the disk refused, the spool is not ready for this long (then the next beacon
# tries again: a process taken out of service by its readiness gets no beacon to try with).
WRITE_FAILED_SECONDS = 10.0
# The room a spool leaves free on its disk unless told (``VISITORSTATS_DISK_RESERVE_BYTES``),
# and then at most this share of the disk's size (a small disk keeps a tenth of itself).
DISK_RESERVE_BYTES = 256 * 1024 * 1024
_RESERVE_SHARE = 10
# The room left is read from the disk again after this long, or sooner when the records
# written since would have used half of what was above the reserve.
_ROOM_CHECK_SECONDS = 1.0

log = logging.getLogger(__name__)


class SpoolFullError(Exception):
    pass


class ShortOfRoomError(OSError):
    """The spool's disk has no room for the records above its reserve: nothing was written."""

    def __init__(self, free: int, reserve: int) -> None:
        super().__init__(
            errno.ENOSPC,
            f"{free:,} bytes free on its disk, and {reserve:,} are kept free for other writers "
            "(VISITORSTATS_DISK_RESERVE_BYTES)"
            if reserve
            else "no room left on its disk",
        )


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
    def claim(
        cls,
        root: Path,
        max_bytes: int,
        metered: bool = True,
        reserve: int | None = None,
        least: int = 0,
    ) -> Spool:
        """Take the first free ``root/worker-N`` (an exclusive lock held while the process
        lives), so a restarted process drains what a crashed one spooled. ``metered``: its
        depth and size are the ``visitorstats_spool_*`` gauges. ``reserve``: the room it
        leaves free on its disk (None: the default, see the module's text, and at least
        ``least``)."""
        root.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            directory = root / f"worker-{n}"
            directory.mkdir(exist_ok=True)
            fd = _lock(directory)
            if fd is None:
                n += 1
                continue
            spool = cls(directory, max_bytes, metered, reserve, least)
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

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        metered: bool = True,
        reserve: int | None = None,
        least: int = 0,
    ) -> None:
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
        self._record_size = 1  # the largest record loaded, or mean record of an append
        self._tail: int = 0
        self._tail_file: int | None = None
        self._tail_size = 0
        # the last write the disk refused: when, why, and how many since it was last logged
        self._failed_at = -WRITE_FAILED_SECONDS
        self._failure = ""
        self._failures_unlogged = 0
        self._failure_logged_at = -WRITE_FAILED_SECONDS
        # the room kept free on the disk, and what was free when last read (then, and the
        # bytes written since)
        self._reserve_told = reserve
        self._reserve_least = least
        self._reserve = 0
        self._held = 0  # room another writer of the disk has reserved (``hold``)
        self._free = 0
        self._free_read_at = -_ROOM_CHECK_SECONDS
        self._written_since_read = 0
        # the oldest segment still held, and how many of its records were popped: kept in
        # ``head`` so that a restarted process does not take them back
        self._head_segment, self._head_popped = self._read_head()
        segments = sorted(self._dir.glob("*.spool"))
        for path in segments:
            segment = int(path.stem)
            if segment < self._head_segment:
                path.unlink()  # every record popped; the process died before deleting it
                continue
            skip = self._head_popped if segment == self._head_segment else 0
            self._load(path, skip, newest=path == segments[-1])
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

    def _load(self, path: Path, skip: int, newest: bool) -> None:
        """The records of one segment, but its first ``skip`` (popped before a restart).
        ``newest``: the segment written last, whose end may be a write the crash cut."""
        segment = int(path.stem)
        data = path.read_bytes()
        self._tail = max(self._tail, segment + 1)
        if data.startswith(_MARK_BYTES):
            # checked records without the magic: a segment begun on a full disk by an older
            # version, whose magic was refused and whose records were written once there was
            # room again (an unchecked segment begins with a shard number, below 2**24)
            log.warning("%s: no magic, its records read as checked ones", path)
            data = _MAGIC + data
        if not data.startswith(_MAGIC):
            if len(data) > len(_MAGIC) or not _MAGIC.startswith(data):
                self._load_unchecked(segment, data, skip)
            elif not newest:  # a segment gets its magic as it is made: this one lost it all
                log.error("%s: %d bytes, its records are lost", path, len(data))
                metrics.SPOOL_DAMAGED.inc()
            return
        records, damage = _read_checked(data, newest)
        for rec in records[skip:]:
            self._records.append((segment, rec))
            size = _RECORD_HEAD + len(rec.key) + len(rec.value)
            self._bytes += size
            self._record_size = max(self._record_size, size)
        if damage:
            kept = _keep_copy(path)
            for start, end in damage:
                log.error(
                    "%s: bytes %d-%d are damaged and were skipped (%d records of this file "
                    "kept; %s)",
                    path,
                    start,
                    end - 1,
                    len(records),
                    kept,
                )
            metrics.SPOOL_DAMAGED.inc(len(damage))

    def _load_unchecked(self, segment: int, data: bytes, skip: int) -> None:
        """A segment written before records were checked: length-prefixed records, read
        until one runs past the end of the file."""
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
                # it goes back out as a checked record if it is written again: counted so
                self._bytes += _RECORD_HEAD + klen + vlen
                self._record_size = max(self._record_size, _RECORD_HEAD + klen + vlen)
            pos = end

    def empty(self) -> bool:
        return not self._records

    def write_failure(self) -> str | None:
        """Why the disk refused the last write, for ``WRITE_FAILED_SECONDS`` after it (a write
        that succeeds since clears it), or that its disk has no room above the reserve now;
        None otherwise."""
        if time.monotonic() - self._failed_at < WRITE_FAILED_SECONDS:
            return self._failure
        if not self._read_room():
            return None
        if self._free - self._reserve - self._held < self._record_size:
            short = ShortOfRoomError(self._free, self._reserve + self._held)
            return f"cannot write to {self._dir}: {short.strerror}"
        return None

    def hold(self, nbytes: int) -> None:
        """Keep ``nbytes`` more free, above the reserve: the room the embedded ClickHouse has
        reserved on the same disk for the parts it is writing (a merge reserves its part's
        size, then writes it), which the disk's free room does not show until written."""
        self._held = max(0, nbytes)

    def _read_room(self) -> bool:
        """Read the room left on the spool's disk (``_free``, and the default ``_reserve`` as
        a share of its size); False when it cannot be read (no record is refused for it)."""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return False
        self._free = st.f_bavail * st.f_frsize
        told = self._reserve_told
        share = st.f_blocks * st.f_frsize // _RESERVE_SHARE
        default = max(self._reserve_least, min(DISK_RESERVE_BYTES, share))
        self._reserve = default if told is None else told
        self._free_read_at = time.monotonic()
        self._written_since_read = 0
        return True

    def _check_room(self, size: int) -> None:
        """Raise ``ShortOfRoomError`` when writing ``size`` more bytes would leave less than
        the reserve free. Reads the disk at most once per ``_ROOM_CHECK_SECONDS``, or sooner
        when what was written since nears the room that was left."""
        if self._reserve_told == 0 and not self._held:
            return
        kept = self._reserve + self._held
        above = self._free - kept - self._written_since_read - size
        stale = time.monotonic() - self._free_read_at >= _ROOM_CHECK_SECONDS
        if (stale or above < (self._free - kept) // 2) and not self._read_room():
            return
        kept = self._reserve + self._held
        if self._free - kept - self._written_since_read < size:
            raise ShortOfRoomError(self._free, kept)

    def refusal(self, full: str) -> str | None:
        """Why this spool takes no record now, for readiness: ``full`` when it is full, else
        its disk's refusal (``write_failure``); None when it takes records."""
        return full if self.full() else self.write_failure()

    def full(self) -> bool:
        """True once an append was refused, until something was drained, and when the room
        left cannot take a record of the size met so far (a spool loaded nearly full at start
        is full before its first refusal)."""
        return self._refused or self._max - self._bytes < self._record_size

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
        chunks: list[bytes] = []
        crc32, pack, check = zlib.crc32, _HEADER.pack, _CHECKED.pack
        for rec in records:
            key, value = rec.key, rec.value
            header = pack(rec.shard, len(key), len(value))
            chunks += (check(_MARK, crc32(value, crc32(key, crc32(header)))), header, key, value)
        blob = b"".join(chunks)
        if records:
            self._record_size = max(self._record_size, len(blob) // len(records))
        # once refused, refused until something was drained: answers and readiness agree
        if self._refused or self._bytes + len(blob) > self._max:
            self._refused = True
            raise SpoolFullError(f"spool full ({self._bytes} bytes)")
        try:
            new_segment = self._tail_file is None or self._tail_size + len(blob) > _SEGMENT_BYTES
            self._check_room(len(blob) + (len(_MAGIC) if new_segment else 0))
            if new_segment:
                self._open_tail()
            self._write_all(memoryview(blob))
        except OSError as e:
            self._failed(e)
            raise
        self._failed_at = -WRITE_FAILED_SECONDS
        self._written_since_read += len(blob)
        self._tail_size += len(blob)
        self._bytes += len(blob)
        segment = self._tail - 1
        self._records.extend((segment, rec) for rec in records)
        self._update_metrics()

    def _write_all(self, blob: memoryview) -> None:
        """All of ``blob`` at the end of the tail segment, or none of it: a write the disk cut
        short (full) is taken back, and ``OSError`` raised. Records half written and then
        answered would be dropped at the next start as a write the crash cut."""
        fd = self._tail_file
        assert fd is not None
        done = 0
        try:
            while done < len(blob):
                n = os.write(fd, blob[done:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError:
            if done:
                try:
                    os.ftruncate(fd, self._tail_size)
                except OSError:  # cannot take it back: the next records go to a new segment
                    os.close(fd)
                    self._tail_file = None
            raise

    def _open_tail(self) -> None:
        """Begin a new segment, its magic written; nothing is left of it if the disk refuses."""
        if self._tail_file is not None:
            os.close(self._tail_file)
            self._tail_file = None
        path = self._dir / f"{self._tail:010d}.spool"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                if os.write(fd, _MAGIC) != len(_MAGIC):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                size = len(_MAGIC)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)  # made here, with no record in it
            raise
        self._tail_file = fd
        self._tail += 1
        self._tail_size = size

    def _failed(self, e: OSError) -> None:
        """Note a write the disk refused; said at most once per ``WRITE_FAILED_SECONDS``."""
        now = time.monotonic()
        self._failed_at, self._failure = now, f"cannot write to {self._dir}: {e.strerror or e}"
        self._failures_unlogged += 1
        if now - self._failure_logged_at >= WRITE_FAILED_SECONDS:
            log.error(
                "%s (%d writes refused since this was last said; their beacons got 503)",
                self._failure,
                self._failures_unlogged,
            )
            self._failure_logged_at, self._failures_unlogged = now, 0

    def peek(self, n: int) -> list[OutRecord]:
        return [rec for _, rec in itertools.islice(self._records, n)]

    def pop(self, n: int) -> None:
        """Forget the oldest ``n`` records: they were acknowledged by the broker (or stored).
        Noted in ``head`` too, so that a restarted process does not take them back."""
        self._refused = False
        n = min(n, len(self._records))
        for _ in range(n):
            segment, rec = self._records.popleft()
            self._bytes -= _RECORD_HEAD + len(rec.key) + len(rec.value)
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
        metrics.SPOOL_CAPACITY.set(self._max)


def _keep_copy(path: Path) -> str:
    """Copy a damaged segment beside itself as ``NAME.damaged`` (whole, or not at all); say
    what became of the copy."""
    copy = path.with_name(path.name + ".damaged")
    if copy.exists():
        return f"a copy of it is kept as {copy.name}"
    part = path.with_name(path.name + ".damaged.part")
    try:
        shutil.copyfile(path, part)
        part.rename(copy)
    except OSError as e:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        return f"no copy of it could be kept: {e.strerror or e}"
    return f"a copy of it is kept as {copy.name}"


def _record_at(data: bytes, pos: int) -> tuple[OutRecord, int] | None:
    """The checked record that starts at ``pos`` and where it ends, or None if none does."""
    if len(data) - pos < _RECORD_HEAD:
        return None
    mark, crc = _CHECKED.unpack_from(data, pos)
    if mark != _MARK:
        return None
    at = pos + _CHECKED.size
    shard, klen, vlen = _HEADER.unpack_from(data, at)
    key_at = at + _HEADER.size
    end = key_at + klen + vlen
    if end > len(data):
        return None
    view = memoryview(data)
    if zlib.crc32(view[key_at:end], zlib.crc32(view[at:key_at])) != crc:
        return None
    return OutRecord(data[key_at : key_at + klen], data[key_at + klen : end], shard), end


def _read_checked(data: bytes, newest: bool) -> tuple[list[OutRecord], list[tuple[int, int]]]:
    """The records of a checked segment, and the damaged byte ranges skipped. A stretch that
    does not check is skipped to the next record that does; with none after it, it is the
    end of the newest segment cut short (or zero-filled) by a crash, not damage: those bytes
    were never a record a client was answered for."""
    records: list[OutRecord] = []
    damage: list[tuple[int, int]] = []
    pos = len(_MAGIC)
    while pos < len(data):
        found = _record_at(data, pos)
        if found is not None:
            records.append(found[0])
            pos = found[1]
            continue
        start, nxt = pos, data.find(_MARK_BYTES, pos + 1)
        while nxt != -1 and _record_at(data, nxt) is None:
            nxt = data.find(_MARK_BYTES, nxt + 1)
        pos = len(data) if nxt == -1 else nxt
        if nxt != -1 or not newest:
            damage.append((start, pos))
    return records, damage
