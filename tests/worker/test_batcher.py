"""The micro-batcher: full batches at once, partial ones after the wait, everything on close."""

from __future__ import annotations

import threading
import time

import pytest

from detector.worker.batcher import Batcher


def test_a_full_batch_is_handed_out_at_once_in_arrival_order() -> None:
    """size items make a batch without waiting; the rest waits for the next one."""
    batcher: Batcher[int] = Batcher(size=3, wait=60)
    for item in range(5):
        assert batcher.put(item)
    started = time.monotonic()
    assert batcher.get() == [0, 1, 2]
    assert time.monotonic() - started < 1
    assert len(batcher) == 2


def test_a_partial_batch_waits_for_its_first_item_to_be_wait_old() -> None:
    """Fewer than size items come out once the oldest has waited `wait`, not before."""
    now = [100.0]
    batcher: Batcher[str] = Batcher(size=10, wait=0.5, clock=lambda: now[0])
    batcher.put("a")
    now[0] += 0.3
    batcher.put("b")
    assert batcher.get(timeout=0) == []  # 0.3 s old: not yet
    now[0] += 0.2
    assert batcher.get(timeout=0) == ["a", "b"]


def test_the_next_batch_deadline_is_its_own_first_items_arrival() -> None:
    """Items left over from a full batch keep their arrival time: they do not wait twice."""
    now = [0.0]
    batcher: Batcher[int] = Batcher(size=2, wait=1.0, clock=lambda: now[0])
    batcher.put(1)
    batcher.put(2)
    batcher.put(3)
    assert batcher.get(timeout=0) == [1, 2]
    now[0] = 1.0
    assert batcher.get(timeout=0) == [3]


def test_get_blocks_until_the_wait_passes() -> None:
    """With a real clock, a lone item comes out after about `wait`."""
    batcher: Batcher[int] = Batcher(size=100, wait=0.2)
    batcher.put(1)
    started = time.monotonic()
    assert batcher.get() == [1]
    assert 0.15 <= time.monotonic() - started < 2


def test_a_blocked_get_wakes_when_the_batch_fills_up() -> None:
    """A get waiting on a long deadline returns as soon as another thread fills the batch."""
    batcher: Batcher[int] = Batcher(size=2, wait=60)
    batcher.put(1)
    threading.Timer(0.1, batcher.put, args=(2,)).start()
    started = time.monotonic()
    assert batcher.get() == [1, 2]
    assert time.monotonic() - started < 5


def test_close_hands_out_what_is_held_then_nothing_and_refuses_more() -> None:
    """After close: held items at once in batches of at most size, then [], and put is refused."""
    batcher: Batcher[int] = Batcher(size=2, wait=60)
    for item in range(3):
        batcher.put(item)
    batcher.close()
    assert not batcher.put(9)
    assert batcher.get() == [0, 1]
    assert batcher.get() == [2]
    assert batcher.get() == []


def test_close_wakes_a_waiting_get() -> None:
    """A get blocked on an empty batcher returns [] when it is closed."""
    batcher: Batcher[int] = Batcher(size=2, wait=60)
    threading.Timer(0.1, batcher.close).start()
    assert batcher.get() == []


def test_take_all_empties_the_batcher() -> None:
    """What take_all returns is no longer held."""
    batcher: Batcher[int] = Batcher(size=5, wait=60)
    batcher.put(1)
    batcher.put(2)
    assert batcher.take_all() == [1, 2]
    assert len(batcher) == 0


@pytest.mark.parametrize(
    ("size", "wait", "message"),
    [(0, 1.0, "size: must be >= 1, got 0"), (1, -1.0, "wait: must be >= 0 seconds, got -1.0")],
)
def test_bad_settings_name_the_field(size: int, wait: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Batcher(size=size, wait=wait)
