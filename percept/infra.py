"""Where this process finds Postgres, the broker and object storage: configured URLs in production,
embedded servers (started or attached to) when none is configured."""

import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from percept.config import Settings
from percept.storage import ObjectStore, object_store_from_url


@dataclass
class Infra:
    settings: Settings
    database_url: str
    broker_url: str
    storage_url: str
    # Embedded servers this process started or attached to; kept alive as long as it is.
    handles: list[Any] = field(default_factory=list)

    @cached_property
    def store(self) -> ObjectStore:
        return object_store_from_url(self.storage_url)

    def close(self) -> None:
        for handle in self.handles:
            if isinstance(handle, subprocess.Popen):
                handle.terminate()
                handle.wait(10)
            elif hasattr(handle, "cleanup"):
                handle.cleanup()
        self.handles.clear()


def resolve_infra(settings: Settings) -> Infra:
    handles: list[Any] = []
    database_url, broker_url = settings.database_url, settings.broker_url
    if settings.embedded_database:
        from percept.embedded import start_postgres

        server, database_url = start_postgres(settings.data_dir)
        handles.append(server)
    if settings.embedded_broker:
        from percept.embedded import start_redis

        process, broker_url = start_redis(settings.data_dir / "redis")
        if process is not None:
            handles.append(process)
    assert database_url and broker_url  # configured, or started above
    return Infra(settings, database_url, broker_url, settings.resolved_storage_url(), handles)
