"""`metaprune serve` as a real process: it migrates, serves, and stops its workers on SIGTERM
and on a terminal's Ctrl-C (their jobs go back to the queue), restarts a worker that died, and
leaves no orphan worker when it is killed itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import LONG_JOB, SMOKE_JOB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and "pruning.cli worker " in cmd:
                pids.append(int(d.name))
    return pids


def _start_serve(tmp_path: Path, *extra: str, env: dict | None = None
                 ) -> tuple[subprocess.Popen, int]:
    """``metaprune serve`` on a free loopback port, once ``/readyz`` answers; in a process
    group of its own, as in a terminal (Ctrl-C signals the whole group)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", "serve", "--port", str(port),
                             "--workers", "1", "--quiet", *extra],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                assert json.load(r) == {"status": "ready"}
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode()) from None
            if time.time() > deadline:
                proc.kill()
                raise AssertionError("serve did not become ready") from None
            time.sleep(0.5)


def _stop(proc: subprocess.Popen, marker: str) -> None:
    if proc.poll() is None:
        proc.kill()
    for pid in _processes_with(marker):
        os.kill(pid, signal.SIGKILL)


def test_serve_answers_and_stops_its_workers_on_sigterm(tmp_path):
    db = tmp_path / "service.db"
    proc, _ = _start_serve(tmp_path, "--database-url", f"sqlite:///{db}",
                           env={"METAPRUNE_ARTIFACT_DIR": str(tmp_path / "artifacts")})
    try:
        deadline = time.time() + 30
        while not _processes_with(str(db)):
            assert time.time() < deadline, "no worker process started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.time() + 10
        while _processes_with(str(db)):
            assert time.time() < deadline, "a worker outlived serve"
            time.sleep(0.2)
    finally:
        _stop(proc, str(db))


def test_serve_artifact_dir_reaches_the_api_and_its_workers(tmp_path):
    """``serve --artifact-dir`` (over ``$METAPRUNE_ARTIFACT_DIR``): the worker writes the job's
    run folder there and the API serves its artifacts from there."""
    db = tmp_path / "service.db"
    artifacts = tmp_path / "chosen"
    proc, port = _start_serve(tmp_path, "--database-url", f"sqlite:///{db}",
                              "--artifact-dir", str(artifacts),
                              env={"METAPRUNE_ARTIFACT_DIR": str(tmp_path / "not-this")})
    base = f"http://127.0.0.1:{port}/v1/jobs"
    try:
        request = urllib.request.Request(base, data=json.dumps(SMOKE_JOB).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            job_id = json.load(r)["id"]
        deadline = time.time() + 300
        while True:
            with urllib.request.urlopen(f"{base}/{job_id}", timeout=10) as r:
                job = json.load(r)
            if job["status"] not in ("queued", "running"):
                break
            assert time.time() < deadline, f"job still {job['status']}"
            time.sleep(1)
        assert job["status"] == "succeeded", job
        with urllib.request.urlopen(f"{base}/{job_id}/artifacts", timeout=10) as r:
            names = {item["name"] for item in json.load(r)["items"]}
        assert {"config.json", "model.safetensors", "report.json"} <= names
        assert list(artifacts.rglob("model.safetensors"))
        assert not (tmp_path / "not-this").exists()
    finally:
        _stop(proc, str(db))


def _submit(port: int, spec: dict) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/jobs",
                                     data=json.dumps(spec).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)["id"]


def _job(port: int, job_id: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=10) as r:
        return json.load(r)


def _wait(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_ctrl_c_on_serve_gives_the_running_job_back_despite_an_open_event_stream(tmp_path):
    """Ctrl-C in a terminal signals serve's whole process group. The workers are not in it:
    serve asks each once to stop, so the job goes back to the queue without using up an
    attempt; an open progress stream does not hold the shutdown until its client leaves."""
    db = tmp_path / "service.db"
    proc, port = _start_serve(tmp_path, "--database-url", f"sqlite:///{db}",
                              "--artifact-dir", str(tmp_path / "artifacts"))
    try:
        job_id = _submit(port, LONG_JOB)
        _wait(lambda: _job(port, job_id)["stage"] == "metanet", "training")
        stream = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events",
                                        timeout=120)
        while not stream.readline().startswith(b"event: progress"):
            pass
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
        stream.close()
        _wait(lambda: not _processes_with(str(db)), "the worker to stop", timeout=30)
    finally:
        _stop(proc, str(db))
        proc.stderr.close()
    proc, port = _start_serve(tmp_path, "--database-url", f"sqlite:///{db}",
                              "--artifact-dir", str(tmp_path / "artifacts"), "--workers", "0")
    try:
        job = _job(port, job_id)
        assert (job["status"], job["attempt"]) == ("queued", 0), job
    finally:
        _stop(proc, str(db))
        proc.stderr.close()


def test_serve_restarts_a_dead_worker_and_its_workers_leave_with_it(tmp_path):
    """A worker killed (the OOM killer, kill -9) is started again; when serve itself is
    killed, its worker stops by itself instead of living on beside the next serve's."""
    db = tmp_path / "service.db"
    proc, _ = _start_serve(tmp_path, "--database-url", f"sqlite:///{db}",
                           "--artifact-dir", str(tmp_path / "artifacts"))
    try:
        _wait(lambda: len(_processes_with(str(db))) == 1, "a worker")
        [first] = _processes_with(str(db))
        os.kill(first, signal.SIGKILL)
        _wait(lambda: _processes_with(str(db)) not in ([], [first]), "a new worker")
        [second] = _processes_with(str(db))
        os.killpg(proc.pid, signal.SIGKILL)  # serve only: its worker is in another session
        proc.wait(timeout=10)
        _wait(lambda: not _processes_with(str(db)), "the orphaned worker to stop", timeout=30)
        log = proc.stderr.read().decode()  # serve's, and its workers' (they share the pipe)
        assert f"worker process {first} exited (status -9)" in log
        assert f"serve (pid {proc.pid}) is gone: stopping" in log  # it left by itself
    finally:
        _stop(proc, str(db))
        proc.stderr.close()


def test_a_worker_that_keeps_dying_young_is_restarted_after_growing_pauses(monkeypatch):
    from app import supervisor

    class Process:
        def __init__(self, status):
            self.status, self.pid = status, 1000 + len(spawned)

        def poll(self):
            return self.status

    clock, spawned = [0.0], []
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: clock[0])
    workers = supervisor.WorkerProcesses(1, "sqlite://", "/nowhere", check_seconds=3600)
    monkeypatch.setattr(workers, "_spawn", lambda: spawned.append(Process(1)) or spawned[-1])
    workers.start()

    def spawns_at(t: float) -> int:
        clock[0] = t
        workers._check(0, workers.processes[0])
        return len(spawned)

    # dies at once each time: pauses of 1, 2, 4 s
    assert [spawns_at(t) for t in (0, 0.9, 1, 1, 2.9, 3, 3, 6.9, 7)] == [1, 1, 2, 2, 2, 3, 3, 3, 4]
    # one that lived a minute or more before dying starts the pauses anew
    spawned[-1].status = None
    assert spawns_at(100) == 4
    spawned[-1].status = -9
    assert [spawns_at(t) for t in (100, 101)] == [4, 5]
    workers._stopping.set()
