"""Log lines: one JSON object a line (or the classic text line) with the job each line belongs to, inside
`job_context`, across nesting, threads of a job run and concurrent asyncio tasks."""

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from percept.config import Settings
from percept.logs import (
    HANDLER_NAME,
    TEXT_FORMAT,
    TextFormatter,
    configure_logging,
    job_context,
    log_handler,
)

# Production refuses to start without configured infrastructure and real secrets.
REAL = {"database_url": "postgresql+psycopg://percept:q8Rt2vLx9Wm4Zp7s@db.internal:5432/percept",
        "broker_url": "redis://:Jf83hSxk2Pq9Lm4T@redis.internal:6379/0",
        "storage_url": "s3://AKIAEXAMPLE7Q2:Xb9f2LwQ8mZr4Tk7Yv3N@s3.internal:9000/percept?secure=true"}


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger whose records go, through the job filter, to a stream (JSON until a test sets another format)."""
    stream = io.StringIO()
    handler = log_handler(stream)
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_carries_the_job_fields_inside_a_job_context_only(lines):
    logger, stream, _ = lines
    with job_context(job_ids=["job_a"]) as context:
        logger.info("claimed %d", 1)
        context.update(tenant_ids=["ten_1"], kinds=["classify"])
        try:
            raise RuntimeError("the model broke")
        except RuntimeError:
            logger.exception("predictor failed")
    logger.info("idle")

    claimed, failed, idle = records(stream)
    assert list(claimed)[:5] == ["timestamp", "level", "logger", "message", "process"]
    assert claimed["timestamp"].endswith("+00:00") and claimed["level"] == "INFO"
    assert (claimed["logger"], claimed["message"], claimed["job_id"]) == ("tests.logs", "claimed 1", "job_a")
    assert "tenant_id" not in claimed  # known only after the claim
    assert (failed["job_id"], failed["tenant_id"], failed["kind"]) == ("job_a", "ten_1", "classify")
    assert failed["level"] == "ERROR" and "RuntimeError: the model broke" in failed["exc_info"]
    assert not {"job_id", "tenant_id", "kind"} & idle.keys()


def test_a_batch_joins_its_distinct_values_in_order(lines):
    logger, stream, _ = lines
    with job_context(job_ids=["job_b", "job_a", "job_b"], tenant_ids=["ten_2", "ten_1", "ten_2"],
                     kinds=["classify", "classify"]):
        logger.info("one forward pass")
    (line,) = records(stream)
    assert (line["job_id"], line["tenant_id"], line["kind"]) == ("job_b,job_a", "ten_2,ten_1", "classify")


def test_the_text_line_names_the_job_after_the_message(lines):
    logger, stream, handler = lines
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    with job_context(job_ids=["job_a"], tenant_ids=["ten_1"], kinds=["caption"]):
        logger.warning("slow")
    logger.warning("idle")
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(" WARNING tests.logs: slow [job=job_a tenant=ten_1 kind=caption]")
    assert outside.endswith(" WARNING tests.logs: idle")


def test_contexts_nest_and_a_record_keeps_fields_it_was_given(lines):
    logger, stream, _ = lines
    with job_context(job_ids=["parent"], kinds=["generate_grid"]):
        with job_context(job_ids=["child"]):
            logger.info("inner")
        logger.info("outer")
        logger.info("explicit", extra={"job_id": "other"})
    inner, outer, explicit = records(stream)
    assert (inner["job_id"], "kind" in inner) == ("child", False)
    assert (outer["job_id"], outer["kind"]) == ("parent", "generate_grid")
    assert explicit["job_id"] == "other"


def test_a_job_runs_threads_share_its_context_only_when_the_process_runs_one_job_run(lines):
    logger, stream, _ = lines

    def in_a_thread(message: str) -> None:
        thread = threading.Thread(target=logger.info, args=(message,))
        thread.start()
        thread.join()

    with job_context(job_ids=["job_a"], whole_process=True):
        in_a_thread("heartbeat")
        with job_context(job_ids=["job_b"], whole_process=True):
            in_a_thread("two runs at once: whose?")
    with job_context(job_ids=["job_c"]):
        in_a_thread("not process-wide")
    in_a_thread("after")
    heartbeat, ambiguous, scoped, after = records(stream)
    assert heartbeat["job_id"] == "job_a"
    assert "job_id" not in ambiguous and "job_id" not in scoped and "job_id" not in after


def test_concurrent_asyncio_tasks_keep_their_own_jobs(lines):
    logger, stream, _ = lines

    async def deliver(job_id: str, delay: float) -> None:
        with job_context(job_ids=[job_id]):
            await asyncio.sleep(delay)
            logger.info("delivered %s", job_id)

    async def both() -> None:
        await asyncio.gather(deliver("job_slow", 0.05), deliver("job_fast", 0.0))

    asyncio.run(both())
    assert {line["message"]: line["job_id"] for line in records(stream)} == {
        "delivered job_fast": "job_fast", "delivered job_slow": "job_slow"}


def test_configure_logging_owns_one_root_handler_and_leaves_others_alone():
    root = logging.getLogger()
    level, kept = root.level, logging.NullHandler()
    root.addHandler(kept)
    try:
        configure_logging(Settings(log_format="json", log_level="WARNING"))
        handler = configure_logging(Settings(log_format="text", log_level="DEBUG"))
        ours = [h for h in root.handlers if h.get_name() == HANDLER_NAME]
        assert ours == [handler] and kept in root.handlers
        assert isinstance(handler.formatter, TextFormatter) and root.level == logging.DEBUG
    finally:
        for h in [h for h in root.handlers if h.get_name() == HANDLER_NAME] + [kept]:
            root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)


@pytest.fixture
def _no_percept_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("PERCEPT_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("_no_percept_environment")
def test_json_is_the_default_in_production_and_text_elsewhere():
    assert Settings().log_format == "text"
    assert Settings(environment="production", **REAL).log_format == "json"
    assert Settings(environment="production", log_format="text", **REAL).log_format == "text"


@pytest.mark.usefixtures("_no_percept_environment")
def test_warm_up_follows_the_worker_endpoint_unless_set(monkeypatch):
    assert (Settings().worker_http_port, Settings().worker_warm_up) == (0, False)
    monkeypatch.setenv("PERCEPT_WORKER_HTTP_PORT", "9100")
    assert Settings().worker_warm_up is True
    monkeypatch.setenv("PERCEPT_WORKER_WARM_UP", "false")
    assert Settings().worker_warm_up is False
