"""`percept run`'s process manager: it keeps the gateway, the workers and the embedded Redis and Postgres running.

A process that exits is started again after a back-off (1 s, doubling to 30 s; back to 1 s once it has stayed up
STABLE_AFTER), each restart one line on the console and in <data dir>/logs/supervisor.log, and counted in
<data dir>/process-restarts.json, which the gateway's /metrics reads (`percept_process_restarts_total`). Redis and
Postgres come back on the same socket, so the other processes reconnect by themselves; Redis appends every write
to its log (appendonly), so the messages it held survive.

One exit is not retried: a child that fails by itself (a non-zero exit, not a signal) on its very first start,
within STARTUP_WINDOW. That is a configuration error (a device this machine lacks, a port in use) that starting it
again would only repeat; `percept run` stops and prints the child's last words instead.
"""

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from percept.infra import Infra

BACKOFF_FIRST = 1.0  # seconds before the first restart of a process that was up a while
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # up this long, a process's next exit is restarted after BACKOFF_FIRST again
STARTUP_WINDOW = 20.0  # a worker that cannot start (no such device) fails within seconds of its first start
STOP_GRACE = 30.0  # SIGTERM, then this long for a worker's warm shutdown before SIGKILL
RESTARTS_FILE = "process-restarts.json"
REDIS, POSTGRES = "redis", "postgres"

log = logging.getLogger(__name__)


def restarts_path(data_dir: Path) -> Path:
    return data_dir / RESTARTS_FILE


def restart_counts(data_dir: Path) -> dict[str, int]:
    """Restarts per process of the `percept run` that owns data_dir, as it last wrote them; {} when none runs."""
    try:
        counts = json.loads(restarts_path(data_dir).read_text())
    except (OSError, ValueError):
        return {}
    return {str(name): int(count) for name, count in counts.items()} if isinstance(counts, dict) else {}


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a process that died said last)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def become_subreaper() -> None:
    """Make the orphans of this process's descendants its own children (Linux), so it can reap them.

    pg_ctl leaves the postmaster behind as an orphan. The pid 1 of a container often reaps nothing, and a killed
    postmaster left as a zombie there looks alive to pgserver (and to Postgres's own lock file check), so it
    could never be started again. Call it before the embedded servers start.
    """
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@dataclass
class Supervised:
    """One process the supervisor keeps running: started by `launch`, found alive by `alive`."""

    name: str
    launch: Callable[[], None]
    alive: Callable[[], bool]
    started_at: float = 0.0
    first_run: bool = True
    failures: int = 0  # exits in a row that came before STABLE_AFTER: the back-off's exponent
    restarts: int = 0
    restart_at: float | None = None  # set while it is down and waiting for its back-off

    def backoff(self) -> float:
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self.failures)


@dataclass
class Child:
    """A program of the platform (the gateway or a worker): its command and its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's
    process: subprocess.Popen | None = None


class StartupFailure(Exception):
    """A child failed at its first start: the platform stops with the child's reason."""


@dataclass
class Supervisor:
    infra: Infra
    env: dict[str, str]
    children: list[Child]
    logs: Path
    say: Callable[[str], None]  # one line for the person at the console
    units: list[Supervised] = field(default_factory=list)
    _file_log: logging.Logger = field(init=False)

    def __post_init__(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._file_log = logging.getLogger("percept.supervisor.file")
        self._file_log.propagate = False  # the console gets `say`'s line, not a second copy
        self._file_log.setLevel(logging.INFO)
        handler = logging.FileHandler(self.logs / "supervisor.log", delay=True)  # made at the first restart
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s percept run: %(message)s"))
        self._file_log.handlers = [handler]
        for child in self.children:
            self.units.append(Supervised(child.name, functools.partial(self._spawn, child),
                                         functools.partial(self._child_alive, child)))
        redis_handle = self._redis_process()
        if redis_handle is not None:
            self.units.append(Supervised(REDIS, self._start_redis, self._redis_alive))
        if self._postgres_server() is not None:
            self.units.append(Supervised(POSTGRES, self._start_postgres, self._postgres_alive))

    # The children

    def _spawn(self, child: Child) -> None:
        with child.log_path.open("ab") as log_file:  # the child keeps its own descriptor
            # Its own process group: a worker's pool processes go with it when it is restarted or stopped.
            child.process = subprocess.Popen([sys.executable, *child.argv], env={**self.env, **child.env},
                                             stdout=log_file, stderr=subprocess.STDOUT, process_group=0)

    @staticmethod
    def _child_alive(child: Child) -> bool:
        return child.process is not None and child.process.poll() is None

    def _child(self, name: str) -> Child | None:
        return next((child for child in self.children if child.name == name), None)

    # The embedded servers (only those this process started: an attached one belongs to someone else)

    def _redis_process(self) -> subprocess.Popen | None:
        return next((h for h in self.infra.handles if isinstance(h, subprocess.Popen)), None)

    def _redis_alive(self) -> bool:
        process = self._redis_process()
        return process is not None and process.poll() is None

    def _start_redis(self) -> None:
        from percept.embedded import start_redis

        old = self._redis_process()
        if old is not None:
            self.infra.handles.remove(old)
        process, _ = start_redis(self.infra.settings.data_dir / "redis")  # the same socket, the same AOF
        if process is not None:
            self.infra.handles.append(process)

    def _postgres_server(self) -> Any:
        return next((h for h in self.infra.handles if hasattr(h, "ensure_postgres_running")), None)

    def _postgres_alive(self) -> bool:
        import psutil  # with pgserver (the embedded extra), like the server it watches

        server = self._postgres_server()
        try:
            postmaster = psutil.Process(server.get_pid())
            return postmaster.is_running() and postmaster.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _start_postgres(self) -> None:
        server = self._postgres_server()
        # pg_ctl start on the same data directory and socket directory; pgserver's lock keeps other processes
        # of this machine from starting it at the same time. While the killed postmaster's backends still hold
        # its shared memory the start fails, and the back-off tries again.
        with server._lock:
            server.ensure_postgres_running()

    # The loop

    def start(self) -> None:
        self._write_counts()
        for unit in self.units:
            if unit.name in (REDIS, POSTGRES):
                unit.started_at = time.monotonic()  # started by resolve_infra, before the supervisor
            else:
                unit.launch()
                unit.started_at = time.monotonic()

    def check(self) -> None:
        """One look at every process: note the ones that died, start the ones whose back-off is over.
        Raises StartupFailure for a child that could not start at all."""
        self._reap_orphans()
        now = time.monotonic()
        for unit in self.units:
            if unit.restart_at is None:
                if unit.alive():
                    if now - unit.started_at >= STABLE_AFTER:
                        unit.failures = 0
                    continue
                self._down(unit, now)
            if unit.restart_at is not None and now >= unit.restart_at:
                self._restart(unit)

    def _down(self, unit: Supervised, now: float) -> None:
        up_for = now - unit.started_at
        child = self._child(unit.name)
        if child is not None and child.process is not None:
            code = child.process.returncode
            self._reap_group(child.process)
            if unit.first_run and code > 0 and up_for < STARTUP_WINDOW:
                raise StartupFailure(f"{child.name} exited ({code}): {last_line(child.log_path)}  "
                                     f"(all of it: {child.log_path})")
            how = exit_description(code)
        elif unit.name == REDIS and (process := self._redis_process()) is not None:
            how = exit_description(process.returncode if process.returncode is not None else 0)
        else:
            how = "exited"
        if up_for >= STABLE_AFTER:
            unit.failures = 0
        delay = unit.backoff()
        unit.failures += 1
        unit.restart_at = now + delay
        self._report(f"{unit.name} {how} after {up_for:.1f} s; restarting it in {delay:g} s "
                     f"(restart {unit.restarts + 1})", logging.WARNING)

    def _restart(self, unit: Supervised) -> None:
        try:
            unit.launch()
        except Exception as exc:  # the server would not start yet: wait longer, then try again
            delay = unit.backoff()
            unit.failures += 1
            unit.restart_at = time.monotonic() + delay
            self._report(f"{unit.name} did not start ({exc.__class__.__name__}: {str(exc)[:200]}); "
                         f"trying again in {delay:g} s", logging.ERROR)
            return
        unit.restart_at, unit.first_run = None, False
        unit.started_at = time.monotonic()
        unit.restarts += 1
        self._write_counts()
        self._report(f"{unit.name} restarted (restart {unit.restarts})", logging.INFO)

    def _reap_orphans(self) -> None:
        """Reap the zombies among our children that no Popen waits for: the postmaster pg_ctl left behind and
        the old backends and pool processes a kill orphaned (see become_subreaper)."""
        import psutil

        tracked = {child.process.pid for child in self.children if child.process is not None}
        tracked |= {h.pid for h in self.infra.handles if isinstance(h, subprocess.Popen)}
        for process in psutil.Process().children():
            try:
                if process.pid not in tracked and process.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(process.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                pass

    def _reap_group(self, process: subprocess.Popen) -> None:
        """What the dead child left in its process group (a worker's pool processes) goes with it."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _report(self, line: str, level: int) -> None:
        self.say(line)
        self._file_log.log(level, line)

    def _write_counts(self) -> None:
        path = restarts_path(self.infra.settings.data_dir)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps({unit.name: unit.restarts for unit in self.units}))
        os.replace(scratch, path)  # a scrape never reads half a file

    def stop(self) -> None:
        """SIGTERM every child's group, a grace period for warm shutdowns, then SIGKILL what is left.
        The embedded servers are the caller's to stop (Infra.close), after the children."""
        running = [child.process for child in self.children
                   if child.process is not None and child.process.poll() is None]
        for process in running:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self._reap_group(process)
        restarts_path(self.infra.settings.data_dir).unlink(missing_ok=True)
        for handler in self._file_log.handlers:
            handler.close()
