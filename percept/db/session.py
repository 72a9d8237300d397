"""Engines and sessions. One engine per database URL per process, created on first use."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from percept.errors import DependencyUnavailable, InvalidInput


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    return create_engine(
        url,
        pool_pre_ping=True,  # a restarted database must not leave dead connections in the pool
        pool_use_lifo=True,  # the connection used last goes out first: warm, and the idle ones age out
        pool_size=10,
        max_overflow=20,
        pool_timeout=5,
        connect_args={"connect_timeout": 3},
    )


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
