"""`python -m workers POOL`: run the Celery worker of one declared worker pool (what `percept worker` runs)."""

import logging
import os
import sys
from collections.abc import Mapping

from percept.config import Settings, get_settings
from percept.infra import resolve_infra
from percept.logs import configure_logging
from percept.services import catalog, import_by_name
from workers import observe
from workers.app import create_worker_app

# The thread pools of torch (OpenMP), MKL and OpenBLAS read these once, when the framework loads.
CPU_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# How long torch's OpenMP threads (GNU libgomp) spin once a parallel region ends before they sleep: a third of
# libgomp's default 300,000, still far longer than the gaps between a forward pass's regions (the model runs as
# fast), but the cores come back sooner after predict(), to the job's result write and to the gateway and
# Postgres on the same machine. Measured at c=1 (bench/serving.py's Percept row): the write after predict()
# went from 6.5 to 3.5 ms, the time outside predict() from 24-26 to 22 ms. A value set in the environment stands.
OPENMP_SPIN = ("GOMP_SPINCOUNT", "100000")


def framework_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the worker sets in its environment for the frameworks' thread pools: PERCEPT_CPU_THREADS as each
    pool's thread count, and OPENMP_SPIN unless the environment has its own."""
    values = {} if OPENMP_SPIN[0] in environ else dict([OPENMP_SPIN])
    if settings.cpu_threads:
        values |= {variable: str(settings.cpu_threads) for variable in CPU_THREAD_VARIABLES}
    return values


def main(argv: list[str]) -> None:
    pools = catalog().worker_pools
    if len(argv) < 1 or argv[0] not in pools:
        sys.exit(f"usage: python -m workers {{{'|'.join(pools)}}} [celery worker options]")
    name, extra = argv[0], argv[1:]
    settings = get_settings()
    configure_logging(settings, observe.CeleryTaskFields({kind.task: kind.name
                                                          for kind in catalog().job_kinds.values()}))
    service, pool = pools[name]
    # Before any framework loads (the device check below imports it); the pool's children inherit them.
    os.environ.update(framework_environment(settings, os.environ))
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
