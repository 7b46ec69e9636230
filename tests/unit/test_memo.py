"""The hot paths' memo: the function's answers, at most ``maxsize`` kept, none tracked by the
cyclic garbage collector."""

from __future__ import annotations

import gc

from services.memo import LONGEST_KEPT, forget_oldest, memo


def test_memo_answers_as_the_function_and_stays_bounded() -> None:
    calls: list[int] = []

    @memo(3)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    assert [square(n) for n in (1, 2, 1, 3, 2)] == [1, 4, 1, 9, 4]
    assert calls == [1, 2, 3]  # answered from the memo the second time
    assert square(4) == 16  # full: the oldest (1) forgotten, then kept
    assert square(3) == 9  # still kept
    assert square(1) == 1  # made again
    assert calls == [1, 2, 3, 4, 1]


def test_memo_of_atomic_values_is_invisible_to_the_collector() -> None:
    @memo(1000)
    def text(n: int) -> tuple[str, bool]:
        return (str(n), n % 2 == 0)

    for n in range(500):
        text(n)
    gc.collect()
    assert len(text.cache) == 500
    assert not gc.is_tracked(text.cache)


def test_a_full_cache_forgets_its_oldest_sixteenth() -> None:
    cache = {n: str(n) for n in range(1000)}
    forget_oldest(cache)
    assert list(cache) == list(range(62, 1000))  # 1000 // 16 = 62 oldest gone, order kept
    small = {"a": 1, "b": 2}
    forget_oldest(small)
    assert small == {"b": 2}  # at least one


def test_a_long_string_is_answered_and_not_kept() -> None:
    """Hostile clients send the longest values allowed, each one new: they are not kept, so a
    cache's size is bounded in bytes, not only in entries."""
    calls: list[str] = []

    @memo(1000)
    def size(s: str) -> int:
        calls.append(s)
        return len(s)

    long = "x" * (LONGEST_KEPT + 1)
    assert size(long) == LONGEST_KEPT + 1
    assert size(long) == LONGEST_KEPT + 1
    assert len(calls) == 2 and long not in size.cache
    edge = "y" * LONGEST_KEPT
    assert size(edge) == size(edge) == LONGEST_KEPT
    assert calls.count(edge) == 1 and edge in size.cache
