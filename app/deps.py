"""FastAPI dependencies: the app's settings and the database sessions opened in its lifespan.

Both are plain attributes of ``app.state`` read by ``async`` functions: no thread hop, and no
``dependency_overrides`` (while that dict is non-empty FastAPI re-inspects every route's
dependencies on every request)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings


@dataclass(frozen=True)
class Database:
    """The app's engine and its session factories. ``write`` sessions take SQLite's write lock
    when they begin (``BEGIN IMMEDIATE``), so a read-then-write cannot fail with SQLITE_BUSY."""

    engine: Engine
    read: sessionmaker[Session]
    write: sessionmaker[Session]


async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


Db = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

