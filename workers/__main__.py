"""`python -m workers SERVICE`: run the Celery worker for one service's queues (what `percept worker` runs)."""

import logging
import os
import sys

from percept.config import get_settings
from percept.infra import resolve_infra
from workers.app import SERVICES, create_worker_app


def main(argv: list[str]) -> None:
    if len(argv) < 1 or argv[0] not in SERVICES:
        sys.exit(f"usage: python -m workers {{{'|'.join(SERVICES)}}} [celery worker options]")
    service, extra = argv[0], argv[1:]
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    infra = resolve_infra(settings)
    spec = SERVICES[service]
    app = create_worker_app(infra, spec)
    try:
        app.worker_main(["worker", "-Q", ",".join(spec.queues), "-n", f"{service}-{os.getpid()}@%h",
                         "--pool", spec.pool, "--concurrency", "1", "--loglevel", settings.log_level,
                         "--without-gossip", "--without-mingle", *extra])
    finally:
        infra.close()


if __name__ == "__main__":
    main(sys.argv[1:])
