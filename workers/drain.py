"""Graceful shutdown: what a worker does between SIGTERM and SIGKILL.

On SIGTERM Celery's warm shutdown stops taking messages and lets the running task finish. The task runs in a
pool child (prefork) or in the worker process itself (solo), so the worker process records when the shutdown
began in a marker file named by its pid, which the job's process reads at each step: a job that would still be
running `handback_margin` before the grace ends (`shutdown_grace`) is handed back, queued again for another
worker, instead of being cut off by SIGKILL and left `running` until its lease runs out.
"""

import os
import tempfile
import time
from pathlib import Path

from percept.config import Settings


def marker(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"percept-drain-{pid}"


def begin(pid: int | None = None) -> None:
    """Record that this worker process's shutdown began now (the worker_shutting_down signal)."""
    marker(pid or os.getpid()).write_text(repr(time.time()))


def clear(pid: int | None = None) -> None:
    """At start-up: a container restarted in the same pod keeps its /tmp and may well have the same pid."""
    marker(pid or os.getpid()).unlink(missing_ok=True)


def shutdown_began() -> float | None:
    """When the shutdown of the worker this process serves began (a pool child's parent, or itself), if it has."""
    for pid in (os.getpid(), os.getppid()):
        try:
            return float(marker(pid).read_text())
        except (OSError, ValueError):
            continue
    return None


def handback_due(settings: Settings) -> bool:
    began = shutdown_began()
    if began is None:
        return False
    keep = (settings.shutdown_grace - settings.handback_margin).total_seconds()
    return time.time() >= began + keep
