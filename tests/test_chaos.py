"""The chaos suite, small (bench/chaos.py runs it at full size): about 100 jobs from 16 clients on `percept run`
with two classifier and two facerec workers, while two random workers are SIGKILLed and the embedded Redis is
killed once (the supervisor restarts each). Every job ends, its end is written once (a trigger on the jobs table
counts the writes), no enrollment's embedding is duplicated, each job end's webhook arrives once after dedup by
delivery id, and no answer was a 5xx but a 503 with Retry-After. See tests/chaos.py.

The cheaper kinds only (classify, faces detect / identify / enroll): captioning, generation and training need
three more worker pools, whose start-up alone would take most of the time budget on this machine; the bench
runs them."""

import psutil
import pytest

from percept.embedded import start_redis
from tests.chaos import ChaosPlan, run_chaos
from tests.own_platform import own_platform

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_no_job_lost_or_run_twice_under_worker_kills_and_a_redis_restart(capsys):
    report = run_chaos(ChaosPlan(jobs=100, clients=16, worker_kills=2, redis_restarts=1))
    with capsys.disabled():
        print("\n" + report.table())
    assert report.problems() == []
    assert len(report.faults) == 3 and len(report.submitted()) >= 100
    # Counted in /metrics: each killed process was restarted once
    assert sum(n for name, n in report.restarts.items() if name.startswith("worker-")) == 2
    assert report.restarts["redis"] == 1 and report.restarts["postgres"] == report.restarts["gateway"] == 0


def test_a_503_for_an_unreachable_broker_retried_with_its_idempotency_key_runs_the_job(tmp_path, coffee_jpeg):
    """What the chaos suite's clients met during the Redis restart: API.md's 503 says "retry", and a retry with the
    same Idempotency-Key must be able to run the job, since nothing was run."""
    with own_platform(tmp_path) as plat, plat.client(plat.new_key()) as api:
        [server] = [p for p in psutil.process_iter(["cmdline"])
                    if "redis-server" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in
                    " ".join(p.info["cmdline"] or [])]
        server.kill()
        server.wait(10)
        key = {"Idempotency-Key": "retry-me"}
        refused = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers=key)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        redis_again, _ = start_redis(tmp_path / "redis")
        try:
            retried = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers=key)
            assert retried.status_code == 202, retried.json()
            assert retried.json()["status"] == "queued"
        finally:
            assert redis_again is not None
            redis_again.terminate()
            redis_again.wait(10)
