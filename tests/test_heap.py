"""Freed weight memory goes back to the system while a run swaps weights (``lib_ti.heap``)."""

from __future__ import annotations

from lib_ti import heap


def test_the_trimmer_gives_memory_back_every_so_many_bytes_and_at_the_end(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(heap, "give_back", lambda: calls.append(1))
    trimmer = heap.Trimmer()
    for _ in range(5):
        trimmer.freed(heap.TRIM_EVERY // 2)
    assert len(calls) == 2  # after 2 and 4 halves; the fifth is pending
    trimmer.done()
    assert len(calls) == 3 and trimmer.pending == 0


def test_giving_back_is_safe_to_call_anywhere():
    heap.give_back()  # glibc's malloc_trim here; a no-op where there is none
    heap.give_back()
