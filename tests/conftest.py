"""Shared helpers for the core tests (search space, counting, plain modules, PruningNet).

Everything that runs a forward pass uses the tiny ``test_*`` architectures; the real ones are
only built at small sizes (or on the ``meta`` device) where a test says so.
"""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from functools import lru_cache

import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pruning.modules import ConvBNAct, conv_path
from pruning.registry import list_archs
from pruning.space import Candidate, MaxPoolSpec, SearchSpace

# No example database (tests must not write into the working tree), no per-example deadline
# (CPU timing varies), and derandomised so that every run checks the same examples. Example
# counts are set per test.
settings.register_profile(
    "core", deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("core")

REAL_ARCHS = ("mobilenet_v1", "mobilenet_v2", "resnet18", "resnet34", "resnet50")
ALL_ARCHS = tuple(list_archs(include_test=True))
TEST_ARCHS = tuple(a for a in ALL_ARCHS if a.startswith("test_"))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module's tests: the tiny networks gain nothing from more, and on
    a busy 2-core machine spinning OpenMP threads make them 10× slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@lru_cache(maxsize=None)
def space_of(arch: str, **kwargs) -> SearchSpace:
    """A cached space (spaces are immutable; caching keeps plan building out of the loops)."""
    return SearchSpace.create(arch, **kwargs)


def image_batch(space: SearchSpace, n: int, seed: int = 0) -> torch.Tensor:
    stem = space.plan.blocks[0].body[0]
    c, (h, w) = stem.cin, stem.in_hw
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


def candidates(space: SearchSpace, max_level: int | None = None) -> st.SearchStrategy[Candidate]:
    """Hypothesis strategy: one level per group, uniformly from ``0..max_level``."""
    top = space.num_levels - 1 if max_level is None else max_level
    return st.lists(st.integers(0, top), min_size=space.num_groups,
                    max_size=space.num_groups).map(lambda c: Candidate(tuple(c)))


def random_candidates(space: SearchSpace, n: int, seed: int) -> list[Candidate]:
    rng = random.Random(seed)
    return [space.random(rng) for _ in range(n)]


def check_widths(space, cand, net):
    """Every conv, BN and the classifier have exactly the candidate's widths (via the plan)."""
    widths = space.widths(cand)
    by_group = space.widths_by_group(cand)
    seen_groups = set()
    n_convs = 0
    for block in space.plan.blocks:
        layers = [(s, False) for s in block.body] + [(s, True) for s in block.shortcut or ()]
        for spec, in_shortcut in layers:
            if isinstance(spec, MaxPoolSpec):
                continue
            n_convs += 1
            unit = net.get_submodule(conv_path(block, spec, in_shortcut))
            assert isinstance(unit, ConvBNAct)
            conv, bn = unit.conv, unit.bn
            cin, cout = space.resolve(spec.cin, widths), space.resolve(spec.cout, widths)
            for ref, w in ((spec.cin, cin), (spec.cout, cout)):
                if isinstance(ref, str):
                    assert w == by_group[ref]
                    seen_groups.add(ref)
            assert (conv.in_channels, conv.out_channels) == (cin, cout)
            assert conv.groups == (cin if spec.depthwise else 1)
            assert conv.kernel_size == (spec.kernel,) * 2 and conv.stride == (spec.stride,) * 2
            assert conv.padding == (spec.kernel // 2,) * 2 and conv.bias is None
            # real tensors of the pruned size, nothing masked
            assert conv.weight.shape == (cout, 1 if spec.depthwise else cin, spec.kernel,
                                         spec.kernel)
            assert bn.num_features == cout
            assert bn.weight.shape == bn.bias.shape == bn.running_mean.shape == (cout,)
    head = space.plan.head
    fc = net.get_submodule(f"{head.name}.fc")
    assert fc.weight.shape == (head.cout, by_group[head.cin]) and fc.bias.shape == (head.cout,)
    assert seen_groups == set(by_group)
    assert n_convs == sum(isinstance(m, nn.Conv2d) for m in net.modules())


PG_ADMIN_URL = os.environ.get("METAPRUNE_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh, migrated PostgreSQL database for one test module, dropped afterwards; skipped
    with the reason only where no PostgreSQL answers (CI always has one)."""
    from sqlalchemy import make_url, text

    from app.db import head_revision, make_engine, upgrade

    try:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 — any failure to connect means: no PostgreSQL here
        pytest.skip(f"PostgreSQL unreachable at {make_url(PG_ADMIN_URL).host}:"
                    f"{make_url(PG_ADMIN_URL).port}: {type(e).__name__}")
    name = f"metaprune_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        assert upgrade(url) == head_revision()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory):
    """A migrated SQLite database file for one test module."""
    from app.db import head_revision, upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'service.db'}"
    assert upgrade(url) == head_revision()
    return url


def emptied_engine(url: str):
    """An engine on the migrated database ``url`` with every job, token and worker deleted."""
    from sqlalchemy import delete

    from app.db import make_engine
    from app.models import ApiToken, Job, WorkerPresence

    engine = make_engine(url)
    with engine.begin() as conn:
        for table in (Job, ApiToken, WorkerPresence):
            conn.execute(delete(table))
    return engine


def sigkill_at(proc, marker, timeout: float) -> None:
    """SIGKILL ``proc`` as soon as the file ``marker`` exists (it must still be running)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the process ended early: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"no {marker.name} within {timeout:g} s"
        time.sleep(0.005)
    assert proc.poll() is None  # killed mid-run, not after it
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


# --- the job service's worker, as the worker and reliability tests drive it -------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a job spec that a worker runs in seconds (the smoke preset on a tiny network, checkpointing
# every 3 steps) and one that would train for minutes: only ever killed, cancelled or fenced out
SMOKE_JOB = {"arch": "test_mobilenet_v2", "dataset": "synthetic", "preset": "smoke",
             "device": "cpu", "budget": {"macs_ratio": 0.5},
             "metanet": {"epochs": 4, "checkpoint_every": 3},
             "search": {"population": 8, "keep_top": 8, "parents": 4, "mutants": 4,
                        "crossovers": 4, "generations": 2}}
LONG_JOB = {**SMOKE_JOB, "metanet": {"epochs": 200, "checkpoint_every": 3}}


def submit_job(engine, spec, max_attempts: int = 3, owner: str = "alice") -> str:
    """Queue ``spec`` straight through :func:`app.queue.submit`; the new job's id."""
    from sqlalchemy.orm import Session

    from app import queue

    with Session(engine, expire_on_commit=False) as s:
        job = queue.submit(s, owner, spec, max_attempts=max_attempts)
        s.commit()
        return job.id


def job_row(engine, job_id):
    """The job's row as it is now (any owner)."""
    from sqlalchemy.orm import Session

    from app import queue

    with Session(engine, expire_on_commit=False) as s:
        return queue.get_job(s, job_id, None)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def record_progress(monkeypatch) -> list[dict]:
    """Every progress write the worker makes (with whether it applied)."""
    import time

    from app import queue

    writes, original = [], queue.report_progress

    def spy(*args, **kwargs):
        applied = original(*args, **kwargs)
        writes.append({**kwargs, "applied": applied, "t": time.monotonic()})
        return applied

    monkeypatch.setattr(queue, "report_progress", spy)
    return writes


def worker_process(settings, worker_id: str, *args: str, lease_seconds: float | None = None,
                   stdout=None):
    """A real ``metaprune worker --once`` process on ``settings``' database and artifact folder
    (one CPU thread; ``lease_seconds``: a short lease, heartbeat a quarter of it). stderr is a
    pipe (read it on failure), stdout goes to ``stdout`` (default: nowhere)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if lease_seconds is not None:
        env.update(METAPRUNE_LEASE_SECONDS=str(lease_seconds),
                   METAPRUNE_HEARTBEAT_SECONDS=str(lease_seconds / 4))
    return subprocess.Popen(
        [sys.executable, "-m", "pruning.cli", "worker", "--once", "--device", "cpu",
         "--database-url", settings.database_url, "--artifact-dir", str(settings.artifact_dir),
         "--worker-id", worker_id, "--quiet", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL if stdout is None else stdout,
        stderr=subprocess.PIPE)


def stop_process(proc) -> None:
    """Kill ``proc`` if it still runs, reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def killed_worker_is_resumed(engine, settings, spec, reference, monkeypatch) -> None:
    """A ``metaprune worker`` process SIGKILLed at its first PruningNet checkpoint: the job stays
    ``running`` until its lease (2 s) expires, the reaper re-queues it, a second worker resumes it
    from the checkpoint and finishes it exactly once, with the result of ``reference`` (the id
    and final row of the same spec run uninterrupted, artifacts under ``settings``)."""
    from pathlib import Path

    from app import queue
    from app.worker import Worker
    from pruning.checkpoint import read_json

    ref_id, ref_row = reference
    job_id = submit_job(engine, spec)
    run_dir = Path(settings.artifact_dir) / "jobs" / job_id
    proc = worker_process(settings, "w-killed", lease_seconds=2)
    try:
        sigkill_at(proc, run_dir / "metanet" / "state.safetensors", 60)  # first checkpoint
    finally:
        stop_process(proc)
    assert not (run_dir / "metanet" / "pruningnet.safetensors").exists()  # killed mid-stage
    job = job_row(engine, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 1, "w-killed")

    assert queue.reap(engine) == {}  # the lease (2 s) still runs
    wait_for(lambda: queue.reap(engine) == {job_id: "queued"}, timeout=10, what="the reaper")

    finishes, original = [], queue.finish
    monkeypatch.setattr(queue, "finish",
                        lambda *a, **k: finishes.append(original(*a, **k)) or finishes[-1])
    writes = record_progress(monkeypatch)
    assert Worker(settings, "w-second", device="cpu").run_once()
    job = job_row(engine, job_id)
    assert (job.status, job.attempt, job.progress) == ("succeeded", 2, 1.0)
    assert finishes == [True]
    # the second attempt resumed the PruningNet training from the killed worker's checkpoint
    first_metanet = next(w for w in writes if w["stage"] == "metanet")
    assert first_metanet["detail"]["step"] > 0
    # exactly one completion: the killed attempt can no longer finish the job
    assert not original(engine, job_id, "w-killed", 1)
    art = Path(settings.artifact_dir) / "jobs"
    assert read_json(art / job_id / "artifacts" / "search.json")["history"] == \
        read_json(art / ref_id / "artifacts" / "search.json")["history"]
    assert job.detail["result"] == ref_row.detail["result"] | {
        "elapsed_s": job.detail["result"]["elapsed_s"]}


# --- the REST API in-process, on the module's SQLite database ----------------------------------

API_SPEC = {"arch": "test_mobilenet_v1", "dataset": "synthetic", "budget": {"macs_ratio": 0.5},
            "preset": "smoke"}
API_SPEC_READING_A_FOLDER = {**API_SPEC, "dataset": "fashion-mnist"}  # synthetic reads none


@pytest.fixture
def engine(sqlite_url):
    """An engine on the module's migrated SQLite database, emptied first (modules that run on
    other databases define their own ``engine``)."""
    eng = emptied_engine(sqlite_url)
    yield eng
    eng.dispose()


def token_for(engine, owner: str, name: str = "t") -> str:
    """A new API token of ``owner``."""
    from sqlalchemy.orm import Session

    from app.auth import create_token

    with Session(engine) as s:
        token = create_token(s, owner, name)
        s.commit()
    return token


def client_for(url: str, **overrides):
    """A TestClient of the app on ``url`` with auth on (``overrides``: other settings)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(database_url=url, **{"require_auth": True, **overrides})
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class EagerGraphs:
    """Stands in for :class:`pruning.train.CudaGraphs` on a CPU: ``capture`` records nothing
    (it counts captures) and each replay runs the captured body — the semantics of a CUDA graph,
    without a GPU."""

    captures = 0
    side_stream = staticmethod(contextlib.nullcontext)

    @classmethod
    def capture(cls, body):
        cls.captures += 1
        return body
