"""The pending-jobs quota under concurrent submits: the count and the insert are one step per tenant, so
a burst at the limit is cut off exactly there."""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from skimage import data

from percept.db import jobs as job_repo
from percept.db.session import session_scope
from percept.db.tenants import tenant_id_for_key
from tests.conftest import image_bytes
from tests.own_platform import own_platform

pytestmark = pytest.mark.integration

LIMIT = 5
BURST = 30


@pytest.fixture(scope="module")
def no_workers(tmp_path_factory):
    """A gateway whose jobs no worker takes, so nothing leaves the quota while the burst runs."""
    with own_platform(tmp_path_factory.mktemp("quota"), PERCEPT_MAX_PENDING_JOBS_PER_TENANT=str(LIMIT)) as plat:
        yield plat


def burst(url: str, key: str, body: dict, idempotency_keys: list[str]) -> list[httpx.Response]:
    """One POST /v1/classify per key, all sent at the same moment."""
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
               for _ in idempotency_keys]
    start = threading.Barrier(len(clients))

    def submit(client: httpx.Client, idempotency_key: str) -> httpx.Response:
        start.wait()
        return client.post("/v1/classify", json=body, headers={"Idempotency-Key": idempotency_key})

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            return list(pool.map(submit, clients, idempotency_keys))
    finally:
        for client in clients:
            client.close()


def test_concurrent_submits_at_the_limit_never_overshoot_it(no_workers):
    key = no_workers.new_key()
    with no_workers.client(key) as client:
        image = client.post("/v1/images", files={"file": ("c.jpg", image_bytes(data.coffee()))}).json()
        body = {"image": image["id"], "top_k": 1}
        keys = [f"burst-{i}" for i in range(BURST)]
        answers = burst(no_workers.url, key, body, keys)

        codes = [answer.status_code for answer in answers]
        assert sorted(codes) == [202] * LIMIT + [429] * (BURST - LIMIT), codes
        refused = [answer for answer in answers if answer.status_code == 429]
        assert {answer.json()["error"]["code"] for answer in refused} == {"quota_exceeded"}
        assert all(answer.headers["retry-after"] for answer in refused)
        with session_scope(no_workers.database_url) as session:
            tenant_id = tenant_id_for_key(session, key)
            assert tenant_id is not None
            assert job_repo.count_pending(session, tenant_id) == LIMIT
        assert len(client.get("/v1/jobs").json()["data"]) == LIMIT

        # At the limit, a replay is still the job it names, and a refused request was never recorded.
        accepted_key, refused_key = (keys[codes.index(code)] for code in (202, 429))
        replay = client.post("/v1/classify", json=body, headers={"Idempotency-Key": accepted_key})
        assert replay.status_code == 202
        assert replay.json()["id"] == answers[codes.index(202)].json()["id"]
        again = client.post("/v1/classify", json=body, headers={"Idempotency-Key": refused_key})
        assert again.status_code == 429 and again.json()["error"]["code"] == "quota_exceeded"

    # The quota is the tenant's: another one submits as before.
    with no_workers.client(no_workers.new_key()) as other:
        image = other.post("/v1/images", files={"file": ("c.jpg", image_bytes(data.coffee()))}).json()
        assert other.post("/v1/classify", json={"image": image["id"]}).status_code == 202
