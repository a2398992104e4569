"""KeyedLocks: same key serialised, other keys not, and no entry left once nobody holds or awaits."""

from __future__ import annotations

import threading
import time

import pytest

from cri_shim.keyed_locks import KeyedLocks


def test_a_key_is_kept_only_while_held_or_awaited():
    locks = KeyedLocks()
    with locks("a"):
        assert len(locks) == 1
        with locks("b"):
            assert len(locks) == 2
        assert len(locks) == 1
    assert len(locks) == 0


def test_an_error_inside_still_releases_and_forgets_the_key():
    locks = KeyedLocks()
    with pytest.raises(RuntimeError), locks("a"):
        raise RuntimeError("boom")
    assert len(locks) == 0
    with locks("a"):  # not left held
        pass


def test_the_same_key_is_serialised_and_a_waiter_keeps_it_alive():
    locks = KeyedLocks()
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.set()
        with locks("k"):
            order.append("second")

    with locks("k"):
        t = threading.Thread(target=second)
        t.start()
        entered.wait(5)
        time.sleep(0.1)  # the waiter is blocked on the key now
        order.append("first")
        assert len(locks) == 1
    t.join(5)
    assert order == ["first", "second"]
    assert len(locks) == 0


def test_other_keys_do_not_wait():
    locks = KeyedLocks()
    done = threading.Event()

    def other() -> None:
        with locks("b"):
            done.set()

    with locks("a"):
        threading.Thread(target=other).start()
        assert done.wait(5)


def test_reentrant_locks_may_be_taken_again_by_their_holder():
    locks = KeyedLocks(reentrant=True)
    with locks("a"), locks("a"):
        assert len(locks) == 1
    assert len(locks) == 0


def test_many_keys_leave_nothing_behind():
    """What the long-run bench found: one lock per VM ID kept for the life of the process."""
    locks = KeyedLocks()
    for i in range(10_000):
        with locks(f"id-{i}"):
            pass
    assert len(locks) == 0
