"""Wakes long-polls and SSE streams when a worker reports a job change (Redis pub/sub).

Waiters re-read the job from Postgres on every wake-up and at least every second, so a lost
message or a broker outage only slows them down; Postgres stays the record. An event that carries the ended
job (a plain success: the worker wrote exactly that) answers its waiters without the read.
"""

import asyncio
import json
import logging
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from percept.queue import JOB_EVENTS_CHANNEL, redis_client_url
from percept.schemas import JobOut

log = logging.getLogger(__name__)
RECHECK_SECONDS = 1.0
TERMINAL = {"succeeded", "failed", "canceled"}
# Jobs that ended recently, so a watch that begins just after the event still wakes at once.
RECENTLY_ENDED = 10_000


class JobEvents:
    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        # job id -> {event: wake only when the job ends}
        self._waiters: dict[str, dict[asyncio.Event, bool]] = defaultdict(dict)
        self._task: asyncio.Task | None = None
        self._ended: OrderedDict[str, None] = OrderedDict()
        # An ended job's result as its event carried it (JobOut's JSON with its tenant), kept only while someone
        # waits for that job: it answers them without a database read.
        self._results: dict[str, str] = {}
        self.on_ended: Callable[[], None] | None = None  # told when any job ends (webhook sender)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self) -> None:
        while True:
            client = aioredis.from_url(redis_client_url(self.broker_url))
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(JOB_EVENTS_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            job_id, _, rest = message["data"].decode().partition(" ")
                            status, _, result = rest.partition(" ")
                            self._wake(job_id, status in TERMINAL, result or None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down: waiters fall back to their timer
                log.warning("job event listener lost the broker (%s); reconnecting", exc.__class__.__name__)
                await asyncio.sleep(1.0)
            finally:
                await client.aclose()

    def _wake(self, job_id: str, terminal: bool, result: str | None = None) -> None:
        if terminal and result is not None and job_id in self._waiters:
            self._results[job_id] = result
        if terminal:
            if self.on_ended is not None:
                self.on_ended()
            self._ended[job_id] = None
            if len(self._ended) > RECENTLY_ENDED:
                self._ended.popitem(last=False)
        for event, only_terminal in self._waiters.get(job_id, {}).items():
            if terminal or not only_terminal:
                event.set()

    @asynccontextmanager
    async def watch(self, job_id: str, only_terminal: bool = False) -> AsyncIterator[asyncio.Event]:
        """An event set on the job's next change (or only when it ends, for long-polls); set at once
        when the job ended before the watch began."""
        event = asyncio.Event()
        if job_id in self._ended:
            event.set()
        self._waiters[job_id][event] = only_terminal
        try:
            yield event
        finally:
            self._waiters[job_id].pop(event, None)
            if not self._waiters[job_id]:
                del self._waiters[job_id]
                self._results.pop(job_id, None)

    def result(self, job_id: str, tenant_id: str) -> JobOut | None:
        """The ended job as its event carried it, if one did while this job was watched and it is the tenant's."""
        carried = self._results.get(job_id)
        if carried is None:
            return None
        job = json.loads(carried)
        return JobOut.model_validate(job) if job.get("tenant_id") == tenant_id else None


async def wait_for_change(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=min(timeout, RECHECK_SECONDS))
    except TimeoutError:
        pass
    event.clear()
