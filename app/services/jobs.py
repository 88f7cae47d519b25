"""Jobs: submission (path rules, idempotency, the per-owner queue limit), reads, cancel, retry
and deletion."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from app import queue
from app.deps import Database
from app.models import TERMINAL, Job
from app.services import Conflict, InvalidRequest, NotFound, QuotaExceeded
from app.settings import Settings
from pruning.constraints import BudgetError
from pruning.spec import PipelineSpec, metanet_fingerprint

log = logging.getLogger("metaprune.api")


def _invalid(field: str, msg: str) -> InvalidRequest:
    # the shape of FastAPI's own validation errors, so that clients parse one format
    return InvalidRequest([{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def check_paths(spec: PipelineSpec, settings: Settings) -> None:
    """No client-supplied filesystem paths: ``data_root`` only under a configured dataset root
    (after resolving symlinks and ``..``); ``metanet_from`` never (PruningNet reuse is the
    service's business, not a path the client names)."""
    if spec.metanet_from is not None:
        raise _invalid("metanet_from", "metanet_from is not accepted over the API")
    if spec.dataset == "imagefolder" and spec.data_root is None:
        raise _invalid("data_root", "the imagefolder dataset needs a data_root: a folder of "
                       "one sub-folder per class, under one of the server's dataset roots"
                       + ("" if settings.dataset_roots else " (this server has none)"))
    problem = data_root_problem(spec.data_root, settings)
    if problem is not None:
        raise _invalid("data_root", problem)


def data_root_problem(data_root: str | None, settings: Settings) -> str | None:
    """Why ``data_root`` may not be read (``None``: it may): it must resolve (symlinks and
    ``..`` followed) under a configured dataset root. Checked when a job is submitted, and again
    by the worker that runs it (a symlink may have changed in between)."""
    if data_root is None:
        return None
    if not settings.dataset_roots:
        return ("this server accepts no data_root (no dataset roots are configured); leave it "
                "out to use the default location")
    path = Path(data_root)
    roots = [Path(os.path.realpath(r)) for r in settings.dataset_roots]
    try:
        inside = path.is_absolute() and any(Path(os.path.realpath(path)).is_relative_to(r)
                                            for r in roots)
    except (ValueError, OSError):  # e.g. an embedded NUL (PipelineSpec refuses it already)
        inside = False
    if not inside:
        return ("data_root must be an absolute path under one of the server's dataset roots: "
                + ", ".join(map(str, roots)))
    return None


def _as_now(stored: dict) -> dict:
    """A stored spec as this version writes it (fields added since take their defaults), so that
    a replay of a key used before an upgrade matches; as stored if it no longer validates."""
    try:
        return PipelineSpec.model_validate(stored).model_dump(mode="json")
    except ValueError:
        return stored


def submit_job(db: Database, settings: Settings, owner: str, spec: PipelineSpec,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Queue ``spec`` for ``owner``; returns the job and whether it is new (an
    ``idempotency_key`` already used by ``owner`` gives that job back, if the spec is the same).

    The limit check and the insert run in one write transaction, serialised per owner
    (:func:`_lock_owner`)."""
    check_paths(spec, settings)
    try:
        spec.check_budget()
    except BudgetError as e:
        raise _invalid("budget", str(e)) from None
    except ValueError as e:  # the architecture's plan (a plugin's) does not hold together
        raise _invalid("arch", str(e)) from None
    spec_json = spec.model_dump(mode="json")
    with db.write() as session:
        _lock_owner(session, owner)
        if idempotency_key is not None:
            existing = queue.get_by_idempotency_key(session, owner, idempotency_key)
            if existing is not None:
                if _as_now(existing.spec) != spec_json:
                    raise Conflict("this Idempotency-Key was used with a different spec")
                return existing, False
        _check_queue_limit(session, settings, owner, adding=1)
        job = queue.submit(session, owner, spec_json, idempotency_key,
                           max_attempts=settings.max_attempts,
                           metanet_key=metanet_fingerprint(spec))
        session.commit()
        return job, True


def _lock_owner(session: Session, owner: str) -> None:
    """Serialise the write transactions that add to ``owner``'s queue (SQLite: ``BEGIN
    IMMEDIATE`` already; PostgreSQL: a transaction-scoped advisory lock on the owner), so that
    concurrent ones cannot overshoot the queue limit."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})


def _check_queue_limit(session: Session, settings: Settings, owner: str, adding: int) -> None:
    """429 when ``owner``'s queued jobs and ``adding`` more would exceed the per-owner limit."""
    if queue.count_queued(session, owner) + adding > settings.max_queued_per_owner:
        raise QuotaExceeded(f"queue limit reached: {settings.max_queued_per_owner} queued "
                            "jobs per owner; wait for some to start or cancel them")


def live_workers(db: Database, settings: Settings) -> queue.LiveWorkers:
    """Workers that reported within a lease."""
    with db.read() as session:
        return queue.live_workers(session, within_s=settings.lease_seconds)


def waiting_reasons(db: Database, settings: Settings, jobs: list[Job]) -> dict[str, str]:
    """Why each queued job of ``jobs`` cannot start now (job id → reason; absent: it can):
    no worker reported within a lease, or none of them claims the jobs that ask for CUDA, or
    those that name a ``data_root``."""
    queued = [job for job in jobs if job.status == queue.QUEUED]
    if not queued:
        return {}
    workers = live_workers(db, settings)
    if workers.total == 0:
        reason = ("no worker is running: start one with `metaprune worker` (or `metaprune "
                  "serve`, which starts its own)")
        return {job.id: reason for job in queued}
    reasons = {}
    for job in queued:
        if job.spec.get("device") == "cuda" and workers.cuda == 0:
            reasons[job.id] = ("the job asks for CUDA and no running worker has a CUDA device: "
                               "start `metaprune worker` on a machine with a GPU")
        elif job.spec.get("data_root") is not None and workers.dataset_roots == 0:
            reasons[job.id] = ("the job names a data_root and no running worker has dataset "
                               "roots: start `metaprune worker` with METAPRUNE_DATASET_ROOTS "
                               "set as the API's")
    return reasons


def get_job(db: Database, owner: str, job_id: str) -> Job:
    with db.read() as session:
        job = queue.get_job(session, job_id, owner)
    if job is None:
        raise NotFound("job not found")
    return job


def list_jobs(db: Database, owner: str, statuses: tuple[str, ...], limit: int,
              offset: int) -> tuple[list[Job], int]:
    with db.read() as session:
        return queue.list_jobs(session, owner, statuses=statuses, limit=limit, offset=offset)


def cancel_job(db: Database, owner: str, job_id: str) -> Job:
    """Cancel a queued job, or ask a running one to stop; a finished job is a conflict."""
    with db.write() as session:
        job = queue.request_cancel(session, job_id, owner)
        if job is None:
            job = queue.get_job(session, job_id, owner)
            if job is None:
                raise NotFound("job not found")
            assert job.status in TERMINAL
            raise Conflict(f"job already {job.status}")
        session.commit()
        return job


def retry_job(db: Database, settings: Settings, owner: str, job_id: str) -> Job:
    """Queue a failed or cancelled job again, to resume from its checkpoints; any other is a
    conflict. The queue limit holds as for a submission (checked after the one ``UPDATE``, in
    its transaction: an unknown or unfinished job is still a 404 or 409, not a 429)."""
    with db.write() as session:
        _lock_owner(session, owner)
        job = queue.retry(session, job_id, owner, max_attempts=settings.max_attempts)
        if job is None:
            job = queue.get_job(session, job_id, owner)
            if job is None:
                raise NotFound("job not found")
            raise Conflict(f"job is {job.status}: only a failed or cancelled job can be retried")
        _check_queue_limit(session, settings, owner, adding=0)  # it is queued now
        session.commit()
        return job


def delete_job(db: Database, settings: Settings, owner: str, job_id: str) -> int:
    """Delete a finished job: its row, then its run folder (checkpoints, PruningNet, artifacts);
    returns the bytes freed. A queued or running job is a conflict (cancel it first). A job that
    was reusing this one's PruningNet has copied it, or copies another's or trains its own
    (the worker's fallback)."""
    with db.write() as session:
        if not queue.delete_job(session, job_id, owner):
            job = queue.get_job(session, job_id, owner)
            if job is None:
                raise NotFound("job not found")
            raise Conflict(f"job is {job.status}: cancel it first (`metaprune cancel {job_id}`"
                           f", or POST /v1/jobs/{job_id}/cancel), then delete it once it is "
                           "cancelled")
        session.commit()
    return _discard(settings.run_dir(job_id), settings.trash_dir)


def _discard(folder: Path, trash: Path) -> int:
    """Move ``folder`` into ``trash`` (one rename: it is gone from its place at once, whatever
    happens next) and remove it; returns the bytes of its files. What cannot be removed now
    stays in ``trash`` for :func:`empty_trash`."""
    if not os.path.lexists(folder):
        return 0
    size = sum(os.lstat(os.path.join(top, name)).st_size
               for top, _, names in os.walk(folder) for name in names)
    trash.mkdir(parents=True, exist_ok=True)
    moved = trash / f"{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, moved)
    except OSError:  # e.g. jobs/ mounted from another filesystem: removed where it is
        moved = folder
    _remove(moved)
    return size


def empty_trash(trash: Path) -> None:
    """Remove what :func:`_discard` left in ``trash`` (an API stopped in between, a file that
    could not be removed); the API's housekeeping calls it every half lease."""
    if trash.is_dir():
        for entry in trash.iterdir():
            _remove(entry)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as e:
        log.warning("cannot remove %s yet: %s", path, e)
