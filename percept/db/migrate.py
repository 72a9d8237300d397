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


def seed_builtin_models(database_url: str) -> None:
    """The services' built-in models into the registry: declared in code, not in migration files."""
    from percept.db import registry
    from percept.db.session import session_scope
    from percept.services import catalog

    with session_scope(database_url) as session:
        registry.seed_builtin(session, catalog().models)
        session.commit()
