"""/metrics with a long history: the scrape reports every job ever (and every webhook delivery), yet after
a replica's first scrape it reads only what changed, never a whole table.

The scrapes run in-process (the gateway's collector) on a database of their own on the platform's
Postgres, so no gateway or worker writes to it meanwhile, and the figures are compared with full-table
counts of the same rows.
"""

import json
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import event, make_url, text

from percept.config import Settings
from percept.db.migrate import upgrade
from percept.db.session import get_engine, session_scope
from percept.infra import Infra
from services.gateway.metrics import PlatformCollector

pytestmark = pytest.mark.integration

HISTORY_ROWS = 20_000
Figures = dict[str, dict]


@pytest.fixture(scope="module")
def history_db(platform) -> Iterator[str]:
    """A database of its own on the platform's Postgres server, built by the migrations."""
    name = f"metrics_{uuid.uuid4().hex[:10]}"
    with get_engine(platform.database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        admin.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(platform.database_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    get_engine(url).dispose()
    with get_engine(platform.database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        admin.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


def collector_on(database_url: str, platform) -> PlatformCollector:
    return PlatformCollector(Infra(Settings(), database_url, platform.broker_url, platform.storage_url))


def write_history(database_url: str, rows: int) -> str:
    """A tenant with a day-old history of `rows` jobs (ids sorting like their creation times, as ULIDs do),
    the newest 20 still queued or running, and a webhook delivery per finished job (the newest still pending);
    its id."""
    tenant, prefix = f"ten_{uuid.uuid4().hex[:12]}", f"job_00{uuid.uuid4().hex[:6]}"
    with session_scope(database_url) as session:
        session.execute(text("INSERT INTO tenants (id, name) VALUES (:t, :t)"), {"t": tenant})
        session.execute(text("""
            INSERT INTO jobs (id, tenant_id, kind, queue, status, params, inputs, provenance, progress, attempts,
                              cancel_requested, created_at, queued_at)
            SELECT :prefix || lpad(g::text, 10, '0'), :t, (ARRAY['classify', 'caption', 'detect_faces'])[1 + g % 3],
                   'q', s.status::job_status, '{}', '[]',
                   CASE WHEN s.status IN ('queued', 'running') THEN NULL ELSE jsonb_build_object(
                       'model', jsonb_build_object('name', (ARRAY['lite0', 'merge', NULL])[1 + g % 3]),
                       'timings_ms', jsonb_build_object('inference', g % 17)) END,
                   '{}', 1, false, now() - interval '1 day' + g * interval '1 second',
                   now() - interval '1 day' + g * interval '1 second'
            FROM generate_series(1, :rows) AS g,
                 LATERAL (SELECT CASE WHEN g > :rows - 10 THEN 'queued' WHEN g > :rows - 20 THEN 'running'
                                      WHEN g % 11 = 0 THEN 'failed' WHEN g % 13 = 0 THEN 'canceled'
                                      ELSE 'succeeded' END AS status) AS s"""),
                        {"prefix": prefix, "t": tenant, "rows": rows})
        # The webhook after the jobs: its deliveries are written below, as old as their jobs (a job inserted
        # ended, as a reused one is, would otherwise get one of today from the trigger).
        session.execute(text("INSERT INTO webhooks (id, tenant_id, url, events, secret) VALUES "
                             "(:t || '_hook', :t, 'https://hooks.example.com/', "
                             "ARRAY['job.succeeded', 'job.failed', 'job.canceled'], 'whsec_x')"), {"t": tenant})
        session.execute(text("""
            INSERT INTO webhook_deliveries (webhook_id, job_id, event, status, attempts, created_at)
            SELECT :t || '_hook', id, 'job.' || status, CASE WHEN created_at > now() - interval '1 day' + :recent
                                                             THEN 'pending' WHEN right(id, 1) = '7' THEN 'failed'
                                                             ELSE 'delivered' END, 1, created_at
            FROM jobs WHERE tenant_id = :t AND status NOT IN ('queued', 'running') ORDER BY id"""),
                        {"t": tenant, "recent": timedelta(seconds=rows - 100)})
        session.commit()
    with get_engine(database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE jobs"))
        connection.execute(text("VACUUM ANALYZE webhook_deliveries"))
    return tenant


def traffic(database_url: str, tenant: str, new_jobs: int = 30) -> None:
    """What happens between two scrapes: jobs arrive (some end at once, ending webhook deliveries through
    the trigger), the oldest queued or running ones end, deliveries are sent."""
    from percept.db.ids import new_id

    with session_scope(database_url) as session:
        for n in range(new_jobs):
            session.execute(text(
                "INSERT INTO jobs (id, tenant_id, kind, queue, status, params, inputs, progress, attempts,"
                " cancel_requested) VALUES (:id, :t, :kind, 'q', 'queued', '{}', '[]', '{}', 0, false)"),
                {"id": new_id("job"), "t": tenant, "kind": ("classify", "generate")[n % 2]})
        session.execute(text("""
            UPDATE jobs SET status = 'succeeded', provenance = CAST(:provenance AS jsonb)
            WHERE id IN (SELECT id FROM jobs WHERE tenant_id = :t AND status IN ('queued', 'running')
                         ORDER BY id LIMIT :n)"""),
                        {"t": tenant, "n": new_jobs // 2,
                         "provenance": json.dumps({"model": {"name": "lite0"}, "timings_ms": {"inference": 4.5}})})
        session.execute(text("""
            UPDATE webhook_deliveries SET status = 'delivered'
            WHERE id IN (SELECT id FROM webhook_deliveries WHERE status = 'pending' ORDER BY id LIMIT 5)"""))
        session.commit()


def full_table(database_url: str) -> Figures:
    """The figures as whole-table aggregates."""
    with session_scope(database_url) as session:
        jobs = {f"{kind}/{status}": count for kind, status, count in
                session.execute(text("SELECT kind, status, count(*) FROM jobs GROUP BY 1, 2"))}
        inference = {name or "unknown": (count, round(total / 1000, 6)) for name, count, total in session.execute(text(
            "SELECT provenance -> 'model' ->> 'name', count(*),"
            " sum((provenance -> 'timings_ms' ->> 'inference')::float)"
            " FROM jobs WHERE provenance -> 'timings_ms' ->> 'inference' IS NOT NULL GROUP BY 1"))}
        deliveries = dict(session.execute(text("SELECT status, count(*) FROM webhook_deliveries GROUP BY 1")).all())
    return {"jobs": jobs, "inference": inference, "deliveries": deliveries}


def scraped(collector: PlatformCollector) -> Figures:
    families = {family.name: family for family in collector.collect()}
    jobs = {f"{s.labels['kind']}/{s.labels['status']}": int(s.value) for s in families["percept_jobs"].samples
            if s.value}
    summary = families["percept_inference_seconds"].samples
    counts = {s.labels["model"]: int(s.value) for s in summary if s.name.endswith("_count")}
    sums = {s.labels["model"]: round(s.value, 6) for s in summary if s.name.endswith("_sum")}
    deliveries = {s.labels["status"]: int(s.value) for s in families["percept_webhook_deliveries"].samples if s.value}
    return {"jobs": jobs, "inference": {m: (counts[m], sums[m]) for m in counts}, "deliveries": deliveries}


def test_the_scrape_reports_every_job_ever_through_every_transition(history_db, platform):
    tenant = write_history(history_db, 3000)
    collector = collector_on(history_db, platform)
    assert scraped(collector) == full_table(history_db)

    traffic(history_db, tenant)
    assert scraped(collector) == full_table(history_db)

    # Time passes: today's jobs are old enough to be folded into the totals, while some are still queued.
    with session_scope(history_db) as session:
        session.execute(text("UPDATE jobs SET created_at = created_at - interval '1 hour' "
                             "WHERE created_at > now() - interval '10 minutes'"))
        session.execute(text("UPDATE webhook_deliveries SET created_at = created_at - interval '1 hour' "
                             "WHERE created_at > now() - interval '10 minutes'"))
        session.commit()
    assert scraped(collector) == full_table(history_db)
    for _ in range(3):
        traffic(history_db, tenant)
        assert scraped(collector) == full_table(history_db)

    # Another replica (or this one restarted) reports the same.
    assert scraped(collector_on(history_db, platform)) == scraped(collector)


def seq_scans(database_url: str, statements: list[tuple[str, object]]) -> list[str]:
    """The tables that each statement's plan reads from end to end."""
    found = []
    connection = get_engine(database_url).raw_connection()
    try:
        cursor = connection.cursor()
        for statement, parameters in statements:
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            pending = [cursor.fetchone()[0][0]["Plan"]]
            while pending:
                node = pending.pop()
                if node["Node Type"] == "Seq Scan":
                    found.append(node["Relation Name"])
                pending.extend(node.get("Plans", []))
    finally:
        connection.close()
    return found


def test_a_scrape_after_the_first_reads_no_table_from_end_to_end(history_db, platform):
    tenant = write_history(history_db, HISTORY_ROWS)
    collector = collector_on(history_db, platform)
    scraped(collector)  # the replica's first scrape: it may read the history once
    traffic(history_db, tenant)

    statements: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append((statement, parameters))

    engine = get_engine(history_db)
    event.listen(engine, "before_cursor_execute", record)
    try:
        figures = scraped(collector)
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert figures == full_table(history_db)
    assert any("jobs" in statement for statement, _ in statements)
    assert seq_scans(history_db, statements) == []


def test_a_metrics_token_protects_the_scrape(platform, api):
    url = platform.start_replica("metrics-token", PERCEPT_METRICS_TOKEN="mt_9f2LwQ8mZr4Tk7Yv3NxB")
    try:
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer mt_wrong"}).status_code == 401
        assert httpx.get(url + "/metrics", headers=api.headers).status_code == 401  # an API key is not the token
        answer = httpx.get(url + "/metrics", headers={"Authorization": "Bearer mt_9f2LwQ8mZr4Tk7Yv3NxB"})
        assert answer.status_code == 200 and "percept_jobs" in answer.text
        assert httpx.get(url + "/healthz").status_code == 200  # probes need no token
    finally:
        platform.kill("metrics-token", signal.SIGTERM)
    assert api.get("/metrics").status_code == 200  # without the setting, the scrape is open
