"""`percept run`, what `make run` starts: embedded Postgres and Redis, local objects, the gateway and a
worker. It prints the URL and a dev key, Ctrl-C stops every process it started, and the data is still
there when it starts again. A process of it that dies is started again; one that cannot start stops it."""

import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from skimage import data

from tests.conftest import ROOT, free_port, image_bytes, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start(data_dir, port: int, log, **settings: str) -> subprocess.Popen:
    env = {**os.environ, "PERCEPT_DATA_DIR": str(data_dir), "PORT": str(port), "PERCEPT_LOG_LEVEL": "WARNING",
           **settings}
    for name in ("PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL"):
        env.pop(name, None)
    # Its own process group, like a terminal's foreground job, so "Ctrl-C" reaches all of it.
    return subprocess.Popen([sys.executable, "-m", "percept.cli", "run", "--workers", "classifier"], env=env,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ctrl_c(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(90) == 0
    # Nothing of it is left running: workers, gateway, embedded servers.
    wait_until(lambda: _group_gone(process.pid), timeout=30, what="every process of the group to exit")


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def test_run_stops_cleanly_and_keeps_its_data(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "first.log", "wb") as log:
        first = start(data_dir, port, log)
        try:
            wait_until(lambda: ready(url), timeout=180, interval=0.5, what="percept run to be ready")
            key = (data_dir / "dev-api-key").read_text().strip()
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=90) as api:
                job = api.post("/v1/classify", files={"image": ("coffee.jpg", image_bytes(data.coffee()))},
                               headers={"Prefer": "wait=60"}).json()
            assert job["status"] == "succeeded" and job["output"]["labels"][0]["label"] == "espresso"
        finally:
            ctrl_c(first)
    printed = (tmp_path / "first.log").read_text()
    assert url in printed and key in printed and "stopped." in printed
    assert f"{url}/console/" in printed and str(data_dir / "logs") in printed
    # A short banner: the servers' and workers' own output goes to their log files, not the terminal
    assert "celery@" not in printed and "Uvicorn running" not in printed and len(printed.splitlines()) < 25
    assert oct((data_dir / "dev-api-key").stat().st_mode)[-3:] == "600"
    logs = {path.name for path in (data_dir / "logs").iterdir()}
    assert logs == {"gateway.log", "worker-classifier.log"}
    assert "Warm shutdown" in (data_dir / "logs" / "worker-classifier.log").read_text()  # Celery's, on Ctrl-C
    shown = subprocess.run([sys.executable, "-m", "percept.cli", "logs", "worker-classifier", "--no-follow",
                            "--lines", "500"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PERCEPT_DATA_DIR": str(data_dir)})
    assert shown.returncode == 0 and "Warm shutdown" in shown.stdout
    unknown = subprocess.run([sys.executable, "-m", "percept.cli", "logs", "worker-nope", "--no-follow"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PERCEPT_DATA_DIR": str(data_dir)})
    assert unknown.returncode == 2 and "worker-classifier" in unknown.stdout

    with open(tmp_path / "second.log", "wb") as log:
        second = start(data_dir, port, log)
        try:
            wait_until(lambda: ready(url), timeout=180, interval=0.5, what="percept run to be ready again")
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
                again = api.get(f"/v1/jobs/{job['id']}").json()
                photo = api.get(f"/v1/images/{job['provenance']['inputs'][0]['image_id']}/content")
            assert again["status"] == "succeeded" and again["output"] == job["output"]
            assert photo.content == image_bytes(data.coffee())
        finally:
            ctrl_c(second)


def test_a_worker_that_cannot_start_says_why_in_one_line(tmp_path):
    """No GPU here: a classifier worker told PERCEPT_DEVICE=cuda stops at start-up, and `percept run` prints its
    reason in one line (and stops the platform)."""
    data_dir, port = tmp_path / "data", free_port()
    with open(tmp_path / "run.log", "wb") as log:
        env = {**os.environ, "PERCEPT_DATA_DIR": str(data_dir), "PORT": str(port), "PERCEPT_DEVICE": "cuda"}
        for name in ("PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL"):
            env.pop(name, None)
        run = subprocess.Popen([sys.executable, "-m", "percept.cli", "run", "--workers", "classifier"], env=env,
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        assert run.wait(180) == 0
    wait_until(lambda: _group_gone(run.pid), timeout=30, what="every process of the group to exit")
    [line] = [line for line in (tmp_path / "run.log").read_text().splitlines() if "exited" in line]
    assert line.startswith("worker-classifier exited (1): percept worker classifier: ")
    assert "cuda" in line.lower() and str(data_dir / "logs" / "worker-classifier.log") in line


def _pids(run: subprocess.Popen, data_dir) -> dict[str, int]:
    """The processes `percept run` keeps running: its children by role, and the postmaster."""
    found = {}
    for child in psutil.Process(run.pid).children():
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "redis-server" in command:
            found["redis"] = child.pid
        elif command.endswith("percept.cli gateway"):
            found["gateway"] = child.pid
        elif "-m workers classifier" in command:
            found["worker-classifier"] = child.pid
    try:  # rewritten by each start of the postmaster
        found["postgres"] = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return found


def _classified(url: str, key: str) -> dict:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=90) as api:
        return api.post("/v1/classify", files={"image": ("coffee.jpg", image_bytes(data.coffee()))},
                        headers={"Prefer": "wait=60"}).json()


def _restarts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("percept_process_restarts_total{")}


def test_run_restarts_what_dies(tmp_path):
    """SIGKILL the worker, the gateway, the embedded Redis and the postmaster in turn: each comes back (the
    servers on the same socket, so the others reconnect), a job succeeds after each, and /metrics counts them."""
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    clocks = {"PERCEPT_JOB_LEASE": "3", "PERCEPT_SWEEP_INTERVAL": "0.5", "PERCEPT_REQUEUE_AFTER": "3"}
    with open(tmp_path / "run.log", "wb") as log:
        run = start(data_dir, port, log, **clocks)
        seen: set[int] = set()
        try:
            wait_until(lambda: ready(url), timeout=180, interval=0.5, what="percept run to be ready")
            key = (data_dir / "dev-api-key").read_text().strip()
            assert _classified(url, key)["status"] == "succeeded"
            assert _restarts(url) == {"gateway": 0, "worker-classifier": 0, "redis": 0, "postgres": 0}
            for victim in ("worker-classifier", "gateway", "redis", "postgres"):
                before = _pids(run, data_dir)
                seen.update(before.values())
                os.kill(before[victim], signal.SIGKILL)
                wait_until(lambda v=victim, b=before: _pids(run, data_dir).get(v) not in (None, b[v]), timeout=60,
                           interval=0.2, what=f"{victim} to be started again")
                wait_until(lambda: ready(url), timeout=60, interval=0.2, what=f"readiness after {victim}")
                job = _classified(url, key)
                assert job["status"] == "succeeded", (victim, job)
                assert _restarts(url)[victim] == 1
            assert _restarts(url) == {"gateway": 1, "worker-classifier": 1, "redis": 1, "postgres": 1}
            seen.update(_pids(run, data_dir).values())
        finally:
            ctrl_c(run)
    assert not [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    printed = (tmp_path / "run.log").read_text()
    for victim in ("worker-classifier", "gateway", "redis", "postgres"):
        assert f"{victim} restarted (restart 1)" in printed
    assert "worker-classifier killed by SIGKILL after" in printed
    logged = (data_dir / "logs" / "supervisor.log").read_text()
    assert "WARNING percept run: redis killed by SIGKILL after" in logged and "postgres restarted" in logged
