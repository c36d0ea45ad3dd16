"""The one wait policy every component loop uses: ready, stop, pause, stall, reclaim cadence."""

from __future__ import annotations

import threading
import time

import pytest

from services.transport.bundle import Transport
from services.transport.waiting import Stalled, WaitPolicy

pytestmark = pytest.mark.integration


class NoData(Stalled):
    pass


def test_until_returns_true_once_ready_and_false_on_stop(transport: Transport) -> None:
    waiter = WaitPolicy(transport.control, timeout_s=5.0, poll_s=0.01)
    calls = iter([False, False, True])
    assert waiter.until(lambda: next(calls), "three polls") is True

    threading.Timer(0.1, transport.control.request_stop, args=("test over",)).start()
    start = time.monotonic()
    assert waiter.until(lambda: False, "never") is False
    assert time.monotonic() - start < 2.0
    assert waiter.stop_reason() == "run stop: test over"


def test_until_stalls_with_the_component_error_and_what_it_awaited(transport: Transport) -> None:
    waiter = WaitPolicy(transport.control, timeout_s=0.2, poll_s=0.01, error=NoData)
    start = time.monotonic()
    with pytest.raises(NoData, match="waited 0s for room in the batches stream"):
        waiter.until(lambda: False, "room in the batches stream")
    assert 0.2 <= time.monotonic() - start < 2.0


def test_a_pause_is_not_a_stall(transport: Transport) -> None:
    waiter = WaitPolicy(transport.control, timeout_s=0.3, poll_s=0.02)
    transport.control.set_paused(True)
    ready = threading.Event()
    threading.Timer(0.8, ready.set).start()  # longer than the timeout, all of it paused
    assert waiter.until(ready.is_set, "the operator") is True
    transport.control.set_paused(False)

    waiter.progressed()
    waiter.check_stall(lambda: "not yet")  # fresh progress: no stall
    time.sleep(0.35)
    with pytest.raises(Stalled, match="nothing for a while"):
        waiter.check_stall(lambda: "nothing for a while")
    transport.control.set_paused(True)
    waiter.check_stall(lambda: "paused")  # paused: the clock restarts instead
    transport.control.set_paused(False)
    waiter.check_stall(lambda: "just restarted")


def test_in_process_stop_and_finished_end_waits(transport: Transport) -> None:
    flag = threading.Event()
    waiter = WaitPolicy(transport.control, 5.0, poll_s=0.01, should_stop=flag.is_set)
    assert waiter.stop_reason() is None
    flag.set()
    assert waiter.until(lambda: False, "never") is False and waiter.stop_reason() == "told to stop"

    done = WaitPolicy(transport.control, 5.0, poll_s=0.01, finished=lambda: "the learner is done")
    assert done.until(lambda: False, "never") is False
    assert done.stop_reason() == "the learner is done"


def test_reclaim_cadence(transport: Transport) -> None:
    waiter = WaitPolicy(transport.control, 5.0, reclaim_every_s=0.2)
    assert waiter.reclaim_due() is True  # the first call looks at once
    assert waiter.reclaim_due() is False
    time.sleep(0.25)
    assert waiter.reclaim_due() is True


def test_bad_timeout_is_refused(transport: Transport) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        WaitPolicy(transport.control, 0)
