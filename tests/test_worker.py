"""The worker (app/worker.py) on a SQLite file: a job run to success, user errors and retries,
prompt cancel, graceful shutdown, a worker killed with SIGKILL (a real process) whose job another
worker finishes from its checkpoint, and a worker that lost its lease being fenced out.

The jobs are the ``smoke`` preset on the tiny ``test_mobilenet_v2`` (seconds on one CPU thread).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from tests.conftest import (LONG_JOB as LONG, SMOKE_JOB as SPEC, job_row,
                            killed_worker_is_resumed, record_progress, submit_job as submit,
                            wait_for)
from app import queue
from app.db import make_engine, upgrade
from app.models import Job, WorkerPresence, utcnow
from app.settings import Settings
from app.worker import Progress, Worker
from pruning.checkpoint import read_json

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def db_url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'worker.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def settings(db_url, artifact_dir):
    return Settings(database_url=db_url, artifact_dir=artifact_dir, lease_seconds=10,
                    heartbeat_seconds=1)


@pytest.fixture(scope="module")
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clean(engine):
    with engine.begin() as conn:
        conn.execute(delete(Job))
    return engine


@pytest.fixture(scope="module")
def reference(settings, engine, single_thread):
    """One job run to success by an in-process worker (the uninterrupted reference)."""
    with engine.begin() as conn:
        conn.execute(delete(Job))
    job_id = submit(engine, SPEC)
    writes = []
    with pytest.MonkeyPatch.context() as mp:
        writes = record_progress(mp)
        t0 = time.monotonic()
        assert Worker(settings, "w-ref", device="cpu").run_once()
        elapsed = time.monotonic() - t0
    return job_id, job_row(engine, job_id), writes, elapsed


@contextlib.contextmanager
def worker_thread(settings, name: str, poll_seconds: float):
    """A CPU worker's ``run_forever`` in a thread: yields ``(stop, thread)``; on the way out it
    is told to stop and joined."""
    stop = threading.Event()
    worker = Worker(settings, name, device="cpu")
    thread = threading.Thread(target=worker.run_forever, args=(stop, poll_seconds))
    thread.start()
    try:
        yield stop, thread
    finally:
        stop.set()
        thread.join(60)


# --- success, errors, retries ---------------------------------------------------------------


def test_a_job_runs_to_success_with_artifacts_and_progress(reference, settings):
    job_id, job, writes, elapsed = reference
    assert job.status == "succeeded" and job.stage == "done" and job.progress == 1.0
    assert job.attempt == 1 and job.lease_owner is None and job.finished_at is not None
    assert job.error_kind is None
    art = Path(settings.artifact_dir) / "jobs" / job_id / "artifacts"
    for name in ("config.json", "model.safetensors", "model.ts", "search.json", "report.json"):
        assert (art / name).is_file(), name
    report = read_json(art / "report.json")
    result = job.detail["result"]
    assert result["metapruning"]["macs"] == report["metapruning"]["macs"]
    assert result["metapruning"]["test_accuracy"] == report["metapruning"]["test_accuracy"]
    assert result["metapruning"]["budget_use"] == report["metapruning"]["budget_use"] <= 1
    assert result["uniform"]["candidate"] == report["uniform"]["candidate"]
    # progress: every stage, never backwards, within [0, 1], throttled (~2 writes a second)
    fractions = [w["progress"] for w in writes]
    assert all(w["applied"] for w in writes)
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    stages = [w["stage"] for w in writes]
    for stage in ("data", "metanet", "search", "final", "evaluate", "export"):
        assert stage in stages
    assert len(writes) <= 2 * elapsed + 2 * len(set(stages)) + 2
    search = [w["detail"] for w in writes if w["stage"] == "search"]
    assert {"generation", "generations", "best"} <= set(search[-1])
    metanet = [w["detail"] for w in writes if w["stage"] == "metanet" and "step" in w["detail"]]
    assert {"epoch", "eta_s", "attempt"} <= set(metanet[-1])


def test_progress_weights_stages():
    p = Progress(train_baseline=False)
    assert p.update({"stage": "data"})[1] == 0.0
    assert p.update({"stage": "metanet", "step": 5, "total": 10})[1] == pytest.approx(0.225)
    assert p.update({"stage": "search", "generation": 0, "generations": 2})[1] == \
        pytest.approx(0.55)
    assert p.update({"stage": "final", "step": 10, "total": 10})[1] == pytest.approx(0.95)
    assert p.update({"stage": "metanet", "step": 1, "total": 10})[1] == pytest.approx(0.95)
    assert p.update({"stage": "done"})[1] == 1.0
    b = Progress(train_baseline=True)
    assert b.update({"stage": "baseline", "step": 0, "total": 10})[1] == pytest.approx(0.8)


@pytest.mark.parametrize("spec, kind", [
    ({"arch": "no_such_arch"}, "invalid_spec"),
    ({**SPEC, "budget": {"macs": 1}}, "invalid_spec"),   # infeasible budget
    ({**SPEC, "budget": {"macs_ratio": 2}}, "invalid_spec"),  # a budget that prunes nothing
    ({**SPEC, "metanet": {"epochs": -1}}, "invalid_spec"),
])
def test_a_bad_spec_fails_without_retry(clean, settings, spec, kind):
    job_id = submit(clean, spec)
    assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.error_kind, job.attempt) == ("failed", kind, 1)
    assert "\n" not in job.error_message and job.error_message
    assert job.finished_at is not None
    assert not Worker(settings, "w2").run_once()  # nothing left to claim


def test_an_unexpected_error_is_retried_up_to_max_attempts(clean, settings, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("pruning.pipeline.run", boom)
    job_id = submit(clean, SPEC, max_attempts=2)
    worker = Worker(settings, "w1", device="cpu")
    assert worker.run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.error_kind) == ("queued", 1, "internal")
    assert job.error_message == "RuntimeError: disk on fire second line"
    assert job.finished_at is None
    assert worker.run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.error_kind) == ("failed", 2, "internal")


def _raised_while(outer: BaseException, inner: BaseException, cause: bool) -> BaseException:
    """``outer`` raised from ``inner`` (``cause``), or while handling it."""
    try:
        try:
            raise inner
        except BaseException as e:
            if cause:
                raise outer from e
            raise outer
    except BaseException as e:
        return e


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM"])
def test_a_storage_failure_is_its_own_error_kind(code):
    """The server's storage failing (full, over quota, read-only, not writable) is ``storage``,
    retried like ``internal``: whether raised as is, or anywhere in the exception's chain."""
    from app.worker import classify

    number = getattr(errno, code)
    err = OSError(number, os.strerror(number), "/srv/x")
    assert classify(err) == ("storage", True)
    assert classify(_raised_while(RuntimeError("save failed"), err, cause=True)) == ("storage",
                                                                                      True)
    assert classify(_raised_while(RuntimeError("cleanup"), err, cause=False)) == ("storage", True)
    try:  # ``from None``: raised while handling it, but not because of it
        try:
            raise err
        except OSError:
            raise RuntimeError("unrelated") from None
    except RuntimeError as e:
        assert classify(e) == ("internal", True)


def test_a_storage_failure_s_message_keeps_what_failed():
    from app.worker import one_line

    full = OSError(errno.ENOSPC, "No space left on device")
    message = one_line(_raised_while(RuntimeError("saving the checkpoint"), full, cause=True))
    assert message.startswith("the server's storage failed, not the job;")
    assert message.endswith(": saving the checkpoint ([Errno 28] No space left on device)")


def test_other_os_errors_stay_internal_and_a_data_error_stays_data():
    from app.worker import classify, one_line
    from pruning.data import DatasetError

    for number in (errno.ENOENT, errno.EIO, errno.EMFILE, None):
        err = OSError(number, "boom") if number is not None else OSError("no errno")
        assert classify(err) == ("internal", True)
        assert one_line(err) == f"{type(err).__name__}: {err}"  # as before: no storage advice
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/train")
    assert classify(_raised_while(DatasetError("cannot read /data"), denied, cause=True)) == (
        "data", False)


def test_a_storage_failure_says_it_is_the_server_s_and_how_to_retry(clean, settings,
                                                                      monkeypatch):
    folder = Path(settings.artifact_dir)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(folder / "jobs" / "x" / "state.json"))

    monkeypatch.setattr("pruning.pipeline.run", full)
    job_id = submit(clean, SPEC, max_attempts=2)
    assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.error_kind) == ("queued", 1, "storage")  # retried
    assert job.error_message == (
        "the server's storage failed, not the job; once that is fixed, a job failed for it can "
        "be retried (`metaprune retry <job id>`, or POST /v1/jobs/<job id>/retry) and resumes "
        "from its last checkpoint: [Errno 28] No space left on device: "
        f"'<artifact folder>{os.sep}jobs{os.sep}x{os.sep}state.json'")


def test_a_worker_waits_a_backoff_after_a_failed_attempt(clean, settings, monkeypatch):
    """An attempt that failed with a retry may fail again on the same worker (its set-up, its
    disk): before its next claim the worker waits, doubling from twice the poll interval, so
    another worker can take the job."""
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("pruning.pipeline.run", boom)
    job_id = submit(clean, SPEC, max_attempts=3)
    waits = []

    class Recorded(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            if job_row(clean, job_id).status == "failed":
                self.set()
            return self.is_set()

    Worker(settings, "w-backoff", device="cpu").run_forever(Recorded(), poll_seconds=0.5)
    assert waits == [1.0, 2.0, 4.0]
    assert job_row(clean, job_id).attempt == 3


def test_a_worker_without_dataset_roots_leaves_a_data_root_job_for_one_that_has_them(
        clean, settings, tmp_path):
    """The API (with dataset roots) accepted a job naming a data_root; a worker set up without
    roots does not take it (it used to claim it and fail it, ``worker``, in seconds: one
    misconfigured worker lost the job) but runs the jobs behind it; a worker that got one
    anyway gives it back without using up an attempt."""
    roots = tmp_path / "datasets"
    (roots / "fashion-mnist").mkdir(parents=True)
    job_id = submit(clean, {**SPEC, "dataset": "fashion-mnist",
                            "data_root": str(roots / "fashion-mnist")}, max_attempts=1)
    other = submit(clean, {"arch": "no_such_arch"})
    w = Worker(settings, "w-no-roots", device="cpu")
    assert w.run_once()  # the other job, not the data_root one
    assert job_row(clean, other).status == "failed"
    assert not w.run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt) == ("queued", 0)
    # claimed by other means (e.g. a worker of an older version): given back, attempt kept
    claimed = queue.claim(clean, "w-no-roots", lease_seconds=10)
    assert claimed.id == job_id
    assert w.process(claimed) == "retry"
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.error_kind) == ("queued", 0, "worker")
    with Session(clean) as s:
        queue.request_cancel(s, job_id, "alice")
        s.commit()


def test_a_database_blip_as_the_job_ends_does_not_lose_its_result(clean, settings,
                                                                   monkeypatch):
    """The job's work is done, but the database does not answer the write that records it for
    a moment (shorter than the lease): the worker tries again instead of leaving the job
    ``running`` until its lease expires — re-queued then, or on its last attempt failed
    ``lease_expired`` with its artifacts all written."""
    from sqlalchemy.exc import OperationalError

    real, calls = queue.finish, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(queue, "finish", flaky)
    job_id = submit(clean, SPEC, max_attempts=1)
    w = Worker(settings, "w1", device="cpu")
    assert w.run_once()
    assert w.last_outcome == "succeeded" and len(calls) == 3
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("succeeded", 1, None)


def test_a_write_the_database_refuses_is_not_tried_again(clean, settings, monkeypatch):
    """The database up but refusing the write itself (a value it cannot store) would refuse it
    every time: the error reaches the claim loop at once instead of holding the worker, its
    lease renewed by the heartbeat, forever."""
    from sqlalchemy.exc import DataError

    calls = []

    def refused(*args, **kwargs):
        calls.append(1)
        raise DataError("UPDATE jobs", {}, Exception("invalid byte sequence"))

    monkeypatch.setattr(queue, "finish", refused)
    submit(clean, SPEC, max_attempts=1)
    with pytest.raises(DataError):
        Worker(settings, "w1", device="cpu").run_once()
    assert len(calls) == 1


def test_a_worker_refuses_an_artifact_folder_it_cannot_write(settings, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ValueError, match=f"the artifact folder {blocked} is not writable here "
                                         r"\(.*\): set METAPRUNE_ARTIFACT_DIR"):
        Worker(settings.model_copy(update={"artifact_dir": blocked}), "w-bad", device="cpu")


def test_a_job_s_error_does_not_show_the_server_s_paths(clean, settings, monkeypatch):
    folder = Path(settings.artifact_dir)

    def boom(*args, **kwargs):
        raise OSError(f"cannot write {folder / 'jobs' / 'x' / 'state.json'} (artifacts.1)")

    monkeypatch.setattr("pruning.pipeline.run", boom)
    job_id = submit(clean, SPEC, max_attempts=1)
    assert Worker(settings, "w-paths", device="cpu").run_once()
    message = job_row(clean, job_id).error_message
    assert message == (f"OSError: cannot write <artifact folder>{os.sep}jobs{os.sep}x{os.sep}"
                       "state.json (artifacts.1)")


def test_a_long_message_is_cut_after_the_server_s_paths_are_hidden():
    from app.worker import MAX_MESSAGE, one_line

    folder = "/srv/metaprune/artifacts"
    long = RuntimeError("x" * (MAX_MESSAGE - 40) + f" {folder}/jobs/x/state.json")
    message = one_line(long, hide=(folder,))
    assert len(message) <= MAX_MESSAGE and "/srv/" not in message
    assert " <artifact folder>/jobs/x" in message and message.endswith("…")


def test_a_corrupt_file_in_the_job_s_folder_is_deleted_and_its_step_redone(clean, settings):
    """A checkpoint damaged on disk (truncated here, after a graceful stop): the worker deletes
    it and retries; the retry redoes that step and the job succeeds. The client is told which
    file, relative to the job's folder, never the server's paths."""
    job_id = submit(clean, LONG, max_attempts=3)
    state = Path(settings.artifact_dir) / "jobs" / job_id / "metanet" / "state.safetensors"

    def train_until_a_checkpoint(name):
        with worker_thread(settings, name, 0.05) as (stop, _):
            wait_for(state.exists, what="a PruningNet checkpoint")
        assert job_row(clean, job_id).status == "queued" and state.exists()

    train_until_a_checkpoint("w1")
    state.write_bytes(state.read_bytes()[:100])
    assert Worker(settings, "w2", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.error_kind, job.attempt) == ("queued", "corrupt_file", 1)
    assert job.error_message == ("metanet/state.safetensors was unreadable (corrupt or "
                                 "truncated) and was deleted; the step that wrote it runs again")
    assert str(settings.artifact_dir) not in job.error_message and not state.exists()
    train_until_a_checkpoint("w3")  # the retry trains the PruningNet again
    from pruning.checkpoint import load_tensors
    assert load_tensors(state)  # readable
    with Session(clean) as s:
        queue.request_cancel(s, job_id, "alice")
        s.commit()


def test_a_run_folder_deleted_while_the_job_ran_starts_the_job_over(clean, settings, caplog):
    """The folder removed under a running attempt, which wrote on into a new one (a checkpoint
    but no spec.json): the next attempt cannot resume it and does not blame the job's spec; it
    starts over and succeeds."""
    job_id = submit(clean, SPEC)
    run_dir = Path(settings.artifact_dir) / "jobs" / job_id
    (run_dir / "metanet").mkdir(parents=True)
    (run_dir / "metanet" / "state.safetensors").write_bytes(b"left by the attempt that ran on")
    with caplog.at_level("WARNING", logger="metaprune.worker"):
        assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.error_kind, job.attempt) == ("succeeded", None, 1)
    assert "lost its spec.json" in caplog.text
    assert read_json(run_dir / "spec.json")["arch"] == SPEC["arch"]


@pytest.mark.parametrize("name, max_attempts", [("metanet/state.safetensors", 1),
                                                ("data.json", 3)])
def test_a_corrupt_file_is_kept_when_it_cannot_be_redone(clean, settings, monkeypatch, name,
                                                        max_attempts):
    """No attempt left, or the record the run checks its data against: the job fails, naming
    the file (relative to its folder), and the file stays for the operator to look at."""
    from pruning.checkpoint import read_json

    def damaged(spec, run_dir, **kwargs):
        path = Path(run_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"truncated": ')
        read_json(path)

    monkeypatch.setattr("pruning.pipeline.run", damaged)
    job_id = submit(clean, SPEC, max_attempts=max_attempts)
    assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.error_kind, job.attempt) == ("failed", "corrupt_file", 1)
    assert job.error_message == f"{name} is unreadable, corrupt or truncated"
    assert (Path(settings.artifact_dir) / "jobs" / job_id / name).exists()


@pytest.mark.parametrize("text", ['{"arch": "test_mob', "[]"])
def test_a_damaged_spec_json_fails_the_job_naming_it(clean, settings, text):
    """The worker reads a resumed job's ``spec.json`` before the pipeline does (which PruningNet
    it adopted): a damaged one fails the job at once as ``corrupt_file``, naming the file, as
    the README says — not retried as an ``internal`` JSONDecodeError up to max_attempts."""
    job_id = submit(clean, SPEC, max_attempts=3)
    run_dir = Path(settings.artifact_dir) / "jobs" / job_id
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(text)
    assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.error_kind, job.attempt) == ("failed", "corrupt_file", 1)
    assert job.error_message == "spec.json is unreadable, corrupt or truncated"
    assert (run_dir / "spec.json").read_text() == text  # kept for the operator


def test_a_job_failed_for_a_full_disk_is_retried_and_resumes_from_its_checkpoint(
        reference, clean, settings, monkeypatch):
    """The disk fills at the PruningNet's second checkpoint and the job's one attempt fails
    (``storage``); once retried, the next worker resumes it from the first checkpoint (one
    interval lost, not the job) and it ends as the uninterrupted run does."""
    import pruning.checkpoint

    job_id = submit(clean, SPEC, max_attempts=1)
    state = Path(settings.artifact_dir) / "jobs" / job_id / "metanet" / "state.safetensors"
    original, writes = pruning.checkpoint.atomic_write_bytes, []

    def disk_fills(path, data):
        if Path(path).parts[-2:] == ("metanet", "state.safetensors"):
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, data)

    with monkeypatch.context() as mp:
        mp.setattr(pruning.checkpoint, "atomic_write_bytes", disk_fills)
        assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.error_kind, job.attempt) == ("failed", "storage", 1)
    assert state.exists() and len(writes) == 2

    with Session(clean) as s:
        assert queue.retry(s, job_id, "alice", max_attempts=settings.max_attempts)
        s.commit()
    progress = record_progress(monkeypatch)
    assert Worker(settings, "w2", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.error_kind, job.error_message) == ("succeeded", 2,
                                                                          None, None)
    first_metanet = next(w for w in progress if w["stage"] == "metanet")
    assert first_metanet["detail"]["step"] >= 3  # from the checkpoint (every 3 steps), not 0
    ref_id, ref_row = reference[:2]
    art = Path(settings.artifact_dir) / "jobs"
    assert read_json(art / job_id / "artifacts" / "search.json")["history"] == \
        read_json(art / ref_id / "artifacts" / "search.json")["history"]
    assert job.detail["result"] == ref_row.detail["result"] | {
        "elapsed_s": job.detail["result"]["elapsed_s"]}


# --- cancel, shutdown -----------------------------------------------------------------------


def test_cancel_while_running_is_prompt_and_the_worker_takes_the_next_job(clean, settings):
    first = submit(clean, LONG)
    second = submit(clean, {"arch": "no_such_arch"})
    with worker_thread(settings, "w1", 0.05) as (_, thread):
        wait_for(lambda: job_row(clean, first).stage == "metanet", what="the first job to train")
        t0 = time.monotonic()
        with Session(clean) as s:
            assert queue.request_cancel(s, first, "alice").status == "running"
            s.commit()
        wait_for(lambda: job_row(clean, first).status == "cancelled", timeout=10,
                 what="the cancel")
        assert time.monotonic() - t0 < 5
        wait_for(lambda: job_row(clean, second).status == "failed", timeout=30,
                 what="the next job")
    assert not thread.is_alive()
    job = job_row(clean, first)
    assert job.lease_owner is None and job.finished_at is not None and job.attempt == 1


def test_shutdown_gives_the_job_back_at_a_checkpoint(clean, settings):
    """...and the worker's presence, renewed every heartbeat while it trains, is removed."""
    def presence():
        with Session(clean) as s:
            return s.get(WorkerPresence, "w1", populate_existing=True)

    job_id = submit(clean, LONG)
    with worker_thread(settings, "w1", 0.05) as (stop, thread):
        wait_for(lambda: job_row(clean, job_id).stage == "metanet", what="training")
        assert presence().cuda  # --device cpu runs every job, those asking for CUDA too
        wait_for(lambda: presence().seen_at > presence().started_at, timeout=10,
                 what="a renewal of the worker's presence")
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
    job = job_row(clean, job_id)
    # queued again without using up an attempt; no error recorded
    assert (job.status, job.attempt, job.error_kind, job.lease_owner) == ("queued", 0, None, None)
    assert presence() is None


# --- a killed worker, a fenced-out worker -----------------------------------------------------


def test_a_killed_worker_s_job_is_finished_from_its_checkpoint(reference, clean, settings,
                                                                 monkeypatch):
    killed_worker_is_resumed(clean, settings, SPEC, reference[:2], monkeypatch)


def test_a_worker_that_lost_its_lease_stops_and_is_fenced_out(clean, settings):
    job_id = submit(clean, LONG)
    worker = Worker(settings, "w-slow", device="cpu")
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_once()))
    thread.start()
    try:
        wait_for(lambda: job_row(clean, job_id).stage == "metanet", what="training")
        # the worker "paused" past its lease: reaped, and another worker claims the job
        assert queue.reap(clean, now=utcnow() + timedelta(days=1)) == {job_id: "queued"}
        other = queue.claim(clean, "w-other", lease_seconds=600)
        assert (other.id, other.attempt) == (job_id, 2)
        before = job_row(clean, job_id)
        t0 = time.monotonic()
        thread.join(15)
        assert not thread.is_alive() and outcome == [True]
        assert time.monotonic() - t0 < 5  # stopped at its next look at the lease
    finally:
        thread.join(60)
    after = job_row(clean, job_id)
    for field in ("status", "attempt", "lease_owner", "lease_expires_at", "stage", "progress",
                  "detail", "updated_at", "error_kind"):
        assert getattr(after, field) == getattr(before, field), field
    # and any write it still tried would not apply
    assert not queue.report_progress(clean, job_id, "w-slow", 1, stage="metanet", progress=0.9)
    assert not queue.finish(clean, job_id, "w-slow", 1)
    assert not queue.heartbeat(clean, job_id, "w-slow", 1)
    assert queue.heartbeat(clean, job_id, "w-other", 2)


def test_a_worker_cut_off_from_the_database_stops_writing_before_its_lease_ends(
        clean, settings, monkeypatch):
    """Heartbeats that cannot reach the database do not renew the lease: by its own clock the
    worker stops at the lease's end (less a margin), before the reaper can give the job to
    another, and no file of the run folder changes after that."""
    from sqlalchemy.exc import OperationalError

    from pruning import checkpoint

    short = settings.model_copy(update={"lease_seconds": 3})
    job_id = submit(clean, LONG)
    worker = Worker(short, "w-cut", device="cpu")
    job = queue.claim(clean, "w-cut", lease_seconds=3)
    outcome, writes = [], []
    real_replace = os.replace

    def replace(src, dst):
        writes.append(time.monotonic())
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    thread = threading.Thread(target=lambda: outcome.append(worker.process(job)))
    thread.start()
    try:
        wait_for(lambda: job_row(clean, job_id).stage == "metanet", what="training")

        def unreachable(*args, **kwargs):
            raise OperationalError("UPDATE …", {}, Exception("connection refused"))

        for name in ("heartbeat", "report_progress", "should_stop", "housekeeping"):
            monkeypatch.setattr(queue, name, unreachable)
        cut = time.monotonic()
        thread.join(20)
        assert not thread.is_alive() and outcome == ["lost"]
    finally:
        thread.join(60)
    assert writes and max(writes) < cut + 3  # the last renewal came before the cut
    assert job_row(clean, job_id).status == "running"  # for the reaper to re-queue


def test_the_write_fence_refuses_a_file_and_leaves_nothing(tmp_path):
    from pruning.checkpoint import WriteRefused, atomic_write_bytes, write_fence

    def lost():
        raise WriteRefused("lease lost")

    atomic_write_bytes(tmp_path / "a", b"1")
    with write_fence(lost), pytest.raises(WriteRefused):
        atomic_write_bytes(tmp_path / "a", b"2")
    atomic_write_bytes(tmp_path / "b", b"3")  # the fence ended with its block
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_bytes() == b"1"


def test_the_worker_command_stops_gracefully_on_sigterm(clean, settings):
    job_id = submit(clean, LONG)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pruning.cli", "worker", "--device", "cpu", "--poll-seconds",
         "0.1", "--database-url", settings.database_url, "--artifact-dir",
         str(settings.artifact_dir), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: job_row(clean, job_id).stage == "metanet", what="training")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("queued", 0, None)


def test_told_to_leave_at_once_the_worker_still_gives_the_job_back(clean, settings, monkeypatch):
    """The worker command's second signal raises ``SystemExit`` wherever the job is (no wait
    for a checkpoint): the job goes back to the queue without using up an attempt, not left
    running until its lease expires."""
    import pruning.pipeline

    def leave_now(*args, **kwargs):
        raise SystemExit(128 + signal.SIGTERM)

    monkeypatch.setattr(pruning.pipeline, "run", leave_now)
    job_id = submit(clean, SPEC)
    with pytest.raises(SystemExit):
        Worker(settings, "w-leaving", device="cpu").run_once()
    job = job_row(clean, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("queued", 0, None)


def test_a_worker_without_cuda_runs_the_other_jobs_and_leaves_the_cuda_one(clean, settings,
                                                                          monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    wants_cuda = submit(clean, {**SPEC, "device": "cuda"})
    on_cpu = submit(clean, SPEC)
    worker = Worker(settings, "w-cpu")  # device auto: each job's own device
    assert worker.run_once() and not worker.run_once()
    assert job_row(clean, on_cpu).status == "succeeded"
    assert (job_row(clean, wants_cuda).status, job_row(clean, wants_cuda).attempt) == ("queued", 0)


def test_a_worker_is_seen_before_pytorch_says_whether_it_has_cuda(clean, settings):
    """Importing PyTorch takes seconds: the worker records itself first (a job submitted just
    after `serve` starts is not told that no worker runs), then says CUDA once it knows."""
    with clean.begin() as conn:
        conn.execute(delete(WorkerPresence))
    asked = threading.Event()

    class SlowToAsk(Worker):
        @property
        def accepts_cuda_jobs(self):
            asked.wait(10)
            return True

    over = threading.Event()
    thread = threading.Thread(target=SlowToAsk(settings, "w-slow")._presence_loop, args=(over,))
    thread.start()
    def seen():
        with Session(clean) as s:
            return queue.live_workers(s, within_s=60)

    try:
        wait_for(lambda: seen() == (1, 0, 0), timeout=10)
        asked.set()
        wait_for(lambda: seen() == (1, 1, 0), timeout=10)
    finally:
        asked.set()
        over.set()
        thread.join(10)


def test_the_worker_waits_out_a_database_outage(clean, settings, monkeypatch, caplog):
    """A claim that fails on the database is logged in one line and tried again (with
    backoff), not a traceback that ends the worker; ``--once`` raises it."""
    from sqlalchemy.exc import OperationalError

    job_id = submit(clean, SPEC)
    real_claim, calls = queue.claim, []

    def flaky_claim(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("SELECT …", {}, Exception("connection refused\nmore"))
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim", flaky_claim)
    with worker_thread(settings, "w-outage", 0.01):
        wait_for(lambda: job_row(clean, job_id).status == "succeeded", what="the job")
    outages = [r.getMessage() for r in caplog.records if "cannot reach the queue" in r.getMessage()]
    assert outages == [("cannot reach the queue (OperationalError: connection refused); "
                        "trying again in 0 s")] * 2
    assert all(r.exc_info is None for r in caplog.records if r.name == "metaprune.worker")
    calls.clear()
    with pytest.raises(OperationalError):
        Worker(settings, "w-once", device="cpu").run_forever(poll_seconds=0.01, once=True)


def test_a_worker_stops_when_its_database_has_lost_the_schema(settings, tmp_path):
    """A database re-created without the tables answers, but every claim fails: the worker
    stops with the start's advice instead of retrying for ever."""
    empty = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'new.db'}"})
    with pytest.raises(ValueError, match="has no metaprune schema.*`metaprune db upgrade`"):
        Worker(empty, "w-no-schema", device="cpu").run_forever(poll_seconds=0.01)


def test_the_worker_command_refuses_a_database_without_the_schema(tmp_path, capsys):
    from pruning import cli

    db = tmp_path / "never-upgraded.db"
    worker = ["worker", "--once", "--database-url", f"sqlite:///{db}",
              "--artifact-dir", str(tmp_path / "a")]
    assert cli.main(worker) == 2  # a typo in the path must not leave an empty file there
    assert capsys.readouterr().err == (f"metaprune: error: there is no database {db}: run "
                                       "`metaprune db upgrade` first (or give --database-url)\n")
    assert not db.exists()
    db.touch()  # a database without the tables
    assert cli.main(worker) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaprune: error: the database has no metaprune schema; this "
                          "version needs "), err
    assert err.endswith("run `metaprune db upgrade` first\n") and err.count("\n") == 1


def test_the_worker_command_once_on_an_unreachable_database_is_one_line(tmp_path, capsys):
    from pruning import cli

    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    assert cli.main(["worker", "--once", "--database-url", url,
                     "--artifact-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaprune: error: database: OperationalError: ") and \
        err.count("\n") == 1, err


def test_a_database_a_newer_version_upgraded_is_one_line_everywhere(tmp_path, capsys):
    """An older metaprune (this one) on a database at a revision it does not know: `db
    upgrade`, `serve` and `worker` say a newer version upgraded it, not a traceback or "run
    db upgrade"."""
    from sqlalchemy import text

    from pruning import cli

    url = f"sqlite:///{tmp_path / 'newer.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    for argv in (["db", "upgrade", "--database-url", url],
                 ["worker", "--once", "--database-url", url, "--artifact-dir",
                  str(tmp_path / "a")],
                 ["serve", "--database-url", url, "--artifact-dir", str(tmp_path / "a"),
                  "--workers", "0", "--port", "8799"]):  # refused before it listens
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a newer metaprune has upgraded this database" in err, err


def test_a_worker_with_dataset_roots_says_so_in_its_presence(clean, settings, tmp_path):
    """So that the API can tell a job that names a data_root whether any worker can take it."""
    over = threading.Event()
    over.set()  # one record, then the loop ends
    roots = settings.model_copy(update={"dataset_roots": [tmp_path]})
    Worker(roots, "w-roots", device="cpu")._presence_loop(over)
    try:
        with Session(clean) as s:
            row = s.get(WorkerPresence, "w-roots")
            assert (row.cuda, row.dataset_roots) == (True, True)
    finally:
        queue.worker_gone(clean, "w-roots")
