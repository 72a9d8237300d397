"""SQL as the driver takes it, for the statements every job runs (its submit, claim and write).

SQLAlchemy's execution of a Core statement (the compiled form's cache lookup, bind and result processing) costs
0.1-0.3 ms of Python per statement on the hot path, where the model's last run has just cooled the CPU's caches;
`exec_driver_sql` skips it and keeps the rest (the pool, the session's transaction, errors wrapped as SQLAlchemy's).
The placeholders are cast to the columns' own types, read off the models, so the SQL follows the schema.
"""

import enum
import json
from typing import Any

from sqlalchemy import CursorResult, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.types import JSON

_DIALECT = postgresql.psycopg.dialect()


def placeholders(table: Table, names: tuple[str, ...]) -> str:
    """`%(name)s::<column type>, ...` for the columns `names` of `table`."""
    return ", ".join(f"%({name})s::{table.c[name].type.compile(dialect=_DIALECT)}" for name in names)


def values(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """A row's values as the driver binds them to `placeholders`: JSON columns as JSON text, enums as their values."""
    return {name: _bound(table.c[name].type, value) for name, value in row.items()}


def _bound(column_type: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(column_type, JSON):
        return json.dumps(value)
    return value.value if isinstance(value, enum.Enum) else value


def execute(session: Session, sql: str, params: dict[str, Any]) -> CursorResult[*tuple[Any, ...]]:
    """Run `sql` (pyformat placeholders) on the session's connection, in its transaction."""
    return session.connection().exec_driver_sql(sql, params)
