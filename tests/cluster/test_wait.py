"""cluster.wait.wait_for: checks until ready, logs only changes, names the last reason."""

from __future__ import annotations

import threading

import pytest

from cluster.wait import wait_for
from core.errors import UserError


def test_waits_until_ready_and_logs_each_change_once(caplog):
    answers = iter([False, False, False, True])
    notes = iter(["pending", "pending", "1/2 ready"])
    wait_for(lambda: next(answers), lambda: next(notes), 10, 0.01)
    logged = [r.getMessage() for r in caplog.records if r.name == "cluster.wait"]
    assert logged == ["pending", "1/2 ready"]


def test_timeout_names_what_and_the_last_reason():
    with pytest.raises(UserError, match=r"^triton-x not ready after 0s: short of nvidia.com/gpu$"):
        wait_for(lambda: False, lambda: "short of nvidia.com/gpu", 0.05, 0.01, what="triton-x")


def test_a_set_event_stops_the_wait():
    stop = threading.Event()
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    with pytest.raises(UserError, match="stopped before triton-x was ready: pending"):
        wait_for(lambda: False, lambda: "pending", 60, 30, what="triton-x", stop=stop)
    timer.join()
