"""The job events the gateway's long-polls wake on, over the platform's real Redis: a plain success's event carries
the job as the API shows it, and answers a waiter of the job's tenant without a database read."""

import asyncio
import json
import time

import pytest
import redis

from percept.queue import JOB_EVENTS_CHANNEL, publish_job_events, redis_client_url
from percept.schemas import JobOut
from services.gateway.events import JobEvents

pytestmark = pytest.mark.integration

SHOWN = {"id": "job_carried", "kind": "classify", "status": "succeeded", "created_at": "2026-12-02T10:00:00Z",
         "started_at": "2026-12-02T10:00:00.005Z", "finished_at": "2026-12-02T10:00:00.030Z",
         "progress": {"done": 1, "total": 1}, "params": {"top_k": 5}, "output": {"labels": [{"label": "espresso"}]},
         "error": None, "provenance": {"attempt": 1}, "attempts": 1, "priority": "normal", "deadline_at": None,
         "parent_id": None, "tenant_id": "ten_a"}


def test_an_ended_job_carried_by_its_event_answers_the_waiters_of_its_tenant(platform):
    client = redis.Redis.from_url(redis_client_url(platform.broker_url))

    def subscribers() -> int:
        return dict(client.pubsub_numsub(JOB_EVENTS_CHANNEL)).get(JOB_EVENTS_CHANNEL.encode(), 0)

    async def scenario() -> None:
        before = subscribers()  # the platform's gateway listens too
        events = JobEvents(platform.broker_url)
        events.start()
        try:
            for _ in range(100):  # until its listener has subscribed
                if subscribers() > before:
                    break
                await asyncio.sleep(0.1)
            publish_job_events(platform.broker_url, [("job_early", "succeeded")],
                               {"job_early": json.dumps({**SHOWN, "id": "job_early"})})
            for _ in range(100):  # until its end was read (a watch begun after it is set at once)
                async with events.watch("job_early", only_terminal=True) as ended:
                    read = ended.is_set()
                if read:
                    break
                await asyncio.sleep(0.05)
            assert read and events.result("job_early", "ten_a") is None  # no one was waiting: nothing kept
            async with events.watch("job_carried", only_terminal=True) as ended:
                publish_job_events(platform.broker_url, [("job_carried", "succeeded")],
                                   {"job_carried": json.dumps(SHOWN)})
                await asyncio.wait_for(ended.wait(), 10)
                carried = events.result("job_carried", "ten_a")
                assert carried == JobOut.model_validate(SHOWN) and carried.output == SHOWN["output"]
                assert events.result("job_carried", "ten_b") is None  # another tenant's waiter reads the database
            assert events.result("job_carried", "ten_a") is None  # let go with its last waiter
            async with events.watch("job_plain", only_terminal=True) as ended:
                publish_job_events(platform.broker_url, [("job_plain", "failed")])  # no result: read as before
                await asyncio.wait_for(ended.wait(), 10)
                assert events.result("job_plain", "ten_a") is None
        finally:
            await events.stop()

    asyncio.run(scenario())


def test_a_workers_plain_success_sends_the_job_with_its_end(platform, api, coffee_jpeg):
    client = redis.Redis.from_url(redis_client_url(platform.broker_url))
    with client.pubsub() as pubsub:
        pubsub.subscribe(JOB_EVENTS_CHANNEL)
        job = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)},
                       headers={"Prefer": "wait=30, no-reuse"}).json()
        assert job["status"] == "succeeded"
        sent, give_up = [], time.monotonic() + 10
        while time.monotonic() < give_up and not any(m.split(" ", 2)[1] == "succeeded" for m in sent):
            message = pubsub.get_message(timeout=1.0)
            if message and message["type"] == "message" and message["data"].decode().startswith(job["id"] + " "):
                sent.append(message["data"].decode())
    _, _, carried = next(m for m in sent if m.split(" ", 2)[1] == "succeeded").split(" ", 2)
    shown = json.loads(carried)
    assert shown.pop("tenant_id").startswith("ten_")
    assert JobOut.model_validate(shown) == JobOut.model_validate(job)  # what the API answered, field for field
