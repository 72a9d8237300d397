"""The broker side of jobs, shared by the gateway and the workers: queues and tasks come from the
services' declarations (`percept.services`), payloads are a job id (with a hint of where its images are).

The gateway sends tasks **by name** with the job id; it never imports a worker's task module. A task may also
name where the job's images are (`image_keys`): a hint the worker reads them by while it claims the job, so the
decode overlaps the claim; the job's row, read by the claim, stays the truth.
"""

from functools import lru_cache

import redis
from celery import Celery
from kombu import Exchange, Queue

from percept.errors import DependencyUnavailable
from percept.services import catalog

# Workers publish "<job id> <status>" here after each committed status or progress change; the
# gateway's long-polls and SSE streams wake on it instead of polling the database.
JOB_EVENTS_CHANNEL = "percept:job-events"

# Per-tenant priorities on the Redis broker: kombu keeps one list per priority step (`<queue>`, `<queue>:3`,
# `<queue>:6`, ...) and a worker's BRPOP names the lists in ascending step order, so it takes every waiting
# message of step 0 before any of step 3. On Redis the lowest number is the highest priority.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEPARATOR = ":"
PRIORITIES = {"high": 0, "normal": 3, "low": 6}


def make_celery(broker_url: str, name: str = "percept") -> Celery:
    """The Celery app both sides configure the same way (the worker adds its tasks)."""
    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in catalog().queues],
        task_default_queue="default",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # Postgres is the job record, not Celery's result backend
        # ...so the (disabled) backend can be shared by all threads. Celery otherwise builds one per
        # thread, and the gateway's first send on each new pool thread costs ~7 ms.
        result_backend_thread_safe=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options={
            # A message unacknowledged this long (its worker died) goes back on the queue.
            # The sweeper takes such jobs back sooner through their heartbeat; this is the backstop.
            "visibility_timeout": 3600,
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEPARATOR,
            "queue_order_strategy": "priority",
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
        },
        broker_pool_limit=16,
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache(maxsize=4)
def producer(broker_url: str) -> Celery:
    return make_celery(broker_url, name="percept-producer")


# The queues this process has declared to its broker: its first send to each declares it, later ones skip kombu's
# declaration bookkeeping. Every send gives Celery the arguments' reprs (plain repr() of a job id and object keys)
# instead of its own safe repr.
_declared: set[tuple[str, str]] = set()


def send_job(broker_url: str, kind: str, job_id: str, priority: str, countdown: float | None = None,
             image_keys: list[str] | None = None) -> None:
    """Send the job's task by name at its tenant's priority (`high`, `normal`, `low`: the job row's), with the
    object keys of its input images as a hint when the sender knows them; raise DependencyUnavailable when the
    broker does not take it."""
    job_kind = catalog().kind(kind)
    kwargs = {"image_keys": image_keys} if image_keys else {}
    declared = (broker_url, job_kind.queue) in _declared
    try:
        producer(broker_url).send_task(
            job_kind.task, args=[job_id], kwargs=kwargs, queue=job_kind.queue, countdown=countdown,
            priority=PRIORITIES.get(priority, PRIORITIES["normal"]),
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
            argsrepr=repr([job_id]), kwargsrepr=repr(kwargs), **({"declare": []} if declared else {}),
        )
        _declared.add((broker_url, job_kind.queue))
    except Exception as exc:  # kombu raises several connection error types
        raise DependencyUnavailable("The job queue is unreachable; retry shortly.",
                                    code="broker_unavailable") from exc


def redis_client_url(broker_url: str) -> str:
    """The redis-py URL of a Celery Redis broker URL (redis+socket:// is kombu's unix socket form)."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url.removeprefix("redis+socket://")
    return broker_url


@lru_cache(maxsize=4)
def redis_client(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5, socket_connect_timeout=3)


def publish_job_event(broker_url: str, job_id: str, status: str) -> None:
    """Best effort: waiters also re-read the database on a timer, so a lost event only delays them."""
    publish_job_events(broker_url, [(job_id, status)])


def publish_job_events(broker_url: str, events: list[tuple[str, str]], results: dict[str, str] | None = None) -> None:
    """(job id, status) events in one round trip (a batch's), best effort like publish_job_event. `results`: the
    job as the API shows it (JobOut's JSON with the `tenant_id`), by job id, for jobs that ended: sent with the
    event, it answers the gateway's waiters without a database read ("<job id> <status> <json>")."""
    if not events:
        return
    results = results or {}
    try:
        with redis_client(broker_url).pipeline(transaction=False) as pipe:
            for job_id, status in events:
                result = results.get(job_id)
                pipe.publish(JOB_EVENTS_CHANNEL, f"{job_id} {status} {result}" if result else f"{job_id} {status}")
            pipe.execute()
    except redis.RedisError:
        pass


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages, one per priority step (kombu's names)."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def _waiting(client: redis.Redis, queue: str) -> int:
    with client.pipeline(transaction=False) as pipe:
        for name in priority_lists(queue):
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())


def waiting_messages(broker_url: str, queue: str) -> int:
    """Messages in the queue no worker has taken yet, at every priority; 0 when the broker cannot say."""
    try:
        return _waiting(redis_client(broker_url), queue)
    except redis.RedisError:
        return 0


def queue_depths(broker_url: str) -> dict[str, int]:
    client = redis_client(broker_url)
    return {queue: _waiting(client, queue) for queue in catalog().queues}
