"""Gateway memory while a large dataset is uploaded: the zip is streamed to object storage, never held.

Starts embedded Postgres and Redis and the gateway alone (no worker: the analysis job stays queued, which
is all the gateway's side needs), then uploads a generated dataset zip (stored, not compressed: every byte
of it crosses the gateway) and prints the gateway's resident memory before the upload, its highest value
sampled while the upload ran, and after.

Run: .venv/bin/python bench/gateway_memory.py [--megabytes 300] [--device auto]
(--device is accepted like every bench's; the gateway runs no model.)
"""

import argparse
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
from harness import add_device_argument, start_gateway

from percept.db.migrate import upgrade
from percept.db.session import session_scope
from percept.db.tenants import create_key
from percept.embedded import start_postgres, start_redis

FILE_BYTES = 512 * 1024  # one "photo"
SAMPLE_SECONDS = 0.02


def rss_bytes(pid: int) -> int:
    """Resident set size of a process: psutil where installed, else /proc/<pid>/status."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/<pid>/status") from None
    return psutil.Process(pid).memory_info().rss


def write_dataset_zip(path: Path, total_bytes: int) -> int:
    """A stored (uncompressed) zip of random-ish JPEG and PNG files in two class folders; its size."""
    jpeg, png = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for n in range(max(2, total_bytes // FILE_BYTES)):
            label, (header, ext) = ("cats", (jpeg, "jpg")) if n % 2 else ("dogs", (png, "png"))
            archive.writestr(f"{label}/{n}.{ext}", header + os.urandom(FILE_BYTES - len(header)))
    return path.stat().st_size


class PeakSampler:
    """The highest RSS of a process seen while the block runs, sampled every SAMPLE_SECONDS."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def mb(size: int, signed: bool = False) -> str:
    return f"{size / 2**20:+.1f} MB" if signed else f"{size / 2**20:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=300, help="size of the generated dataset zip")
    add_device_argument(parser, help="accepted like every bench's; the gateway runs no model")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="percept-bench-memory-"))
    server = redis = gateway = None
    try:
        # 1. The embedded platform pieces the gateway needs: Postgres, Redis, a local object store
        server, database_url = start_postgres(data_dir)
        redis, broker_url = start_redis(data_dir / "redis")
        upgrade(database_url)
        with session_scope(database_url) as session:
            _, key = create_key(session, "bench")
            session.commit()
        gateway, url = start_gateway(data_dir, database_url, broker_url)

        # 2. The dataset, on disk (this process does not hold it either: httpx streams the file)
        archive = data_dir / "bench-dataset.zip"
        size = write_dataset_zip(archive, args.megabytes * 2**20)

        # 3. Warm up the code paths (imports, connection pools) with a tiny upload, then measure
        tiny = data_dir / "tiny.zip"
        write_dataset_zip(tiny, 2 * FILE_BYTES)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            with tiny.open("rb") as file:
                client.post("/v1/datasets", files={"file": ("tiny.zip", file)}).raise_for_status()
            before = rss_bytes(gateway.pid)
            started = time.perf_counter()
            with PeakSampler(gateway.pid) as sampler, archive.open("rb") as file:
                answer = client.post("/v1/datasets", files={"file": ("bench.zip", file)})
            seconds = time.perf_counter() - started
            after = rss_bytes(gateway.pid)
        answer.raise_for_status()
        dataset = answer.json()
        assert dataset["bytes"] == size and dataset["status"] == "analyzing", dataset

        print(f"dataset zip: {mb(size)} (stored, {size // FILE_BYTES} files in 2 class folders), "
              f"uploaded in {seconds:.1f} s -> HTTP {answer.status_code}, status {dataset['status']}")
        print(f"gateway RSS before the upload:      {mb(before)}")
        print(f"gateway RSS peak during the upload: {mb(sampler.peak)}  ({mb(sampler.peak - before, signed=True)})")
        print(f"gateway RSS after the upload:       {mb(after)}  ({mb(after - before, signed=True)})")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
