"""The job queue: a repository over the ``jobs`` table (DESIGN.md §5).

Every state change is ONE SQL statement whose ``WHERE`` clause states the transition it makes,
never a read-modify-write in Python, so concurrent API requests, workers and the reaper cannot
interleave badly:

* **claim** — the oldest queued job becomes ``running`` with ``attempt = attempt + 1`` and a lease
  (``lease_owner``, ``lease_expires_at``). PostgreSQL picks the row with
  ``SELECT … FOR UPDATE SKIP LOCKED`` inside the ``UPDATE`` (concurrent claimers skip each other's
  rows instead of queueing behind them); SQLite runs the same conditional ``UPDATE … RETURNING``
  inside ``BEGIN IMMEDIATE`` (one writer at a time; waiting ones sit in the busy timeout).
* **fencing** — a worker's lease is the pair (worker id, attempt). Every worker write
  (:func:`heartbeat`, :func:`report_progress`, :func:`finish`, :func:`fail`,
  :func:`mark_cancelled`) is conditioned on ``attempt = :attempt AND lease_owner = :worker AND
  status = 'running'`` and reports whether it applied: a worker that lost its lease (paused past
  it, re-queued by the reaper, claimed again by another worker) changes nothing.
* **reap** — running jobs whose lease expired go back to ``queued`` while ``attempt <
  max_attempts``, else to ``failed`` (``error_kind = 'lease_expired'``); if a cancel had been
  requested they become ``cancelled``.
* **cancel** — cooperative: a queued job is cancelled at once, a running one gets
  ``cancel_requested`` which its worker sees in :func:`heartbeat`'s result (or
  :func:`should_stop`) and acknowledges with :func:`mark_cancelled`.
* **retry** — a failed or cancelled job is queued again with fresh attempts
  (:func:`retry`); it resumes from its checkpoints.
* **delete** — a finished job's row goes (:func:`delete_job`); the API removes its run folder.

Functions for the API take a :class:`~sqlalchemy.orm.Session` (the caller commits); functions
for workers and the reaper take the :class:`~sqlalchemy.Engine` and commit their one statement.
Every time is an aware UTC datetime; ``now`` defaults to the current time and exists for tests.
Lease and presence times (:func:`claim`, :func:`heartbeat`, :func:`reap`, the workers' rows) are
read from the database server's clock on PostgreSQL, so that workers and the API on machines
whose clocks differ agree on when a lease ends (:func:`_lease_clock`, read inside the
statements; a job's start too); the other times (a job's end, its updates) are the writer's.

Workers also record their presence (:func:`worker_seen`, :func:`worker_gone`) so that the API can
say why a queued job waits (:func:`live_workers`): no worker at all, or none that takes CUDA jobs
(or jobs that name a ``data_root``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (BigInteger, Engine, Interval, and_, case, cast, delete, func, literal,
                        select, true, update)
from sqlalchemy.orm import Session

from app.db import write_transaction
from app.models import Job, JobStatus, UTCDateTime, WorkerPresence, new_id, utcnow

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
SUCCEEDED, FAILED, CANCELLED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value,
                                JobStatus.CANCELLED.value)


@dataclass(frozen=True)
class Claimed:
    """A job a worker holds: write with ``(worker_id, attempt)`` to pass the fence."""

    id: str
    owner: str
    spec: dict[str, Any]
    attempt: int
    max_attempts: int
    stage: str | None
    detail: dict[str, Any]
    lease_expires_at: datetime


@dataclass(frozen=True)
class Beat:
    """What a heartbeat found: falsy when the lease is lost (fenced out, stop at once)."""

    renewed: bool
    cancel_requested: bool = False

    def __bool__(self) -> bool:
        return self.renewed


def _insert(dialect: str):
    """The ``INSERT`` construct with ``ON CONFLICT`` of this database."""
    from sqlalchemy.dialects import postgresql, sqlite

    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]


def _lease_clock(dialect: str, now: datetime | None = None):
    """The clock leases and workers' presence are measured by, as ``at(seconds=0)``: the SQL
    value of that clock plus ``seconds``. On PostgreSQL, the database server's
    (``statement_timestamp()``, read inside the statement: no round trip of its own): workers
    and the API run on machines of their own (README, Scaling out), and a worker whose clock
    ran behind the reaper's by more than a lease had its job reaped while it heartbeat (failed
    ``lease_expired`` after ``max_attempts``; a clock ahead kept a dead worker's job
    ``running`` as much longer). On SQLite every process is on one machine, and its time text
    takes no SQL arithmetic: this process's clock. ``now`` (tests) replaces either."""
    if now is None and dialect == "postgresql":
        server = func.statement_timestamp(type_=UTCDateTime())

        def at(seconds: float = 0.0):
            return server + literal(timedelta(seconds=seconds), Interval()) if seconds else server
    else:
        base = now or utcnow()

        def at(seconds: float = 0.0):
            return _ts(base + timedelta(seconds=seconds))
    return at


def _ts(value: datetime):
    """A typed time literal (inside CASE the column type cannot be inferred)."""
    return literal(value, UTCDateTime())


# --- API side (session; caller commits) -------------------------------------------------------


def submit(session: Session, owner: str, spec: dict[str, Any], idempotency_key: str | None = None,
           *, max_attempts: int = 3, metanet_key: str | None = None,
           now: datetime | None = None) -> Job:
    """Queue a job for ``owner``. With an ``idempotency_key`` the same key of the same owner gives
    the same job (the first one's; a concurrent duplicate waits for it and gets it too)."""
    now = now or utcnow()
    values = dict(id=new_id(), owner=owner, status=QUEUED, stage=None, progress=0.0, detail={},
                  spec=spec, attempt=0, max_attempts=max_attempts, cancel_requested=False,
                  idempotency_key=idempotency_key, metanet_key=metanet_key, created_at=now,
                  updated_at=now)
    stmt = _insert(session.get_bind().dialect.name)(Job).values(**values)
    if idempotency_key is not None:
        # a no-op update on conflict makes RETURNING give the existing row (one statement)
        stmt = stmt.on_conflict_do_update(index_elements=[Job.owner, Job.idempotency_key],
                                          set_={"idempotency_key": stmt.excluded.idempotency_key})
    stmt = stmt.returning(Job)
    return session.scalars(stmt, execution_options={"populate_existing": True}).one()


def get_job(session: Session, job_id: str, owner: str | None) -> Job | None:
    """The job, if it exists and belongs to ``owner`` (``None``: any owner — internal use)."""
    stmt = select(Job).where(Job.id == job_id)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.scalars(stmt).one_or_none()


def metanet_lenders(engine: Engine, owner: str, metanet_key: str, exclude: str,
                    limit: int = 5) -> list[str]:
    """Ids of ``owner``'s succeeded jobs (newest first) whose PruningNet fingerprint is
    ``metanet_key``, other than ``exclude``: the PruningNets a new job may reuse."""
    stmt = (select(Job.id)
            .where(Job.owner == owner, Job.metanet_key == metanet_key,
                   Job.status == SUCCEEDED, Job.id != exclude)
            .order_by(Job.finished_at.desc(), Job.id).limit(limit))
    with engine.connect() as conn:
        return list(conn.execute(stmt).scalars())


def count_queued(session: Session, owner: str) -> int:
    """How many queued jobs ``owner`` has (for the per-owner queue limit)."""
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.owner == owner, Job.status == QUEUED))


def get_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    """The job ``owner`` submitted with ``key``, if any."""
    return session.scalars(select(Job).where(Job.owner == owner,
                                             Job.idempotency_key == key)).one_or_none()


def list_jobs(session: Session, owner: str, *, statuses: tuple[str, ...] = (), limit: int = 20,
              offset: int = 0) -> tuple[list[Job], int]:
    """A page of ``owner``'s jobs, newest first (optionally only these statuses), and the total
    number of jobs that match."""
    where = [Job.owner == owner]
    if statuses:
        where.append(Job.status.in_(statuses))
    total = session.scalar(select(func.count()).select_from(Job).where(*where))
    rows = session.scalars(select(Job).where(*where)
                           .order_by(Job.created_at.desc(), Job.id.desc())
                           .limit(limit).offset(offset)).all()
    return list(rows), total


def request_cancel(session: Session, job_id: str, owner: str | None,
                   *, now: datetime | None = None) -> Job | None:
    """Cancel a queued job at once, or ask the worker of a running one to stop.

    Returns the job as it is afterwards, or ``None`` when no job of ``owner`` with this id is
    queued or running (unknown → 404, already finished → 409: the caller tells them apart)."""
    now = now or utcnow()
    was_queued = Job.status == QUEUED
    stmt = (update(Job)
            .where(Job.id == job_id, Job.status.in_((QUEUED, RUNNING)))
            .values(status=case((was_queued, CANCELLED), else_=Job.status),
                    cancel_requested=true(),
                    error_kind=case((was_queued, None), else_=Job.error_kind),
                    error_message=case((was_queued, None), else_=Job.error_message),
                    finished_at=case((was_queued, _ts(now)), else_=Job.finished_at),
                    updated_at=now)
            .returning(Job))
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.scalars(stmt, execution_options={"populate_existing": True}).one_or_none()


def retry(session: Session, job_id: str, owner: str | None, *, max_attempts: int,
          now: datetime | None = None) -> Job | None:
    """Queue a ``failed`` or ``cancelled`` job again; its next claim resumes it from the
    checkpoints in its run folder. It gets ``max_attempts`` claims more: ``attempt`` counts on
    (never back to 0), as it is the fencing token of every worker write. ``cancel_requested`` is
    cleared; the error stays until the next outcome (:func:`finish` clears it). A job a worker
    holds is ``running``, never failed or cancelled, so no lease is taken from a worker.

    Returns the job as it is afterwards, or ``None`` when no job of ``owner`` with this id is
    failed or cancelled (unknown → 404, queued, running or succeeded → 409: the caller tells
    them apart)."""
    now = now or utcnow()
    stmt = (update(Job)
            .where(Job.id == job_id, Job.status.in_((FAILED, CANCELLED)))
            .values(status=QUEUED, max_attempts=Job.attempt + max_attempts,
                    cancel_requested=False, finished_at=None, lease_owner=None,
                    lease_expires_at=None, updated_at=now)
            .returning(Job))
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.scalars(stmt, execution_options={"populate_existing": True}).one_or_none()


def delete_job(session: Session, job_id: str, owner: str | None) -> bool:
    """Delete a finished (``succeeded``, ``failed`` or ``cancelled``) job's row; whether one
    was deleted (``False``: unknown → 404, queued or running → 409: the caller tells them
    apart). No worker holds a finished job, so none loses its lease; one whose lease had expired
    and that still runs is fenced out of every write by the row's absence."""
    stmt = delete(Job).where(Job.id == job_id, Job.status.in_((SUCCEEDED, FAILED, CANCELLED)))
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.execute(stmt).rowcount == 1


# --- worker side (engine; one statement, committed) -------------------------------------------


def _fence(job_id: str, worker_id: str, attempt: int):
    return and_(Job.id == job_id, Job.attempt == attempt, Job.lease_owner == worker_id,
                Job.status == RUNNING)


def claim(engine: Engine, worker_id: str, *, lease_seconds: float = 60.0, cuda: bool = True,
          data_root: bool = True, now: datetime | None = None) -> Claimed | None:
    """Atomically take the oldest queued job (``None`` when there is none); ``cuda=False``:
    the oldest whose spec does not ask for ``cuda`` (a worker without a GPU leaves those);
    ``data_root=False``: the oldest without a ``data_root`` (a worker without dataset roots
    leaves those to one that has them)."""
    claimable = Job.status == QUEUED
    if not cuda:
        claimable = and_(claimable, Job.spec["device"].as_string().is_distinct_from("cuda"))
    if not data_root:
        claimable = and_(claimable, Job.spec["data_root"].as_string().is_(None))
    oldest = (select(Job.id).where(claimable)
              .order_by(Job.created_at, Job.id).limit(1)
              .with_for_update(skip_locked=True)  # PostgreSQL; SQLite: BEGIN IMMEDIATE
              .scalar_subquery())
    at = _lease_clock(engine.dialect.name, now)
    stmt = (update(Job)
            .where(Job.id == oldest, Job.status == QUEUED)
            .values(status=RUNNING, attempt=Job.attempt + 1, lease_owner=worker_id,
                    lease_expires_at=at(lease_seconds), cancel_requested=False,
                    started_at=func.coalesce(Job.started_at, at()), updated_at=at())
            .returning(Job.id, Job.owner, Job.spec, Job.attempt, Job.max_attempts,
                       Job.stage, Job.detail, Job.lease_expires_at))
    with write_transaction(engine) as conn:
        row = conn.execute(stmt).one_or_none()
    return None if row is None else Claimed(*row)


def _worker_write(engine: Engine, job_id: str, worker_id: str, attempt: int,
                  values: dict) -> bool:
    """A fenced update of the job; whether (``worker_id``, ``attempt``) still held it."""
    stmt = update(Job).where(_fence(job_id, worker_id, attempt)).values(**values)
    with write_transaction(engine) as conn:
        return conn.execute(stmt).rowcount == 1


def heartbeat(engine: Engine, job_id: str, worker_id: str, attempt: int, *,
              lease_seconds: float = 60.0, now: datetime | None = None) -> Beat:
    """Renew the lease if (``worker_id``, ``attempt``) still hold it. A falsy result means the
    lease is lost: stop, write nothing more. ``cancel_requested``: stop and
    :func:`mark_cancelled`."""
    at = _lease_clock(engine.dialect.name, now)
    stmt = (update(Job).where(_fence(job_id, worker_id, attempt))
            .values(lease_expires_at=at(lease_seconds), updated_at=at())
            .returning(Job.cancel_requested))
    with write_transaction(engine) as conn:
        row = conn.execute(stmt).one_or_none()
    return Beat(False) if row is None else Beat(True, bool(row[0]))


def should_stop(engine: Engine, job_id: str, worker_id: str, attempt: int) -> bool:
    """Whether the worker must stop: lease lost, or cancel requested (a read, no renewal)."""
    with engine.connect() as conn:
        cancel = conn.execute(select(Job.cancel_requested)
                              .where(_fence(job_id, worker_id, attempt))).scalar_one_or_none()
    return cancel is None or bool(cancel)


def report_progress(engine: Engine, job_id: str, worker_id: str, attempt: int, *, stage: str,
                    progress: float, detail: dict[str, Any] | None = None,
                    now: datetime | None = None) -> bool:
    """Record the current stage, progress (0–1) and stage detail; whether it applied."""
    values = {"stage": stage, "progress": min(1.0, max(0.0, float(progress))),
              "updated_at": now or utcnow()}
    if detail is not None:
        values["detail"] = detail
    return _worker_write(engine, job_id, worker_id, attempt, values)


def _end(now: datetime) -> dict:
    return {"lease_owner": None, "lease_expires_at": None, "finished_at": now, "updated_at": now}


def finish(engine: Engine, job_id: str, worker_id: str, attempt: int, *,
           detail: dict[str, Any] | None = None, now: datetime | None = None) -> bool:
    """The job succeeded; whether this worker still held it (exactly one completion)."""
    now = now or utcnow()
    # an earlier attempt's error (a retried one) is no longer why anything failed
    values = {"status": SUCCEEDED, "stage": "done", "progress": 1.0, "error_kind": None,
              "error_message": None, **_end(now)}
    if detail is not None:
        values["detail"] = detail
    return _worker_write(engine, job_id, worker_id, attempt, values)


def fail(engine: Engine, job_id: str, worker_id: str, attempt: int, *, error_kind: str,
         error_message: str, retry: bool = False, now: datetime | None = None) -> bool:
    """The attempt failed. ``retry``: re-queue while attempts are left (a transient error) —
    or, if a cancel was requested meanwhile, cancel it —, else the job fails for good. Whether
    this worker still held the job."""
    now = now or utcnow()
    # a cancel requested meanwhile wins over a retry: re-queued, the job's next claim would
    # clear ``cancel_requested`` and run it again although its owner was told it would stop
    again = and_(literal(retry), Job.attempt < Job.max_attempts)
    requeue = and_(again, ~Job.cancel_requested)
    values = {"status": case((requeue, QUEUED), (again, CANCELLED), else_=FAILED),
              "error_kind": case((and_(again, ~requeue), None), else_=error_kind),
              "error_message": case((and_(again, ~requeue), None), else_=error_message),
              **_end(now),
              "finished_at": case((requeue, None), else_=_ts(now))}
    return _worker_write(engine, job_id, worker_id, attempt, values)


def mark_cancelled(engine: Engine, job_id: str, worker_id: str, attempt: int, *,
                   now: datetime | None = None) -> bool:
    """The worker stopped on a cancel request; whether it still held the job."""
    now = now or utcnow()
    stmt = (update(Job).where(_fence(job_id, worker_id, attempt), Job.cancel_requested)
            .values(status=CANCELLED, error_kind=None, error_message=None, **_end(now)))
    with write_transaction(engine) as conn:
        return conn.execute(stmt).rowcount == 1


def release(engine: Engine, job_id: str, worker_id: str, attempt: int, *,
            error_kind: str | None = None, error_message: str | None = None,
            now: datetime | None = None) -> bool:
    """The worker is shutting down and stopped the job at a checkpoint, or cannot run it but
    another worker can (``error_kind``/``error_message`` then say why: a worker set up
    otherwise than the API): give it back to the queue without using up an attempt (the next
    claim resumes it from its run folder). A job whose cancel was requested meanwhile becomes
    ``cancelled`` instead (a queued job's cancel would otherwise be lost: claiming clears
    ``cancel_requested``). Fenced like every worker write; whether this worker still held the
    job."""
    now = now or utcnow()
    cancelled = Job.cancel_requested
    kind, message = ((Job.error_kind, Job.error_message) if error_kind is None
                     else (literal(error_kind), literal(error_message)))
    stmt = (update(Job).where(_fence(job_id, worker_id, attempt))
            .values(status=case((cancelled, CANCELLED), else_=QUEUED),
                    attempt=case((cancelled, Job.attempt), else_=Job.attempt - 1),
                    finished_at=case((cancelled, _ts(now)), else_=None),
                    error_kind=case((cancelled, None), else_=kind),
                    error_message=case((cancelled, None), else_=message),
                    lease_owner=None, lease_expires_at=None, updated_at=now))
    with write_transaction(engine) as conn:
        return conn.execute(stmt).rowcount == 1


# --- reaper ------------------------------------------------------------------------------------


def reap(engine: Engine, now: datetime | None = None) -> dict[str, str]:
    """Settle running jobs whose lease expired: re-queue (attempts left), fail
    (``lease_expired``), or cancel (cancel requested). Returns ``{job id: new status}``."""
    cancelled = Job.cancel_requested
    retry = Job.attempt < Job.max_attempts
    at = _lease_clock(engine.dialect.name, now)
    stmt = (update(Job)
            .where(Job.status == RUNNING, Job.lease_expires_at < at())
            .values(status=case((cancelled, CANCELLED), (retry, QUEUED), else_=FAILED),
                    error_kind=case((cancelled, None), (retry, Job.error_kind),
                                    else_="lease_expired"),
                    error_message=case(
                        (cancelled, None), (retry, Job.error_message),
                        else_=literal("the worker's lease expired on the last allowed "
                                      "attempt")),
                    finished_at=case((and_(~cancelled, retry), None), else_=at()),
                    lease_owner=None, lease_expires_at=None, updated_at=at())
            .returning(Job.id, Job.status))
    with write_transaction(engine) as conn:
        return {job_id: status for job_id, status in conn.execute(stmt)}


def housekeeping(engine: Engine, *, lease_seconds: float) -> dict[str, str]:
    """What every worker, and the API, does every half lease: :func:`reap` (so that the job of
    a worker that died goes back to the queue even while no worker runs) and
    :func:`forget_workers` not seen for two leases. Returns what :func:`reap` did."""
    reaped = reap(engine)
    forget_workers(engine, unseen_s=2 * lease_seconds)
    return reaped


# --- workers' presence ------------------------------------------------------------------------


def worker_seen(engine: Engine, worker_id: str, *, cuda: bool, dataset_roots: bool = False,
                now: datetime | None = None) -> None:
    """Record that ``worker_id`` is running (``cuda``: it claims the jobs that ask for CUDA;
    ``dataset_roots``: those that name a ``data_root``): its row is made or renewed, in one
    upsert."""
    at = _lease_clock(engine.dialect.name, now)
    stmt = _insert(engine.dialect.name)(WorkerPresence).values(
        id=worker_id, cuda=cuda, dataset_roots=dataset_roots, started_at=at(), seen_at=at())
    stmt = stmt.on_conflict_do_update(
        index_elements=[WorkerPresence.id],
        set_={"seen_at": at(), "cuda": cuda, "dataset_roots": dataset_roots})
    with write_transaction(engine) as conn:
        conn.execute(stmt)


def worker_gone(engine: Engine, worker_id: str) -> None:
    """The worker stopped: forget it."""
    with write_transaction(engine) as conn:
        conn.execute(delete(WorkerPresence).where(WorkerPresence.id == worker_id))


def forget_workers(engine: Engine, *, unseen_s: float, now: datetime | None = None) -> int:
    """Delete the rows of workers not seen for ``unseen_s`` seconds (killed, machine lost);
    how many."""
    since = _lease_clock(engine.dialect.name, now)(-unseen_s)
    with write_transaction(engine) as conn:
        return conn.execute(delete(WorkerPresence).where(WorkerPresence.seen_at < since)).rowcount


class LiveWorkers(NamedTuple):
    """Workers that reported recently: all of them, those that claim the jobs that ask for
    CUDA, those that claim the jobs that name a ``data_root``."""
    total: int
    cuda: int
    dataset_roots: int


def live_workers(session: Session, *, within_s: float,
                 now: datetime | None = None) -> LiveWorkers:
    """How many workers reported within the last ``within_s`` seconds."""
    since = _lease_clock(session.get_bind().dialect.name, now)(-within_s)
    row = session.execute(select(func.count(), func.count().filter(WorkerPresence.cuda),
                                 func.count().filter(WorkerPresence.dataset_roots))
                          .where(WorkerPresence.seen_at >= since)).one()
    return LiveWorkers(*(int(n) for n in row))


# --- reads for /metrics and /v1/configurations ------------------------------------------------


def count_by_status(session: Session) -> dict[str, int]:
    """How many jobs there are in each status (all owners; one ``GROUP BY``)."""
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def _result_macs():
    # BIGINT: as_integer() casts to a 32-bit INTEGER on PostgreSQL, and MACs exceed 2**31
    return cast(Job.detail[("result", "metapruning", "macs")].as_string(), BigInteger)


def list_configurations(session: Session, owner: str, *, arch: str | None = None,
                        dataset: str | None = None, min_macs: int | None = None,
                        max_macs: int | None = None, limit: int = 20,
                        offset: int = 0) -> tuple[list[Job], int]:
    """A page of ``owner``'s succeeded jobs that stored a MetaPruning result, filtered in SQL by
    the spec's ``arch`` and ``dataset`` and the result's MACs (JSON path access that works on
    SQLite and PostgreSQL), newest first, and the total number that match."""
    macs = _result_macs()
    where = [Job.owner == owner, Job.status == SUCCEEDED, macs.is_not(None)]
    if arch is not None:
        where.append(Job.spec["arch"].as_string() == arch)
    if dataset is not None:
        where.append(Job.spec["dataset"].as_string() == dataset)
    if min_macs is not None:
        where.append(macs >= min_macs)
    if max_macs is not None:
        where.append(macs <= max_macs)
    total = session.scalar(select(func.count()).select_from(Job).where(*where))
    rows = session.scalars(select(Job).where(*where)
                           .order_by(Job.created_at.desc(), Job.id.desc())
                           .limit(limit).offset(offset)).all()
    return list(rows), total
