"""A schemathesis run against the OpenAPI document, in-process (ASGI), on SQLite and PostgreSQL.

Every operation is called with generated valid and invalid requests (schemathesis' examples,
coverage, fuzzing and stateful phases), always with an API token, and every answer must be free
of server errors and conform to the document (status codes, content types, headers, bodies,
server-sent events). The database holds jobs in every state (queued, running with a search in
progress, succeeded with artifacts, failed, cancelled, and one of another owner), and the
job-scoped operations are called with those ids as well as with generated ones and with ids
schemathesis finds in earlier responses, so that they answer more than 404s.

The run is deterministic (a fixed seed, derandomised Hypothesis, no example database). Event
streams of finished jobs end by themselves; one of an unfinished job is cut by a short request
timeout, so no call blocks.

Why not ``schemathesis.pytest.from_fixture``: with pytest 9 its lazy loader fails
(``'Function' object has no attribute '_nodeid'``, schemathesis 4.32.5), so the run uses
schemathesis' engine (what ``schemathesis run`` does) and reports its failures.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.engine import Status
from schemathesis.engine import events as engine_events
from schemathesis.python import asgi as schemathesis_asgi
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from app import queue
from app.auth import create_token
from app.db import make_engine
from app.main import create_app
from app.models import Job
from app.services.artifacts import parse_range
from app.settings import Settings

pytestmark = pytest.mark.timeout(240)

SPEC = {"arch": "test_mobilenet_v1", "dataset": "synthetic", "budget": {"macs_ratio": 0.5},
        "preset": "smoke", "seed": 0}
RECORD = {"key": "1-2", "generation": 0, "widths": {"stem": 8, "stage1": 16}, "macs": 1000,
          "params": 100, "score": 0.5}
FILES = {"model.onnx": b"onnx" * 100, "pareto.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 50,
         "search.json": json.dumps({"history": [RECORD], "best": "1-2",
                                    "generations": 1}).encode()}
RESULT = {"metapruning": {"candidate": "1-2", "widths": {"stem": 8, "stage1": 16},
                          "macs": 1000, "params": 100, "test_accuracy": 0.5},
          "budget": {"macs_ratio": 0.5, "macs": 1200}}
FINISHED = ("succeeded", "failed", "cancelled")

# Every check whose premise the document can express. Left out: `positive_data_acceptance` (a
# schema-valid spec may still be refused: "exactly one budget", known architectures) and
# `ensure_resource_availability` (a new job has no search results yet: 404 by design).
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance",
          "negative_data_rejection", "missing_required_header", "unsupported_method",
          "ignored_auth", "use_after_free")
MAX_EXAMPLES = 25  # per operation, in the fuzzing phase; the other phases add their own cases
ARTIFACT = "/v1/jobs/{job_id}/artifacts/{name}"
EVENTS = "GET /v1/jobs/{job_id}/events"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DELETE = "DELETE /v1/jobs/{job_id}"
DOOMED = tuple(f"doomed-{i}" for i in range(4))  # finished jobs only DELETE is given


def seed_jobs(engine, artifact_dir) -> dict[str, str]:
    """``alice``'s jobs in every state and a succeeded one of ``bob``'s; their ids by name.
    And the :data:`DOOMED` ones, for DELETE, so that it leaves the others in place."""
    ids = {}
    with Session(engine) as s:
        for name, owner in (("queued", "alice"), ("running", "alice"), ("succeeded", "alice"),
                            ("failed", "alice"), ("cancelled", "alice"), ("others", "bob"),
                            *((name, "alice") for name in DOOMED)):
            ids[name] = queue.submit(s, owner, {**SPEC, "seed": len(ids)}).id
        s.commit()
    done = dict(status="succeeded", stage="done", progress=1.0, attempt=1,
                detail={"result": RESULT})
    values = {
        "running": dict(status="running", stage="search", progress=0.4, attempt=1,
                        lease_owner="w", detail={"generation": 0}),
        "succeeded": done,
        "failed": dict(status="failed", stage="metanet", attempt=3, error_kind="oom",
                       error_message="out of memory"),
        "cancelled": dict(status="cancelled", cancel_requested=True),
        "others": dict(status="succeeded", stage="done", progress=1.0, detail={"result": RESULT}),
        **{name: done for name in DOOMED},
    }
    with engine.begin() as conn:
        for name, vals in values.items():
            conn.execute(update(Job).where(Job.id == ids[name]).values(**vals))
    for name in ("succeeded", "others", *DOOMED):
        folder = artifact_dir / "jobs" / ids[name] / "artifacts"
        folder.mkdir(parents=True)
        for file, data in FILES.items():
            (folder / file).write_bytes(data)
        config = {"arch": SPEC["arch"], "files": {f: _sha(d) for f, d in FILES.items()}}
        (folder / "config.json").write_text(json.dumps(config))
    state = artifact_dir / "jobs" / ids["running"] / "search"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"records": [RECORD], "generation": 0}))
    return ids


@dataclass
class Service:
    backend: str
    app: object
    headers: dict[str, str]
    ids: dict[str, str]
    url: str


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres",
                                                               marks=pytest.mark.postgres)])
def service(request, tmp_path_factory):
    """The app on a migrated database (SQLite file, or fresh PostgreSQL) with seeded jobs."""
    url = request.getfixturevalue(f"{request.param}_url")
    artifact_dir = tmp_path_factory.mktemp("artifacts")
    engine = make_engine(url)
    with Session(engine) as s:
        token = create_token(s, "alice", "schemathesis")
        s.commit()
    ids = seed_jobs(engine, artifact_dir)
    engine.dispose()
    datasets = tmp_path_factory.mktemp("datasets")
    settings = Settings(database_url=url, require_auth=True, artifact_dir=artifact_dir,
                        dataset_roots=[datasets], max_queued_per_owner=5,
                        events_poll_seconds=0.01, events_heartbeat_seconds=0.05)
    yield Service(request.param, create_app(settings), {"Authorization": f"Bearer {token}"},
                  ids, url)
    schemathesis_asgi.shutdown_lifespans()  # the engine schemathesis started for the app


@dataclass
class RunResult:
    """What a schemathesis run saw: failed checks, errors, and per operation the status codes
    of its answers, the seeded job ids it was called with and its event-stream bodies."""

    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seeded: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    streams: list[bytes] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"RunResult({len(self.failures)} failures, {len(self.errors)} errors, "
                f"{sum(map(sum, [c.values() for c in self.statuses.values()]))} responses)")


def load_schema(service: Service):
    """The app's OpenAPI document as schemathesis loads it over ASGI, configured for the run."""
    config = schemathesis.Config.from_dict({
        "seed": 20240601,
        "continue-on-failure": True,
        "headers": service.headers,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "max-stream-events": 3,
        "request-timeout": 10,
        # an unfinished job's stream never ends: cut it early (a finished job's ends by itself)
        "operations": [{"include-name": EVENTS, "request-timeout": 0.5},
                       # their cases spread over every seeded job and every artifact name
                       *({"include-name": f"{method} {ARTIFACT}",
                          "generation": {"max-examples": 3 * MAX_EXAMPLES}}
                         for method in ("GET", "HEAD"))],
    })
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.app, config=config)
    kept = [i for name, i in service.ids.items() if name not in DOOMED]
    # DELETE: the doomed jobs, and those it must refuse (unfinished: 409; bob's: 404)
    to_delete = [service.ids[name] for name in (*DOOMED, "queued", "running", "others")]

    def schema_valid(params) -> bool:  # a negative case keeps its invalid value
        return all(isinstance(params.get(k, ""), str) and len(params.get(k, "")) <= limit
                   for k, limit in (("job_id", 64), ("name", 255)))

    turns: Counter = Counter()  # per operation

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        """The generated job id, or one of the seeded jobs' (artifact names of a succeeded
        one), in turn: ``sampled_from`` would leave some out, depending on what ran before."""
        if not path_parameters or "job_id" not in path_parameters or not schema_valid(
                path_parameters):
            return st.just(path_parameters)
        label = context.operation.label if context.operation is not None else ""
        seeded = to_delete if label == DELETE else kept
        choices = [path_parameters] + [{**path_parameters, "job_id": i} for i in seeded]
        if "name" in path_parameters:  # every seeded job with a real name too
            choices += [{**path_parameters, "job_id": i, "name": "model.onnx"} for i in seeded]
            choices += [{**path_parameters, "job_id": service.ids["succeeded"], "name": name}
                        for name in ("config.json", *FILES)]
        turns[label] += 1
        return st.just(choices[turns[label] % len(choices)])

    return schema


def describe_failure(label: str, node, case_id: str, recorder) -> str:
    info = node.failure_info
    response = recorder.find_response(case_id=case_id)
    status = response.status_code if response is not None else "no response"
    return (f"{label}: {node.name}: {info.failure.title} ({status})\n"
            f"{info.failure.message}\n{info.code_sample}")


@pytest.fixture(scope="module")
def run(service) -> RunResult:
    """One schemathesis run over every operation of the document."""
    result = RunResult()
    seeded = {v: k for k, v in service.ids.items()}
    for event in schemathesis.engine.from_schema(load_schema(service)).execute():
        if isinstance(event, engine_events.ScenarioFinished):
            recorder = event.recorder
            for case_id, nodes in recorder.checks.items():
                result.failures += [describe_failure(recorder.label, node, case_id, recorder)
                                    for node in nodes if node.status == Status.FAILURE]
            for case_id, node in recorder.cases.items():
                case = node.value
                interaction = recorder.interactions.get(case_id)
                if interaction is None or interaction.response is None:
                    continue
                label = case.operation.label
                result.statuses[label][interaction.response.status_code] += 1
                job_id = (case.path_parameters or {}).get("job_id")
                if job_id in seeded:
                    result.seeded[label].add(seeded[job_id])
                if label == EVENTS and interaction.response.status_code == 200:
                    result.streams.append(interaction.response.content)
        elif isinstance(event, engine_events.NonFatalError):
            result.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, engine_events.FatalError):
            result.errors.append(f"fatal: {event.exception!r}")
    return result


def test_no_server_errors_and_answers_conform_to_the_document(run):
    assert not run.errors, "\n\n".join(run.errors)
    assert not run.failures, f"{len(run.failures)} failed checks:\n\n" + "\n\n".join(
        run.failures[:20])


def test_every_operation_was_called_and_answered_2xx(run, service):
    operations = {f"{method.upper()} {path}"
                  for path, methods in service.app.openapi()["paths"].items()
                  for method in methods}
    assert len(operations) >= 14
    assert operations <= set(run.statuses), operations - set(run.statuses)
    for label in operations:
        assert any(200 <= code < 300 for code in run.statuses[label]), (label,
                                                                        run.statuses[label])
    assert 500 not in {code for counts in run.statuses.values() for code in counts}


@pytest.mark.parametrize("label, codes", [
    ("GET /v1/jobs/{job_id}", {200, 404}),
    ("POST /v1/jobs/{job_id}/cancel", {200, 202, 404, 409}),
    ("POST /v1/jobs/{job_id}/retry", {200, 404, 409}),
    ("GET /v1/jobs/{job_id}/artifacts", {200, 404, 409}),
    (f"GET {ARTIFACT}", {200, 404, 409}),
    (f"HEAD {ARTIFACT}", {200, 404, 409}),
    ("GET /v1/jobs/{job_id}/search", {200, 404}),
    (EVENTS, {200, 404}),
    (DELETE, {200, 404, 409}),
])
def test_job_operations_met_the_seeded_jobs(run, label, codes):
    """Called with seeded jobs in several states, not only with unknown ids."""
    finished = {"doomed-0"} if label == DELETE else {"succeeded"}
    assert {"queued", "running", *finished} <= run.seeded[label], run.seeded[label]
    assert codes <= set(run.statuses[label]), run.statuses[label]


def test_job_operations_met_every_seeded_job(run):
    """Between them: jobs of every state, and one of another owner's."""
    assert set().union(*run.seeded.values()) == {"queued", "running", "succeeded", "failed",
                                                  "cancelled", "others", *DOOMED}


def test_event_streams_of_finished_jobs_ended_with_done(run):
    ended = [body for body in run.streams if b"event: done\n" in body]
    assert ended, "no event stream of a finished job was read to its end"
    for body in ended:
        assert body.index(b"event: progress\n") < body.index(b"event: done\n")
        status = json.loads(body.split(b"event: done\ndata: ")[1].split(b"\n")[0])["status"]
        assert status in FINISHED


# --- server errors found beside the run (inputs it rarely generates), each pinned ------------


def test_job_id_with_nul_is_404_not_500(service):
    """PostgreSQL refuses text holding NUL: every job-scoped operation answered 500."""
    with schemathesis_asgi.get_client(service.app) as client:
        for method, path in (("get", ""), ("delete", ""), ("post", "/cancel"), ("post", "/retry"),
                             ("get", "/artifacts"), ("get", "/artifacts/config.json"),
                             ("get", "/search"), ("get", "/events")):
            r = client.request(method, f"/v1/jobs/a%00b{path}", headers=service.headers)
            assert r.status_code == 404 and r.json() == {"detail": "job not found"}, path
        r = client.get("/v1/jobs/a%00b")  # auth still comes first
        assert r.status_code == 401


def test_configuration_filters_with_nul_match_nothing(service):
    with schemathesis_asgi.get_client(service.app) as client:
        for query in ({"arch": "a\0"}, {"dataset": "\0"}):
            r = client.get("/v1/configurations", params=query, headers=service.headers)
            assert r.status_code == 200, r.text
            assert r.json()["items"] == [] and r.json()["total"] == 0
        r = client.get("/v1/configurations", params={"arch": SPEC["arch"]},
                       headers=service.headers)
        assert r.json()["total"] == 1  # the seeded succeeded job


def test_idempotency_key_with_control_characters_is_422(service):
    with schemathesis_asgi.get_client(service.app) as client:
        r = client.post("/v1/jobs", json=SPEC,
                        headers={**service.headers, "Idempotency-Key": "a\0b"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["header", "idempotency-key"]


def test_range_with_non_ascii_digits_is_ignored_not_500(service):
    """``'²'.isdigit()`` is true (a latin-1 header can carry it) but ``int('²')`` fails."""
    assert parse_range("bytes=²-", 100) is None and parse_range("bytes=0-³", 100) is None
    assert parse_range("bytes=-¹", 100) is None and parse_range("bytes=١-", 100) is None
    assert parse_range("bytes=2-5", 100) == (2, 5)
    url = f"/v1/jobs/{service.ids['succeeded']}/artifacts/model.onnx"
    with schemathesis_asgi.get_client(service.app) as client:  # sends headers as latin-1
        r = client.get(url, headers={**service.headers, "Range": "bytes=²-"})
        assert r.status_code == 200 and r.content == FILES["model.onnx"]
        r = client.get(url, headers={**service.headers, "Range": "bytes=2-5"})
        assert r.status_code == 206 and r.content == FILES["model.onnx"][2:6]


@pytest.mark.parametrize("token, value", [("NaN", math.nan), ("Infinity", math.inf),
                                          ("-Infinity", -math.inf)])
def test_non_finite_number_in_a_body_is_422_naming_the_field(service, token, value):
    """Python's json accepts NaN / Infinity, and FastAPI's 422 echoed it: unrenderable, a 500."""
    body = json.dumps({**SPEC, "width_mult": value})
    assert token in body
    with schemathesis_asgi.get_client(service.app) as client:
        r = client.post("/v1/jobs", data=body, headers={**service.headers,
                                                        "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "width_mult"]]
    assert errors[0]["input"] == token


def test_configurations_beyond_int32_macs(service):
    """MAC counts beyond 2**31 (ResNet-50 at 224 px) are stored, filtered and listed (a 32-bit
    cast on PostgreSQL once made this a 500)."""
    big = 4_100_000_000  # ResNet-50 at 224 px: 4.1 GMACs
    engine = make_engine(service.url)
    try:
        with Session(engine, expire_on_commit=False) as s:
            job = queue.submit(s, "alice", {**SPEC, "arch": "resnet50"})
            s.commit()
        result = {**RESULT, "metapruning": {**RESULT["metapruning"], "macs": big}}
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job.id)
                         .values(status="succeeded", detail={"result": result}))
        with schemathesis_asgi.get_client(service.app) as client:
            r = client.get("/v1/configurations", params={"arch": "resnet50"},
                           headers=service.headers)
            assert r.status_code == 200 and [c["macs"] for c in r.json()["items"]] == [big]
            r = client.get("/v1/configurations", params={"max_macs": 2**31},
                           headers=service.headers)
            assert r.status_code == 200 and r.json()["total"] == 1
    finally:
        with engine.begin() as conn:
            conn.execute(delete(Job).where(Job.spec["arch"].as_string() == "resnet50"))
        engine.dispose()
