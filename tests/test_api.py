"""The REST API on SQLite (a migrated temporary file) and, for the main flow, PostgreSQL (a fresh
database on 127.0.0.1:5432, as in test_queue.py)."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from tests.conftest import API_SPEC as SPEC
from tests.conftest import API_SPEC_READING_A_FOLDER as READS_A_FOLDER
from tests.conftest import bearer, client_for, emptied_engine, job_row, token_for
from app.main import create_app
from app.models import ApiToken, Job
from app.settings import Settings

pytestmark = pytest.mark.timeout(60)

@pytest.fixture
def api(engine, sqlite_url, tmp_path):
    """A client with auth on; ``alice`` and ``bob`` hold tokens."""
    with client_for(sqlite_url, dataset_roots=[tmp_path / "datasets"],
                    max_queued_per_owner=3) as client:
        client.alice = bearer(token_for(engine, "alice"))
        client.bob = bearer(token_for(engine, "bob"))
        yield client


def main_flow(client, engine, headers):
    r = client.post("/v1/jobs", json=SPEC, headers=headers)
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0 and job["attempt"] == 0
    assert job["spec"]["arch"] == "test_mobilenet_v1" and job["spec"]["seed"] == 0  # filled in

    r = client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert r.status_code == 200 and r.json()["id"] == job["id"]

    second = client.post("/v1/jobs", json={**SPEC, "seed": 1}, headers=headers).json()
    page = client.get("/v1/jobs", headers=headers).json()
    assert [j["id"] for j in page["items"]] == [second["id"], job["id"]]  # newest first
    assert page["total"] == 2 and page["next_offset"] is None
    page = client.get("/v1/jobs", params={"limit": 1}, headers=headers).json()
    assert [j["id"] for j in page["items"]] == [second["id"]] and page["next_offset"] == 1
    page = client.get("/v1/jobs", params={"limit": 1, "offset": 1}, headers=headers).json()
    assert [j["id"] for j in page["items"]] == [job["id"]] and page["next_offset"] is None

    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert r.status_code == 409 and r.json() == {"detail": "job already cancelled"}
    page = client.get("/v1/jobs", params={"status": "queued"}, headers=headers).json()
    assert [j["id"] for j in page["items"]] == [second["id"]]
    page = client.get("/v1/jobs", params=[("status", "queued"), ("status", "cancelled")],
                      headers=headers).json()
    assert page["total"] == 2

    # a running job: cancel is requested (202), its worker acknowledges later
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == second["id"])
                     .values(status="running", attempt=1, lease_owner="w"))
    r = client.post(f"/v1/jobs/{second['id']}/cancel", headers=headers)
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True


def test_main_flow_sqlite(api, engine):
    main_flow(api, engine, api.alice)


@pytest.mark.postgres
def test_main_flow_postgres(postgres_url):
    engine = emptied_engine(postgres_url)
    try:
        with client_for(postgres_url) as client:
            main_flow(client, engine, bearer(token_for(engine, "alice")))
            headers = {**bearer(token_for(engine, "alice", "second")), "Idempotency-Key": "k"}
            r = client.post("/v1/jobs", json=SPEC, headers=headers)
            again = client.post("/v1/jobs", json=SPEC, headers=headers)
            assert r.status_code == 201 and again.status_code == 200
            assert again.json()["id"] == r.json()["id"]
    finally:
        engine.dispose()


def test_idempotency_key(api):
    headers = {**api.alice, "Idempotency-Key": "abc-1"}
    first = api.post("/v1/jobs", json=SPEC, headers=headers)
    again = api.post("/v1/jobs", json=SPEC, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert api.get("/v1/jobs", headers=api.alice).json()["total"] == 1
    r = api.post("/v1/jobs", json={**SPEC, "seed": 5}, headers=headers)
    assert r.status_code == 409 and "different spec" in r.json()["detail"]
    # the same key of another owner is another job
    other = api.post("/v1/jobs", json=SPEC, headers={**api.bob, "Idempotency-Key": "abc-1"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_idempotency_key_of_a_job_stored_by_an_older_version(api, engine):
    """A spec stored before a field existed (here: without image_size) is the same spec."""
    headers = {**api.alice, "Idempotency-Key": "old-1"}
    first = api.post("/v1/jobs", json=SPEC, headers=headers).json()
    with Session(engine) as s:
        job = s.get(Job, first["id"])
        job.spec = {k: v for k, v in job.spec.items() if k != "image_size"}
        s.commit()
    again = api.post("/v1/jobs", json=SPEC, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first["id"]


@pytest.mark.parametrize("body, where, words", [
    ({**SPEC, "arch": "vgg99"}, ["body", "arch"], "unknown"),
    ({**SPEC, "budget": {"macs_ratio": 0.5, "params_ratio": 0.5}}, ["body", "budget"],
     "exactly one budget"),
    ({**SPEC, "seed": -1}, ["body", "seed"], "greater than or equal"),
    ({**SPEC, "surprise": 1}, ["body", "surprise"], "extra"),
    ({**SPEC, "metanet_from": "/tmp/run"}, ["body", "metanet_from"], "not accepted"),
    ({**SPEC, "budget": {"macs": 1}}, ["body", "budget"], "is infeasible"),
    ({**SPEC, "budget": {"params_ratio": 1.2}}, ["body", "budget"], "does not prune"),
])
def test_bad_spec_is_422_with_reason(api, body, where, words):
    r = api.post("/v1/jobs", json=body, headers=api.alice)
    assert r.status_code == 422, r.text
    errs = r.json()["detail"]
    assert any(e["loc"][:2] == where and words in e["msg"].lower() for e in errs), errs


def test_budgets_known_only_to_a_worker_are_checked_there(api):
    """A latency budget depends on the worker's device, an image folder's shape on its files:
    the submission is accepted and the worker checks the budget (a failed job says why)."""
    r = api.post("/v1/jobs", json={**SPEC, "budget": {"latency_ratio": 2}}, headers=api.alice)
    assert r.status_code == 201, r.text


def test_data_root_only_under_dataset_roots(api, tmp_path):
    root = tmp_path / "datasets"
    (root / "fmnist").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    for bad in ("/etc", str(root / ".." / "elsewhere"), str(root / "escape"), "datasets/fmnist"):
        r = api.post("/v1/jobs", json={**READS_A_FOLDER, "data_root": bad},
                     headers=api.alice)
        assert r.status_code == 422, bad
        assert r.json()["detail"][0]["loc"] == ["body", "data_root"]
    r = api.post("/v1/jobs", json={**READS_A_FOLDER, "data_root": str(root / "fmnist")},
                 headers=api.alice)
    assert r.status_code == 201


@pytest.mark.parametrize("field, value", [
    ("seed", True), ("seed", "3"), ("train_baseline", "yes"), ("train_baseline", 1),
    ("width_mult", "0.5"), ("budget", {"macs": "5000000"}), ("budget", {"macs_ratio": "0.3"}),
])
def test_spec_values_are_taken_as_their_json_type(api, field, value):
    """A spec's values are not coerced (true was stored as seed 1, "yes" as true), as the
    metanet/search/final settings never were."""
    r = api.post("/v1/jobs", json={**SPEC, field: value}, headers=api.alice)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["body", field]


def test_a_whole_number_written_as_a_float_is_a_count(api):
    """JSON Schema's "integer" (the OpenAPI document's) includes 9001.0: taken as 9001."""
    r = api.post("/v1/jobs", json={**SPEC, "seed": 9001.0, "val_size": 500.0,
                                   "budget": {"macs": 1e5}}, headers=api.alice)
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert (spec["seed"], spec["val_size"], spec["budget"]["macs"]) == (9001, 500, 100_000)
    assert all(type(v) is int for v in (spec["seed"], spec["val_size"], spec["budget"]["macs"]))
    r = api.post("/v1/jobs", json={**SPEC, "seed": 1.5}, headers=api.alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "seed"]


def test_the_worker_checks_data_root_again(api, engine, sqlite_url, tmp_path):
    """A symlink under a root that pointed inside when the job was submitted, and outside when
    a worker takes it: the job fails (invalid_spec) before anything is read."""
    from app.worker import Worker

    root = tmp_path / "datasets"
    (root / "fmnist").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(root / "fmnist")
    r = api.post("/v1/jobs", json={**READS_A_FOLDER, "data_root": str(root / "link")},
                 headers=api.alice)
    assert r.status_code == 201, r.text
    (root / "link").unlink()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    settings = Settings(database_url=sqlite_url, artifact_dir=tmp_path / "art",
                        dataset_roots=[root])
    assert Worker(settings, "w1", device="cpu").run_once()
    job = job_row(engine, r.json()["id"])
    assert (job.status, job.error_kind) == ("failed", "invalid_spec")
    assert job.error_message.startswith("data_root: data_root must be an absolute path under")


def test_data_root_refused_without_roots(engine, sqlite_url):
    with client_for(sqlite_url, require_auth=False) as client:
        r = client.post("/v1/jobs", json={**READS_A_FOLDER, "data_root": "/tmp"})
        assert r.status_code == 422 and "no dataset roots" in r.json()["detail"][0]["msg"]


def test_other_owners_job_is_404(api):
    job = api.post("/v1/jobs", json=SPEC, headers=api.alice).json()
    assert api.get(f"/v1/jobs/{job['id']}", headers=api.bob).status_code == 404
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=api.bob).status_code == 404
    assert api.get("/v1/jobs", headers=api.bob).json()["total"] == 0
    assert api.get(f"/v1/jobs/{uuid.uuid4()}", headers=api.alice).json() == {
        "detail": "job not found"}
    assert api.get(f"/v1/jobs/{job['id']}", headers=api.alice).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": "Basic YTpi"}])
def test_401_without_or_with_a_wrong_token(api, headers):
    for method, path in (("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", "/v1/archs"),
                         ("get", f"/v1/jobs/{uuid.uuid4()}")):
        r = api.request(method, path, headers=headers, json=SPEC if method == "post" else None)
        assert r.status_code == 401 and isinstance(r.json()["detail"], str)
        assert r.headers["www-authenticate"] == "Bearer"


def test_without_auth_owner_is_local(engine, sqlite_url):
    with client_for(sqlite_url, require_auth=False) as client:
        job = client.post("/v1/jobs", json=SPEC).json()
        with Session(engine) as s:
            assert s.get(Job, job["id"]).owner == "local"
        # a token that is sent is still checked
        assert client.get("/v1/jobs", headers=bearer("nope")).status_code == 401


def test_queue_limit_429(api):
    for seed in range(3):
        assert api.post("/v1/jobs", json={**SPEC, "seed": seed},
                        headers=api.alice).status_code == 201
    r = api.post("/v1/jobs", json={**SPEC, "seed": 9}, headers=api.alice)
    assert r.status_code == 429 and "queue limit" in r.json()["detail"]
    assert r.headers["retry-after"] == "30"  # seconds
    assert api.post("/v1/jobs", json=SPEC, headers=api.bob).status_code == 201  # per owner
    first = api.get("/v1/jobs", headers=api.alice).json()["items"][-1]
    api.post(f"/v1/jobs/{first['id']}/cancel", headers=api.alice)
    assert api.post("/v1/jobs", json={**SPEC, "seed": 9}, headers=api.alice).status_code == 201


def test_retry_a_failed_or_cancelled_job(api, engine):
    """Only a failed or cancelled job is queued again (fresh attempts, its error kept until it
    ends again); anything else is a 409 saying its status; another owner's a 404."""
    job = api.post("/v1/jobs", json=SPEC, headers=api.alice).json()
    url = f"/v1/jobs/{job['id']}/retry"
    r = api.post(url, headers=api.alice)
    assert r.status_code == 409 and r.json() == {
        "detail": "job is queued: only a failed or cancelled job can be retried"}
    api.post(f"/v1/jobs/{job['id']}/cancel", headers=api.alice)
    assert api.post(url, headers=api.bob).status_code == 404
    assert api.get(f"/v1/jobs/{job['id']}", headers=api.alice).json()["status"] == "cancelled"
    r = api.post(url, headers=api.alice)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["status"], got["cancel_requested"], got["finished_at"]) == ("queued", False,
                                                                           None)
    with engine.begin() as conn:  # its attempts used up by a full disk
        conn.execute(update(Job).where(Job.id == job["id"]).values(
            status="failed", attempt=3, max_attempts=3, error_kind="storage",
            error_message="the server's storage failed"))
    got = api.post(url, headers=api.alice).json()
    assert (got["status"], got["attempt"], got["max_attempts"]) == ("queued", 3, 6)
    assert got["error_kind"] == "storage"  # until the job ends again
    for status in ("running", "succeeded"):
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job["id"]).values(status=status))
        r = api.post(url, headers=api.alice)
        assert r.status_code == 409 and r.json()["detail"].startswith(f"job is {status}:")
    assert api.post(f"/v1/jobs/{uuid.uuid4()}/retry", headers=api.alice).json() == {
        "detail": "job not found"}


def test_a_retry_counts_against_the_queue_limit(api):
    ids = [api.post("/v1/jobs", json={**SPEC, "seed": seed}, headers=api.alice).json()["id"]
           for seed in range(3)]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.alice)
    assert api.post("/v1/jobs", json={**SPEC, "seed": 9}, headers=api.alice).status_code == 201
    r = api.post(f"/v1/jobs/{ids[0]}/retry", headers=api.alice)  # 3 queued already
    assert r.status_code == 429 and "queue limit" in r.json()["detail"]
    assert api.get(f"/v1/jobs/{ids[0]}", headers=api.alice).json()["status"] == "cancelled"
    api.post(f"/v1/jobs/{ids[1]}/cancel", headers=api.alice)
    assert api.post(f"/v1/jobs/{ids[0]}/retry", headers=api.alice).status_code == 200


def test_delete_a_finished_job_and_its_files(engine, sqlite_url, tmp_path):
    """Only a finished job is deleted, with its run folder (a symlink in it is removed, never
    followed); it is then a 404; a queued or running one is a 409, another owner's a 404."""
    from app.services.jobs import empty_trash

    with client_for(sqlite_url, artifact_dir=tmp_path / "store") as api:
        alice = bearer(token_for(engine, "alice"))
        job = api.post("/v1/jobs", json=SPEC, headers=alice).json()
        url = f"/v1/jobs/{job['id']}"
        for status in ("queued", "running"):
            with engine.begin() as conn:
                conn.execute(update(Job).where(Job.id == job["id"]).values(status=status))
            r = api.delete(url, headers=alice)
            assert r.status_code == 409 and r.json()["detail"].startswith(
                f"job is {status}: cancel it first")
        run_dir = tmp_path / "store" / "jobs" / job["id"]
        (run_dir / "artifacts").mkdir(parents=True)
        (run_dir / "artifacts" / "model.ts").write_bytes(b"m" * 1000)
        (run_dir / "spec.json").write_bytes(b"{}")
        kept = tmp_path / "kept.txt"
        kept.write_text("not the job's")
        (run_dir / "link").symlink_to(kept)
        for status in ("succeeded", "failed", "cancelled"):
            with engine.begin() as conn:
                conn.execute(update(Job).where(Job.id == job["id"]).values(status=status))
            bob = bearer(token_for(engine, "bob", name=f"b-{status}"))
            assert api.delete(url, headers=bob).status_code == 404
        assert run_dir.exists()
        r = api.delete(url, headers=alice)
        assert r.status_code == 200, r.text
        assert r.json() == {"id": job["id"], "deleted": True,
                            "freed_bytes": 1002 + len(str(kept))}
        assert not run_dir.exists() and kept.read_text() == "not the job's"
        assert list((tmp_path / "store" / "trash").iterdir()) == []
        assert api.get(url, headers=alice).status_code == 404
        assert api.delete(url, headers=alice).json() == {"detail": "job not found"}
        # a removal cut short (an API stopped halfway) is finished by the housekeeping
        left = tmp_path / "store" / "trash" / "x-1234" / "metanet"
        left.mkdir(parents=True)
        (left / "state.safetensors").write_bytes(b"s")
        empty_trash(tmp_path / "store" / "trash")
        assert list((tmp_path / "store" / "trash").iterdir()) == []


def test_oversized_body_413(engine, sqlite_url):
    with client_for(sqlite_url, require_auth=False, max_body_bytes=2048) as client:
        big = {**SPEC, "search": {"x": "y" * 4000}}
        r = client.post("/v1/jobs", json=big)
        assert r.status_code == 413 and "larger than 2048" in r.json()["detail"]

        def chunks():  # no Content-Length: Transfer-Encoding: chunked
            yield b'{"arch": "test_mobilenet_v1", "search": {"x": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}}'

        r = client.post("/v1/jobs", content=chunks(),
                        headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and "larger than 2048" in r.json()["detail"]
        assert client.get("/v1/jobs").json()["total"] == 0
        assert client.post("/v1/jobs", json=SPEC).status_code == 201  # small bodies pass


def test_a_queued_job_says_why_it_waits(api, engine):
    """``waiting_reason``: no worker reported within a lease, or (a job asking for CUDA, or
    naming a data_root) none that claims such jobs; null once one runs, and for jobs that are not queued. The reason is
    in submit's answer, a job's, the list's and the event stream's."""
    from app import queue

    r = api.post("/v1/jobs", json=SPEC, headers=api.alice)
    job = r.json()
    assert "no worker is running" in job["waiting_reason"], job
    assert "`metaprune worker`" in job["waiting_reason"]
    on_gpu = api.post("/v1/jobs", json={**SPEC, "device": "cuda"}, headers=api.alice).json()

    def reasons():
        page = api.get("/v1/jobs", headers=api.alice).json()
        assert page["items"][0]["waiting_reason"] == api.get(
            f"/v1/jobs/{on_gpu['id']}", headers=api.alice).json()["waiting_reason"]
        return {j["id"]: j["waiting_reason"] for j in page["items"]}

    queue.worker_seen(engine, "cpu-only", cuda=False)
    got = reasons()
    assert got[job["id"]] is None
    assert "asks for CUDA" in got[on_gpu["id"]] and "GPU" in got[on_gpu["id"]]
    with api.stream("GET", f"/v1/jobs/{on_gpu['id']}/events", headers=api.alice) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                assert "asks for CUDA" in line
                break

    queue.worker_seen(engine, "gpu", cuda=True)
    assert reasons() == {job["id"]: None, on_gpu["id"]: None}
    with engine.begin() as conn:  # a job that names a data_root, and no worker has roots
        spec = conn.execute(select(Job.spec).where(Job.id == job["id"])).scalar_one()
        conn.execute(update(Job).where(Job.id == job["id"])
                     .values(spec={**spec, "data_root": "/datasets/shoes"}))
    assert "names a data_root" in reasons()[job["id"]]
    queue.worker_seen(engine, "with-roots", cuda=False, dataset_roots=True)
    assert reasons() == {job["id"]: None, on_gpu["id"]: None}
    queue.worker_gone(engine, "with-roots")
    queue.worker_gone(engine, "cpu-only")
    queue.worker_gone(engine, "gpu")
    with engine.begin() as conn:  # a job that is not queued never waits for a worker
        conn.execute(update(Job).where(Job.id == job["id"])
                     .values(status="running", attempt=1, lease_owner="w"))
    got = reasons()
    assert got[job["id"]] is None and "no worker is running" in got[on_gpu["id"]]


def test_the_api_reaps_a_dead_worker_s_job(engine, sqlite_url):
    """With no worker left to reap it, the job of a worker that died (its lease expired) goes
    back to the queue through the API's own housekeeping, and then says why it waits; a
    cancel asked of it completes the same way."""
    import time
    from datetime import timedelta

    from app import queue
    from app.models import utcnow

    with client_for(sqlite_url, lease_seconds=0.2) as client:
        headers = bearer(token_for(engine, "alice"))
        ids = [client.post("/v1/jobs", json={**SPEC, "seed": i}, headers=headers).json()["id"]
               for i in range(2)]
        long_ago = utcnow() - timedelta(hours=1)
        for _ in ids:  # claimed by a worker that died at once: its leases expired an hour ago
            assert queue.claim(engine, "dead", lease_seconds=1, now=long_ago)
        # 202: asked of the running job; 200: the housekeeping (every 0.1 s here) re-queued
        # it first, and a queued job is cancelled at once
        assert client.post(f"/v1/jobs/{ids[1]}/cancel", headers=headers).status_code in (200, 202)
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{ids[0]}", headers=headers).json()["status"] == "running":
            assert time.monotonic() < deadline, "not reaped"
            time.sleep(0.05)
        first = client.get(f"/v1/jobs/{ids[0]}", headers=headers).json()
        assert first["status"] == "queued" and first["attempt"] == 1
        assert "no worker is running" in first["waiting_reason"]
        assert client.get(f"/v1/jobs/{ids[1]}", headers=headers).json()["status"] == "cancelled"


def test_health_and_ready(api, tmp_path):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 200
    for url in ("/healthz", "/readyz"):  # probes that use HEAD get the same answer
        assert api.head(url).status_code == 200
    broken = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
    with TestClient(create_app(Settings(database_url=broken))) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and "unreachable" in r.json()["detail"]
        assert client.head("/readyz").status_code == 503


def test_client_mistakes_get_a_4xx_with_a_reason(api):
    """Mistakes a client can make that FastAPI or Starlette answered with a 400, a 500, a
    redirect or a partial ``Allow``: each a JSON error with the right status."""
    r = api.post("/v1/jobs", content=b'{"seed": ' + b"9" * 5000 + b"}",
                 headers={**api.alice, "Content-Type": "application/json"})
    assert r.status_code == 422 and "4300 digits" in r.json()["detail"][0]["msg"]
    r = api.post("/v1/jobs", json={**SPEC, "val_size": 10**400}, headers=api.alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "val_size"]
    r = api.post("/v1/jobs", json={**SPEC, "arch": "x" * 100_000}, headers=api.alice)
    assert r.status_code == 422 and len(r.content) < 3000  # the value is echoed cut short
    assert "100,000 characters" in r.text
    r = api.post("/v1/jobs", json={**SPEC, "levels": ["z" * 10] * 50_000}, headers=api.alice)
    assert r.status_code == 422 and len(r.content) < 20_000
    r = api.post("/v1/jobs", json={**SPEC, "dataset": "imagefolder"}, headers=api.alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "data_root"]
    r = api.delete("/v1/jobs", headers=api.alice)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = api.post("/v1/jobs", json=SPEC, headers=[*api.alice.items(), ("Idempotency-Key", "a"),
                                                  ("Idempotency-Key", "b")])
    assert r.status_code == 422 and "one Idempotency-Key" in r.json()["detail"][0]["msg"]
    for path in (f"/v1/jobs/{'x' * 65}", f"/v1/jobs/{uuid.uuid4()}/artifacts/{'y' * 300}"):
        assert api.get(path, headers=api.alice).status_code == 404, path
    r = api.get("/v1/jobs/", headers=api.alice, follow_redirects=False)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}  # no redirect


def test_every_request_is_logged_with_an_id_and_no_secret(api, caplog):
    with caplog.at_level("INFO", logger="metaprune.access"):
        r = api.get("/v1/jobs", params={"token": "s3cret", "limit": 2}, headers=api.alice)
        mine = api.get("/v1/jobs", headers={**api.alice, "X-Request-ID": "trace-7.a"})
        odd = api.get("/v1/jobs", headers={**api.alice, "X-Request-ID": "a b/c"})
        api.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"})
        api.get("/v1/jobs?a=1;access_token=s3cret", headers=api.alice)
        api.get("/v1/jobs/%0A127.0.0.1%20GET%20/v1/x%20200", headers=api.alice)  # a forged line?
    new_id = r.headers["x-request-id"]
    assert len(new_id) == 32 and mine.headers["x-request-id"] == "trace-7.a"
    assert odd.headers["x-request-id"] not in ("a b/c", new_id)  # not a plain id: a new one
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "metaprune.access"]
    assert len(lines) == 6 and "s3cret" not in caplog.text
    assert "GET /v1/jobs?token=REDACTED&limit=2 200" in lines[0] and lines[0].endswith(new_id)
    assert lines[1].endswith("id=trace-7.a")
    assert "POST /v1/jobs 415" in lines[3]  # refused before routing, logged all the same
    assert "GET /v1/jobs?a=1;access_token=REDACTED 200" in lines[4]
    assert "GET /v1/jobs/%0A127.0.0.1%20GET%20/v1/x%20200 404" in lines[5]  # as sent, one line
    assert all("\n" not in line for line in lines)


def test_a_server_error_is_json(engine, sqlite_url, monkeypatch):
    from app.routes import catalog

    monkeypatch.setattr(catalog, "DatasetList", lambda **_: 1 / 0)
    with TestClient(create_app(Settings(database_url=sqlite_url, require_auth=False)),
                    base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        r = client.get("/v1/datasets", headers={"X-Request-ID": "bug-1"})
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert r.headers["x-request-id"] == "bug-1"


def test_catalog(api, sqlite_url):
    archs = api.get("/v1/archs", headers=api.alice).json()["archs"]
    assert "mobilenet_v2" in archs and not any(a.startswith("test_") for a in archs)
    assert "test_mobilenet_v1" in api.get("/v1/archs", params={"include_test": True},
                                          headers=api.alice).json()["archs"]
    assert api.get("/v1/datasets", headers=api.alice).json()["datasets"] == [
        "fashion-mnist", "imagefolder", "synthetic"]
    with client_for(sqlite_url) as client:  # no dataset roots: no folder to read images from
        assert client.get("/v1/datasets", headers=api.alice).json()["datasets"] == [
            "fashion-mnist", "synthetic"]


def test_openapi_is_complete(api):
    doc = api.get("/openapi.json").json()
    assert {"/healthz", "/readyz", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/retry", "/v1/archs", "/v1/datasets"} <= set(doc["paths"])
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert {"201", "200", "401", "409", "413", "422", "429"} <= set(submit["responses"])
    assert submit["requestBody"]["content"]["application/json"]["examples"]
    assert {"404", "409", "202"} <= set(doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]
                                        ["responses"])
    assert {"200", "404", "409", "429"} <= set(doc["paths"]["/v1/jobs/{job_id}/retry"]["post"]
                                               ["responses"])
    schemas = doc["components"]["schemas"]
    for name in ("JobOut", "JobPage", "ErrorOut", "ArchList", "DatasetList"):
        assert schemas[name].get("examples"), name
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in doc["paths"].values():
        for op in path.values():
            assert op.get("tags") and op.get("summary")


def test_openapi_examples_match_their_schemas(api):
    """Every example the OpenAPI document shows (components, request bodies, responses) is valid
    against its own schema, nulls included (FastAPI drops them unless put back)."""
    import jsonschema_rs

    doc = api.get("/openapi.json").json()

    def check(schema: dict, example, where: str) -> None:
        root = {**schema, "components": doc["components"]}  # $refs resolve from the root
        errors = [e.message for e in jsonschema_rs.validator_for(root).iter_errors(example)]
        assert not errors, (where, errors)

    checked = []
    for name, schema in doc["components"]["schemas"].items():
        for i, example in enumerate(schema.get("examples", [])):
            check(schema, example, f"{name}[{i}]")
            checked.append(name)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            bodies = [("request", op.get("requestBody", {}))] + list(op["responses"].items())
            for code, body in bodies:
                for media in body.get("content", {}).values():
                    examples = [e["value"] for e in media.get("examples", {}).values()]
                    examples += [media["example"]] if "example" in media else []
                    for example in examples:
                        check(media["schema"], example, f"{method} {path} {code}")
                        checked.append(f"{method} {path} {code}")
    assert {"JobOut", "JobPage", "ConfigurationPage", "SearchOut", "post /v1/jobs request",
            "get /v1/jobs/{job_id}/events 200"} <= set(checked)
    job = doc["components"]["schemas"]["JobOut"]["examples"][0]
    assert job["finished_at"] is None and job["detail"]["best"]["key"] == job["detail"]["best_key"]


def test_token_is_stored_hashed(engine):
    token = token_for(engine, "carol", "laptop")
    with Session(engine) as s:
        row = s.scalars(select(ApiToken).where(ApiToken.owner == "carol")).one()
        assert row.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
        values = [str(v) for v in s.execute(text("SELECT * FROM api_tokens")).one()]
    assert token not in " ".join(values) and len(token) >= 43


def test_readme_documents_every_setting():
    """The README's configuration table names every METAPRUNE_* setting, and nothing else."""
    import re
    from pathlib import Path

    from app.settings import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Configuration"):readme.index("### API")]
    documented = set(re.findall(r"^\| `METAPRUNE_([A-Z_]+)`", table, re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_the_api_and_the_client_do_not_import_pytorch():
    """The API validates specs with pruning.spec alone, and the client commands need no PyTorch:
    ~0.7 GB and seconds of start-up saved per API process and per `metaprune status`."""
    import subprocess
    import sys

    code = ("import sys; import app.main, app.routes.jobs, app.routes.catalog, pruning.cli; "
            "from app.main import create_app; create_app(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr
