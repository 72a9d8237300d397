"""Webhooks: signed POSTs to a real HTTP receiver when jobs end, retried until the receiver takes them."""

import hashlib
import hmac
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from skimage import data

from services.gateway.webhooks import non_public_address
from tests.conftest import image_bytes, wait_until

pytestmark = pytest.mark.integration


class Receiver:
    """An HTTP server on a free port that records what it is sent and answers with the given codes."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.answers = list(answers or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/percept"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(answers: list[int] | None = None) -> Receiver:
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the HMAC over "<t>.<body>" and compare in constant time."""
    parts = dict(part.split("=", 1) for part in headers["percept-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


def test_a_finished_job_is_posted_signed(api, receiver, coffee_jpeg):
    hook = receiver()
    created = api.post("/v1/webhooks", json={"url": hook.url})
    assert created.status_code == 201
    webhook = created.json()
    assert webhook["secret"].startswith("whsec_") and webhook["events"] == ["job.succeeded", "job.failed",
                                                                             "job.canceled"]
    assert "secret" not in api.get("/v1/webhooks").json()[0]

    job = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "succeeded"
    wait_until(lambda: hook.calls, timeout=30, what="the webhook delivery")
    headers, body = hook.calls[0]
    assert verify(webhook["secret"], headers, body)
    assert not verify("whsec_someone-else", headers, body)
    sent = json.loads(body)
    assert sent["event"] == headers["percept-event"] == "job.succeeded"
    assert sent["job"]["id"] == job["id"] and sent["job"]["output"]["labels"][0]["label"] == "espresso"
    assert str(sent["delivery_id"]) == headers["percept-delivery"]

    deliveries = api.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()
    assert [(d["job_id"], d["status"], d["attempts"], d["last_status_code"]) for d in deliveries] == [
        (job["id"], "delivered", 1, 200)]
    assert 'percept_webhook_deliveries{status="delivered"}' in api.get("/metrics").text


def test_a_refused_delivery_is_retried_until_taken(api, receiver):
    hook = receiver(answers=[500, 503])
    webhook = api.post("/v1/webhooks", json={"url": hook.url, "events": ["job.failed"]}).json()
    # A meme of a photo without a face fails: the failure is the event (and no success is sent).
    job = api.post("/v1/memes", files={"image": ("coffee.jpg", image_bytes(data.coffee()))},
                   headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "failed"
    done = wait_until(lambda: [d for d in api.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()
                               if d["status"] == "delivered"], timeout=60, what="the third attempt")
    assert done[0]["attempts"] == 3 and done[0]["event"] == "job.failed"
    assert len(hook.calls) == 3
    assert len({headers["percept-delivery"] for headers, _ in hook.calls}) == 1  # one delivery, tried 3 times
    assert json.loads(hook.calls[-1][1])["job"]["error"]["code"] == "no_face"


def test_a_receiver_that_never_answers_well_is_given_up_on(platform, api, receiver):
    hook = receiver(answers=[500] * 20)
    webhook = api.post("/v1/webhooks", json={"url": hook.url, "events": ["job.canceled"]}).json()
    # A job canceled while queued ends in the gateway, not in a worker: it is sent all the same.
    queued = _queued_job(platform, api)
    assert api.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "canceled"
    failed = wait_until(lambda: [d for d in api.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()
                                 if d["status"] == "failed"], timeout=120, what="the delivery to be given up")
    assert failed[0]["attempts"] == 4 and failed[0]["last_status_code"] == 500  # PERCEPT_WEBHOOK_MAX_ATTEMPTS
    assert "HTTP 500" in failed[0]["last_error"] and failed[0]["next_attempt_at"] is None
    assert len(hook.calls) == 4


def _queued_job(platform, api) -> str:
    """A classify job that stays queued: its row is written as the gateway would, but never sent."""
    from percept.db.ids import new_id
    from percept.db.models import Image, Job, JobStatus
    from percept.db.session import session_scope

    image = api.post("/v1/images", files={"file": ("c.jpg", image_bytes(data.chelsea()))}).json()
    with session_scope(platform.database_url) as session:
        tenant_id = session.get(Image, image["id"]).tenant_id
        job_id = new_id("job")
        inputs = [{"image_id": image["id"], "sha256": image["sha256"]}]
        session.add(Job(id=job_id, tenant_id=tenant_id, kind="classify", queue="classifier",
                        status=JobStatus.QUEUED, model_name="imagenet-efficientnet-lite0:1", inputs=inputs,
                        params={"model": "imagenet-efficientnet-lite0:1", "top_k": 1}, provenance={"inputs": inputs},
                        progress={"done": 0, "total": 1}, attempts=0, cancel_requested=False))
        session.commit()
    return job_id


def test_webhooks_are_checked_and_private_to_their_tenant(platform, api, receiver):
    hook = receiver()
    for bad in ({"url": "ftp://example.com/x"}, {"url": "not a url"}, {"url": "http://a:b:c/"},
                {"url": "http://[::1/x"}, {"url": "http://example.com:99999/"}, {"url": hook.url, "events": []},
                {"url": hook.url, "events": ["job.started"]}, {"url": hook.url, "secret": "mine"}):
        answer = api.post("/v1/webhooks", json=bad)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_parameters", bad
    webhook = api.post("/v1/webhooks", json={"url": hook.url}).json()
    with platform.client(platform.new_key()) as other:
        assert other.get("/v1/webhooks").json() == []
        assert other.get(f"/v1/webhooks/{webhook['id']}/deliveries").status_code == 404
        assert other.delete(f"/v1/webhooks/{webhook['id']}").status_code == 404
    assert api.delete(f"/v1/webhooks/{webhook['id']}").json() == {"id": webhook["id"], "deleted": True}
    assert api.get("/v1/webhooks").json() == []


@pytest.mark.parametrize(("url", "blocked"), [
    ("http://127.0.0.1:9000/x", "127.0.0.1"), ("http://localhost/x", None), ("http://10.1.2.3/x", "10.1.2.3"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254"), ("http://[::1]/x", "::1"),
    ("https://8.8.8.8/hook", None), ("http://no-such-host.invalid/x", None)])
def test_non_public_addresses_are_recognised(url, blocked):
    found = non_public_address(url)
    if url.startswith("http://localhost"):
        assert found in ("127.0.0.1", "::1")  # whichever the resolver lists first
    else:
        assert found == blocked


def test_a_platform_for_untrusted_tenants_keeps_webhooks_off_the_internal_network(platform, api, receiver):
    guarded = platform.start_replica("no-private-webhooks", PERCEPT_WEBHOOK_ALLOW_PRIVATE="false")
    try:
        hook = receiver()
        answer = httpx.post(guarded + "/v1/webhooks", json={"url": hook.url}, headers=api.headers)
        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "webhook_url_not_allowed"
        assert answer.json()["error"]["details"]["address"] == "127.0.0.1"
        assert api.get("/v1/webhooks").json() == []
    finally:
        platform.kill("no-private-webhooks", signal.SIGTERM)
