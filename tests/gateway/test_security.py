"""Guessing API keys: wrong keys are limited per client address, valid keys are not slowed down.

The X-Forwarded-For tests need `percept gateway` to hand PERCEPT_TRUSTED_PROXIES to uvicorn
(`forwarded_allow_ips=settings.trusted_proxies` in percept/cli.py): on its own uvicorn believes the header
from 127.0.0.1 and ::1.
"""

import asyncio
import signal

import httpx
import pytest

from percept.errors import QuotaExceeded
from services.gateway.ratelimit import WrongKeyLimit, client_key, limits_storage
from tests.conftest import free_port

LIMIT = 5


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client_from(url: str, address: str = "127.0.0.1") -> httpx.Client:
    """A client whose connections come from `address` (any of 127.0.0.0/8 reaches the loopback gateway)."""
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture(scope="module")
def guarded(platform):
    """A gateway that takes LIMIT wrong keys per client address per minute; 127.0.0.5 is a trusted proxy."""
    url = platform.start_replica("auth-failure-limit", PERCEPT_AUTH_FAILURE_LIMIT=f"{LIMIT}/minute",
                                 PERCEPT_TRUSTED_PROXIES="127.0.0.5")
    yield url
    platform.kill("auth-failure-limit", signal.SIGTERM)


def test_an_ipv6_client_is_counted_by_its_64():
    """One subscriber holds a /64: its 2^64 addresses are one client, not 2^64 fresh windows."""
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:198.51.100.7") == client_key("198.51.100.7") == "198.51.100.7"


def test_without_redis_each_replica_still_counts_wrong_keys():
    limit = WrongKeyLimit("2/minute", limits_storage(f"redis://127.0.0.1:{free_port()}/0"))  # nobody listens

    async def guesses() -> None:
        for _ in range(2):
            await limit.wrong_key("198.51.100.7")
        with pytest.raises(QuotaExceeded) as refused:
            await limit.wrong_key("198.51.100.7")
        assert refused.value.code == "too_many_wrong_keys" and refused.value.retry_after
        with pytest.raises(QuotaExceeded):
            limit.check("198.51.100.7")  # blocked for any key now, without asking anyone
        limit.check("198.51.100.8")

    asyncio.run(guesses())


@pytest.mark.integration
def test_wrong_keys_from_one_address_are_answered_429_after_the_limit(platform, guarded):
    key = platform.new_key()
    with client_from(guarded, "127.0.0.4") as client:
        # Valid keys never count: many more of them than the limit, then still LIMIT wrong ones before 429.
        for _ in range(3 * LIMIT):
            assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        for n in range(LIMIT):
            wrong = client.get("/v1/jobs", headers=bearer(f"pk_guess{n}"))
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        refused = client.get("/v1/jobs", headers=bearer("pk_guess-one-too-many"))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_wrong_keys"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # While blocked, every key is refused before it is looked at, the valid one too: a 200 for the right
        # key among 429s for the wrong ones would tell a guesser which guess was right.
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 429
        assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 429
        # No key at all is nothing to guess with: still the 401 that says how to send one.
        assert client.get("/v1/jobs").json()["error"]["code"] == "missing_api_key"

    with client_from(guarded, "127.0.0.2") as neighbour:  # another address is not affected
        assert neighbour.get("/v1/jobs", headers=bearer(key)).status_code == 200
        assert neighbour.get("/v1/jobs", headers=bearer("pk_typo")).status_code == 401


@pytest.mark.integration
def test_x_forwarded_for_is_not_trusted_from_an_address_not_named_a_proxy(guarded):
    """From 127.0.0.1 (which uvicorn on its own trusts as a proxy) a new X-Forwarded-For per request does
    not make a new client: the connection's address is counted."""
    with client_from(guarded, "127.0.0.1") as client:
        answers = [client.get("/v1/jobs", headers={**bearer(f"pk_guess{n}"), "X-Forwarded-For": f"198.51.100.{n}"})
                   for n in range(LIMIT + 1)]
    assert [a.status_code for a in answers] == [401] * LIMIT + [429]


@pytest.mark.integration
def test_behind_a_named_proxy_the_forwarded_client_is_counted(platform, guarded):
    key = platform.new_key()
    with client_from(guarded, "127.0.0.5") as proxy:
        for n in range(LIMIT + 1):
            proxy.get("/v1/jobs", headers={**bearer(f"pk_guess{n}"), "X-Forwarded-For": "203.0.113.9"})
        assert proxy.get("/v1/jobs", headers={**bearer(key), "X-Forwarded-For": "203.0.113.9"}).status_code == 429
        # The proxy's other clients, and the proxy itself, keep working.
        assert proxy.get("/v1/jobs", headers={**bearer(key), "X-Forwarded-For": "203.0.113.10"}).status_code == 200
        assert proxy.get("/v1/jobs", headers=bearer(key)).status_code == 200
