"""Webhooks: signed POSTs to a real HTTP receiver when jobs end, retried until the receiver takes them."""

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import json
import signal
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx
import pytest
from skimage import data

from percept.config import Settings
from services.gateway.webhooks import WebhookAllow, WebhookRefused, checked_addresses, delivery_client, post_delivery
from tests.conftest import image_bytes, wait_until

pytestmark = pytest.mark.integration


class Receiver:
    """An HTTP server on a free port that records what it is sent and answers with the given codes."""

    def __init__(self, answers: list[int] | None = None, tls: ssl.SSLContext | None = None) -> None:
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
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_port}/hooks/percept"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(answers: list[int] | None = None, tls: ssl.SSLContext | None = None) -> Receiver:
        made.append(Receiver(answers, tls))
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


# --------------------------------------------------------------------------- where deliveries may go

def _one_address(address: str):
    """A resolver that answers `address` for every name (and the port it is asked for)."""
    def resolve(host, port, *args, **kwargs):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port or 0))]
    return resolve


@pytest.mark.parametrize("address", [
    "127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "fe80::1", "fc00::1",
    "0.0.0.0", "100.64.0.1", "224.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::1"])
def test_non_public_addresses_are_refused_by_default(address):
    with pytest.raises(WebhookRefused) as refused:
        checked_addresses("https://hooks.example.com/x", WebhookAllow.of([]), resolve=_one_address(address))
    assert refused.value.details["address"] == address
    assert "PERCEPT_WEBHOOK_ALLOW" in refused.value.message


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111"])
def test_public_addresses_are_the_addresses_to_connect_to(address):
    assert checked_addresses("https://hooks.example.com/x", WebhookAllow.of([]),
                             resolve=_one_address(address)) == [address]


def test_every_address_a_name_resolves_to_is_checked():
    def resolve(host, port, *args, **kwargs):  # a public answer first, the metadata address second
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
    with pytest.raises(WebhookRefused):
        checked_addresses("http://hooks.example.com/x", WebhookAllow.of([]), resolve=resolve)


def test_operators_open_named_hosts_and_networks():
    allow = WebhookAllow.of(Settings(webhook_allow="10.0.0.0/8, hooks.internal,*.svc.cluster.local").webhook_allow)
    assert checked_addresses("http://10.1.2.3:8080/x", allow) == ["10.1.2.3"]
    with pytest.raises(WebhookRefused):
        checked_addresses("http://192.168.1.5/x", allow)
    private = _one_address("192.168.7.7")
    assert checked_addresses("http://HOOKS.internal./x", allow, resolve=private) == ["192.168.7.7"]
    assert checked_addresses("http://receiver.team.svc.cluster.local/x", allow, resolve=private) == ["192.168.7.7"]
    with pytest.raises(WebhookRefused):
        checked_addresses("http://svc.cluster.local.evil.example/x", allow, resolve=private)
    with pytest.raises(WebhookRefused):
        checked_addresses("http://hooks.internal.evil.example/x", allow, resolve=private)


def test_the_default_is_to_refuse_private_addresses(monkeypatch):
    monkeypatch.delenv("PERCEPT_WEBHOOK_ALLOW", raising=False)
    assert Settings().webhook_allow == []
    with pytest.raises(WebhookRefused):
        checked_addresses("http://127.0.0.1:9000/x", WebhookAllow.of(Settings().webhook_allow))


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "http://hooks.internal", "hooks internal", "*"])
def test_an_allow_entry_that_is_neither_a_host_nor_a_network_stops_the_start(entry):
    with pytest.raises(ValueError, match="PERCEPT_WEBHOOK_ALLOW"):
        Settings(webhook_allow=entry)


class _Rebinding:
    """A resolver for `name` that answers `first` once, then `after` every time (DNS rebinding); other
    names resolve for real."""

    def __init__(self, monkeypatch, name: str, first: str, after: str) -> None:
        self.name, self.answers, self.asked = name, (first, after), 0
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if (host.decode() if isinstance(host, bytes) else host) != self.name:  # anyio asks with bytes
                return real(host, port, *args, **kwargs)
            self.asked += 1
            return _one_address(self.answers[0] if self.asked == 1 else self.answers[1])(host, port)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _record_connections(monkeypatch) -> list[tuple[str, int]]:
    """Where TCP connections are opened. This sandbox has no internet: a public address is refused as
    unreachable, so nothing leaves the machine."""
    opened: list[tuple[str, int]] = []
    real = anyio.connect_tcp

    async def connect_tcp(remote_host, remote_port, **kwargs):
        opened.append((str(remote_host), remote_port))
        try:
            if ipaddress.ip_address(str(remote_host)).is_global:
                raise OSError(101, "Network is unreachable (the test has no internet)")
        except ValueError:
            pass  # a name: resolved by anyio, through socket.getaddrinfo
        return await real(remote_host, remote_port, **kwargs)

    monkeypatch.setattr(anyio, "connect_tcp", connect_tcp)
    return opened


def _deliver(url: str, allow: list[str], verify: ssl.SSLContext | bool = True) -> tuple[int | None, str | None]:
    async def send() -> tuple[int | None, str | None]:
        async with delivery_client(timeout=5, verify=verify) as client:
            return await post_delivery(client, url, b'{"event": "job.succeeded"}',
                                       {"Content-Type": "application/json"}, WebhookAllow.of(allow))
    return asyncio.run(send())


def test_a_name_that_answers_differently_after_the_check_is_not_followed(monkeypatch, receiver):
    """DNS rebinding: the name answers a public address when it is checked and 127.0.0.1 afterwards.
    The connection goes to the address that was checked, never to the receiver on loopback."""
    hook = receiver()
    port = hook.server.server_port
    rebinding = _Rebinding(monkeypatch, "hooks.example.test", first="93.184.215.14", after="127.0.0.1")
    opened = _record_connections(monkeypatch)

    status_code, error = _deliver(f"http://hooks.example.test:{port}/hooks/percept", allow=[])

    assert hook.calls == []
    assert opened == [("93.184.215.14", port)]
    assert rebinding.asked == 1  # resolved once: the answer checked is the answer used
    assert status_code is None and "ConnectError" in error


def test_an_allowed_name_is_pinned_to_its_checked_address_and_keeps_its_host_header(monkeypatch, receiver):
    hook = receiver()
    port = hook.server.server_port
    rebinding = _Rebinding(monkeypatch, "hooks.example.test", first="127.0.0.1", after="10.255.255.1")
    opened = _record_connections(monkeypatch)

    assert _deliver(f"http://hooks.example.test:{port}/hooks/percept", allow=["127.0.0.0/8"]) == (200, None)

    assert opened == [("127.0.0.1", port)] and rebinding.asked == 1
    [(headers, body)] = hook.calls
    assert headers["host"] == f"hooks.example.test:{port}" and json.loads(body) == {"event": "job.succeeded"}


def _certificate_for(name: str, directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate valid for `name` only (not for 127.0.0.1), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_an_https_delivery_pinned_to_an_address_still_verifies_the_name(monkeypatch, receiver, tmp_path):
    """The TLS handshake names the URL's host (SNI) and the certificate is checked against it, while
    the connection goes to the checked address."""
    cert_file, key_file = _certificate_for("hooks.example.test", tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert_file, key_file)
    names: list[str | None] = []
    server_side.sni_callback = lambda sock, name, context: names.append(name)
    hook = receiver(tls=server_side)
    port = hook.server.server_port
    _Rebinding(monkeypatch, "hooks.example.test", first="127.0.0.1", after="10.255.255.1")
    trusted = ssl.create_default_context(cafile=str(cert_file))

    assert _deliver(f"https://hooks.example.test:{port}/hooks/percept", ["127.0.0.1"], trusted) == (200, None)
    assert names == ["hooks.example.test"] and hook.calls[0][0]["host"] == f"hooks.example.test:{port}"

    # Pinning never weakens verification: the same server under a name its certificate does not carry fails.
    _Rebinding(monkeypatch, "other.example.test", first="127.0.0.1", after="127.0.0.1")
    status_code, error = _deliver(f"https://other.example.test:{port}/x", ["127.0.0.1"], trusted)
    assert status_code is None and "CERTIFICATE_VERIFY_FAILED" in error


def test_a_platform_refuses_webhooks_to_the_internal_network_by_default(platform, api, receiver):
    guarded = platform.start_replica("default-webhook-allow", PERCEPT_WEBHOOK_ALLOW="")
    try:
        hook = receiver()
        answer = httpx.post(guarded + "/v1/webhooks", json={"url": hook.url}, headers=api.headers)
        assert answer.status_code == 422
        error = answer.json()["error"]
        assert error["code"] == "webhook_url_not_allowed" and error["details"]["address"] == "127.0.0.1"
        assert "PERCEPT_WEBHOOK_ALLOW" in error["message"]
        metadata = httpx.post(guarded + "/v1/webhooks", json={"url": "http://169.254.169.254/latest/meta-data"},
                              headers=api.headers)
        assert metadata.status_code == 422 and metadata.json()["error"]["details"]["address"] == "169.254.169.254"
        assert api.get("/v1/webhooks").json() == []
    finally:
        platform.kill("default-webhook-allow", signal.SIGTERM)
