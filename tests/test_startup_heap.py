"""The startup heap's freeze and the collection watcher (`PDCLUSTER_GC_WARN_MS`)."""
from __future__ import annotations

import gc
import logging

import pytest

from cluster import startup_heap


@pytest.fixture
def restore_gc():
    callbacks = list(gc.callbacks)
    yield
    gc.callbacks[:] = callbacks
    gc.unfreeze()


def test_a_collection_over_the_threshold_is_logged_with_its_generation(restore_gc, caplog):
    startup_heap.watch_collections(0.0)
    with caplog.at_level(logging.WARNING, logger="pdcluster.gc"):
        gc.collect(2)
    lines = [r.getMessage() for r in caplog.records if r.name == "pdcluster.gc"]
    assert any(line.startswith("gc generation 2 held the process") for line in lines), lines


def test_collections_under_the_threshold_are_not_logged(restore_gc, caplog):
    startup_heap.watch_collections(60.0)
    with caplog.at_level(logging.WARNING, logger="pdcluster.gc"):
        gc.collect(2)
    assert not [r for r in caplog.records if r.name == "pdcluster.gc"]


def test_freeze_watches_only_when_asked_and_refuses_a_bad_value_clearly(restore_gc, caplog, monkeypatch):
    before = len(gc.callbacks)
    monkeypatch.delenv(startup_heap.GC_WARN_ENV, raising=False)
    startup_heap.freeze_startup_heap()
    assert len(gc.callbacks) == before and gc.get_freeze_count() > 0
    monkeypatch.setenv(startup_heap.GC_WARN_ENV, "soon")
    with caplog.at_level(logging.WARNING, logger="pdcluster.gc"):
        startup_heap.freeze_startup_heap()
    assert len(gc.callbacks) == before
    assert "is not a number of milliseconds" in caplog.text
    monkeypatch.setenv(startup_heap.GC_WARN_ENV, "50")
    startup_heap.freeze_startup_heap()
    assert len(gc.callbacks) == before + 1
