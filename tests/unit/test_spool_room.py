"""The room a spool (ingest's, and ``run``'s journal) leaves free on its disk: it takes no
record that would leave less than its reserve, says why (readiness, the error), writes nothing
of a refused record, and takes records again once there is room. Real files; the disk's size
and free room are those of a small disk whose free room falls as the spool's files grow
(``os.statvfs`` answered from them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.ingest.publish_types import OutRecord
from services.ingest.spool import DISK_RESERVE_BYTES, ShortOfRoomError, Spool

KIB = 1024
MIB = 1024 * KIB


class Disk:
    """A disk of ``size`` bytes that has ``other`` bytes of others' files, and the spool's."""

    def __init__(self, directory: Path, size: int, other: int) -> None:
        self.directory = directory
        self.size = size
        self.other = other

    def free(self) -> int:
        spooled = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        return max(0, self.size - self.other - spooled)

    def statvfs(self, path: object) -> os.statvfs_result:
        free = self.free()
        return os.statvfs_result((4096, 1, self.size, free, free, 1000, 1000, 1000, 0, 255))


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Disk:
    """100 MiB with 20 KiB above a 1 MiB reserve free (the spool's ``head`` aside)."""
    d = Disk(tmp_path, 100 * MIB, 100 * MIB - MIB - 20 * KIB)
    monkeypatch.setattr(os, "statvfs", d.statvfs)
    return d


def record(i: int) -> OutRecord:
    return OutRecord(b"key-%06d" % i, b'{"event_id":"%06d","site":"dongha"}' % i, i % 4)


def test_a_spool_takes_records_until_its_reserve_and_no_further(tmp_path: Path, disk: Disk) -> None:
    spool = Spool(tmp_path, 1 << 30, reserve=MIB)
    taken = 0
    with pytest.raises(ShortOfRoomError) as refused:
        while True:
            spool.append([record(taken + i) for i in range(10)])
            taken += 10
            assert disk.free() >= MIB  # never into the reserve, even between two reads of it
    assert taken > 200  # the room above the reserve was used: 20 KiB of ~60-byte records
    assert disk.free() - MIB < 10 * 80  # ... up to less than a batch of them
    assert len(spool) == taken
    sizes = [p.stat().st_size for p in tmp_path.glob("*.spool")]
    # nothing of the refused records was written, and the reason names the setting
    with pytest.raises(ShortOfRoomError):
        spool.append([record(10**5 + i) for i in range(10)])
    assert [p.stat().st_size for p in tmp_path.glob("*.spool")] == sizes
    assert len(spool) == taken
    said = spool.write_failure()
    assert said is not None and said.startswith(f"cannot write to {tmp_path}: ")
    assert "kept free" in said and "VISITORSTATS_DISK_RESERVE_BYTES" in said
    assert str(refused.value) == f"[Errno 28] {refused.value.strerror}"
    assert f"{disk.free():,} bytes free" in said and f"{MIB:,} are kept free" in said

    # drained (its segment deleted), it takes records again at once
    spool.pop(taken)
    spool.append([record(0)])
    assert len(spool) == 1
    assert [r.key for r in spool.peek(1)] == [b"key-000000"]


def test_the_disk_is_read_once_a_second_while_there_is_room_and_more_often_near_the_reserve(
    tmp_path: Path, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two reads of the disk the spool counts what it wrote itself; it reads the disk
    again sooner when that used half of the room that was above the reserve."""
    reads = []

    def counted(path: object) -> os.statvfs_result:
        reads.append(path)
        return disk.statvfs(path)

    clock = [1000.0]
    monkeypatch.setattr(os, "statvfs", counted)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    disk.other -= 10 * MIB  # 10 MiB above the reserve
    spool = Spool(tmp_path, 1 << 30, reserve=MIB)
    for i in range(1000):  # 60 KiB in no time: one read
        spool.append([record(i)])
    assert len(reads) == 1
    clock[0] += 1.0
    spool.append([record(1000)])
    assert len(reads) == 2  # a second later: read again

    disk.other += disk.free() - MIB - 20 * KIB  # others took the room: 20 KiB above the reserve
    clock[0] += 1.0
    with pytest.raises(ShortOfRoomError):
        for i in range(1001, 10_000):  # the clock stands still: only the room read again
            spool.append([record(i)])
    assert 3 < len(reads) < 40
    assert disk.free() >= MIB


@pytest.mark.parametrize(
    ("size", "free", "short"),
    [
        (10 * MIB, MIB + 64 * KIB, False),  # a tenth of a small disk: 1 MiB
        (10 * MIB, MIB - 64 * KIB, True),
        (100 * 1024 * MIB, DISK_RESERVE_BYTES + MIB, False),  # 256 MiB of a big one
        (100 * 1024 * MIB, DISK_RESERVE_BYTES - MIB, True),
    ],
)
def test_the_default_reserve_is_256_mib_or_a_tenth_of_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, free: int, short: bool
) -> None:
    disk = Disk(tmp_path, size, size - free)
    monkeypatch.setattr(os, "statvfs", disk.statvfs)
    spool = Spool(tmp_path, 1 << 30)
    said = spool.write_failure()
    assert (said is not None) == short, said
    if short:
        with pytest.raises(ShortOfRoomError):
            spool.append([record(0)])
        assert len(spool) == 0
    else:
        spool.append([record(0)])
        assert len(spool) == 1


def test_a_reserve_of_0_refuses_only_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness follows the room on the spool's disk too, not only the last refused write
    (which is forgotten after ``WRITE_FAILED_SECONDS``, or never made after a restart)."""
    disk = Disk(tmp_path, 10 * MIB, 10 * MIB - 4 * KIB)
    monkeypatch.setattr(os, "statvfs", disk.statvfs)
    spool = Spool(tmp_path, 1 << 30, reserve=0)
    assert spool.write_failure() is None
    spool.append([record(i) for i in range(20)])  # into what a reserve would have kept
    disk.other = disk.size
    said = spool.write_failure()
    assert said == f"cannot write to {tmp_path}: no room left on its disk"


def test_the_room_clickhouse_holds_is_kept_free_too(tmp_path: Path, disk: Disk) -> None:
    """A merge reserves its part's room and then writes it: the journal on the same disk keeps
    that free besides its own reserve (``Spool.hold``), even with no reserve of its own."""
    spool = Spool(tmp_path, 1 << 30, reserve=MIB)
    spool.hold(15 * KIB)  # of the 20 KiB above the reserve
    taken = 0
    with pytest.raises(ShortOfRoomError) as refused:
        while True:
            spool.append([record(taken)])
            taken += 1
    assert disk.free() >= MIB + 15 * KIB
    assert f"{MIB + 15 * KIB:,} are kept free" in str(refused.value)
    said = spool.write_failure()
    assert said is not None and f"{MIB + 15 * KIB:,} are kept free" in said
    spool.hold(0)  # the merge wrote its part (the room is the disk's again)
    spool.append([record(taken)])
    none = Spool(tmp_path / "other", 1 << 30, reserve=0)
    none.hold(disk.free())
    with pytest.raises(ShortOfRoomError):
        none.append([record(0)])


def test_the_default_reserve_of_the_journal_leaves_clickhouse_room_for_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run``'s journal drains only as ClickHouse writes its batches, and ClickHouse reserves
    a batch's room first: on a 32 MiB disk a tenth (3.2 MiB) left it less than the 14.5 MiB of
    a batch of 50,000 beacons, and neither moved again (measured on a tmpfs). So the journal's
    default reserve is at least ``least``; a reserve told is taken as told."""
    disk = Disk(tmp_path, 32 * MIB, 32 * MIB - 20 * MIB)  # 20 MiB free
    monkeypatch.setattr(os, "statvfs", disk.statvfs)
    journal = Spool(tmp_path, 1 << 30, least=30 * MIB)
    assert journal.write_failure() is not None
    with pytest.raises(ShortOfRoomError) as refused:
        journal.append([record(0)])
    assert f"{30 * MIB:,} are kept free" in str(refused.value)
    told = Spool(tmp_path / "told", 1 << 30, reserve=MIB, least=30 * MIB)
    told.append([record(0)])
    assert len(told) == 1
    plain = Spool(tmp_path / "plain", 1 << 30)  # a tenth of the disk
    plain.append([record(0)])
    assert len(plain) == 1
