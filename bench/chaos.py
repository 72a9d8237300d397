"""The chaos suite at full size: ~1,000 mixed jobs (classify, caption, detect, identify, enroll, a few generations
and a training) from 16 concurrent clients on `percept run` with two workers per service, while random workers are
SIGKILLed 5 times and the embedded Redis and Postgres are each killed once (the supervisor restarts them).

Run: .venv/bin/python bench/chaos.py [--jobs 1000] [--clients 16] [--kills 5] [--redis 1] [--postgres 1]
     [--generations 10] [--trainings 1] [--seed 0] [--keep DIR]

Prints what happened to the jobs (submitted / succeeded / failed by code / lost / duplicated, p50/p99 latency),
the recovery after each fault, every HTTP status the clients saw, and the audit (terminal writes per job counted
by a trigger on the jobs table, outputs, webhook deliveries after dedup); exits 1 if a promise was broken.
The implementation is tests/chaos.py, which `make test` runs small (tests/test_chaos.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos import ChaosPlan, run_chaos  # noqa: E402 - after the path it is found on

# Two workers per serving pool; one per training pool (a training holds its worker for its whole run, and the
# dataset analysis shares that queue).
WORKERS = ("classifier", "classifier", "facerec", "facerec", "captioner", "captioner", "diffusion", "diffusion",
           "classifier-train", "captioner-train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs besides the trainings (default 1000)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kills", type=int, default=5, help="random worker processes SIGKILLed")
    parser.add_argument("--redis", type=int, default=1, help="times the embedded redis-server is SIGKILLed")
    parser.add_argument("--postgres", type=int, default=1, help="times the postmaster is SIGKILLed")
    parser.add_argument("--generations", type=int, default=10, help="of the jobs, text-to-image generations")
    parser.add_argument("--trainings", type=int, default=1, help="classifier trainings, besides the jobs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the platform's data dir (and its logs) here")
    args = parser.parse_args()
    share = args.generations / args.jobs
    mix = {"classify": 0.45, "caption": 0.15, "faces_detect": 0.15, "faces_identify": 0.12, "faces_enroll": 0.08,
           "generate": share}
    mix["classify"] -= share
    plan = ChaosPlan(jobs=args.jobs, clients=args.clients, workers=WORKERS, mix=mix, trainings=args.trainings,
                     worker_kills=args.kills, redis_restarts=args.redis, postgres_restarts=args.postgres,
                     tenants=4, seed=args.seed, job_timeout=600,
                     # Ten model-holding workers on two cores: one CPU thread each, and a lease long enough that
                     # a worker starved of CPU for a few seconds is not taken for dead.
                     env={"PERCEPT_CPU_THREADS": "1", "PERCEPT_JOB_LEASE": "10",
                          "PERCEPT_MAX_PIPELINE_IMPORT_BYTES": str(64 * 2**20)})
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    report = run_chaos(plan, keep=args.keep)
    print()
    print(report.table())
    problems = report.problems()
    print()
    print("promises kept" if not problems else "BROKEN PROMISES:\n  " + "\n  ".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
