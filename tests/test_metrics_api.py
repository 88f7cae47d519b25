"""``/metrics`` (Prometheus text format) and ``/v1/configurations`` on SQLite (a migrated
temporary file), with jobs driven through ``app.queue``'s functions."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import queue
from app.auth import create_token
from app.main import create_app
from app.models import STATUSES, Job, utcnow
from app.settings import Settings

pytestmark = pytest.mark.timeout(30)

SPEC = {"arch": "test_mobilenet_v1", "dataset": "synthetic", "budget": {"macs_ratio": 0.5},
        "preset": "smoke"}
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def bearer(engine, owner):
    with Session(engine) as s:
        token = create_token(s, owner, "t")
        s.commit()
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(engine, sqlite_url):
    with TestClient(create_app(Settings(database_url=sqlite_url, require_auth=True))) as client:
        client.alice = bearer(engine, "alice")
        client.bob = bearer(engine, "bob")
        yield client


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Samples by (name, labels); checks every line is a comment or a well-formed sample."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = LINE.match(line)
        assert m, f"malformed line {line!r}"
        name, _, body, value = m.groups()
        pairs = frozenset(LABEL.findall(body or ""))
        samples[(name, pairs)] = float(value)
    return samples


def sample(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def run_job(engine, owner, spec=SPEC, *, result=None, fail=False, cancel=False, when=None):
    """Submit a job and take it to its end through app.queue (a fake worker)."""
    with Session(engine) as s:
        job = queue.submit(s, owner, spec, now=when)
        s.commit()
        job_id = job.id
    if cancel:
        with Session(engine) as s:
            queue.request_cancel(s, job_id, owner)
            s.commit()
        return job_id
    claimed = queue.claim(engine, "w1")
    assert claimed.id == job_id
    if fail:
        assert queue.fail(engine, job_id, "w1", claimed.attempt, error_kind="x",
                          error_message="boom")
    elif result is not None:
        assert queue.finish(engine, job_id, "w1", claimed.attempt,
                            detail={"attempt": claimed.attempt, "result": result})
    return job_id


def result_of(macs, key="1-2-3", acc=0.5):
    return {"metapruning": {"candidate": key, "widths": {"stem": 8, "stage1": 16}, "macs": macs,
                            "params": macs // 10, "test_accuracy": acc},
            "uniform": {"candidate": "2-2-2", "macs": macs, "params": 1, "test_accuracy": 0.4},
            "budget": {"macs_ratio": 0.5, "macs": macs + 1}, "elapsed_s": 1.0}


def test_metrics_format_and_job_gauges(api, engine):
    run_job(engine, "alice", result=result_of(1000))
    run_job(engine, "alice", fail=True)
    run_job(engine, "bob", cancel=True)
    run_job(engine, "bob")  # stays running
    with Session(engine) as s:
        queue.submit(s, "bob", SPEC)  # stays queued
        s.commit()
        truth = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    r = api.get("/metrics")  # no auth
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE metaprune_jobs gauge" in r.text
    assert "# TYPE metaprune_http_requests_total counter" in r.text
    assert "# TYPE metaprune_http_request_duration_seconds histogram" in r.text
    samples = parse(r.text)
    for status in STATUSES:
        assert sample(samples, "metaprune_jobs", status=status) == truth.get(status, 0), status
    assert truth == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 1}
    assert sample(samples, "metaprune_build_info", version=api.app.version) == 1
    assert sample(samples, "metaprune_workers") == sample(samples, "metaprune_workers_cuda") == 0
    queue.worker_seen(engine, "w1", cuda=False)
    queue.worker_seen(engine, "w2", cuda=True)
    samples = parse(api.get("/metrics").text)
    assert (sample(samples, "metaprune_workers"), sample(samples, "metaprune_workers_cuda")) \
        == (2, 1)
    assert "alice" not in r.text and "bob" not in r.text  # counts only


def test_a_retry_is_counted_under_its_route_template(api, engine):
    failed = run_job(engine, "alice", fail=True)
    for code in (200, 409):  # queued again, then nothing to retry
        assert api.post(f"/v1/jobs/{failed}/retry", headers=api.alice).status_code == code
    samples = parse(api.get("/metrics").text)
    for code in ("200", "409"):
        assert sample(samples, "metaprune_http_requests_total", method="POST",
                      route="/v1/jobs/{job_id}/retry", status=code) == 1
    assert sample(samples, "metaprune_jobs", status="queued") == 1
    assert not any(failed in str(key) for key in samples)


def test_request_counter_uses_route_templates(api, engine):
    job_id = run_job(engine, "alice", result=result_of(1000))
    for _ in range(3):
        assert api.get(f"/v1/jobs/{job_id}", headers=api.alice).status_code == 200
    assert api.get("/v1/jobs/nope", headers=api.alice).status_code == 404
    assert api.get("/no/such/path").status_code == 404
    assert api.get("/healthz").status_code == 200
    assert api.get("/openapi.json").status_code == 200  # a Starlette route, not FastAPI's
    # answered before routing, by the body guard: still counted under the route's template
    assert api.post("/v1/jobs", content=b"x", headers={**api.alice, "Content-Type":
                                                       "text/plain"}).status_code == 415
    samples = parse(api.get("/metrics").text)
    assert sample(samples, "metaprune_http_requests_total", method="POST", route="/v1/jobs",
                  status="415") == 1
    assert sample(samples, "metaprune_http_requests_total", method="GET", route="/openapi.json",
                  status="200") == 1
    route = "/v1/jobs/{job_id}"
    assert sample(samples, "metaprune_http_requests_total", method="GET", route=route,
                  status="200") == 3
    assert sample(samples, "metaprune_http_requests_total", method="GET", route=route,
                  status="404") == 1
    assert sample(samples, "metaprune_http_requests_total", method="GET", route="unmatched",
                  status="404") == 1
    assert not any(job_id in str(key) for key in samples)
    count = sample(samples, "metaprune_http_request_duration_seconds_count", method="GET",
                   route=route)
    assert count == 4
    assert sample(samples, "metaprune_http_request_duration_seconds_bucket", method="GET",
                  route=route, le="+Inf") == 4
    buckets = sorted((float(dict(k[1])["le"].replace("+Inf", "inf")), v)
                     for k, v in samples.items()
                     if k[0] == "metaprune_http_request_duration_seconds_bucket"
                     and dict(k[1]).get("route") == route)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert sample(samples, "metaprune_http_request_duration_seconds_sum", method="GET",
                  route=route) > 0
    again = parse(api.get("/metrics").text)
    assert sample(again, "metaprune_http_requests_total", method="GET", route="/metrics",
                  status="200") == 1  # the first scrape, counted once it finished


def test_configurations_filters_and_owner_scope(api, engine):
    t0 = utcnow() - timedelta(hours=1)
    other = {**SPEC, "arch": "test_resnet"}
    mnist = {**SPEC, "dataset": "fashion-mnist"}
    ids = {
        "a1": run_job(engine, "alice", result=result_of(1000, "a1"), when=t0),
        "a2": run_job(engine, "alice", result=result_of(2000, "a2"),
                      when=t0 + timedelta(minutes=1)),
        "a3": run_job(engine, "alice", other, result=result_of(3000, "a3"),
                      when=t0 + timedelta(minutes=2)),
        "a4": run_job(engine, "alice", mnist, result=result_of(4000, "a4"),
                      when=t0 + timedelta(minutes=3)),
    }
    run_job(engine, "alice", fail=True)  # not succeeded: never listed
    run_job(engine, "bob", result=result_of(1500, "b1"))

    def get(**params):
        r = api.get("/v1/configurations", params=params, headers=api.alice)
        assert r.status_code == 200, r.text
        return r.json()

    page = get()
    assert [c["candidate"] for c in page["items"]] == ["a4", "a3", "a2", "a1"]  # newest first
    assert page["total"] == 4 and page["next_offset"] is None
    first = page["items"][3]
    assert first == {"job_id": ids["a1"], "arch": "test_mobilenet_v1", "dataset": "synthetic",
                     "width_mult": None, "budget": {"macs_ratio": 0.5, "macs": 1001},
                     "candidate": "a1", "widths": {"stem": 8, "stage1": 16}, "macs": 1000,
                     "params": 100, "test_accuracy": 0.5,
                     "created_at": first["created_at"]}
    assert [c["candidate"] for c in get(arch="test_mobilenet_v1")["items"]] == ["a4", "a2", "a1"]
    assert [c["candidate"] for c in get(dataset="fashion-mnist")["items"]] == ["a4"]
    assert [c["candidate"] for c in get(min_macs=1500, max_macs=3000)["items"]] == ["a3", "a2"]
    assert [c["candidate"] for c in get(arch="test_mobilenet_v1", max_macs=2000)["items"]] == \
        ["a2", "a1"]
    assert get(arch="vgg99")["items"] == []

    p1 = get(limit=3)
    assert [c["candidate"] for c in p1["items"]] == ["a4", "a3", "a2"]
    assert p1["total"] == 4 and p1["next_offset"] == 3
    p2 = get(limit=3, offset=p1["next_offset"])
    assert [c["candidate"] for c in p2["items"]] == ["a1"] and p2["next_offset"] is None
    p = get(min_macs=1500, limit=1, offset=1)
    assert [c["candidate"] for c in p["items"]] == ["a3"] and p["total"] == 3

    bob = api.get("/v1/configurations", headers=api.bob).json()
    assert [c["candidate"] for c in bob["items"]] == ["b1"]
    assert api.get("/v1/configurations").status_code == 401
    bad = api.get("/v1/configurations", params={"min_macs": 5, "max_macs": 1},
                  headers=api.alice)
    assert bad.status_code == 422
    assert api.get("/v1/configurations", params={"limit": 0}, headers=api.alice
                   ).status_code == 422
    doc = api.get("/openapi.json").json()
    assert {"/metrics", "/v1/configurations"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["ConfigurationPage"]["examples"]


def test_a_database_outage_is_a_json_503_and_metrics_still_answer(api, monkeypatch):
    """The database gone while serving: API calls answer 503 with a JSON detail (as /readyz
    does), not a plain-text 500; /metrics still gives the HTTP metrics, with
    metaprune_database_up 0 in place of the queue's gauges."""
    from sqlalchemy.exc import OperationalError

    from app.routes import metrics as metrics_route
    from app.services import jobs

    def gone(*args, **kwargs):
        raise OperationalError("SELECT …", {}, Exception("connection refused"))

    assert sample(parse(api.get("/metrics").text), "metaprune_database_up") == 1
    monkeypatch.setattr(jobs, "list_jobs", gone)
    monkeypatch.setattr(metrics_route, "job_counts", gone)
    r = api.get("/v1/jobs", headers=api.alice)
    assert r.status_code == 503 and r.json() == {"detail": "database unreachable: "
                                                           "OperationalError"}
    r = api.get("/metrics")
    samples = parse(r.text)
    assert r.status_code == 200 and sample(samples, "metaprune_database_up") == 0
    assert sample(samples, "metaprune_jobs", status="queued") is None
    assert sample(samples, "metaprune_http_requests_total", method="GET", route="/v1/jobs",
                  status="503") == 1
