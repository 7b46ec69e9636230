"""The on-disk spool (ingest's, and ``run``'s journal) read back after a crash or a damaged disk:
the end of the newest segment cut short is a write never answered, dropped quietly; any other
damage skips only the bytes that do not check, keeps every record around them, says which file
and bytes, and keeps a copy of the file. Real files, damaged as a crash or a disk leaves them."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from services import metrics
from services.ingest.publish_types import OutRecord
from services.ingest.spool import Spool

N = 40


def record(i: int) -> OutRecord:
    """Records of one size, so a test can find the n-th in a file."""
    return OutRecord(b"key-%03d" % i, b'{"event_id":"%03d","site":"dongha"}' % i, i % 4)


def fields(records: list[OutRecord]) -> list[tuple[bytes, bytes, int]]:
    return [(r.key, r.value, r.shard) for r in records]


def values(spool: Spool) -> list[int]:
    return [int(r.value.split(b'"')[3]) for r in spool.peek(10 * N)]


def written(directory: Path, segments: int = 1) -> list[Path]:
    """``segments`` segments of N records each (a restart begins a new segment)."""
    for s in range(segments):
        spool = Spool(directory, 1 << 20)
        spool.append([record(s * N + i) for i in range(N)])
        spool.close()
    files = sorted(directory.glob("*.spool"))
    assert len(files) == segments
    return files


def damaged_count() -> float:
    return metrics.SPOOL_DAMAGED._value.get()


def test_records_round_trip_with_their_shard(tmp_path: Path) -> None:
    written(tmp_path, 2)
    spool = Spool(tmp_path, 1 << 20)
    assert fields(spool.peek(2 * N)) == fields([record(i) for i in range(2 * N)])


@pytest.mark.parametrize("cut", [1, 7, 30])
def test_the_newest_segment_cut_short_loses_its_torn_record_quietly(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    (path,) = written(tmp_path)
    path.write_bytes(path.read_bytes()[:-cut])
    before = damaged_count()
    assert values(Spool(tmp_path, 1 << 20)) == list(range(N - 1))
    assert damaged_count() == before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not list(tmp_path.glob("*.damaged"))


def test_a_zero_filled_end_of_the_newest_segment_is_quiet(tmp_path: Path) -> None:
    (path,) = written(tmp_path)
    path.write_bytes(path.read_bytes() + bytes(4096))
    before = damaged_count()
    assert values(Spool(tmp_path, 1 << 20)) == list(range(N))
    assert damaged_count() == before


@pytest.mark.parametrize("how", ["flipped byte", "huge length", "length off by 50", "garbage"])
def test_damage_in_the_middle_skips_only_what_does_not_check(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    (path,) = written(tmp_path)
    data = bytearray(path.read_bytes())
    # the 11th record: magic, then 10 records of the same size before it
    size = (len(data) - 8) // N
    assert (len(data) - 8) % N == 0
    at = 8 + 10 * size
    if how == "flipped byte":
        data[at + size - 3] ^= 0x20
    elif how == "huge length":
        struct.pack_into(">I", data, at + 12, 0xFFFFFF)
    elif how == "length off by 50":
        struct.pack_into(">I", data, at + 12, struct.unpack_from(">I", data, at + 12)[0] + 50)
    else:
        data[at:at] = b"\x00garbage\xa5\x5a written over\xff" * 3
    path.write_bytes(bytes(data))
    before = damaged_count()
    caplog.set_level(logging.ERROR, "services.ingest.spool")
    spool = Spool(tmp_path, 1 << 20)
    kept = values(spool)
    expected = list(range(N)) if how == "garbage" else [i for i in range(N) if i != 10]
    assert kept == expected
    assert damaged_count() == before + 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert str(path) in line and f"bytes {at}-" in line
    copy = path.with_name(path.name + ".damaged")
    assert copy.read_bytes() == bytes(data)
    spool.pop(len(kept))  # drained: the segment goes, its copy stays for a look
    spool.close()
    assert not list(tmp_path.glob("*.spool")) and copy.exists()


def test_an_older_segment_cut_short_is_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older, _newest = written(tmp_path, 2)
    older.write_bytes(older.read_bytes()[:-5])
    before = damaged_count()
    caplog.set_level(logging.ERROR, "services.ingest.spool")
    assert values(Spool(tmp_path, 1 << 20)) == [i for i in range(2 * N) if i != N - 1]
    assert damaged_count() == before + 1
    assert [str(older) in r.getMessage() for r in caplog.records] == [True]


def test_an_older_segment_left_empty_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older, _newest = written(tmp_path, 2)
    older.write_bytes(b"")
    before = damaged_count()
    caplog.set_level(logging.ERROR, "services.ingest.spool")
    assert values(Spool(tmp_path, 1 << 20)) == list(range(N, 2 * N))
    assert damaged_count() == before + 1
    assert "its records are lost" in caplog.records[0].getMessage()


def test_a_segment_from_before_the_checksums_is_read(tmp_path: Path) -> None:
    """A spool left by the version before (length-prefixed records, no magic, no CRC), a
    torn record at its end, then taken over by this one: read as written, then drained."""
    old = b"".join(
        struct.pack(">IHI", r.shard, len(r.key), len(r.value)) + r.key + r.value
        for r in map(record, range(N))
    )
    (tmp_path / "0000000000.spool").write_bytes(old + old[:9])
    spool = Spool(tmp_path, 1 << 20)
    assert fields(spool.peek(N + 1)) == fields([record(i) for i in range(N)])
    spool.append([record(N)])
    spool.pop(N)
    spool.close()
    assert values(Spool(tmp_path, 1 << 20)) == [N]


def test_a_spool_loaded_nearly_full_is_full_before_its_first_refusal(tmp_path: Path) -> None:
    """Readiness follows the answers: left with less room than a record, a restarted spool
    says full at once, not only after the first beacon it refuses."""
    written(tmp_path)
    used = Spool(tmp_path, 1 << 20).bytes
    assert Spool(tmp_path, used + 10).full()
    assert not Spool(tmp_path, used + 200).full()


def test_a_segment_whose_magic_a_full_disk_refused_keeps_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version began a segment on a full disk, its magic refused, and wrote checked
    records in it once there was room: they are read, not taken for unchecked ones (which
    found none of them)."""
    (path,) = written(tmp_path)
    path.write_bytes(path.read_bytes()[len(b"VSSPOOL\x02") :])
    before = damaged_count()
    with caplog.at_level(logging.WARNING):
        spool = Spool(tmp_path, 1 << 20)
    assert values(spool) == list(range(N))
    assert damaged_count() == before
    assert "no magic" in caplog.text


def test_damage_on_a_full_disk_says_that_no_copy_was_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The copy of a damaged segment cannot be made (here: a directory stands where it goes):
    the records are kept, and the log does not claim a copy."""
    old, _ = written(tmp_path, 2)
    data = bytearray(old.read_bytes())
    data[200] ^= 0xFF
    old.write_bytes(bytes(data))
    (tmp_path / (old.name + ".damaged.part")).mkdir()
    with caplog.at_level(logging.ERROR):
        spool = Spool(tmp_path, 1 << 20)
    assert len(values(spool)) == 2 * N - 1
    assert "no copy of it could be kept" in caplog.text
    assert not (tmp_path / (old.name + ".damaged")).exists()
