"""Service settings from the environment (``METAPRUNE_*``), via pydantic-settings.

Nothing happens at import time: :func:`get_settings` reads the environment on first use and
caches the result (tests call ``get_settings.cache_clear()`` after changing the environment).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the API and the workers (each field: env ``METAPRUNE_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="METAPRUNE_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite:///./metaprune.db",
        description="SQLAlchemy URL: a SQLite file (embedded default) or "
                    "postgresql+psycopg://user@host/db (scale-out)")
    artifact_dir: Path = Field(Path("./artifacts"),
                               description="folder of job run folders and artifacts")
    lease_seconds: float = Field(60.0, gt=0, le=3600,
                                 description="a claimed job's lease; a worker renews it by heartbeat")
    heartbeat_seconds: float = Field(
        15.0, gt=0, le=600, description="how often a worker renews its lease and its presence")
    max_attempts: int = Field(3, ge=1, le=100,
                              description="claims of a job (and of each retry) before a "
                                          "failing attempt or a lost lease fails it")
    max_queued_per_owner: int = Field(20, ge=1, le=10_000,
                                      description="queued jobs one owner may have (429 beyond)")
    require_auth: bool = Field(True,
                               description="require an API token on every /v1 request; "
                                           "`metaprune serve` turns it off when it binds only to "
                                           "loopback (unless this is set) and forces it on "
                                           "otherwise; without auth the owner is 'local'")
    dataset_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders a job's data_root may lie under (env: a JSON list, or folders "
                    "separated by ':' as in PATH); none: data_root refused")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30,
                                description="largest request body, counted while streaming "
                                            "(413 beyond)")
    db_pool_size: int = Field(40, ge=1, le=1000,
                              description="database connections the API keeps open (up to 10 "
                                          "more under bursts); PostgreSQL counts them against "
                                          "max_connections")
    events_poll_seconds: float = Field(0.5, gt=0, le=60,
                                       description="how often a progress event stream "
                                                   "(GET /v1/jobs/{id}/events) reads the job")
    events_heartbeat_seconds: float = Field(15.0, gt=0, le=3600,
                                            description="a comment line keeps an idle event "
                                                        "stream open this often")

    def run_dir(self, job_id: str) -> Path:
        """A job's run folder: its checkpoints, and its artifacts in ``artifacts/``."""
        return self.artifact_dir / "jobs" / job_id

    @property
    def trash_dir(self) -> Path:
        """Run folders of deleted jobs, moved here at once and removed in the background."""
        return self.artifact_dir / "trash"

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _dataset_roots_from_text(cls, value):
        """``["/a", "/b"]`` or ``/a:/b`` (the environment gives text)."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [
                p for p in text.split(os.pathsep) if p]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read once; a FastAPI dependency)."""
    return Settings()
