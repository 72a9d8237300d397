"""A platform of a test module's own: its own Postgres, Redis and gateway, and only the workers the test
starts. For tests that need jobs no worker takes (quotas, long-polls that end first), a worker that starts
late, or settings and services the session's platform does not have."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import Platform, make_infra


@dataclass
class OwnPlatform(Platform):
    # Environment for every process it starts (gateway and workers), over the test defaults.
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{**self.extra_env, **extra})


@contextmanager
def own_platform(data_dir: Path, **env: str) -> Iterator[OwnPlatform]:
    """Postgres (migrated), Redis and a gateway with `env`; no worker until the test starts one."""
    handles, database_url, broker_url = make_infra(data_dir)
    plat = OwnPlatform(data_dir, database_url, broker_url, (data_dir / "objects").as_uri(), extra_env=env)
    try:
        plat.start_gateway()
        yield plat
    finally:
        plat.stop_all()
        handles[1].terminate()
        handles[0].cleanup()
