"""What the bench scripts share: the `--device` flag and starting a gateway to measure.

Imported by the scripts as `from harness import ...` (they run as `python bench/NAME.py`).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
DEVICE_HELP = "auto, cpu, cuda or cuda:N (default: PERCEPT_DEVICE, else auto)"


def add_device_argument(parser: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    parser.add_argument("--device", help=help)


def apply_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    """Check `--device` and set it as PERCEPT_DEVICE, so this process and the platform's workers agree.
    Call it before anything reads the settings."""
    if not device:
        return
    from percept.devices import check_device_setting  # reads no settings

    try:
        check_device_setting(device)
    except ValueError as exc:
        parser.error(str(exc))
    os.environ["PERCEPT_DEVICE"] = device
    from percept.config import get_settings

    get_settings.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_gateway(url: str, process: subprocess.Popen, timeout: float = 60, path: str = "/healthz") -> None:
    """Until `url + path` answers 200; raises if `process` (the gateway, or `percept run`) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.1)


def start_gateway(data_dir: Path, database_url: str, broker_url: str) -> tuple[subprocess.Popen, str]:
    """`percept gateway` on the given database and broker, objects under data_dir; (process, its URL)."""
    port = free_port()
    env = {**os.environ, "PERCEPT_DATA_DIR": str(data_dir), "PERCEPT_DATABASE_URL": database_url,
           "PERCEPT_BROKER_URL": broker_url, "PERCEPT_STORAGE_URL": (data_dir / "objects").as_uri(),
           "PORT": str(port), "PERCEPT_LOG_LEVEL": "WARNING"}
    log = (data_dir / "gateway.log").open("ab")
    gateway = subprocess.Popen([sys.executable, "-m", "percept.cli", "gateway"], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_gateway(url, gateway)
    return gateway, url


@contextmanager
def running_platform(workers: str = "", **env_vars: str) -> Iterator[tuple[str, str, psutil.Process]]:
    """`percept run` in a temporary data dir, with `workers` (`percept run --workers`: a pool named twice runs
    twice; default every pool once) and settings `env_vars`; yields (base URL, API key, gateway process)."""
    data_dir = Path(tempfile.mkdtemp(prefix="percept-bench-"))
    port = free_port()
    # The benches send one image many times to time the model's runs: result reuse would answer all but the first.
    env = {**os.environ, "PERCEPT_DATA_DIR": str(data_dir), "PORT": str(port), "PERCEPT_LOG_LEVEL": "WARNING",
           "PERCEPT_RESULT_REUSE": "false", **env_vars}
    command = [sys.executable, "-m", "percept.cli", "run", *(["--workers", workers] if workers else [])]
    runner = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_gateway(url, runner, timeout=120, path="/readyz")
        key = (data_dir / "dev-api-key").read_text().strip()
        gateway = next(p for p in psutil.Process(runner.pid).children()
                       if "gateway" in " ".join(p.cmdline()))
        yield url, key, gateway
    finally:
        runner.send_signal(signal.SIGINT)
        runner.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)
