"""FastAPI dependencies: the database sessions opened in the app's lifespan, and settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

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
