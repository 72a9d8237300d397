"""Engines and sessions. One engine per database URL per process, created on first use."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from percept.errors import DependencyUnavailable, InvalidInput

# A pooled connection idle longer than this is pinged before use; one back in the pool sooner is not, so a busy path
# (a job's submit, claim and finish, each reusing the connection the last one returned) pays no ping round trip. A
# database restart takes longer than this: a connection that outlived one has been idle longer. (Were one ever
# missed, its statement fails as a 503 and that disconnect throws the whole pool away, SQLAlchemy's default.)
PING_AFTER_IDLE_SECONDS = 0.25


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    engine = create_engine(
        url,
        pool_use_lifo=True,  # the connection used last goes out first: warm, and the idle ones age out
        pool_size=10,
        max_overflow=20,
        pool_timeout=5,
        connect_args={"connect_timeout": 3},
    )
    ping_idle_connections(engine)
    return engine


def ping_idle_connections(engine: Engine) -> None:
    """`pool_pre_ping` for connections idle over PING_AFTER_IDLE_SECONDS only: a restarted database must not
    leave dead connections in the pool (a dead one is replaced before the checkout returns)."""
    @event.listens_for(engine, "checkin")
    def _idle_from(_: Any, record: Any) -> None:
        record.info["idle_from"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _: Any) -> None:
        idle_from = record.info.pop("idle_from", None)
        if idle_from is None or time.monotonic() - idle_from < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)  # raises on a dead connection
        except Exception as exc:
            raise DisconnectionError("an idle pooled connection is dead") from exc


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@lru_cache(maxsize=8)
def _autocommit_factory(url: str) -> sessionmaker[Session]:
    # Each statement its own transaction: no BEGIN, COMMIT or ROLLBACK round trips around a single statement.
    return sessionmaker(get_engine(url).execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


@contextmanager
def session_scope(url: str, *, autocommit: bool = False) -> Iterator[Session]:
    """A session whose caller commits; rolled back on error. Connection failures become 503s. `autocommit`: each
    statement commits as it runs, for work whose statements need not stand or fall together (one read, one
    conditional UPDATE), at no transaction's round trips."""
    session = (_autocommit_factory if autocommit else _session_factory)(url)()
    try:
        yield session
    except DataError as exc:  # a value the database cannot hold: NUL bytes in text, numbers out of range
        session.rollback()
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        raise InvalidInput(f"A value you sent cannot be stored ({reason}); correct it and send again.",
                           code="invalid_value") from exc
    except UnicodeEncodeError as exc:  # JSON's "\ud800": a lone surrogate decodes, but no database text holds it
        session.rollback()
        raise InvalidInput("A value you sent cannot be stored (text that is not valid Unicode: a lone surrogate); "
                           "correct it and send again.", code="invalid_value") from exc
    except (OperationalError, DBAPIError) as exc:
        session.rollback()
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise DependencyUnavailable("The database is unreachable; retry shortly.",
                                        code="database_unavailable") from exc
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (SQLAlchemy types `execute()` as a plain Result)."""
    return cast(CursorResult[Any], result).rowcount
