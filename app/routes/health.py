"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.deps import Db
from app.schemas import Health, errors

router = APIRouter(tags=["health"])


# HEAD too: load balancers and uptime checkers often probe with it
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", response_model=Health, summary="The database is reachable",
            responses=errors(503))
def readyz(db: Db):
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 — any failure means: not ready
        return JSONResponse({"detail": f"database unreachable: {type(e).__name__}"},
                            status_code=503)
    return Health(status="ready")
