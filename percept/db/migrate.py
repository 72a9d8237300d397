"""Apply the alembic migrations: the only way the schema changes (tests build their database this way)."""

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head", pgvector: bool | None = None) -> None:
    """`pgvector`: None uses the extension where the server has it; False stores face embeddings as
    plain arrays searched exactly (what a server without the extension gets)."""
    config = alembic_config(database_url)
    config.attributes["pgvector"] = pgvector
    command.upgrade(config, revision)
    if revision == "head":
        seed_builtin_models(database_url)


def current_revision(database_url: str) -> str | None:
    """The schema's alembic revision now (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()


def schema_is_current(database_url: str) -> tuple[bool, str | None, str | None]:
    """(ready, the database's revision, this code's head). Ready when the database is at this code's head or
    past it (a revision this code does not know: a newer release migrated it, and migrations stay backward
    compatible, so an older pod of a rollout or a rollback still runs)."""
    from alembic.script import ScriptDirectory

    current, head = current_revision(database_url), head_revision()
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config("postgresql://")).walk_revisions()}
    return current is not None and (current == head or current not in known), current, head


def seed_builtin_models(database_url: str) -> None:
    """The services' built-in models into the registry: declared in code, not in migration files."""
    from percept.db import registry
    from percept.db.session import session_scope
    from percept.services import catalog

    with session_scope(database_url) as session:
        registry.seed_builtin(session, catalog().models)
        session.commit()
