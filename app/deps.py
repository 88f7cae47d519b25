"""FastAPI dependencies: the database sessions opened in the app's lifespan, settings, and the
job id of a path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.auth import current_owner
from app.services import NotFound
from app.settings import Settings, get_settings


@dataclass(frozen=True)
class Database:
    """The app's engine and its session factories. ``write`` sessions take SQLite's write lock
    when they begin (``BEGIN IMMEDIATE``), so a read-then-write cannot fail with SQLITE_BUSY."""

    engine: Engine
    read: sessionmaker[Session]
    write: sessionmaker[Session]


def get_database(request: Request) -> Database:
    return request.app.state.database


Db = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def job_id_of_path(job_id: Annotated[str, Path(description="the job id", max_length=64)],
                   _owner: Annotated[str, Depends(current_owner)]) -> str:
    """The ``{job_id}`` of a path (after auth). One with a NUL character is no job's (ids are
    UUIDs), and PostgreSQL refuses to compare text holding one (a 500): 404 without a query."""
    if "\x00" in job_id:
        raise NotFound("job not found")
    return job_id


JobId = Annotated[str, Depends(job_id_of_path)]
