"""Rate limits: requests per tenant (API.md: 429 + Retry-After over the rate quota), and wrong API keys
per client address, so keys cannot be guessed at line rate.

Moving windows from the `limits` library (exact: at most N hits in any period-long span), kept in the
broker's Redis so every gateway replica counts against the same window.
"""

import ipaddress
import logging
import math
import time

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from percept.errors import QuotaExceeded
from percept.queue import redis_client_url

log = logging.getLogger(__name__)
# Addresses blocked for wrong keys that this replica remembers; past it, expired blocks are dropped.
MAX_REMEMBERED_BLOCKS = 10_000


def limits_storage_uri(broker_url: str) -> str | None:
    """The `limits` URI of a Redis broker URL; None when the broker is not Redis."""
    url = redis_client_url(broker_url)
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return "async+" + url if url.startswith(("redis://", "rediss://")) else None


def limits_storage(broker_url: str) -> Storage:
    """The broker's Redis; without one, each replica counts its own hits."""
    uri = limits_storage_uri(broker_url)
    return (RedisStorage(uri, implementation="redispy", wrap_exceptions=True, socket_timeout=1,
                         socket_connect_timeout=1) if uri else MemoryStorage())


def _per(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"


class TenantRateLimit:
    """Requests per tenant. If Redis cannot be reached the limit is not enforced: the broker outage itself
    turns job submissions into 503s, and reads keep working."""

    def __init__(self, rate: str | None, storage: Storage) -> None:
        """`rate` in the limits notation ("100/second", "5000/hour"); empty or None: no limit."""
        self.item: RateLimitItem | None = parse(rate) if rate else None  # checked by Settings
        self.limiter = MovingWindowRateLimiter(storage)

    async def hit(self, tenant_id: str) -> None:
        """Count one request; raise 429 with the seconds until the window lets the tenant in again."""
        if self.item is None:
            return
        try:
            if await self.limiter.hit(self.item, "tenant", tenant_id):
                return
            stats = await self.limiter.get_window_stats(self.item, "tenant", tenant_id)
        except Exception as exc:  # the storage's errors, wrapped: fail open
            log.warning("rate limit not enforced: %s", exc.__class__.__name__)
            return
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        error = QuotaExceeded(f"You sent more than {self.item.amount} requests per {_per(self.item)}; "
                              f"slow down and retry in {retry_after} s.", code="rate_limited",
                              details={"limit": str(self.item), "retry_after_seconds": retry_after})
        error.retry_after = retry_after
        raise error


def client_key(host: str | None) -> str:
    """Who is counted: an IPv4 address, or an IPv6 address's /64 (one subscriber's allocation, whose
    2^64 addresses would otherwise each get a window of their own)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class WrongKeyLimit:
    """Wrong API keys per client address. Only a wrong key is counted (one Redis round trip, on a request
    that is refused anyway); a valid key's request never touches Redis.

    An address over the limit is blocked for every key until the window lets it in again, valid keys
    included: answering the right key while refusing the wrong ones would tell a guesser which guess was
    right. The block is kept in this replica's memory (checking it costs no I/O); another replica learns
    of it at the address's next wrong key there. If Redis cannot be reached, each replica counts on its own.
    """

    def __init__(self, rate: str | None, storage: Storage) -> None:
        self.item: RateLimitItem | None = parse(rate) if rate else None  # checked by Settings
        self.limiter = MovingWindowRateLimiter(storage)
        self.fallback = MovingWindowRateLimiter(MemoryStorage())
        self.blocked_until: dict[str, float] = {}  # client key -> time.time() when it may try again

    def check(self, host: str | None) -> None:
        """Refuse an address that is blocked (no I/O: call it before looking at the key)."""
        client = client_key(host)
        until = self.blocked_until.get(client)
        if until is not None:
            if until > time.time():
                raise self._refusal(until)
            del self.blocked_until[client]

    async def wrong_key(self, host: str | None) -> None:
        """Count a wrong key; raise 429 when it is one too many."""
        if self.item is None:
            return
        client = client_key(host)
        try:
            if await self.limiter.hit(self.item, "wrong-key", client):
                return
            stats = await self.limiter.get_window_stats(self.item, "wrong-key", client)
        except Exception as exc:  # the storage's errors, wrapped: count in this replica instead
            log.warning("wrong keys counted per replica: %s", exc.__class__.__name__)
            if await self.fallback.hit(self.item, "wrong-key", client):
                return
            stats = await self.fallback.get_window_stats(self.item, "wrong-key", client)
        until = max(stats.reset_time, time.time() + 1)
        if len(self.blocked_until) >= MAX_REMEMBERED_BLOCKS:
            now = time.time()
            self.blocked_until = {c: t for c, t in self.blocked_until.items() if t > now}
        self.blocked_until[client] = until
        raise self._refusal(until)

    def _refusal(self, until: float) -> QuotaExceeded:
        assert self.item is not None
        retry_after = max(1, math.ceil(until - time.time()))
        error = QuotaExceeded(f"More than {self.item.amount} requests with a wrong API key came from your address "
                              f"per {_per(self.item)}; retry in {retry_after} s with a valid key.",
                              code="too_many_wrong_keys",
                              details={"limit": str(self.item), "retry_after_seconds": retry_after})
        error.retry_after = retry_after
        return error
