"""`percept migrate --check`: what a pod's init container waits on before the new gateway or worker starts. It
changes nothing, and exits 0 only once the database is at this release's schema (or a newer release's)."""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import make_url, text

from percept.db.migrate import head_revision, upgrade
from percept.db.session import get_engine

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_db(platform) -> Iterator[str]:
    name = f"migrate_{uuid.uuid4().hex[:10]}"
    with get_engine(platform.database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        admin.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(platform.database_url).set(database=name).render_as_string(hide_password=False)
    yield url
    get_engine(url).dispose()


def check(url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PERCEPT_DATABASE_URL": url, "PERCEPT_BROKER_URL": "redis://127.0.0.1:1/0",
           "PERCEPT_STORAGE_URL": "file:///tmp/unused"}
    return subprocess.run([sys.executable, "-m", "percept.cli", "migrate", "--check"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def revision(url: str) -> str | None:
    with get_engine(url).connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def test_check_waits_for_the_migration_and_changes_nothing(empty_db):
    never = check(empty_db)
    assert never.returncode == 1 and "has not run for this release" in never.stdout, never.stdout + never.stderr

    upgrade(empty_db, revision="0007")  # the previous release
    behind = check(empty_db)
    assert behind.returncode == 1 and "0007" in behind.stdout
    assert revision(empty_db) == "0007"  # a check migrates nothing

    upgrade(empty_db)
    assert check(empty_db).returncode == 0


def test_an_older_release_runs_on_a_newer_schema(empty_db):
    """A pod of the previous release (a rollout's old ReplicaSet scaled up, a rollback) must not wait forever."""
    upgrade(empty_db)
    with get_engine(empty_db).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_from_a_newer_release'"))
    assert check(empty_db).returncode == 0
    assert head_revision() != "9999_from_a_newer_release"
