"""Sends webhook deliveries from the outbox: signed POSTs, retried with exponential backoff.

Runs in every gateway next to the sweeper. It wakes when a job ends (the job events the long-polls
use) and at every sweep interval, so retries and a missed event are picked up without one.
Delivery is at least once: receivers deduplicate by the `Percept-Delivery` header.

Deliveries reach public addresses only, beside the hosts and networks an operator opens
(PERCEPT_WEBHOOK_ALLOW): each send resolves the URL's host once, checks every address, and connects to a
checked one (PinnedNetwork), so a name whose answer changes after the check cannot reach anything else.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpcore
import httpx
from starlette.concurrency import run_in_threadpool

from percept.db import webhooks as webhook_repo
from percept.db.session import session_scope
from percept.errors import InvalidInput
from percept.infra import Infra
from percept.logs import job_context
from services.gateway.usecases.jobs import job_out

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "Percept-Signature"
MIN_SECONDS_BETWEEN_LOOKS = 0.1
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# socket.getaddrinfo's shape (a parameter, so that tests can give a name the answers they need).
Resolver = Callable[..., list[tuple[Any, ...]]]
DEFAULT_PORTS = {"http": 80, "https": 443}
# NAT64 (RFC 6052): these IPv6 addresses carry the IPv4 address a NAT64 gateway connects to.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: what a receiver recomputes to trust a call."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookRefused(InvalidInput):
    code = "webhook_url_not_allowed"


@dataclass(frozen=True)
class WebhookAllow:
    """The hosts and networks an operator opened to webhooks beside the public internet
    (PERCEPT_WEBHOOK_ALLOW, already checked by Settings)."""

    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def of(cls, entries: Sequence[str]) -> "WebhookAllow":
        networks, names, suffixes = [], set(), []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    suffixes.append(entry[1:])  # ".svc.cluster.local": a dot before it, never a bare suffix
                else:
                    names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def opens_name(self, host: str) -> bool:
        return host in self.names or host.endswith(self.suffixes)

    def opens_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def is_public(address: IPAddress) -> bool:
    """On the public internet: not loopback, private, link-local (169.254.169.254, the cloud metadata
    service), shared (100.64/10), reserved or multicast, nor an IPv6 form of such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = (address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
                    or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None))
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not address.is_multicast


def checked_addresses(url: str, allow: WebhookAllow, resolve: Resolver | None = None) -> list[str]:
    """Resolve the URL's host once and check every address it has: the addresses a delivery may connect to.

    Raises WebhookRefused for an address that is not public unless PERCEPT_WEBHOOK_ALLOW opens the host or
    the address; socket.gaierror when the name does not resolve. Blocking: call it from a thread.
    """
    parts = httpx.URL(url)
    host = parts.raw_host.decode("ascii")
    infos = (resolve or socket.getaddrinfo)(host, parts.port or DEFAULT_PORTS[parts.scheme], type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))
    if not allow.opens_name(host.rstrip(".").lower()):
        for text in addresses:
            address = ipaddress.ip_address(text)
            if not is_public(address) and not allow.opens_address(address):
                raise WebhookRefused(
                    f"The URL's host resolves to {text}, which is not a public address; webhooks go to the "
                    "public internet only, unless the platform's operator opens this host or network with "
                    "PERCEPT_WEBHOOK_ALLOW.", details={"address": text})
    return addresses


@dataclass(frozen=True)
class _Pin:
    host: str
    port: int
    addresses: list[str]


# The delivery being sent in this task, and the addresses checked for its host.
_pinned: ContextVar[_Pin | None] = ContextVar("percept_webhook_pin", default=None)


class PinnedNetwork(httpcore.AsyncNetworkBackend):
    """Opens a delivery's connection to the addresses checked for it (`post_delivery`), never to a new DNS
    answer, so a name that changes its answer after the check (DNS rebinding) cannot reach another address.
    httpx keeps the URL's host for everything else: the Host header, TLS SNI and certificate checks, and
    the pool of kept-alive connections (one per host name)."""

    def __init__(self) -> None:
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        pin = _pinned.get()
        if pin is None or (pin.host, pin.port) != (host, port):
            raise httpcore.ConnectError(f"{host}:{port} was not checked; a delivery connects to checked addresses only")
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in pin.addresses:
            try:
                return await self._network.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are not sent over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


def delivery_client(timeout: float, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """The client deliveries are sent with: connections pinned to checked addresses, no redirects (a
    redirect would go unchecked), and no proxy from the environment (a proxy would resolve the name again)."""
    transport = httpx.AsyncHTTPTransport(verify=verify, trust_env=False)
    # httpx takes no network backend of its own; its connection pool (httpcore's) does.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False), network_backend=PinnedNetwork(),
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
    return httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False)


async def post_delivery(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                        allow: WebhookAllow) -> tuple[int | None, str | None]:
    """POST one delivery (checked at each send, not only at creation: the name may point elsewhere by now);
    (the receiver's status code, the error when it was not a success)."""
    try:
        addresses = await run_in_threadpool(checked_addresses, url, allow)
    except WebhookRefused as refused:
        return None, f"not sent: the URL's host resolves to {refused.details['address']}, which is not a public address"
    except (socket.gaierror, UnicodeError) as exc:
        return None, f"not sent: the URL's host does not resolve ({exc})"[:500]
    parts = httpx.URL(url)
    token = _pinned.set(_Pin(parts.raw_host.decode("ascii"), parts.port or DEFAULT_PORTS[parts.scheme], addresses))
    try:
        answer = await client.post(url, content=body, headers=headers)
    except Exception as exc:  # whatever stopped the send, it is a failed attempt to record
        return None, f"{exc.__class__.__name__}: {exc}"[:500]
    finally:
        _pinned.reset(token)
    return answer.status_code, None if answer.is_success else f"the receiver answered HTTP {answer.status_code}"


class WebhookSender:
    def __init__(self, infra: Infra) -> None:
        self.infra = infra
        self.allow = WebhookAllow.of(infra.settings.webhook_allow)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._none_until = 0.0  # monotonic time up to which "no webhook exists" is taken as known

    def wake(self) -> None:
        self._wake.set()

    def webhooks_changed(self) -> None:
        """A webhook was created here (committed): look again at the next job end."""
        self._none_until = 0.0

    def _known_none(self) -> bool:
        """No webhook exists, as remembered (_any_webhooks): checked on the event loop, no thread trip."""
        return time.monotonic() < self._none_until

    def _any_webhooks(self) -> bool:
        """Whether any tenant has a webhook. "None" is remembered for a sweep interval, so a platform without
        webhooks spends no transaction (nor a trip to a worker thread) per job end; one created on another
        replica is seen by then (and the timer's look below sends whatever became due meanwhile)."""
        if self._known_none():
            return False
        with session_scope(self.infra.database_url, autocommit=True) as session:
            if webhook_repo.any_webhooks(session):
                return True
        self._none_until = time.monotonic() + self.infra.settings.sweep_interval.total_seconds()
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        settings = self.infra.settings
        async with delivery_client(settings.webhook_timeout.total_seconds()) as client:
            while True:
                woken = True
                try:
                    await asyncio.wait_for(self._wake.wait(), settings.sweep_interval.total_seconds())
                except TimeoutError:
                    woken = False
                self._wake.clear()
                try:
                    if woken and (self._known_none() or not await run_in_threadpool(self._any_webhooks)):
                        continue  # a job ended, but no one has a webhook to tell
                    while await self.send_due(client):
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is away: try again at the next wake-up
                    log.warning("webhook deliveries postponed: %s", exc)
                # Jobs end by the dozen per second under load: look for due deliveries at most this often.
                await asyncio.sleep(MIN_SECONDS_BETWEEN_LOOKS)

    async def send_due(self, client: httpx.AsyncClient) -> int:
        """Send one lease of due deliveries at once; the number sent."""
        due = await run_in_threadpool(self._take_due)
        await asyncio.gather(*(self._send(client, *item) for item in due))
        return len(due)

    def _take_due(self) -> list[tuple[webhook_repo.DueDelivery, bytes]]:
        lease = self.infra.settings.webhook_timeout * 3
        with session_scope(self.infra.database_url) as session:
            due = webhook_repo.take_due(session, lease, self.infra.settings.webhook_max_attempts)
            bodies = [json.dumps({"event": d.event, "delivery_id": d.id,
                                  "job": job_out(session, d.job).model_dump(mode="json")}).encode() for d in due]
            session.commit()
        return list(zip(due, bodies, strict=True))

    async def _send(self, client: httpx.AsyncClient, delivery: webhook_repo.DueDelivery, body: bytes) -> None:
        job = delivery.job
        with job_context(job_ids=[job.id], tenant_ids=[job.tenant_id], kinds=[job.kind]):
            await self._send_for_job(client, delivery, body)

    async def _send_for_job(self, client: httpx.AsyncClient, delivery: webhook_repo.DueDelivery, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "Percept-Webhooks/1",
                   "Percept-Event": delivery.event, "Percept-Delivery": str(delivery.id),
                   SIGNATURE_HEADER: signature(delivery.secret, int(time.time()), body)}
        status_code, error = await post_delivery(client, delivery.url, body, headers, self.allow)
        delivered = error is None
        retry_at = None
        settings = self.infra.settings
        if not delivered and delivery.attempt < settings.webhook_max_attempts:
            retry_at = datetime.now(UTC) + settings.webhook_retry_base * 2 ** (delivery.attempt - 1)
        if delivered:
            log.info("webhook delivery %d (%s) delivered: HTTP %s", delivery.id, delivery.event, status_code)
        else:
            log.warning("webhook delivery %d (%s) attempt %d failed: %s; %s", delivery.id, delivery.event,
                        delivery.attempt, error, f"retried at {retry_at:%H:%M:%S}" if retry_at else "given up")
        await run_in_threadpool(self._record, delivery.id, delivered, status_code, error, retry_at)

    def _record(self, delivery_id: int, delivered: bool, status_code: int | None, error: str | None,
                retry_at: datetime | None) -> None:
        with session_scope(self.infra.database_url) as session:
            webhook_repo.record_attempt(session, delivery_id, delivered=delivered, status_code=status_code,
                                        error=error, retry_at=retry_at)
            session.commit()
