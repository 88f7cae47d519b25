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


def test_serve_answers_and_stops_its_workers_on_sigterm(tmp_path):
    db = tmp_path / "service.db"
    url = f"sqlite:///{db}"
    port = _free_port()
    env = {**os.environ, "METAPRUNE_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", "serve", "--port", str(port),
                             "--workers", "1", "--database-url", url, "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert json.load(r) == {"status": "ready"}
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "serve did not become ready"
                time.sleep(0.5)
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
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_with(str(db)):
            os.kill(pid, signal.SIGKILL)
