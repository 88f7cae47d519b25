"""`metaprune serve` as a real process: it migrates, serves, and stops its workers on SIGTERM."""

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

from tests.conftest import SMOKE_JOB


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
            if marker in cmd and "worker" in cmd:
                pids.append(int(d.name))
    return pids


def _start_serve(tmp_path: Path, *extra: str, env: dict | None = None
                 ) -> tuple[subprocess.Popen, int]:
    """``metaprune serve`` on a free loopback port, once ``/readyz`` answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", "serve", "--port", str(port),
                             "--workers", "1", "--quiet", *extra],
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
