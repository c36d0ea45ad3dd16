"""The weight store's rules, without Ray: only the latest version is kept, versions never go
back unless a resumed learner says so."""

from __future__ import annotations

import pytest

from services.weightsync.ray_store import WeightStore, store_name


def test_keeps_only_the_latest_version() -> None:
    store = WeightStore()
    assert store.latest_version() == -1 and store.get() is None
    store.publish(0, ["ref0"], "c0")
    store.publish(1, ["ref1"], "c1")
    assert store.latest_version() == 1
    assert store.get() == (1, ["ref1"], "c1")
    assert store.info() == {"version": 1, "checksum": "c1", "published": 2}


def test_versions_only_move_forward_except_on_a_resume() -> None:
    store = WeightStore()
    store.publish(5, ["ref5"], "c5")
    with pytest.raises(ValueError, match="older than the stored 5"):
        store.publish(4, ["ref4"], "c4")
    assert store.latest_version() == 5
    store.publish(2, ["ref2"], "c2", allow_rewind=True)  # a learner resumed from step 2
    assert store.get() == (2, ["ref2"], "c2")


def test_refs_travel_in_a_one_element_list() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        WeightStore().publish(0, [], "c")
    assert store_name("run1") == "run1-weights"
