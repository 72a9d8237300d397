"""percept/supervisor.py with small real child processes: restarts with a doubling back-off reset once a process
has stayed up, counted in the file the gateway's /metrics reads; a child that cannot start at all stops the
platform instead; stop() ends every child's process group."""

import os
import re
import signal
import time

import psutil
import pytest

from percept import supervisor as sv
from percept.config import Settings
from percept.infra import Infra
from percept.supervisor import Child, StartupFailure, Supervisor, restart_counts
from tests.conftest import wait_until

DIES_BY_SIGNAL = "import os, signal, time; time.sleep(0.2); os.kill(os.getpid(), signal.SIGKILL)"
# Stands for a worker's pool: a grandchild in the child's process group, left behind when the child is killed.
WITH_A_POOL = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
               "time.sleep(600)']); print('pool started', flush=True); time.sleep(600)")


@pytest.fixture
def fast_clocks(monkeypatch):
    monkeypatch.setattr(sv, "BACKOFF_FIRST", 0.2)
    monkeypatch.setattr(sv, "BACKOFF_MAX", 0.8)
    monkeypatch.setattr(sv, "STARTUP_WINDOW", 5.0)


def supervisor(tmp_path, *children: tuple[str, str]) -> tuple[Supervisor, list[str]]:
    said: list[str] = []
    infra = Infra(Settings(data_dir=tmp_path), "", "", "", [])
    made = [Child(name, ["-c", code], tmp_path / "logs" / f"{name}.log") for name, code in children]
    return Supervisor(infra, dict(os.environ), made, tmp_path / "logs", say=said.append), said


def run_until(sup: Supervisor, condition, timeout: float = 20):
    def step():
        sup.check()
        return condition()
    return wait_until(step, timeout=timeout, interval=0.05, what=str(condition))


def test_a_child_that_dies_is_restarted_with_a_doubling_backoff_and_counted(tmp_path, fast_clocks):
    sup, said = supervisor(tmp_path, ("worker-x", DIES_BY_SIGNAL))
    sup.start()
    assert restart_counts(tmp_path) == {"worker-x": 0}
    try:
        run_until(sup, lambda: sup.units[0].restarts >= 4)
    finally:
        sup.stop()
    waits = [line for line in said if "restarting it in" in line]
    assert all(re.fullmatch(r"worker-x killed by SIGKILL after [0-9.]+ s; restarting it in [0-9.]+ s "
                            r"\(restart \d+\)", line) for line in waits), waits
    assert [float(re.search(r"in ([0-9.]+) s", line)[1]) for line in waits][:4] == [0.2, 0.4, 0.8, 0.8]
    assert "worker-x restarted (restart 1)" in said
    logged = (tmp_path / "logs" / "supervisor.log").read_text()
    assert "WARNING percept run: worker-x killed by SIGKILL" in logged and "worker-x restarted (restart 4)" in logged
    assert not restart_counts(tmp_path)  # the file goes with the platform


def test_the_backoff_starts_over_once_a_child_stayed_up(tmp_path, fast_clocks, monkeypatch):
    monkeypatch.setattr(sv, "STABLE_AFTER", 0.1)  # the child lives 0.2 s: "a while"
    sup, said = supervisor(tmp_path, ("worker-x", DIES_BY_SIGNAL))
    sup.start()
    try:
        run_until(sup, lambda: sup.units[0].restarts >= 3)
        assert restart_counts(tmp_path)["worker-x"] == sup.units[0].restarts
    finally:
        sup.stop()
    assert all("restarting it in 0.2 s" in line for line in said if "restarting" in line)


def test_a_child_that_cannot_start_stops_the_platform_with_its_reason(tmp_path, fast_clocks):
    sup, _ = supervisor(tmp_path, ("worker-x", "raise SystemExit('percept worker x: no such device cuda')"))
    sup.start()
    with pytest.raises(StartupFailure, match=r"^worker-x exited \(1\): percept worker x: no such device cuda  "
                                             r"\(all of it: .*worker-x.log\)$"):
        run_until(sup, lambda: False, timeout=10)
    sup.stop()


def test_a_killed_child_takes_its_process_group_along_and_stop_ends_the_rest(tmp_path, fast_clocks):
    sup, _ = supervisor(tmp_path, ("worker-x", WITH_A_POOL), ("gateway", "import time; time.sleep(600)"))
    sup.start()
    worker = sup.children[0]
    assert worker.process is not None
    wait_until(lambda: "pool started" in worker.log_path.read_text(), timeout=20)
    [pool] = psutil.Process(worker.process.pid).children()
    os.kill(worker.process.pid, signal.SIGKILL)
    try:
        run_until(sup, lambda: sup.units[0].restarts == 1)
        wait_until(lambda: not pool.is_running() or pool.status() == psutil.STATUS_ZOMBIE, timeout=10)
        everyone = [child.process for child in sup.children if child.process is not None]
        wait_until(lambda: "pool started" in worker.log_path.read_text().split("pool started", 1)[1], timeout=20)
        pools = [p for process in everyone for p in psutil.Process(process.pid).children()]
    finally:
        started = time.monotonic()
        sup.stop()
    assert time.monotonic() - started < 10  # SIGTERM ends them; no grace period spent
    assert all(process.poll() is not None for process in everyone)
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in pools)
