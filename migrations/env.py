"""Alembic environment of the metaprune service.

The database URL comes from, in order: ``Config.attributes["url"]`` (``app.db.upgrade``),
``alembic -x url=…``, ``sqlalchemy.url`` in the ini file, the settings (``METAPRUNE_DATABASE_URL``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from app.db import make_engine
from app.models import Base

config = context.config
target_metadata = Base.metadata
MIGRATION_LOCK = 0x6D657461  # the PostgreSQL advisory lock held while migrating ("meta")


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = config.get_main_option("sqlalchemy.url")
    if not url:
        from app.settings import get_settings

        url = get_settings().database_url
    return url


def _configure(**kwargs) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True,
                      render_as_batch=True,  # SQLite cannot ALTER most things: copy-and-move
                      **kwargs)


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # API replicas starting at once: one migrates, the others wait, then find
                    # the schema at head (SQLite serialises writers by itself)
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": MIGRATION_LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
