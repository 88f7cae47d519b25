"""The worker processes of ``metaprune serve``: started beside the API, restarted when one
dies, stopped with it.

* Each worker runs in a session of its own, so a terminal's Ctrl-C reaches only ``serve``, which
  then asks every worker once (SIGTERM) to stop its job at the next checkpoint and give it back
  to the queue. Were the workers in the terminal's process group, that SIGTERM would be their
  second signal, which means "leave now".
* A worker that dies (the OOM killer, a crash, ``kill -9``) is started again, after a pause that
  doubles while it keeps dying young (:data:`RESTART_DELAYS_S`); the job it held is re-queued by
  the reaper of the new one when its lease expires (``lease_expired`` after ``max_attempts``).
* Each worker is told ``serve``'s pid (``--parent-pid``) and stops, as on SIGTERM, when ``serve``
  is gone (``kill -9`` of ``serve``), so a new ``serve`` never finds an orphan beside its own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

log = logging.getLogger("metaprune.serve")

RESTART_DELAYS_S = (1, 2, 4, 8, 15, 30, 60)  # after the 1st, 2nd, … death in a row
LIVED_LONG_S = 60.0   # a worker that ran this long before dying starts the delays anew
WORKER_NICE = 10      # training yields the CPU to the API's requests


class WorkerProcesses:
    """``n`` ``metaprune worker`` processes on one database and artifact folder."""

    def __init__(self, n: int, database_url: str, artifact_dir: str, *,
                 check_seconds: float = 1.0, stop_timeout_s: float = 30.0):
        self.command = [sys.executable, "-m", "pruning.cli", "worker",
                        "--database-url", database_url, "--artifact-dir", artifact_dir,
                        "--parent-pid", str(os.getpid()), "--nice", str(WORKER_NICE)]
        self.env = {**os.environ, "METAPRUNE_DATABASE_URL": database_url,
                    "METAPRUNE_ARTIFACT_DIR": artifact_dir}
        self.check_seconds, self.stop_timeout_s = check_seconds, stop_timeout_s
        self.processes: list[subprocess.Popen] = []
        self._n = n
        self._started_at: list[float] = []
        self._deaths: list[int] = []        # deaths in a row, per slot
        self._restart_at: list[float | None] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()       # the watcher's restarts vs stop()
        self._watcher = threading.Thread(target=self._watch, name="worker-watcher", daemon=True)

    def start(self) -> WorkerProcesses:
        with self._lock:
            for _ in range(self._n):
                self.processes.append(self._spawn())
                self._started_at.append(time.monotonic())
                self._deaths.append(0)
                self._restart_at.append(None)
        if self._n:
            self._watcher.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.command, env=self.env, start_new_session=True)

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_seconds):
            with self._lock:
                if self._stopping.is_set():
                    return
                for slot, proc in enumerate(self.processes):
                    self._check(slot, proc)

    def _check(self, slot: int, proc: subprocess.Popen) -> None:
        """Schedule the restart of a worker that died; start it when its pause is over."""
        now = time.monotonic()
        if self._restart_at[slot] is None:
            status = proc.poll()
            if status is None:
                return
            lived = now - self._started_at[slot]
            self._deaths[slot] = 1 if lived >= LIVED_LONG_S else self._deaths[slot] + 1
            delay = RESTART_DELAYS_S[min(self._deaths[slot], len(RESTART_DELAYS_S)) - 1]
            log.warning("worker process %d exited (status %s) after %.0f s; starting a new one "
                        "in %d s", proc.pid, status, lived, delay)
            self._restart_at[slot] = now + delay
        if now >= self._restart_at[slot]:
            self.processes[slot] = self._spawn()
            self._started_at[slot], self._restart_at[slot] = now, None

    def stop(self) -> None:
        """SIGTERM to every worker (its job stops at the next checkpoint and goes back to the
        queue); SIGKILL to one still running after ``stop_timeout_s``."""
        with self._lock:
            self._stopping.set()
            processes = list(self.processes)
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker process %d did not stop in %.0f s; killing it", proc.pid,
                            self.stop_timeout_s)
                proc.kill()
                proc.wait()
