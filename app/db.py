"""Engines and migrations.

SQLite (the embedded default) is opened in WAL mode (readers never block the one writer), with a
busy timeout (a writer waits for the lock instead of failing with "database is locked") and
foreign keys on. pysqlite's own transaction handling is switched off so that SQLAlchemy emits the
``BEGIN`` itself: ``BEGIN IMMEDIATE`` for writes (:func:`write_transaction`), which takes the
write lock up front; a deferred transaction that reads and then writes can fail at once with
SQLITE_BUSY, whatever the busy timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def database_url(url: str | URL) -> URL:
    """``url`` parsed; a ``ValueError`` for one that is not a SQLite or PostgreSQL URL (the
    text is not repeated: it may hold a password)."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise ValueError("the database URL cannot be read: give sqlite:///path/to/file.db or "
                         "postgresql+psycopg://user@host/db") from None
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {u.get_backend_name()!r}: use sqlite or "
                         "postgresql")
    return u


def make_engine(url: str | URL, **kwargs) -> Engine:
    """An engine for ``url`` (``sqlite:///file.db`` or ``postgresql+psycopg://…``)."""
    u = database_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(
            u, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **kwargs)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if u.drivername == "postgresql":  # plain postgresql:// means psycopg 3 here
        u = u.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # autocommit at the driver: SQLAlchemy emits BEGIN
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe in WAL mode
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the write lock from its start on SQLite
    (``BEGIN IMMEDIATE``); an ordinary transaction elsewhere. Commits on success."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for the API's requests (``expire_on_commit=False``: rows stay readable)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None):
    """The Alembic configuration of ``migrations/`` (``url`` overrides the settings)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.attributes["url"] = url  # not set_main_option: '%' in URLs would be interpolated
    return cfg


def head_revision() -> str:
    """The newest revision in ``migrations/``: what ``upgrade`` brings a database to."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this version's migrations (not a newer version's)."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


NEWER_DATABASE = ("a newer metaprune has upgraded this database: run that version (this one "
                  "cannot go back), or give this one another database")


def upgrade(url: str, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision`` (``alembic upgrade head``); returns the
    revision the database is at afterwards. Migrations are the only way the schema is made.
    ``ValueError`` for a database a newer version has upgraded."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.util.exc import CommandError

    try:
        command.upgrade(alembic_config(url), revision)
    except CommandError as e:
        newer = f"; {NEWER_DATABASE}" if "Can't locate revision" in str(e) else ""
        raise ValueError(f"database upgrade failed: {e}{newer}") from None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
