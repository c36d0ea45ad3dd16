"""Version-aware admission across rollout actors, against a real Redis: rounds other actors have
in flight count as queued ahead (they land first), an actor's own round does not, and the
check-and-reserve is atomic so concurrent actors never all count themselves first."""

from __future__ import annotations

import threading

import pytest

from services.transport.bundle import Transport

pytestmark = pytest.mark.integration

P = 32  # groups per step


def admit(t: Transport, actor: str, version: int, *, share: int = 16, stale: int = 0, **kw) -> bool:
    return t.state.admit_round(actor, share, version, stale, P, **kw)


def test_rounds_in_flight_elsewhere_count_as_queued_ahead(transport: Transport) -> None:
    transport.state.write_schedule({"step": 0})
    # Nothing queued: two half-step rounds of version 0 both land in step 0's batch.
    assert admit(transport, "a", 0)
    assert admit(transport, "b", 0)
    assert transport.state.rounds_in_flight() == {"a": 16, "b": 16}
    # A third would only be used at step 1: stale at max_staleness 0, fine at 1.
    assert not admit(transport, "c", 0)
    assert admit(transport, "c", 0, stale=1, reserve=False)
    assert "c" not in transport.state.rounds_in_flight()  # a look without reserving
    # An actor's own round is not ahead of itself: re-admitting "a" sees only b's 16 groups.
    assert admit(transport, "a", 0)
    # a's groups land (queued now), its round ends: c still sees 32 groups ahead of it.
    transport.client.xadd(transport.keys.groups, {"x": "1"})
    transport.state.end_round("a")
    assert transport.state.rounds_in_flight() == {"b": 16}
    assert not admit(transport, "c", 0)
    transport.state.end_round("b")
    assert admit(transport, "c", 0)  # 1 queued + its own 16: still step 0


def test_a_newer_version_or_a_later_step_moves_the_bound(transport: Transport) -> None:
    transport.state.write_schedule({"step": 5})
    assert not admit(transport, "a", 3, stale=1)  # used at step 5, version 3 is 2 behind
    assert admit(transport, "a", 4, stale=1)
    assert not admit(transport, "b", 3, stale=2, share=48)  # a's 16 + 48 reach step 6


def test_concurrent_admission_never_over_admits(transport: Transport) -> None:
    # Eight actors race for rounds of 16 groups at max_staleness 0 from step 0: exactly two
    # rounds fit in step 0, however the calls interleave.
    transport.state.write_schedule({"step": 0})
    barrier = threading.Barrier(8)
    results: dict[str, bool] = {}

    def race(name: str) -> None:
        barrier.wait()
        results[name] = admit(transport, name, 0)

    threads = [threading.Thread(target=race, args=(f"r{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert sum(results.values()) == 2
    assert set(transport.state.rounds_in_flight()) == {n for n, ok in results.items() if ok}
