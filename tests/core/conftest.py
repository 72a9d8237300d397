"""What the tests of percept's own parts share."""

import pytest

from percept.db.migrate import upgrade
from percept.embedded import start_postgres


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    """A database of the module's own (embedded Postgres), built by the migrations."""
    server, url = start_postgres(tmp_path_factory.mktemp("db"))
    upgrade(url)
    yield url
    server.cleanup()
