"""Per-tenant request rate limit (API.md: 429 + Retry-After over the rate quota).

A moving window from the `limits` library (exact: at most N requests in any period-long span),
kept in the broker's Redis so every gateway replica counts against the same window. If Redis cannot
be reached the limit is not enforced: the broker outage itself turns job submissions into 503s, and
reads keep working.
"""

import logging
import math
import time

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from percept.errors import QuotaExceeded
from percept.queue import redis_client_url

log = logging.getLogger(__name__)


def limits_storage_uri(broker_url: str) -> str | None:
    """The `limits` URI of a Redis broker URL; None when the broker is not Redis."""
    url = redis_client_url(broker_url)
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return "async+" + url if url.startswith(("redis://", "rediss://")) else None


class TenantRateLimit:
    def __init__(self, rate: str | None, broker_url: str) -> None:
        """`rate` in the limits notation ("100/second", "5000/hour"); empty or None: no limit."""
        self.item: RateLimitItem | None = parse(rate) if rate else None  # checked by Settings
        uri = limits_storage_uri(broker_url)
        # Without Redis, each replica counts its own requests.
        storage: Storage = (RedisStorage(uri, implementation="redispy", wrap_exceptions=True,
                                         socket_timeout=1, socket_connect_timeout=1)
                            if uri else MemoryStorage())
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
        error = QuotaExceeded(f"You sent more than {self.item.amount} requests per {self._per()}; "
                              f"slow down and retry in {retry_after} s.", code="rate_limited",
                              details={"limit": str(self.item), "retry_after_seconds": retry_after})
        error.retry_after = retry_after
        raise error

    def _per(self) -> str:
        assert self.item is not None
        unit = self.item.GRANULARITY.name
        return unit if self.item.multiples == 1 else f"{self.item.multiples} {unit}s"
