"""What one hand-off to another process costs on this machine: a round trip to the embedded Postgres (`SELECT 1`)
and Redis (`PING`) sent at once after the last one, and after the client and the server slept 1, 10 and 30 ms.

A c=1 request crosses processes about a dozen times (client, gateway, Postgres, Redis, worker, and back), and most
of those crossings wake a process that slept while the model ran or while the last request was answered. On a
virtual machine whose idle cores halt at once, each such wake-up costs a round trip far more than its own work:
this is the floor under Percept's c=1 time outside the model that no code path of its own can remove.

Run: .venv/bin/python bench/handoff.py [--rounds 200] [--device ...]   (no model runs: --device is only accepted)
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis
from harness import add_device_argument

from percept.embedded import start_postgres, start_redis

GAPS_MS = (0, 1, 10, 30)


def round_trip_ms(call: Callable[[], object], gap_ms: float, rounds: int) -> float:
    """The median round trip of `call`, each one sent `gap_ms` after the last one came back."""
    times = []
    for _ in range(rounds):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(rounds: int) -> dict[str, dict[float, float]]:
    """{"postgres": {gap ms: median round trip ms}, "redis": {...}} against freshly started embedded servers."""
    with tempfile.TemporaryDirectory(prefix="percept-handoff-") as tmp:
        server, _ = start_postgres(Path(tmp) / "pg")
        process, broker_url = start_redis(Path(tmp) / "redis")
        try:
            with psycopg.connect(server.get_uri(), autocommit=True) as connection:
                cache = redis.Redis(unix_socket_path=broker_url.removeprefix("redis+socket://"))
                calls: dict[str, Callable[[], object]] = {
                    "postgres": lambda: connection.execute("SELECT 1").fetchone(), "redis": cache.ping}
                for call in calls.values():  # warm: connections open, plans cached
                    round_trip_ms(call, 0, 20)
                return {name: {gap: round_trip_ms(call, gap, rounds) for gap in GAPS_MS}
                        for name, call in calls.items()}
        finally:
            if process is not None:
                process.terminate()
                process.wait(10)
            server.cleanup()


def summary(figures: dict[str, dict[float, float]]) -> str:
    """One line: each server's round trip at once and after each gap."""
    return "; ".join(f"{name} " + ", ".join(f"{ms:.2f} ms" + (f" after {gap:g} ms idle" if gap else " at once")
                                            for gap, ms in by_gap.items()) for name, by_gap in figures.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser, help="accepted for every bench script's sake; nothing here runs on a device")
    parser.add_argument("--rounds", type=int, default=200, help="round trips per server and gap")
    args = parser.parse_args()
    figures = measure(args.rounds)
    print("| server | " + " | ".join("at once" if gap == 0 else f"after {gap} ms idle" for gap in GAPS_MS) + " |")
    print("|---|" + "---|" * len(GAPS_MS))
    for name, by_gap in figures.items():
        print(f"| {name} | " + " | ".join(f"{by_gap[gap]:.2f} ms" for gap in GAPS_MS) + " |")


if __name__ == "__main__":
    main()
