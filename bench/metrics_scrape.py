"""What a `/metrics` scrape costs with a large job history: 1M job rows in an embedded Postgres.

Starts embedded Postgres and Redis and the gateway alone (no worker), writes `--rows` job rows in one
`INSERT ... SELECT generate_series` (a month of history with realistic provenance, a few hundred still
queued or running), then:

1. times the query every scrape ran before the jobs metrics were kept incrementally (a GROUP BY over the
   whole table plus a JSONB aggregate over every finished job), run directly in Postgres;
2. times `GET /metrics` on the gateway: the first scrape, sent as soon as the gateway answers (a replica
   reads the history once, from start-up: the first scrape waits for that read when it is still running),
   then steady-state scrapes while jobs keep arriving and finishing between them (rows written directly,
   as workers would);
3. checks that the scrape's `percept_jobs` and `percept_inference_seconds` figures equal the full-table
   counts.

Run: .venv/bin/python bench/metrics_scrape.py [--rows 1000000] [--scrapes 20] [--device auto]
(--device is accepted like every bench's; no model runs here.)
"""

import argparse
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import add_device_argument, start_gateway
from sqlalchemy import text

from percept.db.ids import new_id
from percept.db.migrate import upgrade
from percept.db.session import get_engine, session_scope
from percept.embedded import start_postgres, start_redis

KINDS = ("classify", "caption", "detect_faces", "generate")
MODELS = ("imagenet-efficientnet-lite0", "captioner-merge", "dlib-resnet", "sd-turbo")
# Jobs that arrive and finish between two steady-state scrapes (a scrape every 15 s at ~7 jobs/s).
JOBS_PER_INTERVAL = 100

# The history: ids sort like created_at (as ULIDs do), spread over the 30 days before the last hour;
# 1 in 20 failed, 1 in 50 canceled, the newest 200 still queued or running.
INSERT_HISTORY = """
INSERT INTO jobs (id, tenant_id, kind, queue, status, model_name, params, inputs, provenance, progress,
                  attempts, cancel_requested, created_at, queued_at, started_at, finished_at)
SELECT 'job_00' || lpad(g::text, 24, '0'), :tenant, k.kind, 'bench',
       s.status::job_status, k.model || '\:1',
       jsonb_build_object('model', k.model || '\:1', 'top_k', 5),
       jsonb_build_array(jsonb_build_object('image_id', 'img_' || md5(g::text),
                                            'sha256', md5(g::text) || md5(g::text))),
       CASE WHEN s.status IN ('queued', 'running') THEN NULL ELSE jsonb_build_object(
           'inputs', jsonb_build_array(jsonb_build_object('image_id', 'img_' || md5(g::text),
                                                          'sha256', md5(g::text) || md5(g::text))),
           'model', jsonb_build_object('name', k.model, 'version', '1', 'sha256', md5(k.model) || md5(k.model)),
           'worker', jsonb_build_object('host', 'worker-' || (g % 7), 'device', 'cpu'),
           'code_version', '0.1.0', 'libraries', jsonb_build_object('torch', '2.13.0', 'pillow', '11.0.0'),
           'seed', NULL,
           'timings_ms', jsonb_build_object('queued', 3.1, 'load', 0.0, 'inference', 10 + (g % 37), 'total', 25.0))
       END,
       jsonb_build_object('done', 1, 'total', 1), 1, false, t.at, t.at, t.at, t.at
FROM generate_series(1, :rows) AS g,
     LATERAL (SELECT (ARRAY['classify', 'caption', 'detect_faces', 'generate'])[1 + g % 4] AS kind,
                     (ARRAY['imagenet-efficientnet-lite0', 'captioner-merge', 'dlib-resnet', 'sd-turbo'])[1 + g % 4]
                     AS model) AS k,
     LATERAL (SELECT CASE WHEN g > :rows - 100 THEN 'queued' WHEN g > :rows - 200 THEN 'running'
                          WHEN g % 50 = 0 THEN 'canceled' WHEN g % 20 = 0 THEN 'failed'
                          ELSE 'succeeded' END AS status) AS s,
     LATERAL (SELECT now() - interval '1 hour' - interval '30 days' * (1 - g::float8 / :rows) AS at) AS t
"""

# What every scrape ran before: percept.db.jobs.count_by_kind_and_status and inference_time_by_model.
OLD_SCRAPE_QUERIES = (
    "SELECT kind, status, count(*) FROM jobs GROUP BY kind, status",
    "SELECT provenance -> 'model' ->> 'name', count(*), sum(CAST(provenance -> 'timings_ms' ->> 'inference' AS FLOAT))"
    " FROM jobs WHERE CAST(provenance -> 'timings_ms' ->> 'inference' AS FLOAT) IS NOT NULL"
    " GROUP BY provenance -> 'model' ->> 'name'",
)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def write_history(database_url: str, rows: int) -> str:
    with session_scope(database_url) as session:
        tenant = new_id("ten")
        session.execute(text("INSERT INTO tenants (id, name) VALUES (:id, 'bench')"), {"id": tenant})
        session.execute(text(INSERT_HISTORY), {"tenant": tenant, "rows": rows})
        session.commit()
    # As autovacuum would have left a month-old table: statistics and the visibility map up to date.
    with get_engine(database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE jobs"))
    return tenant


def traffic(database_url: str, tenant: str) -> None:
    """What workers and the gateway write between two scrapes: new jobs, some of them finished at once, and
    the oldest queued or running jobs finished."""
    with session_scope(database_url) as session:
        for n in range(JOBS_PER_INTERVAL):
            done = n % 2 == 0
            session.execute(text(
                "INSERT INTO jobs (id, tenant_id, kind, queue, status, model_name, params, inputs, provenance,"
                " progress, attempts, cancel_requested) VALUES (:id, :tenant, :kind, 'bench', :status, :model,"
                " '{}', '[]', CAST(:provenance AS jsonb), '{}', 1, false)"),
                {"id": new_id("job"), "tenant": tenant, "kind": KINDS[n % 4], "model": MODELS[n % 4] + ":1",
                 "status": "succeeded" if done else "queued",
                 "provenance": (f'{{"model": {{"name": "{MODELS[n % 4]}"}}, "timings_ms": {{"inference": 12.5}}}}'
                                if done else None)})
        session.execute(text(
            "UPDATE jobs SET status = 'succeeded', finished_at = now(), provenance = jsonb_build_object("
            "'model', jsonb_build_object('name', split_part(model_name, ':', 1)),"
            "'timings_ms', jsonb_build_object('inference', 20.0))"
            " WHERE id IN (SELECT id FROM jobs WHERE status IN ('queued', 'running') ORDER BY id LIMIT :n)"),
            {"n": JOBS_PER_INTERVAL // 4})
        session.commit()


def full_table_figures(database_url: str) -> tuple[dict[tuple[str, str], int], dict[str, tuple[int, float]]]:
    with session_scope(database_url) as session:
        jobs = {(kind, status): count for kind, status, count in session.execute(text(OLD_SCRAPE_QUERIES[0]))}
        inference = {name: (count, total / 1000) for name, count, total in session.execute(text(OLD_SCRAPE_QUERIES[1]))}
    return jobs, inference


def scraped_figures(body: str) -> tuple[dict[tuple[str, str], int], dict[str, tuple[int, float]]]:
    jobs = {(kind, status): int(float(value)) for kind, status, value in
            re.findall(r'^percept_jobs\{kind="([^"]+)",status="([^"]+)"\} (\S+)$', body, re.M)}
    counts = dict(re.findall(r'^percept_inference_seconds_count\{model="([^"]+)"\} (\S+)$', body, re.M))
    sums = dict(re.findall(r'^percept_inference_seconds_sum\{model="([^"]+)"\} (\S+)$', body, re.M))
    return jobs, {name: (int(float(counts[name])), float(sums[name])) for name in counts}


def same_figures(database_url: str, body: str) -> bool:
    (db_jobs, db_inference), (jobs, inference) = full_table_figures(database_url), scraped_figures(body)
    return ({k: v for k, v in jobs.items() if v} == db_jobs and inference.keys() == db_inference.keys()
            and all(inference[m][0] == db_inference[m][0] and abs(inference[m][1] - db_inference[m][1]) < 1e-3
                    for m in inference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="job rows of history")
    parser.add_argument("--scrapes", type=int, default=20, help="steady-state scrapes to time")
    add_device_argument(parser, help="accepted like every bench's; the gateway runs no model")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="percept-bench-metrics-"))
    server = redis = gateway = None
    try:
        # 1. Embedded Postgres and Redis, the schema, and the history
        server, database_url = start_postgres(data_dir)
        redis, broker_url = start_redis(data_dir / "redis")
        upgrade(database_url)
        started = time.perf_counter()
        tenant = write_history(database_url, args.rows)
        print(f"wrote {args.rows:,} job rows in {time.perf_counter() - started:.1f} s")
        with session_scope(database_url) as session:
            size = session.scalar(text("SELECT pg_size_pretty(pg_total_relation_size('jobs'))"))
        print(f"jobs table with its indexes and TOAST: {size}")

        # 2. The query every scrape used to run, directly
        old = []
        for _ in range(5):
            started = time.perf_counter()
            full_table_figures(database_url)
            old.append(time.perf_counter() - started)
        print(f"full-table scrape query (before): median {ms(statistics.median(old))}, "
              f"min {ms(min(old))}, max {ms(max(old))} over {len(old)} runs")

        # 3. The gateway's scrape
        gateway, url = start_gateway(data_dir, database_url, broker_url)
        with httpx.Client(base_url=url, timeout=600) as client:
            started = time.perf_counter()
            first = client.get("/metrics")
            first.raise_for_status()
            print(f"GET /metrics, first scrape, sent as the gateway answered: {ms(time.perf_counter() - started)}")
            print(f"  figures equal the full-table counts: {same_figures(database_url, first.text)}")
            steady = []
            for _ in range(args.scrapes):
                traffic(database_url, tenant)
                started = time.perf_counter()
                answer = client.get("/metrics")
                steady.append(time.perf_counter() - started)
                answer.raise_for_status()
            print(f"GET /metrics, steady state ({JOBS_PER_INTERVAL} new jobs and {JOBS_PER_INTERVAL // 4} "
                  f"older ones finished between scrapes): median {ms(statistics.median(steady))}, "
                  f"min {ms(min(steady))}, max {ms(max(steady))} over {len(steady)} scrapes")
            print(f"  figures equal the full-table counts: {same_figures(database_url, answer.text)}")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        if redis is not None:
            redis.terminate()
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
