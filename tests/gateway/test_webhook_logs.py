"""A webhook delivery's log line names the job it is about (the gateway's sender runs many at once)."""

import asyncio
import io
import json
import logging
import types

from percept.config import Settings
from percept.db.webhooks import DueDelivery
from percept.logs import log_handler
from services.gateway.webhooks import WebhookSender, delivery_client
from tests.conftest import free_port


def test_a_failed_delivery_is_logged_with_its_job():
    stream = io.StringIO()
    handler = log_handler(stream)
    logger = logging.getLogger("services.gateway.webhooks")
    logger.addHandler(handler)
    try:
        settings = Settings(webhook_allow="127.0.0.0/8", webhook_timeout=2)
        sender = WebhookSender(types.SimpleNamespace(settings=settings))  # type: ignore[arg-type]
        sender._record = lambda *args: None  # type: ignore[method-assign]  # no database here
        job = types.SimpleNamespace(id="job_01X", tenant_id="ten_01Y", kind="classify")
        # Nothing listens there: the attempt fails and is retried later.
        delivery = DueDelivery(7, "job.succeeded", 1, f"http://127.0.0.1:{free_port()}/hook", "s3cret", job)

        async def send() -> None:
            async with delivery_client(2) as client:
                await sender._send(client, delivery, b"{}")

        asyncio.run(send())
    finally:
        logger.removeHandler(handler)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["level"] == "WARNING"
    assert line["message"].startswith("webhook delivery 7 (job.succeeded) attempt 1 failed")
    assert (line["job_id"], line["tenant_id"], line["kind"]) == ("job_01X", "ten_01Y", "classify")
