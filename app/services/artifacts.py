"""Artifacts of a finished job, its search history and Pareto front, and its progress events.

A job's run folder is ``<artifact_dir>/jobs/<job id>/`` (the worker's); its artifacts lie in
``artifacts/``. Clients name an artifact, never a path: a name is served only when it is
``config.json`` or a key of ``config.json``'s ``files`` map, and the file is opened without
following symlinks (``O_NOFOLLOW``) and only when it resolves inside the job's artifacts
folder. Before a file is served its sha256 is checked against ``config.json`` (digests are
cached by (path, inode, mtime, size), so an unchanged file is hashed once); a mismatch refuses
the download (409) rather than serve a corrupted model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool

from app.deps import Database
from app.models import TERMINAL, Job, JobStatus
from app.services import Conflict, NotFound, ServiceError
from app.services.jobs import get_job
from app.settings import Settings

CONFIG = "config.json"
CHUNK = 1 << 16
CONTENT_TYPES = {".json": "application/json", ".png": "image/png"}


class RangeNotSatisfiable(ServiceError):
    """416: the ``Range`` lies beyond the file (``size`` goes into ``Content-Range``)."""

    status_code = 416

    def __init__(self, detail: str, size: int):
        super().__init__(detail)
        self.size = size


# --- files ------------------------------------------------------------------------------------


def artifacts_dir(settings: Settings, job_id: str) -> Path:
    return settings.run_dir(job_id) / "artifacts"


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def _plain_name(name: str) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and "/" not in name and "\\" not in name and "\0" not in name
            and not name.startswith("."))


def open_inside(folder: Path, name: str) -> tuple[int, os.stat_result] | None:
    """An fd of the regular file ``folder/name`` and its stat, or ``None`` when it is missing,
    a symlink, not a regular file, or resolves outside ``folder``. Opened with ``O_NOFOLLOW`` so
    that a symlink swapped in after the checks is not followed either."""
    if not _plain_name(name):
        return None
    path = folder / name
    try:
        if os.path.islink(folder) or os.path.islink(path):
            return None
        real_folder = os.path.realpath(folder)
        if os.path.dirname(os.path.realpath(path)) != real_folder:
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


class DigestCache:
    """sha256 of files by (path, device, inode, mtime, size): an unchanged file is hashed once."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0  # how many digests were computed (for tests)

    def digest(self, path: Path, fd: int, st: os.stat_result) -> str:
        key = (str(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        h = hashlib.sha256()
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        value = h.hexdigest()
        with self._lock:
            self.computed += 1
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value


digests = DigestCache()


@dataclass
class ArtifactFile:
    """An artifact opened for serving: call :meth:`chunks` (which closes the fd) or
    :meth:`close`."""

    name: str
    fd: int
    size: int
    sha256: str
    media_type: str

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``start..end`` (inclusive), read from the verified fd."""
        try:
            os.lseek(self.fd, start, os.SEEK_SET)
            left = end - start + 1
            while left > 0:
                chunk = os.read(self.fd, min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # a response that is never sent (the client left first) closes it too


def _succeeded_job(db: Database, owner: str, job_id: str) -> Job:
    job = get_job(db, owner, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise Conflict(f"job is {job.status}: artifacts are available once it has succeeded")
    return job


def _read_config(folder: Path) -> tuple[dict[str, Any], int, os.stat_result]:
    """``config.json`` of the artifacts folder (parsed), with its open fd and stat."""
    opened = open_inside(folder, CONFIG)
    if opened is None:
        raise NotFound("the job's artifacts are missing (no config.json)")
    fd, st = opened
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        config = json.loads(data)
        if not isinstance(config, dict) or not isinstance(config.get("files"), dict):
            raise ValueError("no files map")
    except (ValueError, UnicodeDecodeError):
        os.close(fd)
        raise Conflict("artifact config.json is corrupted (not a valid artifact config)")
    return config, fd, st


def _known_files(config: dict[str, Any]) -> dict[str, str]:
    """``config.json``'s ``files`` map, plain names with hex digests only."""
    return {name: digest for name, digest in config["files"].items()
            if _plain_name(name) and name != CONFIG and isinstance(digest, str)}


def list_artifacts(db: Database, settings: Settings, owner: str,
                   job_id: str) -> list[dict[str, Any]]:
    """``[{name, size, sha256, intact}]``: ``config.json`` and every file of its ``files`` map
    that is present (sizes from the file system, digests from ``config.json``; ``intact``: the
    file still has that digest, so a download of it will not be refused as corrupted)."""
    _succeeded_job(db, owner, job_id)
    folder = artifacts_dir(settings, job_id)
    config, fd, st = _read_config(folder)
    try:
        items = [{"name": CONFIG, "size": st.st_size,
                  "sha256": digests.digest(folder / CONFIG, fd, st), "intact": True}]
    finally:
        os.close(fd)
    for name, digest in sorted(_known_files(config).items()):
        opened = open_inside(folder, name)
        if opened is None:
            continue
        fd, st = opened
        try:
            intact = digests.digest(folder / name, fd, st) == digest.lower()
        finally:
            os.close(fd)
        items.append({"name": name, "size": st.st_size, "sha256": digest, "intact": intact})
    return items


def open_artifact(db: Database, settings: Settings, owner: str, job_id: str,
                  name: str) -> ArtifactFile:
    """Open artifact ``name`` of a succeeded job after checking its sha256 against
    ``config.json``. 404: not an artifact of the job; 409: not succeeded, or corrupted."""
    _succeeded_job(db, owner, job_id)
    folder = artifacts_dir(settings, job_id)
    config, cfd, cst = _read_config(folder)
    if name == CONFIG:
        digest = digests.digest(folder / CONFIG, cfd, cst)
        return ArtifactFile(CONFIG, cfd, cst.st_size, digest, content_type(CONFIG))
    os.close(cfd)
    expected = _known_files(config).get(name)
    if expected is None:
        raise NotFound(f"no artifact named {name[:100]!r}" + ("…" if len(name) > 100 else ""))
    opened = open_inside(folder, name)
    if opened is None:
        raise NotFound(f"artifact {name} is missing")
    fd, st = opened
    try:
        actual = digests.digest(folder / name, fd, st)
    except OSError:
        os.close(fd)
        raise
    if actual != expected.lower():
        os.close(fd)
        raise Conflict(f"artifact {name} is corrupted (sha256 mismatch)")
    return ArtifactFile(name, fd, st.st_size, actual, content_type(name))


def _digits(text: str) -> bool:
    """Empty or ASCII digits only: ``str.isdigit`` also accepts ``²`` (a header is latin-1),
    which ``int`` refuses."""
    return text == "" or (text.isascii() and text.isdigit())


def _offset(digits: str) -> int:
    """A byte offset of a Range: past 18 digits, larger than any file (``int`` refuses
    numbers over 4,300 digits, and nothing needs more than 18)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks of a ``size``-byte file; ``None`` for the
    whole file (no header, a malformed one, several ranges or another unit: RFC 9110 lets a
    server ignore those). Raises :class:`RangeNotSatisfiable` for a range beyond the file."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not _digits(first) or not _digits(last):
        return None
    if first == "":
        if last == "":
            return None
        n = _offset(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} is empty", size)
        return max(0, size - n), size - 1
    start = _offset(first)
    if last != "" and _offset(last) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts beyond the file's {size} bytes",
                                  size)
    end = size - 1 if last == "" else _offset(last)
    return start, min(end, size - 1)


# --- search history and Pareto front ---------------------------------------------------------


RECORD_FIELDS = ("key", "generation", "widths", "macs", "params", "score")


def pareto_front(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated records of score vs MACs: none other has fewer-or-equal MACs and a
    higher-or-equal score (better in one). Sorted by MACs; of equal points the earliest
    evaluated is kept (as in ``pareto.png``)."""
    order = sorted(range(len(records)),
                   key=lambda i: (records[i]["macs"], -records[i]["score"], i))
    front: list[dict[str, Any]] = []
    for i in order:
        if not front or records[i]["score"] > front[-1]["score"]:
            front.append(records[i])
    return front


def _read_json_inside(folder: Path, name: str) -> dict[str, Any] | None:
    opened = open_inside(folder, name)
    if opened is None:
        return None
    fd, _ = opened
    try:
        return json.loads(b"".join(iter(lambda: os.read(fd, 1 << 20), b"")))
    except ValueError:
        return None
    finally:
        os.close(fd)


def search_history(db: Database, settings: Settings, owner: str, job_id: str) -> dict[str, Any]:
    """Every evaluated candidate and the Pareto front, from ``artifacts/search.json`` (a
    finished job) or ``search/state.json`` (a search in progress). 404 when neither exists."""
    job = get_job(db, owner, job_id)
    root = settings.run_dir(job_id)
    data, source = _read_json_inside(root / "artifacts", "search.json"), "artifacts"
    if data is None or not isinstance(data.get("history"), list):
        state = _read_json_inside(root / "search", "state.json")
        data, source = ({"history": state.get("records"), **state}, "state") \
            if isinstance(state, dict) and isinstance(state.get("records"), list) else (None, "")
    if data is None:
        raise NotFound("no search results yet")
    try:
        history = [{f: r[f] for f in RECORD_FIELDS} for r in data["history"]]
    except (KeyError, TypeError):
        raise Conflict("the job's search record is unreadable") from None
    if source == "artifacts":
        finished, best = True, data.get("best")
        generations = data.get("generations")
    else:
        finished = bool(data.get("finished"))
        ranked = sorted(history, key=lambda r: (-r["score"], r["macs"]))
        best = ranked[0]["key"] if ranked else None
        generations = (data.get("generation", -1) + 1) if isinstance(
            data.get("generation"), int) else None
    return {"job_id": job.id, "status": job.status, "source": source, "finished": finished,
            "generations": generations, "evaluated": len(history), "best": best,
            "history": history, "pareto_front": pareto_front(history)}


# --- progress events --------------------------------------------------------------------------


def _sse(event: str | None, data: str) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in data.splitlines()) + "\n").encode()


async def job_events(db: Database, settings: Settings, owner: str, job_id: str,
                     should_end, render) -> AsyncIterator[bytes]:
    """Server-sent events of a job: ``progress`` (the job as JSON, ``render(job)``, run in a
    thread: it may read the database) whenever its status, stage, progress or detail changes,
    then ``done`` (the job) once it is succeeded, failed or cancelled, and the stream ends. A
    comment line every ``events_heartbeat_seconds`` keeps idle connections open; the stream
    stops when ``await should_end()`` (the client left, or the server is stopping). The caller
    has checked that the job exists (404 before the stream starts)."""
    poll, beat = settings.events_poll_seconds, settings.events_heartbeat_seconds
    last = None
    quiet = 0.0
    yield b": stream of job " + job_id.encode() + b"\n\n"
    while True:
        if await should_end():
            return
        try:
            job = await run_in_threadpool(get_job, db, owner, job_id)
        except NotFound:
            return
        snapshot = (job.status, job.stage, job.progress, json.dumps(job.detail, sort_keys=True))
        if snapshot != last:
            last, quiet = snapshot, 0.0
            body = await run_in_threadpool(render, job)
            yield _sse("progress", body)
            if job.status in TERMINAL:
                yield _sse("done", body)
                return
        elif quiet >= beat:
            quiet = 0.0
            yield b": heartbeat\n\n"
        await anyio.sleep(poll)
        quiet += poll
