"""Reliability of the job service with real processes and real databases (DESIGN.md §5):

* a process SIGKILLed while it overwrites a checkpoint (the training-state and the search-state
  writers of pruning/checkpoint.py) leaves the previous version loadable, and the writers fsync
  the file before the rename and the folder after it;
* worker processes racing on one queue (SQLite and PostgreSQL) claim every job exactly once;
* a job that kills its worker on every attempt fails for good after ``max_attempts`` lost leases;
* a worker killed mid-stage on PostgreSQL: its job is finished from the checkpoint;
* cancel through the API in every state, with a real worker process for a running job.

Jobs are the ``smoke`` preset on the tiny ``test_mobilenet_v2`` on one CPU thread, as in
test_worker.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from torch import nn

from tests.conftest import (LONG_JOB as LONG, ROOT, SMOKE_JOB as SPEC, emptied_engine, job_row, killed_worker_is_resumed, stop_process,
                            submit_job, wait_for, worker_process)
from app import queue
from app.auth import create_token
from app.main import create_app
from app.models import utcnow
from app.settings import Settings
from app.worker import Worker
from pruning.checkpoint import (atomic_write_json, load_training_state, read_json,
                                save_training_state)

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(180)]



@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request):
    return request.getfixturevalue(f"{request.param}_url")


def service_settings(url, tmp_path, **overrides) -> Settings:
    return Settings(database_url=url, artifact_dir=tmp_path / "artifacts", lease_seconds=10,
                    heartbeat_seconds=1, **overrides)


# --- 1. a kill during a checkpoint write ------------------------------------------------------

# One version of each checkpoint is ~32 MB and says which version it is in every byte that
# matters: the training state of a 2048×2048 linear layer whose weights and bias are all ``v``,
# its SGD momentum buffers all ``-v``, metadata ``{"version": v}``; the search-state-like JSON
# ``{"version": v, "payload": 16 strings of "0000000v" × 250,000}``.
SIDE, STRINGS, REPEAT = 2048, 16, 250_000

# The writer: imports torch once (2+ s here), writes version 0, then for every line ``first log``
# on stdin forks a child that writes versions first, first+1, … with the project's writers,
# appending each version to ``log`` once its write has returned, until it is killed; the
# parent prints the child's pid, then its wait status. Forking saves the import per kill; a
# child dies with the writer, the writer with the test (PR_SET_PDEATHSIG).
WRITER = r"""
import ctypes, os, signal, sys

def die_with_parent():  # Linux: never outlive the test (or the writer) as an orphan
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

die_with_parent()
import torch
from torch import nn
from pruning.checkpoint import atomic_write_json, save_training_state

kind, path = sys.argv[1:3]
SIDE, STRINGS, REPEAT = map(int, sys.argv[3:6])
torch.set_num_threads(1)
module = nn.Linear(SIDE, SIDE)
opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
for p in module.parameters():
    p.grad = torch.zeros_like(p)
opt.step()  # makes the momentum buffers

def write(v):
    if kind == "tensors":
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(v)
                opt.state[p]["momentum_buffer"].fill_(-v)
        save_training_state(path, module, opt, {"version": v})
    else:
        atomic_write_json(path, {"version": v, "payload": [f"{v:08d}" * REPEAT] * STRINGS})

write(0)
print("ready", flush=True)
for line in sys.stdin:
    first, log = line.split()
    pid = os.fork()
    if pid == 0:
        die_with_parent()
        try:
            with open(log, "a") as f:
                v = int(first)
                while True:
                    write(v)
                    f.write(f"{v}\n")
                    f.flush()
                    v += 1
        finally:
            os._exit(3)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def load_version(kind: str, path: Path) -> int:
    """Load the checkpoint with the project's loader; the version it holds, after checking that
    every tensor / string of it belongs to that one version."""
    if kind == "tensors":
        module = nn.Linear(SIDE, SIDE)
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        v = load_training_state(path, module, opt)["version"]
        for name, p in module.named_parameters():
            assert torch.equal(p.detach(), torch.full_like(p, v)), f"{name} mixes versions"
            assert torch.equal(opt.state[p]["momentum_buffer"], torch.full_like(p, -v)), name
        return v
    state = read_json(path)
    v = state["version"]
    assert set(state) == {"version", "payload"}
    assert state["payload"] == [f"{v:08d}" * REPEAT] * STRINGS, "the payload mixes versions"
    return v


def test_the_checkpoint_writers_fsync_the_file_before_the_rename_and_the_folder_after(
        tmp_path, monkeypatch):
    """What a SIGKILL cannot show (the page cache survives a killed process, not a power cut):
    the data is flushed to the OS and fsynced in a temporary file of the target's own folder,
    then renamed over the target, then the folder is fsynced."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    module = nn.Linear(8, 8)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for target, write in ((tmp_path / "metanet" / "state.safetensors",
                           lambda p: save_training_state(p, module, opt, {"step": 1})),
                          (tmp_path / "search" / "state.json",
                           lambda p: atomic_write_json(p, {"generation": 1}))):
        events.clear()
        write(target)
        assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
        (_, synced, size), (_, src, dst), (_, folder, _) = events
        assert synced == src and dst == str(target)
        assert Path(src).parent == target.parent, "the temporary file is in another folder"
        assert re.fullmatch(rf"\.{re.escape(target.name)}\..+\.tmp", Path(src).name)
        assert size == target.stat().st_size  # everything was written before the fsync
        assert folder == str(target.parent)
        assert not Path(src).exists()


@pytest.mark.parametrize("kind", ["tensors", "json"])
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(kind, tmp_path):
    """14 SIGKILLs of a process overwriting a ~32 MB checkpoint, at varied moments (half of
    them once the write's temporary file exists): after each, the checkpoint loads with the
    project's loader and is exactly the last version whose write returned (or the one whose
    rename had just happened), and the folder holds nothing else but the writer's hidden
    ``.<name>.*.tmp`` leftovers."""
    kills = 14
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / ("state.safetensors" if kind == "tensors" else "state.json")
    temp = re.compile(rf"\.{re.escape(path.name)}\..+\.tmp")

    def temp_files() -> set[str]:
        names = set(os.listdir(folder)) - {path.name}
        # nothing but the checkpoint and the writer's own temporary files: no other name that a
        # loader could take for a checkpoint
        assert all(temp.fullmatch(n) for n in names), names
        return names

    rng = random.Random(f"kill-{kind}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(path), str(SIDE), str(STRINGS), str(REPEAT)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    mid_write, after_writes, outcomes, pid = 0, 0, [], None
    try:
        assert writer.stdout.readline() == "ready\n", writer.stderr.read()
        previous = load_version(kind, path)
        assert previous == 0
        for i in range(kills):
            before = temp_files()
            first, log = (i + 1) * 1000, tmp_path / f"done-{i}.log"
            writer.stdin.write(f"{first} {log}\n")
            writer.stdin.flush()
            pid = int(writer.stdout.readline())  # a child of the writer, ours to kill
            if i % 2:  # provably mid-write: once its temporary file exists
                deadline = time.monotonic() + 10
                while not temp_files() - before:
                    assert time.monotonic() < deadline, "the writer made no temporary file"
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.01))
            elif i % 4 == 2:  # after a complete write: between writes or in the next one
                wait_for(lambda: log.exists() and log.read_text(), timeout=30,
                         what="a complete write")
                time.sleep(rng.uniform(0, 0.3))
            else:  # anywhere: before the first write, mid-write, between writes
                time.sleep(rng.uniform(0, 0.8))
            os.kill(pid, signal.SIGKILL)
            status = int(writer.stdout.readline())
            pid = None  # reaped by the writer
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

            done = [int(v) for v in log.read_text().split()] if log.exists() else []
            version = load_version(kind, path)
            # the last version whose write returned, or the next one if the kill fell between
            # the rename and the log line; never a torn or an older one
            allowed = {done[-1], done[-1] + 1} if done else {previous, first}
            assert version in allowed, (i, version, allowed)
            left = temp_files() - before
            assert len(left) <= 1
            mid_write += bool(left)  # the kill fell between the temp file and the rename
            after_writes += bool(done)  # ... or after this run's first complete write
            outcomes.append((version, len(done), [os.path.getsize(folder / n) for n in left]))
            previous = version
    finally:
        if pid is not None:  # a child left running by a failed assertion (it holds stdout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=30)
        for name in os.listdir(folder):  # stray temporary files of killed writes: ~32 MB each
            if temp.fullmatch(name):
                os.unlink(folder / name)
    # the kills fell at different moments: mid-write (between the temporary file's creation and
    # the rename: inside write() — a truncated file — or inside fsync, as timing has it), and
    # after complete writes
    assert mid_write >= kills // 4, outcomes
    assert after_writes >= 3 and previous > 0, outcomes


def test_stale_temporaries_of_killed_writes_are_removed_on_resume(tmp_path):
    """What killed writers leave (``.<name>.*.tmp``) is removed when a run resumes, once
    untouched for a while; the checkpoints and a temporary file still being written stay."""
    from pruning.checkpoint import atomic_write_bytes, remove_stale_temporaries

    folder = tmp_path / "run"
    atomic_write_bytes(folder / "metanet" / "state.safetensors", b"checkpoint")
    stale = [folder / "metanet" / ".state.safetensors.k1.tmp", folder / ".spec.json.k2.tmp"]
    fresh = folder / "search" / ".state.json.k3.tmp"
    for f in (*stale, fresh):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"torn")
    for f in stale:
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temporaries(folder) == 2
    assert not any(f.exists() for f in stale) and fresh.exists()
    assert (folder / "metanet" / "state.safetensors").read_bytes() == b"checkpoint"


# --- 2. worker processes racing on one queue --------------------------------------------------

# A worker process's claim loop: connects, says it is ready, waits for the start file, then
# claims and finishes jobs until none is left; prints its claims and any error as JSON.
RACER = r"""
import json, sys, time
from pathlib import Path
from app import queue
from app.db import make_engine

url, name, ready, go = sys.argv[1:5]
engine = make_engine(url)
with engine.connect() as conn:
    conn.exec_driver_sql("SELECT 1")
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
claims, errors = [], []
try:
    while (job := queue.claim(engine, name)) is not None:
        claims.append([job.id, job.attempt, queue.finish(engine, job.id, name, job.attempt)])
except Exception as e:
    errors.append(f"{type(e).__name__}: {e}")
print(json.dumps({"claims": claims, "errors": errors}))
sys.exit(1 if errors else 0)
"""


def test_worker_processes_racing_claim_every_job_exactly_once(db_url, tmp_path):
    n_jobs, n_procs = 60, 6
    engine = emptied_engine(db_url)
    try:
        ids = {submit_job(engine, {"arch": "test_mobilenet_v1", "seed": i}) for i in range(n_jobs)}
        go = tmp_path / "go"
        procs = [subprocess.Popen([sys.executable, "-c", RACER, db_url, f"p{i}",
                                   str(tmp_path / f"ready-{i}"), str(go)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
                 for i in range(n_procs)]
        try:
            wait_for(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(n_procs))
                     or any(p.poll() is not None for p in procs), timeout=60,
                     what="the processes to connect")
            go.touch()  # all of them start at once
            results = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                stop_process(p)
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0 and "database is locked" not in err, (out, err)
        outputs = [json.loads(out) for out, _ in results]
        assert [o["errors"] for o in outputs] == [[]] * n_procs
        claims = [c for o in outputs for c in o["claims"]]
        assert sorted(c[0] for c in claims) == sorted(ids)  # every job, each exactly once
        assert all(attempt == 1 and finished for _, attempt, finished in claims), claims
        counts = [len(o["claims"]) for o in outputs]
        assert sum(n > 0 for n in counts) >= 2, counts  # they did race
        with Session(engine) as s:
            rows = [queue.get_job(s, job_id, None) for job_id in ids]
        assert {(r.status, r.attempt, r.lease_owner) for r in rows} == {("succeeded", 1, None)}
    finally:
        engine.dispose()


# --- 3. a poison job that kills its worker ----------------------------------------------------


def sigkill_when(proc, predicate, timeout: float, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``predicate()`` holds (it must still be running then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended early: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def test_a_job_that_kills_its_worker_fails_for_good_after_max_attempts(sqlite_url, tmp_path):
    engine = emptied_engine(sqlite_url)
    settings = service_settings(sqlite_url, tmp_path)
    lease = 3.0
    try:
        job_id = submit_job(engine, LONG, max_attempts=2)

        def lease_expired():
            row = job_row(engine, job_id)
            return row.lease_expires_at is not None and row.lease_expires_at < utcnow()

        for attempt in (1, 2):
            worker_id = f"w-poison-{attempt}"
            # the second worker's own reaper re-queues the job, then it claims attempt 2
            proc = worker_process(settings, worker_id, lease_seconds=lease)
            try:
                def training(a=attempt, w=worker_id):
                    row = job_row(engine, job_id)
                    return (row.lease_owner == w and row.attempt == a and row.stage == "metanet"
                            and row.detail.get("attempt") == a)

                sigkill_when(proc, training, 60, f"attempt {attempt} to train")
            finally:
                stop_process(proc)
            row = job_row(engine, job_id)
            assert (row.status, row.attempt, row.lease_owner) == ("running", attempt, worker_id)
            wait_for(lease_expired, timeout=lease + 5, what=f"lease {attempt} to expire")

        # a third worker: its reaper fails the job (no attempt left) and it claims nothing
        proc = worker_process(settings, "w-poison-3", "--json", lease_seconds=lease,
                              stdout=subprocess.PIPE)
        try:
            wait_for(lambda: proc.poll() is not None or job_row(engine, job_id).attempt > 2,
                     timeout=60, what="the third worker")
            assert job_row(engine, job_id).attempt == 2, "a third attempt was claimed"
            out, err = proc.communicate(timeout=30)
        finally:
            stop_process(proc)
        assert proc.returncode == 0, err
        assert json.loads(out) == {"worker": "w-poison-3", "jobs": 0}
        row = job_row(engine, job_id)
        assert (row.status, row.attempt, row.lease_owner, row.lease_expires_at) == (
            "failed", 2, None, None)
        assert row.error_kind == "lease_expired"
        assert row.error_message == "the worker's lease expired on the last allowed attempt"
        assert row.finished_at is not None
        assert queue.claim(engine, "w-poison-4") is None
        assert job_row(engine, job_id).attempt == 2
    finally:
        engine.dispose()


# --- 4. a worker killed mid-stage, on PostgreSQL ----------------------------------------------


@pytest.mark.postgres
def test_a_killed_worker_s_job_is_finished_from_its_checkpoint_postgres(postgres_url, tmp_path,
                                                                        monkeypatch):
    engine = emptied_engine(postgres_url)
    settings = service_settings(postgres_url, tmp_path)
    try:
        ref_id = submit_job(engine, SPEC)  # the uninterrupted reference, in this process
        assert Worker(settings, "w-ref", device="cpu", engine=engine).run_once()
        ref = job_row(engine, ref_id)
        assert (ref.status, ref.attempt) == ("succeeded", 1)
        killed_worker_is_resumed(engine, settings, SPEC, (ref_id, ref), monkeypatch)
    finally:
        engine.dispose()


# --- 5. cancel in every state, through the API ------------------------------------------------


def api_client(url, engine):
    """A client with auth on; ``.alice`` and ``.bob`` are their headers."""
    client = TestClient(create_app(Settings(database_url=url, require_auth=True)))
    for owner in ("alice", "bob"):
        with Session(engine) as s:
            token = create_token(s, owner, "t")
            s.commit()
        setattr(client, owner, {"Authorization": f"Bearer {token}"})
    return client


def test_cancel_of_a_finished_job_is_409_and_of_another_owners_job_404(db_url):
    engine = emptied_engine(db_url)
    try:
        with api_client(db_url, engine) as api:
            def job_in(state: str) -> str:
                job_id = api.post("/v1/jobs", json=SPEC,
                                  headers=api.alice).json()["id"]
                if state == "queued":
                    return job_id
                claimed = queue.claim(engine, f"w-{state}")
                assert claimed.id == job_id
                if state == "succeeded":
                    assert queue.finish(engine, job_id, f"w-{state}", 1)
                elif state == "failed":
                    assert queue.fail(engine, job_id, f"w-{state}", 1, error_kind="internal",
                                      error_message="boom")
                elif state == "cancelled":
                    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=api.alice)
                    assert r.status_code == 202
                    assert queue.mark_cancelled(engine, job_id, f"w-{state}", 1)
                assert job_row(engine, job_id).status == state
                return job_id

            jobs = {state: job_in(state)
                    for state in ("succeeded", "failed", "cancelled", "running", "queued")}
            before = {state: job_row(engine, job_id) for state, job_id in jobs.items()}
            # another owner's job is not found, whatever its state; nothing changes
            for state, job_id in jobs.items():
                r = api.post(f"/v1/jobs/{job_id}/cancel", headers=api.bob)
                assert (r.status_code, r.json()) == (404, {"detail": "job not found"}), state
                after = job_row(engine, job_id)
                assert (after.status, after.cancel_requested, after.updated_at) == (
                    before[state].status, before[state].cancel_requested,
                    before[state].updated_at), state
            # a finished job: a conflict naming its state; nothing changes
            for state in ("succeeded", "failed", "cancelled"):
                r = api.post(f"/v1/jobs/{jobs[state]}/cancel", headers=api.alice)
                assert (r.status_code, r.json()) == (409, {"detail": f"job already {state}"})
                after = job_row(engine, jobs[state])
                assert (after.status, after.finished_at, after.updated_at, after.error_kind) == (
                    state, before[state].finished_at, before[state].updated_at,
                    before[state].error_kind)
            assert job_row(engine, jobs["succeeded"]).cancel_requested is False
    finally:
        engine.dispose()


def test_cancel_of_a_running_job_through_the_api_stops_a_worker_process(sqlite_url, tmp_path):
    engine = emptied_engine(sqlite_url)
    settings = service_settings(sqlite_url, tmp_path)
    try:
        with api_client(sqlite_url, engine) as api:
            r = api.post("/v1/jobs", json=LONG, headers=api.alice)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            proc = worker_process(settings, "w-cancel", "--json", lease_seconds=4,
                                  stdout=subprocess.PIPE)
            try:
                wait_for(lambda: job_row(engine, job_id).stage == "metanet"
                         or proc.poll() is not None, timeout=60, what="training")
                assert proc.poll() is None, proc.stderr.read().decode()
                r = api.post(f"/v1/jobs/{job_id}/cancel", headers=api.alice)
                assert r.status_code == 202
                assert (r.json()["status"], r.json()["cancel_requested"]) == ("running", True)
                # the worker acknowledges at its next look (heartbeat or should_stop poll), then
                # its --once run is over
                wait_for(lambda: job_row(engine, job_id).status == "cancelled", timeout=15,
                         what="the worker to acknowledge the cancel")
                out, err = proc.communicate(timeout=30)
            finally:
                stop_process(proc)
            assert proc.returncode == 0, err
            assert json.loads(out) == {"worker": "w-cancel", "jobs": 1}
            job = api.get(f"/v1/jobs/{job_id}", headers=api.alice).json()
            assert (job["status"], job["attempt"]) == ("cancelled", 1)
            assert job["finished_at"] is not None and job["error_kind"] is None
            assert job_row(engine, job_id).lease_owner is None
            assert not (Path(settings.artifact_dir) / "jobs" / job_id / "artifacts").exists()
            r = api.post(f"/v1/jobs/{job_id}/cancel", headers=api.alice)
            assert (r.status_code, r.json()) == (409, {"detail": "job already cancelled"})
    finally:
        engine.dispose()
