"""Stored pruned configurations: the MetaPruning results of an owner's succeeded jobs."""

from __future__ import annotations

from typing import Any

from app import queue
from app.deps import Database
from app.models import Job
from app.services import InvalidRequest


def as_configuration(job: Job) -> dict[str, Any]:
    result = (job.detail or {}).get("result") or {}
    best = result.get("metapruning") or {}
    return {"job_id": job.id, "arch": job.spec.get("arch"), "dataset": job.spec.get("dataset"),
            "width_mult": job.spec.get("width_mult"),
            "budget": result.get("budget") or job.spec.get("budget"),
            "candidate": best.get("candidate"), "widths": best.get("widths"),
            "macs": best.get("macs"), "params": best.get("params"),
            "test_accuracy": best.get("test_accuracy"), "created_at": job.created_at}


def list_configurations(db: Database, owner: str, *, arch: str | None, dataset: str | None,
                        min_macs: int | None, max_macs: int | None, limit: int,
                        offset: int) -> tuple[list[dict[str, Any]], int]:
    if min_macs is not None and max_macs is not None and min_macs > max_macs:
        raise InvalidRequest([{"loc": ["query", "min_macs"], "type": "value_error",
                               "msg": "min_macs must not exceed max_macs"}])
    if any("\x00" in value for value in (arch, dataset) if value is not None):
        return [], 0  # no stored spec names one (and PostgreSQL refuses to compare text with NUL)
    with db.read() as session:
        jobs, total = queue.list_configurations(session, owner, arch=arch, dataset=dataset,
                                                min_macs=min_macs, max_macs=max_macs,
                                                limit=limit, offset=offset)
    return [as_configuration(j) for j in jobs], total


def job_counts(db: Database) -> dict[str, int]:
    with db.read() as session:
        return queue.count_by_status(session)
