"""`python -m workers POOL`: run the Celery worker of one declared worker pool (what `percept worker` runs)."""

import logging
import os
import sys

from percept.config import get_settings
from percept.infra import resolve_infra
from percept.logs import configure_logging
from percept.services import catalog, import_by_name
from workers import observe
from workers.app import create_worker_app

# The thread pools of torch (OpenMP), MKL and OpenBLAS read these once, when the framework loads.
CPU_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def main(argv: list[str]) -> None:
    pools = catalog().worker_pools
    if len(argv) < 1 or argv[0] not in pools:
        sys.exit(f"usage: python -m workers {{{'|'.join(pools)}}} [celery worker options]")
    name, extra = argv[0], argv[1:]
    settings = get_settings()
    configure_logging(settings, observe.CeleryTaskFields({kind.task: kind.name
                                                          for kind in catalog().job_kinds.values()}))
    service, pool = pools[name]
    if settings.cpu_threads:
        # Before any framework loads (the device check below imports it); the pool's children inherit them.
        os.environ.update({variable: str(settings.cpu_threads) for variable in CPU_THREAD_VARIABLES})
    if service.device is not None:
        # A device the worker cannot have stops it here, with the reason, not at its first job.
        try:
            device = import_by_name(service.device)(settings.device)
        except ValueError as exc:
            sys.exit(f"percept worker {name}: {exc}")
        logging.getLogger("workers").info("worker %s runs its models on %s", name, device)
    observe.prepare(settings)  # before the pool forks: its processes share the metrics directory
    infra = resolve_infra(settings)
    app = create_worker_app(infra, pool)
    if settings.worker_http_port:
        observe.serve(settings)
    # JSON logs: Celery's start-up banner (plain text on stdout) would be the one line that is not JSON.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    try:
        app.worker_main([*quiet, "worker", "-Q", ",".join(pool.queues), "-n", f"{name}-{os.getpid()}@%h",
                         "--pool", pool.pool, "--concurrency", "1", "--loglevel", settings.log_level,
                         "--without-gossip", "--without-mingle", *extra])
    finally:
        infra.close()
        observe.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
