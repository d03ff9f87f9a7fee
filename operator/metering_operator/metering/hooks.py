"""Test hook (documented, for crash tests only): die at a named step of the send protocol.

``MMO_CRASH_AT`` = ``before-ledger-write`` | ``after-ledger-write`` | ``after-call`` makes the
process SIGKILL itself at that step; with ``MMO_CRASH_MARKER=<path>`` it does so only if that
file does not exist yet (and creates it first), so a restarted process with the same environment
runs on.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

CRASH_ENV = "MMO_CRASH_AT"
CRASH_MARKER_ENV = "MMO_CRASH_MARKER"
CRASH_STEPS = ("before-ledger-write", "after-ledger-write", "after-call")


def crash_point(step: str) -> None:
    """SIGKILL this process at ``step`` if ``MMO_CRASH_AT`` asks for it."""
    if os.environ.get(CRASH_ENV) != step:
        return
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker:
        path = Path(marker)
        if path.exists():
            return
        path.write_text(step)
    log.critical("test hook %s=%s: killing the process now", CRASH_ENV, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
