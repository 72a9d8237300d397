"""A platform of a test module's own: its own Postgres, Redis and gateway, and only the workers the test
starts. For tests that need jobs no worker takes (quotas, long-polls that end first), a worker that starts
late, or settings and services the session's platform does not have."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from percept.db.models import Job
from percept.db.session import session_scope
from tests.conftest import Platform, make_infra


@dataclass
class OwnPlatform(Platform):
    # Environment for every process it starts (gateway and workers), over the test defaults.
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{**self.extra_env, **extra})

    def job_row(self, job_id: str) -> Job:
        """The job's row as committed now (for jobs of kinds no gateway route submits)."""
        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job


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
