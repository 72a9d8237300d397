"""Sends webhook deliveries from the outbox: signed POSTs, retried with exponential backoff.

Runs in every gateway next to the sweeper. It wakes when a job ends (the job events the long-polls
use) and at every sweep interval, so retries and a missed event are picked up without one.
Delivery is at least once: receivers deduplicate by the `Percept-Delivery` header.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from starlette.concurrency import run_in_threadpool

from percept.db import webhooks as webhook_repo
from percept.db.session import session_scope
from percept.infra import Infra
from services.gateway.usecases.jobs import job_out

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "Percept-Signature"
MIN_SECONDS_BETWEEN_LOOKS = 0.1


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: what a receiver recomputes to trust a call."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def non_public_address(url: str) -> str | None:
    """An address the URL's host resolves to that is not on the public internet (loopback, private,
    link-local such as 169.254.169.254, ...), or None. Blocking: call it from a thread."""
    try:
        infos = socket.getaddrinfo(urlsplit(url).hostname, None)
    except (socket.gaierror, UnicodeError):
        return None  # it does not resolve: the delivery fails and says so
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if not address.is_global:
            return str(address)
    return None


class WebhookSender:
    def __init__(self, infra: Infra) -> None:
        self.infra = infra
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        settings = self.infra.settings
        async with httpx.AsyncClient(timeout=settings.webhook_timeout.total_seconds(),
                                     follow_redirects=False) as client:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), settings.sweep_interval.total_seconds())
                except TimeoutError:
                    pass
                self._wake.clear()
                try:
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
        headers = {"Content-Type": "application/json", "User-Agent": "Percept-Webhooks/1",
                   "Percept-Event": delivery.event, "Percept-Delivery": str(delivery.id),
                   SIGNATURE_HEADER: signature(delivery.secret, int(time.time()), body)}
        status_code, error = None, None
        # Checked at each send, not only at creation: the name may point elsewhere by now.
        blocked = (None if self.infra.settings.webhook_allow_private
                   else await run_in_threadpool(non_public_address, delivery.url))
        if blocked:
            error = f"not sent: the URL's host resolves to {blocked}, which is not a public address"
        else:
            try:
                answer = await client.post(delivery.url, content=body, headers=headers)
                status_code = answer.status_code
                if not answer.is_success:
                    error = f"the receiver answered HTTP {status_code}"
            except Exception as exc:  # whatever stopped the send, it is a failed attempt to record
                error = f"{exc.__class__.__name__}: {exc}"[:500]
        delivered = error is None
        retry_at = None
        settings = self.infra.settings
        if not delivered and delivery.attempt < settings.webhook_max_attempts:
            retry_at = datetime.now(UTC) + settings.webhook_retry_base * 2 ** (delivery.attempt - 1)
        await run_in_threadpool(self._record, delivery.id, delivered, status_code, error, retry_at)

    def _record(self, delivery_id: int, delivered: bool, status_code: int | None, error: str | None,
                retry_at: datetime | None) -> None:
        with session_scope(self.infra.database_url) as session:
            webhook_repo.record_attempt(session, delivery_id, delivered=delivered, status_code=status_code,
                                        error=error, retry_at=retry_at)
            session.commit()
