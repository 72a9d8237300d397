"""Start one peer server in its own virtualenv and hand back its URL; stop it (and all it started) after.

Each peer serves POST /classify with a multipart `image` file part, answering the classifier's output dict.
"""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.peers.envs import ENVS_DIR, ROOT, ensure_env, env_dir, framework_version

# name -> (label in the table, the env it runs in, command after the env's bin dir, readiness path)
PEERS: dict[str, tuple[str, str, list[str], str]] = {
    "ray": ("Ray Serve, @serve.batch(16, 10 ms)", "ray",
            ["python", "bench/peers/ray_serve_app.py", "--port", "{port}"], "/healthz"),
    "bentoml": ("BentoML, adaptive batching (max 16)", "bentoml",
                ["bentoml", "serve", "bench.peers.bentoml_service:Classifier", "--host", "127.0.0.1",
                 "--port", "{port}"], "/readyz"),
    "fastapi": ("plain FastAPI, no batching", "fastapi",
                ["python", "-m", "uvicorn", "bench.peers.fastapi_app:app", "--host", "127.0.0.1", "--port", "{port}",
                 "--log-level", "warning"], "/healthz"),
}
START_TIMEOUT_S = 180  # Ray's first start on 2 busy cores takes ~30 s


def peer_version(name: str) -> str:
    return framework_version(PEERS[name][1])


@contextmanager
def running_peer(name: str, port: int, device: str | None = None) -> Iterator[str]:
    """The peer `name` serving on 127.0.0.1:port until the block ends; yields its base URL."""
    _, env_name, command, ready_path = PEERS[name]
    ensure_env(env_name)
    binary = env_dir(env_name) / "bin" / command[0]
    args = [str(binary), *(part.format(port=port) for part in command[1:])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           "VIRTUAL_ENV": str(env_dir(env_name)), "PATH": f"{env_dir(env_name) / 'bin'}:{os.environ['PATH']}",
           # BentoML and Ray keep their home and session state out of ~
           "BENTOML_HOME": str(ENVS_DIR / "bentoml-home"), "RAY_USAGE_STATS_ENABLED": "0"}
    if device:
        env["PERCEPT_DEVICE"] = device
    log_path = ENVS_DIR / f"{name}.log"
    with log_path.open("ab") as log:
        # A session of its own: stopping it stops the workers, proxies and actors it started too.
        server = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url + ready_path, server, log_path)
        yield url
    finally:
        _stop(server)


def _wait_ready(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the peer exited with {server.returncode}: see {log_path}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the peer did not answer {url} within {START_TIMEOUT_S} s: see {log_path}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the peer's own process group (Ray Serve shuts its actors down on it), then SIGKILL
    whatever of the group is left (Ray's raylet and workers can outlive the driver)."""
    _signal_group(server.pid, signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while _signal_group(server.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_group(server.pid, signal.SIGKILL)
    server.wait(10)


def _signal_group(group: int, signum: int) -> bool:
    """Send `signum` to the process group; False once no process of it is left."""
    try:
        os.killpg(group, signum)
        return True
    except ProcessLookupError:
        return False
