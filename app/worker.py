"""The worker: claims queued jobs and runs the pruning pipeline on them (DESIGN.md §5).

One job at a time, in the calling thread::

    claim → run(spec, <artifact_dir>/jobs/<id>, resume=True) → finish | fail | mark_cancelled

* **Lease.** A heartbeat thread renews the lease every ``min(heartbeat_seconds,
  lease_seconds / 3)``. Every write is fenced by (worker id, attempt) (:mod:`app.queue`): once
  the lease is lost — the worker was paused past it, the reaper re-queued the job, another worker
  claimed it — nothing this worker writes applies, and it stops. The run folder is fenced too:
  the worker keeps its own deadline (``lease_seconds`` less :data:`LEASE_MARGIN`, by its own
  clock, moved on by each renewal), and past it every file write of the pipeline raises
  :class:`~pruning.checkpoint.WriteRefused` (:func:`~pruning.checkpoint.write_fence`), so a
  worker cut off from the database, or paused, stops before the reaper gives the job to another
  and never rewrites the files of an attempt that replaced it.
* **Prompt cooperative cancel.** The pipeline asks ``should_stop`` before every training step and
  after every search generation; the answer becomes true when the heartbeat finds the lease lost
  or a cancel requested, when a throttled read of the job (at most once a second) finds the same,
  or when the worker is asked to shut down. The pipeline then raises
  :class:`~pruning.train.Cancelled` and the worker marks the job cancelled (cancel requested),
  gives it back to the queue (shutdown: :func:`app.queue.release`, resumed by the next claim), or
  drops it (lease lost: someone else owns it now).
* **Resume.** The run folder of a job is the same for every attempt, and ``run(...,
  resume=True)`` continues from the last stage checkpoint there (a folder that lost its
  ``spec.json``, deleted under a running attempt, is started over).
* **PruningNet reuse.** A job whose :func:`~pruning.spec.metanet_fingerprint` (architecture,
  widths, data and split, seed, PruningNet recipe; stored on the row at submission) equals one of
  the same owner's succeeded jobs adopts that job's trained PruningNet (``metanet_from``, checked
  first; an unusable one, or one trained on data that has changed since, is passed over) and
  runs only search, training, evaluation and export.
* **Errors.** A bad spec or a user error (validation, a budget that is infeasible or prunes
  nothing, missing data, unusable ``metanet_from``, diverged training) fails the job for good;
  a damaged file in the job's folder (``corrupt_file``) is deleted and the job retried, which
  redoes the step that wrote it; a machine too busy to measure a latency table (``busy``), the
  server's storage failing (``storage``: full, over quota, read-only or not writable; the
  message says the job is not at fault and can be retried once that is fixed:
  :func:`app.queue.retry`) and anything else are retried (the attempt fails with that
  ``error_kind``, else ``"internal"``, and the job is re-queued while attempts are left).
* **Reaper.** Every worker (and the API) calls :func:`app.queue.housekeeping` every
  ``lease_seconds / 2`` (idle or busy): expired leases are reaped, workers not seen for two
  leases forgotten.
* **Presence.** While :meth:`Worker.run_forever` runs, a thread records the worker in the
  ``workers`` table every heartbeat interval (:func:`app.queue.worker_seen`) and deletes it at the
  end, so the API can tell a queued job's owner that no worker (or none with CUDA) is running.
* **Devices.** A worker without CUDA does not claim the jobs whose spec asks for ``cuda``: they
  wait in the queue for one that has it (``--device cpu``/``cuda`` workers claim every job).
* **Database outages.** A worker waits for an unreachable database, retrying with backoff (up
  to :data:`MAX_BACKOFF_S`), at its start and whenever a claim fails, so restarting the database
  stops no worker; a database without this version's schema stops it at the start
  (``metaprune db upgrade``).
* **Progress.** Pipeline events become :func:`app.queue.report_progress` writes (at most about two
  a second, and at every stage change): the stage, the fraction of the whole pipeline done
  (stages weighted by :data:`STAGE_WEIGHTS`) and the stage detail.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from app import queue
from app.db import make_engine
from app.models import Job
from app.settings import Settings
from app.services.jobs import data_root_problem

log = logging.getLogger("metaprune.worker")

# share of the whole pipeline per stage (train: the winner, and the baseline when asked for)
STAGE_WEIGHTS = {"metanet": 0.45, "search": 0.20, "train": 0.30, "evaluate": 0.03,
                 "export": 0.02}
PROGRESS_INTERVAL_S = 0.5   # at most ~2 progress writes a second (plus one per stage change)
CANCEL_POLL_S = 1.0         # how often should_stop reads the job between heartbeats
MAX_MESSAGE = 500           # error messages stored, in characters
MAX_BACKOFF_S = 30.0        # the longest wait between tries of an unreachable database
LEASE_MARGIN = 0.1          # a worker's own deadline for its lease comes this share earlier
# the server's storage, not the job: full, over quota, read-only, or not ours to write
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from pruning.constraints import BudgetError
    from pruning.pipeline import RunFolderError

    return (ValidationError, BudgetError, RunFolderError)


def classify(exc: BaseException) -> tuple[str, bool]:
    """``(error_kind, retry)`` of an exception raised by a job."""
    from pruning.checkpoint import UnreadableFileError
    from pruning.data import DatasetError
    from pruning.machine import MachineBusyError

    if isinstance(exc, DatasetError):
        return "data", False
    if isinstance(exc, MachineBusyError):  # a latency table: worth another try, later
        return "busy", True
    if isinstance(exc, _user_errors()):
        return "invalid_spec", False
    if isinstance(exc, FloatingPointError):  # training diverged: the same settings diverge again
        return "diverged", False
    if isinstance(exc, UnreadableFileError):  # as is, a retry would read it again (the worker
        return "corrupt_file", False          # deletes one of the job's own first: _unreadable)
    if storage_error(exc) is not None:  # another worker may have another disk: retried
        return "storage", True
    return "internal", True


def storage_error(exc: BaseException) -> OSError | None:
    """The :data:`STORAGE_ERRNOS` error in ``exc`` or what it was raised from or while handling
    (``__cause__``/``__context__``), if any: the server's storage failed, not the job."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def database_error(exc: SQLAlchemyError) -> str:
    """The driver's first line (SQLAlchemy's own text adds the statement and a web link)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {text[0]}"


def check_artifact_dir(folder: Path) -> None:
    """A worker whose artifact folder it cannot write would fail every job it claims: it is
    refused at its start (``ValueError``, naming the setting) instead."""
    import tempfile

    try:
        (folder / "jobs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder / "jobs"):
            pass
    except OSError as e:
        raise ValueError(f"the artifact folder {folder} is not writable here ({e.strerror or e}):"
                         " set METAPRUNE_ARTIFACT_DIR (or --artifact-dir) to the folder the API "
                         "serves, shared with its workers") from None


def _reason(exc: BaseException) -> str:
    """A failed database call in one line (the log's warnings; tracebacks only for bugs)."""
    return database_error(exc) if isinstance(exc, SQLAlchemyError) else repr(exc)


def one_line(exc: BaseException, hide: Sequence[str] = ()) -> str:
    """The job's error message: one line, at most :data:`MAX_MESSAGE` characters, each folder
    of ``hide`` (the server's paths are not the client's) shown as ``<artifact folder>`` before
    the cut, so a cut cannot leave part of one."""
    from pruning.spec import error_message

    text = error_message(exc)
    kind = classify(exc)[0]
    if kind == "internal":
        text = f"{type(exc).__name__}: {text}"
    elif kind == "storage":  # the remedy before the detail, which a long path may cut short
        text = ("the server's storage failed, not the job; once that is fixed, a job failed "
                "for it can be retried (`metaprune retry <job id>`, or POST "
                "/v1/jobs/<job id>/retry) and resumes from its last checkpoint: " + text)
        if (cause := storage_error(exc)) is not exc:  # what failed, then the storage's error
            text += f" ({error_message(cause)})"
    for folder in sorted(set(hide), key=len, reverse=True):
        text = text.replace(folder + os.sep, "<artifact folder>" + os.sep)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


class Progress:
    """Turns pipeline events into a progress fraction of the whole run and a stage detail."""

    def __init__(self, train_baseline: bool, start: float = 0.0):
        self.train_baseline = train_baseline
        self.fraction = start  # never goes back within an attempt
        self.best: dict[str, Any] | None = None
        offsets, acc = {}, 0.0
        for name, weight in STAGE_WEIGHTS.items():
            offsets[name] = (acc, weight)
            acc += weight
        self.offsets = offsets

    def _span(self, stage: str) -> tuple[float, float] | None:
        if stage in ("final", "baseline"):
            start, weight = self.offsets["train"]
            if not self.train_baseline:
                return start, weight
            half = weight / 2
            return (start, half) if stage == "final" else (start + half, half)
        return self.offsets.get(stage)

    def update(self, event: dict) -> tuple[str, float, dict]:
        stage = event.get("stage", "")
        span = self._span(stage)
        if stage == "done":
            frac = 1.0
        elif span is None:
            frac = self.fraction
        else:
            start, weight = span
            if event.get("total"):
                inner = event.get("step", 0) / event["total"]
            elif event.get("generations"):
                inner = (event.get("generation", -1) + 1) / event["generations"]
            else:
                inner = 0.0
            frac = start + weight * min(1.0, max(0.0, inner))
        self.fraction = max(self.fraction, min(1.0, frac))
        detail = {k: v for k, v in event.items()
                  if k != "report" and isinstance(v, (int, float, str, bool, type(None)))}
        if "best_score" in event:
            self.best = {"score": event["best_score"], "macs": event.get("best_macs"),
                         "params": event.get("best_params"), "key": event.get("best_key")}
        if self.best is not None:
            detail["best"] = self.best
        return stage, self.fraction, detail


class _JobRun:
    """The state of one claimed job: flags set by the heartbeat thread, the should_stop poll and
    the progress writer, read by the pipeline thread."""

    def __init__(self, worker: Worker, job: queue.Claimed):
        self.worker, self.job = worker, job
        self.lost = threading.Event()       # the lease is gone: write nothing more
        self.cancel = threading.Event()     # a cancel was requested
        self.done = threading.Event()       # the attempt is over: the heartbeat thread ends
        self.last_poll = time.monotonic()
        self.last_write = 0.0
        self.last_stage: str | None = None
        self.progress: Progress | None = None
        self.lease_until = time.monotonic() + self._lease_s  # by this process's clock

    @property
    def _lease_s(self) -> float:
        return self.worker.settings.lease_seconds * (1 - LEASE_MARGIN)

    def lease_held(self) -> bool:
        """Whether the lease still holds by this process's own clock: a worker that could not
        renew it in time (an unreachable database, a pause) stops before the reaper hands the
        job to another."""
        if not self.lost.is_set() and time.monotonic() > self.lease_until:
            log.warning("job %s: lease not renewed in time (attempt %d); stopping", self.job.id,
                        self.job.attempt)
            self.lost.set()
        return not self.lost.is_set()

    def check_write(self) -> None:
        """The run folder's write fence (:func:`pruning.checkpoint.write_fence`)."""
        from pruning.checkpoint import WriteRefused

        if not self.lease_held():
            raise WriteRefused(f"job {self.job.id}: attempt {self.job.attempt} lost its lease")

    # --- called from the pipeline thread --------------------------------------------------

    def should_stop(self) -> bool:
        if not self.lease_held() or self.cancel.is_set() or self.worker.stopping.is_set():
            return True
        now = time.monotonic()
        if now - self.last_poll >= CANCEL_POLL_S:
            self.last_poll = now
            try:
                if queue.should_stop(self.worker.engine, self.job.id, self.worker.worker_id,
                                     self.job.attempt):
                    self.cancel.set()  # cancel or lost: told apart when the pipeline stopped
                    return True
            except Exception as e:  # noqa: BLE001 — a database hiccup: the lease decides
                log.warning("job %s: should_stop read failed (%s)", self.job.id, _reason(e))
        return False

    def on_event(self, event: dict) -> None:
        if self.lost.is_set() or self.progress is None:
            return
        stage, fraction, detail = self.progress.update(event)
        now = time.monotonic()
        if stage == self.last_stage and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        detail["attempt"] = self.job.attempt
        try:
            applied = queue.report_progress(self.worker.engine, self.job.id,
                                            self.worker.worker_id, self.job.attempt,
                                            stage=stage, progress=fraction, detail=detail)
        except Exception as e:  # noqa: BLE001 — progress is best effort; the lease decides
            log.warning("job %s: progress write failed (%s)", self.job.id, _reason(e))
            self.last_write = now  # tried again in PROGRESS_INTERVAL_S, not at every step
            return
        self.last_write, self.last_stage = now, stage
        if not applied:
            self.lost.set()

    # --- the heartbeat thread -------------------------------------------------------------

    def heartbeat_loop(self) -> None:
        w = self.worker
        while not self.done.wait(w.heartbeat_interval):
            sent = time.monotonic()
            try:
                beat = queue.heartbeat(w.engine, self.job.id, w.worker_id, self.job.attempt,
                                       lease_seconds=w.settings.lease_seconds)
            except Exception as e:  # noqa: BLE001 — retried at the next beat (the lease has slack)
                log.warning("job %s: heartbeat failed (%s)", self.job.id, _reason(e))
            else:
                if not beat:
                    log.warning("job %s: lease lost (attempt %d); stopping", self.job.id,
                                self.job.attempt)
                    self.lost.set()
                    return
                self.lease_until = sent + self._lease_s
                if beat.cancel_requested:
                    self.cancel.set()
            w.maybe_reap()


class Worker:
    """Runs queued jobs (see the module docstring). ``device``: ``auto`` runs a job on its
    spec's device; ``cpu``/``cuda`` run every job there."""

    def __init__(self, settings: Settings, worker_id: str | None = None, device: str = "auto",
                 *, engine: Engine | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is available here")
        self.settings = settings
        check_artifact_dir(Path(settings.artifact_dir))
        self.last_outcome: str | None = None  # of the last job processed
        self.worker_id = worker_id or (f"{socket.gethostname()}:{os.getpid()}:"
                                       f"{uuid.uuid4().hex[:8]}")
        self.device = device
        self.engine = engine or make_engine(settings.database_url)
        self.stopping = threading.Event()  # shut down: claim nothing more, stop the job
        self.heartbeat_interval = min(settings.heartbeat_seconds, settings.lease_seconds / 3)
        self._last_reap = float("-inf")
        self._reap_lock = threading.Lock()

    @property
    def artifact_dir(self) -> Path:
        return Path(self.settings.artifact_dir)

    def run_dir(self, job_id: str) -> Path:
        return self.settings.run_dir(job_id)

    def maybe_reap(self) -> dict[str, str]:
        """Re-queue (or fail) jobs whose lease expired, at most every ``lease_seconds / 2``."""
        with self._reap_lock:
            now = time.monotonic()
            if now - self._last_reap < self.settings.lease_seconds / 2:
                return {}
            self._last_reap = now
        try:
            reaped = queue.housekeeping(self.engine, lease_seconds=self.settings.lease_seconds)
        except Exception as e:  # noqa: BLE001 — the next round tries again
            log.warning("reap failed (%s)", _reason(e))
            return {}
        for job_id, status in reaped.items():
            log.info("reaped job %s: %s", job_id, status)
        return reaped

    @functools.cached_property
    def accepts_cuda_jobs(self) -> bool:
        """Whether this worker claims jobs whose spec asks for CUDA: it has a CUDA device, or
        it runs every job on its own ``--device`` (asked once: every claim uses it)."""
        if self.device != "auto":
            return True
        import torch

        return torch.cuda.is_available()

    def check_database(self, *, wait: bool, stop: threading.Event | None = None) -> None:
        """The database must be reachable and at this version's schema (``ValueError``
        otherwise: run ``metaprune db upgrade``). Unreachable: wait for it, retrying with
        backoff, when ``wait`` (until ``stop`` is set), else raise the error."""
        from alembic.runtime.migration import MigrationContext

        from app.db import NEWER_DATABASE, head_revision, known_revision

        stop = stop or threading.Event()
        delay = 1.0
        while True:
            try:
                with self.engine.connect() as conn:
                    revision = MigrationContext.configure(conn).get_current_revision()
                break
            except SQLAlchemyError as e:
                if not wait:
                    raise
                log.warning("database unreachable (%s); trying again in %.0f s",
                            database_error(e), delay)
                if stop.wait(delay):
                    return
                delay = min(2 * delay, MAX_BACKOFF_S)
        head = head_revision()
        if revision is not None and not known_revision(revision):
            raise ValueError(f"the database is at revision {revision}, which this version does "
                             f"not know: {NEWER_DATABASE}")
        if revision != head:
            found = "has no metaprune schema" if revision is None else f"is at revision {revision}"
            raise ValueError(f"the database {found}; this version needs {head}: run "
                             "`metaprune db upgrade` first")

    def run_forever(self, stop_event: threading.Event | None = None,
                    poll_seconds: float = 1.0, once: bool = False) -> int:
        """Claim and run jobs until ``stop_event`` is set (the job running then is stopped at its
        next checkpoint and given back to the queue). ``once``: return after the first job
        (or at once when none is queued; a database error is raised). Returns how many jobs
        were processed."""
        if stop_event is not None:
            self.stopping = stop_event
        over = threading.Event()
        presence = threading.Thread(target=self._presence_loop, args=(over,), name="presence",
                                    daemon=True)
        presence.start()
        try:
            return self._claim_loop(poll_seconds, once)
        finally:
            over.set()
            presence.join(timeout=30)
            try:
                queue.worker_gone(self.engine, self.worker_id)
            except SQLAlchemyError:  # forgotten by another worker's reaper two leases from now
                log.debug("could not remove this worker's presence", exc_info=True)

    def _presence_loop(self, over: threading.Event) -> None:
        """Record this worker as running now, and again every heartbeat interval. The first
        record comes before PyTorch is imported to ask for CUDA (seconds), so a job submitted
        just after ``serve`` starts is not told that no worker runs; it says CUDA only when
        ``--device`` names it, and is rewritten once PyTorch has answered."""
        cuda = self.device != "auto"
        while True:
            try:
                queue.worker_seen(self.engine, self.worker_id, cuda=cuda,
                                  dataset_roots=bool(self.settings.dataset_roots))
            except SQLAlchemyError:  # the claim loop reports an unreachable database
                log.debug("presence write failed", exc_info=True)
            if cuda != self.accepts_cuda_jobs:
                cuda = self.accepts_cuda_jobs
                continue
            if over.wait(self.heartbeat_interval):
                return

    def _claim_loop(self, poll_seconds: float, once: bool) -> int:
        n, delay, failed = 0, poll_seconds, 0
        while not self.stopping.is_set():
            try:
                claimed = self.run_once()
            except SQLAlchemyError as e:
                if once:
                    raise
                try:  # a database that answers but lost its schema (re-created): stop, as at
                    self.check_database(wait=False)  # the start (ValueError: db upgrade)
                except SQLAlchemyError:
                    pass  # unreachable: wait for it
                delay = min(2 * delay, MAX_BACKOFF_S)
                log.warning("cannot reach the queue (%s); trying again in %.0f s",
                            database_error(e), delay)
                self.stopping.wait(delay)
                continue
            delay = poll_seconds
            if claimed:
                n += 1
                if once:
                    break
                # a failed attempt (one this worker may fail again: its set-up, its disk) waits
                # out a backoff, so that another worker can take the job's next attempt
                failed = failed + 1 if self.last_outcome == "retry" else 0
                if failed:
                    pause = min(poll_seconds * 2 ** failed, MAX_BACKOFF_S)
                    log.warning("an attempt failed on this worker; claiming again in %.0f s",
                                pause)
                    self.stopping.wait(pause)
            elif once:
                break
            else:
                self.stopping.wait(poll_seconds)
        return n

    def run_once(self) -> bool:
        """Claim one job and process it; whether there was one."""
        self.maybe_reap()
        if self.stopping.is_set():
            return False
        job = queue.claim(self.engine, self.worker_id, lease_seconds=self.settings.lease_seconds,
                          cuda=self.accepts_cuda_jobs,
                          data_root=bool(self.settings.dataset_roots))
        if job is None:
            return False
        log.info("job %s: claimed (attempt %d of %d)", job.id, job.attempt, job.max_attempts)
        self.last_outcome = self.process(job)
        return True

    def process(self, job: queue.Claimed) -> str:
        """Run a claimed job to its end; returns what became of it: ``succeeded``, ``failed``,
        ``retry``, ``cancelled``, ``released`` or ``lost``."""
        state = _JobRun(self, job)
        beat = threading.Thread(target=state.heartbeat_loop, name=f"heartbeat-{job.id[:8]}",
                                daemon=True)
        beat.start()
        try:
            outcome = self._run(job, state)
        except (SystemExit, KeyboardInterrupt):  # told to leave now: give the job back first
            try:
                log.info("job %s: %s", job.id, self._fenced(queue.release, job, "released"))
            except Exception:  # noqa: BLE001 — leaving anyway: the reaper re-queues it
                log.warning("job %s: could not give it back", job.id, exc_info=True)
            raise
        finally:
            state.done.set()
            beat.join(timeout=30)
        log.info("job %s: %s", job.id, outcome)
        return outcome

    def _fenced(self, write, job: queue.Claimed, outcome: str, *, state: _JobRun | None = None,
                **kwargs) -> str:
        if self._write(write, job, state, **kwargs):
            return outcome
        return "lost"

    def _write(self, write, job: queue.Claimed, state: _JobRun | None, **kwargs) -> bool:
        """A fenced write of the attempt's end (``queue.finish``, ``fail``, ``release``…). With
        ``state``, a database error is retried while the lease holds (the heartbeat thread runs
        on meanwhile): a database blip as the job ends would otherwise leave it ``running``
        until its lease expired, and the reaper re-queue it — or, on its last attempt, fail it
        ``lease_expired`` with its artifacts written. Only a lost connection is tried again, for
        at most a lease: the database refusing the write itself would refuse it every time."""
        delay, give_up = 0.25, time.monotonic() + self.settings.lease_seconds
        while True:
            try:
                return write(self.engine, job.id, self.worker_id, job.attempt, **kwargs)
            except (OperationalError, InterfaceError) as e:
                if state is None or not state.lease_held() or time.monotonic() > give_up:
                    raise
                log.warning("job %s: recording its end failed (%s); trying again in %.2g s",
                            job.id, _reason(e), delay)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _run(self, job: queue.Claimed, state: _JobRun) -> str:
        from pruning.checkpoint import UnreadableFileError, WriteRefused, write_fence
        from pruning.pipeline import MetanetDataError, MetanetGoneError, PipelineSpec, run
        from pruning.train import Cancelled

        try:
            spec = PipelineSpec.model_validate(job.spec)
            problem = data_root_problem(spec.data_root, self.settings)
            if problem is not None and not self.settings.dataset_roots:
                # the API accepted it: this worker is set up otherwise (it claims no such job,
                # but one may have been claimed by other means). Given back without using up an
                # attempt, for a worker with the roots; not failed: a misconfigured worker
                # would fail it in seconds
                return self._fenced(
                    queue.release, job, "retry", state=state, error_kind="worker",
                    error_message="this worker has no dataset roots (METAPRUNE_DATASET_ROOTS, "
                                  "as the API's) to read a data_root from")
            if problem is not None:  # e.g. a symlink pointed out of the roots since submission
                return self._fenced(queue.fail, job, "failed", state=state,
                                    error_kind="invalid_spec",
                                    error_message=f"data_root: {problem}", retry=False)
            device = self.device if self.device != "auto" else spec.device
            if device == "cuda":
                import torch

                if not torch.cuda.is_available():  # another worker may have a GPU: given
                    return self._fenced(queue.release, job, "retry", state=state,
                                        error_kind="device",
                                        error_message="the job asks for CUDA and this worker "
                                                      "has no CUDA device")  # back, as above
            self._start_over_if_lost(job, state)
            asked = spec.model_copy(update={"device": device})
            spec = asked.model_copy(update={"metanet_from": self._metanet_source(job, asked)})
            state.progress = Progress(spec.train_baseline, start=self._progress_of(job.id))

            def run_job(spec):
                with write_fence(state.check_write):  # nothing written once the lease is gone
                    return run(spec, self.run_dir(job.id), resume=True, lock=False,
                               progress=state.on_event, should_stop=state.should_stop)

            try:
                report = run_job(spec)
            except MetanetDataError as e:  # found only once the data is loaded: train one
                log.info("job %s: %s; training its own", job.id, e)
                report = run_job(spec.model_copy(update={"metanet_from": None}))
            except MetanetGoneError as e:  # its lender was deleted before the copy
                self._start_over(job, state, str(e))
                report = run_job(asked.model_copy(
                    update={"metanet_from": self._metanet_source(job, asked)}))
        except (Cancelled, WriteRefused):
            return self._stopped(job, state)
        except UnreadableFileError as e:
            return self._unreadable(job, state, e)
        except Exception as e:  # noqa: BLE001 — every failure is recorded on the job
            if state.lost.is_set():
                return "lost"
            kind, retry = classify(e)
            if retry:
                log.exception("job %s: attempt %d failed", job.id, job.attempt)
            message = one_line(e, hide=(str(self.artifact_dir),
                                        str(self.artifact_dir.resolve())))
            return self._fenced(queue.fail, job, "retry" if retry else "failed", state=state,
                                error_kind=kind, error_message=message, retry=retry)
        if state.lost.is_set():
            return "lost"
        return self._fenced(queue.finish, job, "succeeded", state=state,
                            detail=summary(report, job.attempt))

    def _unreadable(self, job: queue.Claimed, state: _JobRun, e) -> str:
        """A file of the job's run folder that cannot be read back (a disk error: the atomic
        writes never leave one) is deleted, and the job retried: its resumed run redoes the
        step that wrote the file. Named relative to the run folder: a client has no business
        with the server's paths, nor anything to do about them. Not deleted: a file of another
        job (a lent PruningNet), the records a run checks itself against (``spec.json``,
        ``data.json``, ``recipe.json``: written once, when the run begins), or any file once
        the lease is lost or no attempt is left."""
        from pruning.pipeline import DATA_FILE, RECIPE_FILE

        run_dir, root = self.run_dir(job.id).resolve(), self.artifact_dir.resolve()
        path = Path(e.path).resolve()
        if not path.is_relative_to(run_dir):
            where = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        else:
            where = path.relative_to(run_dir)
            redo = (str(where) not in ("spec.json", DATA_FILE, RECIPE_FILE)
                    and job.attempt < job.max_attempts and state.lease_held())
            if redo:
                log.warning("job %s: %s; deleting it and retrying", job.id, e)
                path.unlink(missing_ok=True)
                return self._fenced(queue.fail, job, "retry", state=state,
                                    error_kind="corrupt_file",
                                    error_message=f"{where} was unreadable (corrupt or truncated) "
                                                  f"and was deleted; the step that wrote it runs "
                                                  f"again", retry=True)
        if state.lost.is_set():
            return "lost"
        return self._fenced(queue.fail, job, "failed", state=state, error_kind="corrupt_file",
                            error_message=f"{where} is unreadable, corrupt or truncated",
                            retry=False)

    def _start_over_if_lost(self, job: queue.Claimed, state: _JobRun) -> None:
        """A run folder holding files but no ``spec.json`` lost its record (deleted while an
        attempt ran, which then wrote on into a new one): it cannot be resumed, and the pipeline
        would refuse it as a folder of someone else's files; it is the job's own, so the job
        starts over in an empty one."""
        from pruning.pipeline import holds_other_files

        run_dir = self.run_dir(job.id)
        if not (run_dir / "spec.json").exists() and holds_other_files(run_dir):
            self._start_over(job, state, "its run folder lost its spec.json (deleted?)")

    def _start_over(self, job: queue.Claimed, state: _JobRun, why: str) -> None:
        """Empty the job's run folder, so that it starts over (lease held: the folder may be
        another attempt's by now)."""
        state.check_write()
        log.warning("job %s: %s; starting the job over", job.id, why)
        if self.run_dir(job.id).exists():
            shutil.rmtree(self.run_dir(job.id))

    def _metanet_source(self, job: queue.Claimed, spec) -> str | None:
        """The run folder of the owner's newest succeeded job whose PruningNet this job can reuse
        (same :func:`~pruning.spec.metanet_fingerprint`, checked by
        :func:`~pruning.pipeline.check_metanet_source`), or ``None``: train one. Decided at the
        first attempt; later attempts resume with the same decision (saved in ``spec.json``)."""
        from pruning.checkpoint import UnreadableFileError, read_json
        from pruning.pipeline import RunFolderError, check_metanet_source
        from pruning.spec import metanet_fingerprint

        saved = self.run_dir(job.id) / "spec.json"
        if saved.exists():  # damaged: named, and the job failed (_unreadable), not retried
            recorded = read_json(saved)
            if not isinstance(recorded, dict):
                raise UnreadableFileError(saved, "not a job specification (a JSON object)")
            return recorded.get("metanet_from")
        if spec.metanet_from is not None:  # not over the API; a job queued by other means
            return spec.metanet_from
        for lender in queue.metanet_lenders(self.engine, job.owner, metanet_fingerprint(spec),
                                            exclude=job.id):
            src = self.run_dir(lender)
            try:
                check_metanet_source(spec.model_copy(update={"metanet_from": str(src)}),
                                     self.run_dir(job.id))
            except RunFolderError as e:  # e.g. trained by an older version: try the next one
                log.info("job %s: cannot reuse the PruningNet of job %s: %s", job.id, lender, e)
                continue
            log.info("job %s: reusing the PruningNet of job %s", job.id, lender)
            return str(src)
        return None

    def _stopped(self, job: queue.Claimed, state: _JobRun) -> str:
        """The pipeline stopped on request: cancelled, given back (shutdown) or lost."""
        if state.lost.is_set():
            return "lost"
        if self._write(queue.mark_cancelled, job, state):
            return "cancelled"
        if self.stopping.is_set():
            return self._fenced(queue.release, job, "released", state=state)
        return "lost"  # should_stop found the fence closed

    def _progress_of(self, job_id: str) -> float:
        with self.engine.connect() as conn:
            return float(conn.execute(select(Job.progress).where(Job.id == job_id)).scalar()
                         or 0.0)


def summary(report: dict, attempt: int) -> dict:
    """The small result stored on a succeeded job (``detail``): the report's metapruning and
    uniform entries (the MetaPruning one with its widths, for ``/v1/configurations``), the
    budget and the time taken."""
    keep = ("candidate", "macs", "params", "budget_use", "estimated_val_accuracy",
            "estimated_val_loss", "test_accuracy", "latency_ms", "warning")
    result = {name: {k: report[name][k]
                     for k in keep + (("widths",) if name == "metapruning" else ())
                     if k in report[name]}
              for name in ("metapruning", "uniform") if name in report}
    if "metanet_from" in report:  # the run folder <artifact_dir>/jobs/<id> of the lender
        result["metanet_reused_from"] = Path(report["metanet_from"]["run"]).name
    if "latency_table" in report:  # which device the latency was predicted for
        result["latency_table"] = report["latency_table"]
    result["budget"] = report.get("budget")
    result["elapsed_s"] = report.get("elapsed_s")
    return {"attempt": attempt, "result": result}
