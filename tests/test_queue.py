"""The job queue and the schema, on SQLite (a temporary file) and PostgreSQL (a fresh database on
127.0.0.1:5432, dropped afterwards; ``METAPRUNE_TEST_POSTGRES_URL`` points elsewhere)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, inspect, text
from sqlalchemy.orm import Session

from tests.conftest import emptied_engine
from app import queue
from app.db import make_engine
from app.models import Base, Job, WorkerPresence

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request):
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def engine(db_url):
    """An engine on an empty (migrated) database."""
    eng = emptied_engine(db_url)
    yield eng
    eng.dispose()


def submit(engine, owner="alice", spec=None, key=None, now=None, max_attempts=3):
    with Session(engine, expire_on_commit=False) as s:
        job = queue.submit(s, owner, spec or {"arch": "test_mobilenet_v1"}, key,
                           max_attempts=max_attempts, now=now)
        s.commit()
        return job


def job_row(engine, job_id) -> Job:
    with Session(engine) as s:
        return queue.get_job(s, job_id, None)


# --- schema -----------------------------------------------------------------------------------


def _diff(url, metadata):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    metadata)
    finally:
        eng.dispose()


def test_migrated_schema_equals_models(db_url):
    assert _diff(db_url, Base.metadata) == []
    # and the comparison does see a difference when there is one
    other = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(other)
    Table("extra", other, Column("id", Integer, primary_key=True))
    assert [d[0] for d in _diff(db_url, other)] == ["add_table"]


def test_downgrade_and_upgrade_keep_the_jobs(engine, db_url):
    """Every revision's downgrade and upgrade run on both databases, and rows survive them."""
    from alembic import command

    from app.db import alembic_config, head_revision, upgrade

    job = submit(engine, key="k")
    command.downgrade(alembic_config(db_url), "0001")  # 0003 → 0001: workers, metanet_key dropped
    try:
        with engine.connect() as conn:
            cols = conn.execute(text("SELECT * FROM jobs")).keys()
            tables = set(inspect(conn).get_table_names())
        assert "metanet_key" not in cols and "workers" not in tables
    finally:
        assert upgrade(db_url) == head_revision()
    row = job_row(engine, job.id)
    assert (row.owner, row.idempotency_key, row.metanet_key) == ("alice", "k", None)
    assert _diff(db_url, Base.metadata) == []


@pytest.mark.postgres
def test_concurrent_upgrades_of_an_empty_postgres_database_take_turns(postgres_url):
    """Several API replicas migrating one new database at once: one migrates, the others wait
    for it and find the schema at head (they used to fail on the duplicate version table)."""
    import subprocess
    import sys

    from alembic import command

    from app.db import alembic_config, head_revision

    command.downgrade(alembic_config(postgres_url), "base")
    eng = make_engine(postgres_url)
    with eng.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    eng.dispose()
    # processes, as replicas are (alembic's migration context is one per process)
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; from app.db import upgrade; "
                               "print(upgrade(sys.argv[1]))", postgres_url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, outs)] == \
        [(0, head_revision())] * 4, [err[-300:] for _, err in outs]
    assert _diff(postgres_url, Base.metadata) == []


def test_cli_db_upgrade(tmp_path):
    from pruning.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert _diff(url, Base.metadata) == []
    assert main(["db", "upgrade", "--database-url", url]) == 0  # idempotent


def test_sqlite_pragmas(sqlite_url):
    eng = make_engine(sqlite_url)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    eng.dispose()


# --- submit and claim -------------------------------------------------------------------------


def test_submit_and_idempotency(engine):
    a = submit(engine, key="k1", spec={"seed": 1})
    b = submit(engine, key="k1", spec={"seed": 2})
    assert a.id == b.id and b.spec == {"seed": 1}
    assert submit(engine, owner="bob", key="k1").id != a.id  # keys are per owner
    c, d = submit(engine), submit(engine)  # no key: always a new job
    assert len({a.id, c.id, d.id}) == 3
    assert (a.status, a.attempt, a.progress, a.created_at.tzinfo) == ("queued", 0, 0.0,
                                                                       timezone.utc)
    with Session(engine) as s:
        assert queue.count_queued(s, "alice") == 3
        assert queue.get_job(s, a.id, "bob") is None  # scoped by owner
        assert queue.get_job(s, a.id, "alice").id == a.id


def test_claim_oldest_first(engine):
    ids = [submit(engine, now=T0 + timedelta(seconds=i)).id for i in (2, 0, 1)]
    got = [queue.claim(engine, "w", now=T0 + timedelta(minutes=1)) for _ in range(4)]
    assert [g.id for g in got[:3]] == [ids[1], ids[2], ids[0]]
    assert got[3] is None
    first = got[0]
    assert first.attempt == 1 and first.lease_expires_at == T0 + timedelta(minutes=2)
    row = job_row(engine, first.id)
    assert (row.status, row.lease_owner, row.started_at) == ("running", "w",
                                                             T0 + timedelta(minutes=1))


def test_a_worker_without_cuda_leaves_the_jobs_that_ask_for_it(engine):
    """``claim(cuda=False)`` passes over a spec with ``device: cuda`` (and takes one without a
    device, or another device); ``cuda=True`` takes it."""
    wants_cuda = submit(engine, spec={"arch": "a", "device": "cuda"}, now=T0).id
    no_device = submit(engine, spec={"arch": "a"}, now=T0 + timedelta(seconds=1)).id
    on_cpu = submit(engine, spec={"arch": "a", "device": "cpu"}, now=T0 + timedelta(seconds=2)).id
    later = T0 + timedelta(minutes=1)
    got = [queue.claim(engine, "cpu-only", cuda=False, now=later) for _ in range(3)]
    assert [g and g.id for g in got] == [no_device, on_cpu, None]
    assert job_row(engine, wants_cuda).status == "queued"
    assert queue.claim(engine, "gpu", now=later).id == wants_cuda


def test_worker_presence(engine):
    """``worker_seen`` makes or renews a worker's row (one upsert); ``live_workers`` counts the
    rows seen within the window, and those of workers that claim CUDA jobs; ``forget_workers``
    deletes stale rows and ``worker_gone`` a worker's own."""
    def live(at):
        with Session(engine) as s:
            return queue.live_workers(s, within_s=60, now=at)

    queue.worker_seen(engine, "cpu", cuda=False, now=T0)
    queue.worker_seen(engine, "gpu", cuda=True, dataset_roots=True, now=T0)
    assert live(T0 + timedelta(seconds=30)) == (2, 1, 1)
    assert live(T0 + timedelta(seconds=61)) == (0, 0, 0)  # neither renewed within a minute
    queue.worker_seen(engine, "cpu", cuda=False, now=T0 + timedelta(seconds=60))
    assert live(T0 + timedelta(seconds=90)) == (1, 0, 0)
    with Session(engine) as s:
        row = s.get(WorkerPresence, "cpu")
        assert (row.started_at, row.seen_at) == (T0, T0 + timedelta(seconds=60))
    assert queue.forget_workers(engine, unseen_s=60, now=T0 + timedelta(seconds=90)) == 1  # gpu
    assert live(T0) == (1, 0, 0)
    queue.worker_gone(engine, "cpu")
    queue.worker_gone(engine, "cpu")  # already gone: nothing to do
    assert live(T0) == (0, 0, 0)


def test_many_workers_claim_each_job_once(engine, db_url):
    n_jobs, n_workers = 50, 8
    ids = {submit(engine).id for _ in range(n_jobs)}
    claimed: dict[str, list[str]] = {f"w{i}": [] for i in range(n_workers)}
    errors: list[BaseException] = []
    start = threading.Barrier(n_workers)

    def worker(name):
        eng = make_engine(db_url)  # a worker process has its own engine and connections
        try:
            start.wait()
            while (job := queue.claim(eng, name)) is not None:
                claimed[name].append(job.id)
                assert queue.finish(eng, job.id, name, job.attempt)
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=worker, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []  # in particular no "database is locked"
    all_claims = [j for js in claimed.values() for j in js]
    assert len(all_claims) == n_jobs and set(all_claims) == ids
    with Session(engine) as s:
        rows = s.query(Job).all()
    assert {(r.status, r.attempt) for r in rows} == {("succeeded", 1)}


# --- leases, fencing, reaping -----------------------------------------------------------------


def test_expired_lease_requeued_and_old_worker_fenced_out(engine):
    job = submit(engine)
    a = queue.claim(engine, "w1", lease_seconds=60, now=T0)
    assert queue.heartbeat(engine, a.id, "w1", 1, lease_seconds=60, now=T0 + timedelta(seconds=30))
    assert queue.reap(engine, now=T0 + timedelta(seconds=80)) == {}  # renewed until T0+90
    assert queue.report_progress(engine, a.id, "w1", 1, stage="metanet", progress=0.5,
                                 detail={"epoch": 1})
    assert queue.reap(engine, now=T0 + timedelta(seconds=91)) == {job.id: "queued"}
    row = job_row(engine, job.id)
    assert (row.status, row.lease_owner, row.stage, row.progress) == ("queued", None, "metanet",
                                                                      0.5)
    b = queue.claim(engine, "w2", now=T0 + timedelta(seconds=92))
    assert (b.id, b.attempt, b.stage, b.detail) == (job.id, 2, "metanet", {"epoch": 1})
    # the first worker wakes up: every write of its attempt matches nothing
    later = T0 + timedelta(seconds=93)
    beat = queue.heartbeat(engine, job.id, "w1", 1, now=later)
    assert not beat and beat.renewed is False
    assert queue.should_stop(engine, job.id, "w1", 1)
    assert not queue.report_progress(engine, job.id, "w1", 1, stage="search", progress=0.9)
    assert not queue.finish(engine, job.id, "w1", 1, now=later)
    assert not queue.fail(engine, job.id, "w1", 1, error_kind="x", error_message="y")
    assert not queue.finish(engine, job.id, "w2", 1)  # right worker, wrong attempt
    row = job_row(engine, job.id)
    assert (row.status, row.lease_owner, row.attempt, row.stage) == ("running", "w2", 2,
                                                                     "metanet")
    assert not queue.should_stop(engine, job.id, "w2", 2)
    assert queue.finish(engine, job.id, "w2", 2, detail={"best": "x"}, now=later)
    row = job_row(engine, job.id)
    assert (row.status, row.progress, row.finished_at, row.detail) == ("succeeded", 1.0, later,
                                                                       {"best": "x"})
    assert not queue.finish(engine, job.id, "w2", 2)  # exactly one completion


@pytest.mark.postgres
def test_leases_and_presence_follow_the_database_clock_not_the_worker_s(postgres_url,
                                                                         monkeypatch):
    """Workers and the API may run on different machines: a worker whose clock is ten minutes
    behind the reaper's still holds the lease it renews, and is seen as running (on PostgreSQL
    leases are measured by the database server's clock)."""
    import app.queue as q

    engine = emptied_engine(postgres_url)
    try:
        job = submit(engine)
        real = q.utcnow
        monkeypatch.setattr(q, "utcnow", lambda: real() - timedelta(minutes=10))  # the worker
        c = queue.claim(engine, "w", lease_seconds=60)
        assert queue.heartbeat(engine, job.id, "w", c.attempt, lease_seconds=60)
        queue.worker_seen(engine, "w", cuda=False)
        monkeypatch.setattr(q, "utcnow", real)  # the API, or a worker on another machine
        assert queue.reap(engine) == {}
        assert job_row(engine, job.id).status == "running"
        with Session(engine) as s:
            assert queue.live_workers(s, within_s=60) == (1, 0, 0)
        assert queue.forget_workers(engine, unseen_s=120) == 0
    finally:
        engine.dispose()


def test_poison_job_fails_after_max_attempts(engine):
    job = submit(engine, max_attempts=3)
    now = T0
    for attempt in (1, 2, 3):
        c = queue.claim(engine, f"w{attempt}", lease_seconds=10, now=now)
        assert (c.id, c.attempt) == (job.id, attempt)
        now += timedelta(seconds=11)
        assert queue.reap(engine, now=now) == {job.id: "queued" if attempt < 3 else "failed"}
    assert queue.claim(engine, "w4", now=now) is None
    row = job_row(engine, job.id)
    assert (row.status, row.attempt, row.error_kind, row.finished_at) == ("failed", 3,
                                                                          "lease_expired", now)


def test_fail_with_retry(engine):
    job = submit(engine, max_attempts=2)
    c = queue.claim(engine, "w")
    assert queue.fail(engine, job.id, "w", c.attempt, error_kind="oom", error_message="cuda",
                      retry=True)
    assert job_row(engine, job.id).status == "queued"
    c = queue.claim(engine, "w")
    assert queue.fail(engine, job.id, "w", c.attempt, error_kind="oom", error_message="cuda",
                      retry=True)  # no attempts left: failed for good
    row = job_row(engine, job.id)
    assert (row.status, row.error_kind, row.attempt) == ("failed", "oom", 2)
    assert row.finished_at is not None


@pytest.mark.parametrize("end", ["finish", "mark_cancelled", "cancel_queued", "fail", "reap",
                                 "release"])
def test_an_earlier_attempt_s_error_is_cleared_when_the_job_succeeds_or_is_cancelled(engine,
                                                                                     end):
    """``error_kind``/``error_message`` say why a job failed (or why its last attempt did,
    while it is retried): a job that succeeded on its retry, or was cancelled by any route,
    does not keep an attempt's error."""
    job = submit(engine, max_attempts=3)
    c = queue.claim(engine, "w", lease_seconds=10, now=T0)
    assert queue.fail(engine, job.id, "w", c.attempt, error_kind="internal",
                      error_message="OSError: [Errno 28] No space left on device", retry=True)
    row = job_row(engine, job.id)
    assert (row.status, row.error_kind) == ("queued", "internal")  # while it is retried

    def cancel():
        with Session(engine) as s:
            queue.request_cancel(s, job.id, "alice", now=T0)
            s.commit()

    if end == "cancel_queued":
        cancel()
    else:
        c = queue.claim(engine, "w", lease_seconds=10, now=T0)
        if end != "finish":
            cancel()
        if end == "fail":
            assert queue.fail(engine, job.id, "w", c.attempt, error_kind="storage",
                              error_message="disk full", retry=True)
        elif end == "reap":
            assert queue.reap(engine, now=T0 + timedelta(seconds=11)) == {job.id: "cancelled"}
        elif end == "release":
            assert queue.release(engine, job.id, "w", c.attempt, error_kind="worker",
                                 error_message="no dataset roots")
        else:
            assert getattr(queue, end)(engine, job.id, "w", c.attempt)
    row = job_row(engine, job.id)
    assert row.status == ("succeeded" if end == "finish" else "cancelled")
    assert (row.error_kind, row.error_message) == (None, None)


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_queued(engine):
    job = submit(engine)
    with Session(engine) as s:
        assert queue.request_cancel(s, job.id, "bob") is None  # not bob's job
        s.commit()
    assert job_row(engine, job.id).status == "queued"
    with Session(engine) as s:
        got = queue.request_cancel(s, job.id, "alice")
        s.commit()
        assert got.status == "cancelled" and got.finished_at is not None
        assert queue.request_cancel(s, job.id, "alice") is None  # already final
    assert queue.claim(engine, "w") is None


def test_cancel_running(engine):
    job = submit(engine)
    c = queue.claim(engine, "w")
    assert not queue.mark_cancelled(engine, job.id, "w", c.attempt)  # nothing was requested
    with Session(engine) as s:
        got = queue.request_cancel(s, job.id, "alice")
        s.commit()
        assert (got.status, got.cancel_requested) == ("running", True)
    beat = queue.heartbeat(engine, job.id, "w", c.attempt)
    assert beat and beat.cancel_requested
    assert queue.should_stop(engine, job.id, "w", c.attempt)
    assert queue.mark_cancelled(engine, job.id, "w", c.attempt)
    row = job_row(engine, job.id)
    assert (row.status, row.lease_owner) == ("cancelled", None)


def test_cancel_requested_then_attempt_fails_with_retry(engine):
    """A cancel asked of a running job whose attempt then fails with a transient error (a full
    disk, a crash in export) is not lost: the job is cancelled, not re-queued (its next claim
    would clear ``cancel_requested`` and run it again)."""
    job = submit(engine, max_attempts=3)
    c = queue.claim(engine, "w")
    with Session(engine) as s:
        assert queue.request_cancel(s, job.id, "alice").status == "running"
        s.commit()
    assert queue.fail(engine, job.id, "w", c.attempt, error_kind="internal",
                      error_message="OSError: [Errno 28] No space left on device", retry=True)
    row = job_row(engine, job.id)
    assert (row.status, row.lease_owner) == ("cancelled", None)
    assert row.finished_at is not None
    assert queue.claim(engine, "w2") is None


def test_cancel_requested_then_lease_expires(engine):
    job = submit(engine)
    queue.claim(engine, "w", lease_seconds=10, now=T0)
    with Session(engine) as s:
        queue.request_cancel(s, job.id, "alice", now=T0)
        s.commit()
    assert queue.reap(engine, now=T0 + timedelta(seconds=11)) == {job.id: "cancelled"}
    assert queue.claim(engine, "w2") is None


# --- retry ------------------------------------------------------------------------------------


def retry(engine, job_id, owner="alice", max_attempts=2):
    with Session(engine, expire_on_commit=False) as s:
        job = queue.retry(s, job_id, owner, max_attempts=max_attempts)
        s.commit()
        return job


def test_retry_a_failed_job_with_fresh_attempts(engine):
    """A job whose attempts were used up (a full disk: seconds) is queued again with as many
    more; its error stays until it ends again; ``attempt`` counts on."""
    job = submit(engine, max_attempts=2)
    for attempt in (1, 2):
        c = queue.claim(engine, "w")
        assert queue.fail(engine, job.id, "w", c.attempt, error_kind="storage",
                          error_message="disk full", retry=True)
    assert job_row(engine, job.id).status == "failed"
    assert retry(engine, job.id, owner="bob") is None  # not bob's job
    assert job_row(engine, job.id).status == "failed"
    got = retry(engine, job.id)
    assert (got.status, got.attempt, got.max_attempts) == ("queued", 2, 4)
    assert (got.finished_at, got.lease_owner, got.lease_expires_at) == (None, None, None)
    assert (got.error_kind, got.error_message) == ("storage", "disk full")
    assert retry(engine, job.id) is None  # queued: nothing to retry
    c = queue.claim(engine, "w")
    assert (c.id, c.attempt, c.max_attempts) == (job.id, 3, 4)
    assert queue.fail(engine, job.id, "w", c.attempt, error_kind="storage",
                      error_message="disk full", retry=True)
    assert job_row(engine, job.id).status == "queued"  # the fresh attempts retry it again
    c = queue.claim(engine, "w")
    assert queue.finish(engine, job.id, "w", c.attempt)
    row = job_row(engine, job.id)
    assert (row.status, row.attempt, row.error_kind, row.error_message) == ("succeeded", 4,
                                                                          None, None)


@pytest.mark.parametrize("state", ["queued", "running", "succeeded"])
def test_only_a_failed_or_cancelled_job_is_retried(engine, state):
    job = submit(engine)
    if state != "queued":
        c = queue.claim(engine, "w")
        if state == "succeeded":
            assert queue.finish(engine, job.id, "w", c.attempt)
    before = job_row(engine, job.id)
    assert retry(engine, job.id) is None
    after = job_row(engine, job.id)
    assert (after.status, after.attempt, after.max_attempts, after.lease_owner) == (
        before.status, before.attempt, before.max_attempts, before.lease_owner)
    assert after.status == state


@pytest.mark.parametrize("when", ["queued", "running"])
def test_a_retried_cancelled_job_is_not_cancelled_again(engine, when):
    """A cancelled job keeps ``cancel_requested``; its retry clears it: the queued job no
    longer reads as being cancelled, and the worker that claims it runs it (no cancel in its
    heartbeat or should_stop; given back at a shutdown, it is queued, not cancelled)."""
    job = submit(engine)
    if when == "running":
        c = queue.claim(engine, "w")
    with Session(engine) as s:
        queue.request_cancel(s, job.id, "alice")
        s.commit()
    if when == "running":
        assert queue.mark_cancelled(engine, job.id, "w", c.attempt)
    assert job_row(engine, job.id).cancel_requested
    got = retry(engine, job.id)
    assert (got.status, got.cancel_requested, got.finished_at) == ("queued", False, None)
    c = queue.claim(engine, "w2")
    beat = queue.heartbeat(engine, job.id, "w2", c.attempt)
    assert beat and not beat.cancel_requested
    assert not queue.should_stop(engine, job.id, "w2", c.attempt)
    assert queue.release(engine, job.id, "w2", c.attempt)  # a shutdown: queued, not cancelled
    assert job_row(engine, job.id).status == "queued"


def test_a_stale_worker_stays_fenced_out_after_a_retry(engine):
    """``attempt`` is the fencing token, so a retry never sets it back: a worker that lost its
    lease (paused past it; the job failed ``lease_expired``) writes nothing into the attempt
    the retried job's next claim makes — not even when that claim is its own worker id's
    (``--worker-id`` names a worker, and a restarted one takes the same)."""
    job = submit(engine, max_attempts=1)
    stale = queue.claim(engine, "w", lease_seconds=10, now=T0)
    assert queue.reap(engine, now=T0 + timedelta(seconds=11)) == {job.id: "failed"}
    retry(engine, job.id, max_attempts=1)
    fresh = queue.claim(engine, "w")
    assert fresh.attempt == stale.attempt + 1
    assert not queue.heartbeat(engine, job.id, "w", stale.attempt)
    assert not queue.fail(engine, job.id, "w", stale.attempt, error_kind="internal",
                          error_message="stale")
    assert not queue.finish(engine, job.id, "w", stale.attempt)
    row = job_row(engine, job.id)
    assert (row.status, row.attempt, row.error_kind) == ("running", 2, "lease_expired")
