"""Wait until a Kubernetes object is ready, saying why not while it is not (tenacity).

One loop for every "poll until ready" on the cluster: `python -m cluster up` waits on the
RayCluster or RayJob with it, and `ray_jobs.serve --backend kubernetes` (serving/kubernetes.py)
on the Triton Deployment. The policy is tenacity's: retry while the check says no, a fixed period
between checks, stop at the timeout or when an optional Event is set (SIGTERM in serve).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import tenacity

from core.errors import UserError

# Progress goes to stderr (the entry point's logging) so that with --json the last stdout line
# stays the summary.
LOG = logging.getLogger(__name__)


def wait_for(check: Callable[[], bool], describe: Callable[[], str], timeout_s: float,
             period_s: float, *, what: str = "", stop: threading.Event | None = None) -> None:
    """Call CHECK every PERIOD_S seconds until it returns True.

    Args:
      check: True once ready. It runs first, before any wait.
      describe: why not yet, one line; called after each failed check (it may read what
        CHECK stored). A line is logged (this module's logger, INFO) only when it differs from
        the previous one, so a long wait prints what changes rather than the same line every
        period.
      timeout_s: give up this many seconds after the first check.
      period_s: seconds between checks.
      what: the name of what is awaited, for the error message ("" for none).
      stop: when set, stop waiting at once (the wait sleeps on it, so it wakes immediately).

    Raises:
      UserError: "[WHAT ]not ready after Ns: <last describe()>" at the timeout, or
        "stopped before WHAT was ready: <...>" when STOP was set first.
    """
    notes: list[str] = []

    def ready() -> bool:
        if check():
            return True
        note = describe()
        if not notes or note != notes[-1]:
            LOG.info("%s", note)
        notes[:] = [note]
        return False

    give_up = tenacity.stop_after_delay(timeout_s)
    if stop is not None:
        give_up = give_up | tenacity.stop_when_event_set(stop)
    poller = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda ok: not ok),
        stop=give_up,
        wait=tenacity.wait_fixed(period_s),
        # Sleeping on the Event (when there is one) lets a signal end the wait mid-period.
        sleep=stop.wait if stop is not None else time.sleep,
        retry_error_callback=lambda _state: False)
    if poller(ready):
        return
    note = notes[-1] if notes else "no check ran"
    if stop is not None and stop.is_set():
        raise UserError(f"stopped before {what or 'it'} was ready: {note}")
    raise UserError(f"{what + ' ' if what else ''}not ready after {timeout_s:.0f}s: {note}")
