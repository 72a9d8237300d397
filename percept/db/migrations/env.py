"""Alembic environment: the URL comes from the caller (percept.db.migrate), never from alembic.ini."""

from alembic import context
from sqlalchemy import create_engine

from percept.db.models import Base

url = context.config.get_main_option("sqlalchemy.url")
connection = context.config.attributes.get("connection")


def run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    assert url, "set sqlalchemy.url (percept.db.migrate.alembic_config does)"
    with create_engine(url).connect() as conn:
        run(conn)
