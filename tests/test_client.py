"""The service's client commands (``metaprune submit | status | jobs | cancel | retry | delete |
watch | download``): against the real app in-process (a migrated temporary SQLite file, tokens
on), and ``download`` against a small fake server implementing the artifact contract."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import queue
from app.auth import create_token
from app.main import create_app
from app.settings import Settings
from pruning import cli
from pruning.client import ApiClient

pytestmark = pytest.mark.timeout(60)

SUBMIT = ["submit", "--arch", "test_mobilenet_v1", "--dataset", "synthetic", "--preset", "smoke",
          "--macs-ratio", "0.5"]


@pytest.fixture
def server(engine, sqlite_url, monkeypatch):
    """The app in-process; every client command talks to it with alice's token."""
    with Session(engine) as s:
        token = create_token(s, "alice", "t")
        s.commit()
    settings = Settings(database_url=sqlite_url, require_auth=True)
    with TestClient(create_app(settings)) as tc:
        monkeypatch.setattr(cli, "_api_client", lambda a: ApiClient(token=token, client=tc))
        tc.token = token
        yield tc


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def submit(capsys, *extra):
    rc, out, err = run(capsys, *SUBMIT, *extra)
    assert rc == 0, err
    return out.strip()


def test_submit_status_jobs_cancel(server, capsys):
    job_id = submit(capsys)
    assert len(job_id) == 36 and "\n" not in job_id

    rc, out, _ = run(capsys, *SUBMIT, "--idempotency-key", "k1", "--json")
    first = json.loads(out)
    assert rc == 0 and first["spec"]["arch"] == "test_mobilenet_v1"
    assert first["spec"]["budget"]["macs_ratio"] == 0.5 and first["status"] == "queued"
    assert submit(capsys, "--idempotency-key", "k1") == first["id"]  # a replay: the same job

    rc, out, _ = run(capsys, "status", job_id)
    assert rc == 0 and out.startswith(job_id) and "queued" in out and out.count("\n") == 1
    rc, out, _ = run(capsys, "status", job_id, "--json")
    assert json.loads(out)["id"] == job_id

    rc, out, err = run(capsys, "jobs")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["ID", "STATUS", "STAGE"]
    assert [ln.split()[0] for ln in lines[1:]] == [first["id"], job_id]  # newest first
    assert "2 of 2 jobs" in err
    rc, out, err = run(capsys, "jobs", "--limit", "1", "--json")
    page = json.loads(out)
    assert [j["id"] for j in page["items"]] == [first["id"]] and page["next_offset"] == 1
    rc, out, err = run(capsys, "jobs", "--offset", "-1")  # named as typed, not query.offset
    assert rc == 2 and err == "metaprune: error: --offset must be 0 or more, got -1\n"

    rc, out, _ = run(capsys, "cancel", job_id)
    assert rc == 0 and out.strip() == f"{job_id}: cancelled"
    rc, out, _ = run(capsys, "jobs", "--status", "cancelled")
    assert [ln.split()[0] for ln in out.splitlines()[1:]] == [job_id]

    rc, out, _ = run(capsys, "cancel", job_id)  # already cancelled: done (a retry's answer)
    assert rc == 0 and out.strip() == f"{job_id}: cancelled"
    # a replay of a key whose job has ended says that no new job was queued
    run(capsys, "cancel", first["id"])
    rc, out, err = run(capsys, *SUBMIT, "--idempotency-key", "k1")
    assert rc == 0 and out.strip() == first["id"]
    assert f"--idempotency-key 'k1' already queued job {first['id']}, now cancelled; " \
           "no new job was queued" in err
    rc, _, err = run(capsys, *SUBMIT, "--set", '{"metanet_from": "runs/a"}')
    assert rc == 2 and "use the command-line options" not in err  # submit has none for it
    assert err.startswith("metaprune: error: --set may not give metanet_from: the service "
                          "reuses a PruningNet by itself") and err.count("\n") == 1
    rc, _, err = run(capsys, "status", "no-such-job")
    assert rc == 2 and "HTTP 404" in err and "Traceback" not in err


def test_submit_and_status_say_why_a_queued_job_waits(server, engine, capsys):
    rc, out, err = run(capsys, *SUBMIT)
    job_id = out.strip()
    assert rc == 0 and len(job_id) == 36
    assert err.startswith("metaprune: note: the job is queued, but no worker is running")
    rc, out, _ = run(capsys, "status", job_id)
    assert "queued" in out and "waiting: no worker is running" in out and out.count("\n") == 1
    queue.worker_seen(engine, "w1", cuda=False)
    rc, out, err = run(capsys, *SUBMIT, "--seed", "1")
    assert rc == 0 and err == ""
    assert "waiting" not in run(capsys, "status", job_id)[1]


def test_submit_rejects_bad_options(server, capsys):
    rc, _, err = run(capsys, *SUBMIT, "--set", '{"search": {"generations": -3}}')
    assert rc == 2 and err.count("\n") == 1 and "generations" in err
    for option in ("--out", "--metanet-from"):  # run folders are the server's business
        with pytest.raises(SystemExit) as e:
            cli.main([*SUBMIT, option, "runs/x"])
        assert e.value.code == 2
    usage, error = capsys.readouterr().err.rsplit("error:", 1)
    assert "--metanet-from" not in usage and "unrecognized arguments: --metanet-from" in error


def test_auth_error_is_one_line(server, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_api_client", lambda a: ApiClient(token="wrong", client=server))
    rc, _, err = run(capsys, "jobs")
    assert rc == 2 and err.startswith("metaprune: error: HTTP 401") and err.count("\n") == 1


def _drive(engine, end: str):
    """A fake worker: claim the job, report search progress, then end it as ``end``."""
    def go():
        time.sleep(0.2)
        claimed = queue.claim(engine, "w1")
        assert claimed is not None
        queue.report_progress(engine, claimed.id, "w1", claimed.attempt, stage="search",
                              progress=0.5, detail={"generation": 3, "generations": 6,
                                                    "best": {"score": 0.8, "macs": 1.5e6}})
        time.sleep(0.2)
        if end == "succeeded":
            queue.finish(engine, claimed.id, "w1", claimed.attempt,
                         detail={"result": {"metapruning": {"test_accuracy": 0.9,
                                                            "macs": 1.5e6}}})
        else:
            queue.fail(engine, claimed.id, "w1", claimed.attempt, error_kind="data",
                       error_message="dataset went missing")
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("end", ["succeeded", "failed"])
def test_watch(server, engine, capsys, end):
    job_id = submit(capsys)
    thread = _drive(engine, end)
    rc, out, err = run(capsys, "watch", job_id, "--interval", "0.05")
    thread.join(5)
    assert "[search] running 50%  best est. val 80.00% at 1.50M MACs" in err
    assert err.count("metaprune: waiting: no worker is running") == 1  # while queued, once
    if end == "succeeded":
        assert rc == 0 and "succeeded" in out and "test 90.00%" in out
    else:
        assert rc == 1 and "dataset went missing" in err and "failed" in err


def test_watch_cancelled_and_json(server, capsys):
    job_id = submit(capsys)
    run(capsys, "cancel", job_id)
    rc, out, _ = run(capsys, "watch", job_id, "--json", "--quiet")
    assert rc == 1 and json.loads(out)["status"] == "cancelled"


# --- download, against a fake server implementing the artifact contract ----------------------

FILES = {"model.onnx": b"onnx" * 5000, "report.json": b'{"ok": true}', "config.json": b"{}"}


def fake_server(*, corrupt: str | None = None, bad_header: str | None = None,
                damaged: str | None = None):
    digests = {n: hashlib.sha256(b).hexdigest() for n, b in FILES.items()}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, json={"detail": "missing or invalid API token"})
        parts = request.url.path.strip("/").split("/")
        if parts[:2] != ["v1", "jobs"] or len(parts) < 4 or parts[3] != "artifacts" \
                or parts[2] != "J1":
            return httpx.Response(404, json={"detail": "job not found"})
        if len(parts) == 4:
            return httpx.Response(200, json={"items": [
                {"name": n, "size": len(b), "sha256": digests[n], "intact": n != damaged}
                for n, b in FILES.items()]})
        name = parts[4]
        if name not in FILES:
            return httpx.Response(404, json={"detail": "artifact not found"})
        if name == damaged:
            return httpx.Response(409, json={"detail": f"artifact {name} is corrupted"})
        body = FILES[name] + (b"!" if name == corrupt else b"")
        header = "0" * 64 if name == bad_header else digests[name]
        return httpx.Response(200, content=body, headers={"X-Content-SHA256": header})

    return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fake")


@pytest.fixture
def fake(monkeypatch):
    state = {"client": fake_server()}
    monkeypatch.setattr(cli, "_api_client",
                        lambda a: ApiClient("http://fake", token="tok", client=state["client"]))
    return state


def test_download_all_and_only(fake, tmp_path, capsys):
    dest = tmp_path / "out"
    rc, out, err = run(capsys, "download", "J1", "--dest", str(dest))
    assert rc == 0, err
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    assert all((dest / n).read_bytes() == b for n, b in FILES.items())
    assert out.splitlines() == [str(dest / n) for n in FILES]
    assert "model.onnx: 20000 bytes, sha256 ok" in err
    # the mode of any new file (umask 022: 0644), not the 0600 of the temporary file
    assert {(dest / n).stat().st_mode & 0o777 for n in FILES} == {0o666 & ~_umask()}

    only = tmp_path / "only"
    rc, out, _ = run(capsys, "download", "J1", "--dest", str(only), "--only",
                     "report.json,model.onnx", "--json")
    assert rc == 0 and sorted(p.name for p in only.iterdir()) == ["model.onnx", "report.json"]
    assert {f["name"] for f in json.loads(out)["files"]} == {"model.onnx", "report.json"}

    rc, _, err = run(capsys, "download", "J1", "--dest", str(tmp_path / "x"),
                     "--only", "model.ts")
    assert rc == 2 and "no artifact named model.ts" in err and not (tmp_path / "x").exists()
    for empty in ("", ","):  # names nothing: not every file, nor "the job has no artifacts"
        rc, _, err = run(capsys, "download", "J1", "--dest", str(tmp_path / "x"),
                         "--only", empty)
        assert rc == 2 and err.startswith("metaprune: error: --only names no artifact"), err
        assert not (tmp_path / "x").exists()
    rc, _, err = run(capsys, "download", "J2", "--dest", str(tmp_path / "y"))
    assert rc == 2 and "HTTP 404: job not found" in err


@pytest.mark.parametrize("how", ["corrupt", "bad_header"])
def test_download_sha256_mismatch_leaves_nothing(fake, tmp_path, capsys, how):
    fake["client"] = fake_server(**{how: "model.onnx"})
    dest = tmp_path / "out"
    rc, _, err = run(capsys, "download", "J1", "--dest", str(dest), "--only", "model.onnx")
    assert rc == 2 and err.strip() == "metaprune: error: sha256 mismatch for model.onnx"
    assert list(dest.iterdir()) == []  # no partial or temporary file


def test_download_refuses_a_job_with_a_damaged_file_up_front(fake, tmp_path, capsys):
    """The listing says a file no longer has its recorded sha256: nothing is fetched (not half
    of a model's files), and the error names the damaged file and how to fetch the others."""
    fake["client"] = fake_server(damaged="model.onnx")
    dest = tmp_path / "out"
    rc, _, err = run(capsys, "download", "J1", "--dest", str(dest))
    others = ",".join(sorted(n for n in FILES if n != "model.onnx"))
    assert rc == 2 and err.strip() == (
        "metaprune: error: job J1: model.onnx changed on the server since it was written "
        f"(sha256 mismatch with config.json); nothing was downloaded (--only {others} fetches "
        "the rest)")
    assert not dest.exists()
    rc, _, err = run(capsys, "download", "J1", "--dest", str(dest), "--only", others)
    assert rc == 0, err
    assert sorted(p.name for p in dest.iterdir()) == others.split(",")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("argv, message", [
    (["status", "J1", "--server", "localhost:8000"],
     ("the server's URL must start with http:// or https:// (e.g. http://localhost:8000), "
      "got 'localhost:8000'")),
    (["status", "J1", "--token", "tök"],
     "the token may hold only printable ASCII characters, not 'ö'"),
    ([*SUBMIT, "--idempotency-key", "café-1"],
     "the idempotency key may hold only printable ASCII characters, not 'é'"),
    ([*SUBMIT, "--idempotency-key", ""],
     "argument --idempotency-key: must not be empty (see `metaprune submit --help`)"),
])
def test_client_input_mistakes_are_one_line(capsys, argv, message):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own checks exit
        rc = e.code
    assert (rc, capsys.readouterr().err) == (2, f"metaprune: error: {message}\n")


def test_connection_refused(capsys, monkeypatch):
    monkeypatch.delenv("METAPRUNE_TOKEN", raising=False)
    waits = []
    monkeypatch.setattr("pruning.client.time.sleep", waits.append)  # the retries' backoff
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for argv in (["status", "J1"], ["jobs"], ["download", "J1"], [*SUBMIT]):
        rc, _, err = run(capsys, *argv, "--server", url)
        assert rc == 2
        assert err.strip() == (f"metaprune: error: cannot reach the server at {url} "
                               "([Errno 111] Connection refused; is `metaprune serve` running "
                               "there?)")
    assert waits == [0.5, 1, 2] * 4  # every request tried 4 times, a submit too (its key)
    monkeypatch.setenv("METAPRUNE_SERVER", url)
    rc, _, err = run(capsys, "cancel", "J1")
    assert rc == 2 and f"cannot reach the server at {url}" in err


def test_summary_line_shows_a_collapse_warning():
    from pruning.cli import _summary_line

    job = {"id": "j1", "status": "succeeded", "stage": "done", "progress": 1.0, "attempt": 1,
           "detail": {"result": {"metapruning": {
               "test_accuracy": 0.1, "macs": 1e6,
               "warning": "test accuracy 10.00% is at chance level (10.0%)"}}}}
    line = _summary_line(job)
    assert "test 10.00%" in line and "warning: test accuracy 10.00% is at chance" in line
    del job["detail"]["result"]["metapruning"]["warning"]
    assert "warning" not in _summary_line(job)


def test_summary_line_puts_the_trained_baseline_beside_the_pick():
    from pruning.cli import _summary_line

    pick = {"test_accuracy": 0.9, "macs": 1.5e6, "latency_ms": {"predicted": 1.3, "measured": 1.2}}
    job = {"id": "j1", "status": "succeeded", "stage": "done", "progress": 1.0, "attempt": 1,
           "detail": {"result": {"metapruning": pick,
                                 "uniform": {"test_accuracy": 0.885, "macs": 1.4e6}}}}
    assert ("test 90.00%, MACs 1.50M, 1.20 ms (uniform: test 88.50%, MACs 1.40M)"
            in _summary_line(job))
    del job["detail"]["result"]["uniform"]["test_accuracy"]  # not trained: nothing to compare
    assert "uniform" not in _summary_line(job)


# --- an unreliable network between the client and the real app ---------------------------------

class Flaky:
    """The in-process app behind a network that fails: ``fail(method, n, how, after)`` makes
    ``n`` requests of that method fail, after ``after`` more that pass — "drop": the server handles it, then the answer is lost;
    "refuse": it never arrives; "503": the answer is a 503."""

    def __init__(self, tc):
        self.tc, self.plan, self.calls = tc, {}, []

    def fail(self, method: str, n: int, how: str, after: int = 0) -> None:
        self.plan[method] = [None] * after + [how] * n

    def request(self, method, url, **kwargs):
        self.calls.append(method)
        how = self.plan.get(method, []).pop(0) if self.plan.get(method) else None
        if how == "refuse":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        response = self.tc.request(method, url, **kwargs)
        if how == "drop":
            raise httpx.ReadError("[Errno 104] Connection reset by peer")
        if how == "503":
            return httpx.Response(503, json={"detail": "the database is unreachable"})
        return response

    def close(self):
        pass


@pytest.fixture
def flaky(server, monkeypatch):
    net = Flaky(server)
    waits = []
    monkeypatch.setattr(cli, "_api_client", lambda a: ApiClient(token=server.token, client=net,
                                                                sleep=waits.append))
    net.waits = waits
    return net


def _total_jobs(server) -> int:
    return server.get("/v1/jobs", headers={"Authorization": f"Bearer {server.token}"}
                      ).json()["total"]


def test_a_submit_whose_answer_is_lost_is_retried_without_a_second_job(flaky, server, capsys):
    flaky.fail("POST", 2, "drop")  # queued twice over, both answers lost: the key makes it one
    job_id = submit(capsys)
    assert flaky.calls == ["POST"] * 3 and flaky.waits == [0.5, 1]
    assert _total_jobs(server) == 1 and run(capsys, "status", job_id)[0] == 0

    flaky.fail("POST", 4, "drop")  # every try lost: the error names the key that gets it back
    rc, _, err = run(capsys, *SUBMIT, "--seed", "1")
    assert rc == 2 and err.count("\n") == 1 and "Connection reset by peer" in err
    key = err.split("--idempotency-key ")[1].split()[0]
    assert "the job may have been queued all the same" in err and _total_jobs(server) == 2
    rc, out, _ = run(capsys, *SUBMIT, "--seed", "1", "--idempotency-key", key)
    assert rc == 0 and _total_jobs(server) == 2  # the lost job, not a third

    flaky.fail("POST", 4, "refuse")  # never sent: no "may have been queued"
    rc, _, err = run(capsys, *SUBMIT, "--seed", "2")
    assert rc == 2 and "Connection refused" in err and "may have been queued" not in err


def test_retry_a_cancelled_job(server, capsys):
    job_id = submit(capsys)
    rc, _, err = run(capsys, "retry", job_id)  # queued: nothing to retry
    assert rc == 2 and err == ("metaprune: error: HTTP 409: job is queued: only a failed or "
                               "cancelled job can be retried\n")
    run(capsys, "cancel", job_id)
    rc, out, err = run(capsys, "retry", job_id)
    assert (rc, out) == (0, f"{job_id}: queued\n"), err
    run(capsys, "cancel", job_id)
    rc, out, _ = run(capsys, "retry", job_id, "--json")
    job = json.loads(out)
    assert rc == 0 and (job["id"], job["status"], job["cancel_requested"]) == (job_id, "queued",
                                                                              False)
    rc, _, err = run(capsys, "retry", "no-such-job")
    assert rc == 2 and err == "metaprune: error: HTTP 404: job not found\n"


def test_a_retry_whose_answer_is_lost_is_no_error(flaky, server, capsys):
    """The first try queued the job, its answer was lost: the next try's 409 (the job is
    queued now) is that retry's success, not an error; a 409 at the first try still is one."""
    job_id = submit(capsys)
    run(capsys, "cancel", job_id)
    flaky.fail("POST", 1, "drop")
    rc, out, err = run(capsys, "retry", job_id)
    assert (rc, out) == (0, f"{job_id}: queued\n"), err
    assert flaky.calls[-3:] == ["POST", "POST", "GET"]  # the 409, then a look at the job
    rc, _, err = run(capsys, "retry", job_id)
    assert rc == 2 and "HTTP 409: job is queued" in err


def test_delete_a_finished_job(server, capsys):
    job_id = submit(capsys)
    rc, _, err = run(capsys, "delete", job_id)
    assert rc == 2 and err.startswith("metaprune: error: HTTP 409: job is queued: cancel it "
                                      "first")
    run(capsys, "cancel", job_id)
    rc, out, err = run(capsys, "delete", job_id)
    assert (rc, out) == (0, f"{job_id}: deleted (0.0 MB freed)\n"), err
    rc, _, err = run(capsys, "status", job_id)
    assert rc == 2 and err == "metaprune: error: HTTP 404: job not found\n"
    other = submit(capsys, "--seed", "1")
    run(capsys, "cancel", other)
    rc, out, _ = run(capsys, "delete", other, "--json")
    assert rc == 0 and json.loads(out) == {"id": other, "deleted": True, "freed_bytes": 0}


def test_a_delete_whose_answer_is_lost_is_no_error(flaky, server, capsys):
    """The first try deleted the job, its answer was lost: the next try's 404 is no error;
    a 404 at the first try still is one."""
    job_id = submit(capsys)
    run(capsys, "cancel", job_id)
    flaky.fail("DELETE", 1, "drop")
    rc, out, err = run(capsys, "delete", job_id)
    assert (rc, out) == (0, f"{job_id}: deleted\n"), err
    assert flaky.calls[-2:] == ["DELETE", "DELETE"]
    rc, _, err = run(capsys, "delete", job_id)
    assert rc == 2 and "HTTP 404: job not found" in err


def test_reads_retry_a_503_and_cancel_is_safe_to_repeat(flaky, server, capsys):
    job_id = submit(capsys)
    flaky.fail("GET", 2, "503")
    rc, out, _ = run(capsys, "status", job_id)
    assert rc == 0 and "queued" in out and flaky.waits[-2:] == [0.5, 1]
    flaky.fail("POST", 1, "drop")  # cancelled, the answer lost: the retry's 409 is no error
    rc, out, err = run(capsys, "cancel", job_id)
    assert (rc, out.strip()) == (0, f"{job_id}: cancelled"), err
    rc, _, err = run(capsys, "status", "no-such-job")  # a 404 is not retried
    assert rc == 2 and "HTTP 404" in err and flaky.calls[-1:] == ["GET"]
    assert flaky.calls.count("GET") == 5  # 3 for the 503s, 1 by cancel (after its 409), 1


def test_watch_rides_out_a_server_restart(flaky, server, engine, capsys):
    job_id = submit(capsys)
    flaky.fail("GET", 6, "refuse", after=1)  # seen once, then a poll fails through its 4
    thread = _drive(engine, "succeeded")
    rc, out, err = run(capsys, "watch", job_id, "--interval", "0.05")
    thread.join(5)
    assert rc == 0 and "succeeded" in out, err
    assert err.count("Connection refused; is `metaprune serve` running there?); trying again "
                     "(the job goes on on the server)") == 1
    assert err.count("metaprune: note: the server answers again") == 1
    assert "Traceback" not in err


def test_watch_gives_up_after_its_patience(server, capsys):
    """Failed polls are tried again for ``patience`` seconds by the clock (each poll's own
    retries and timeouts count); a first poll that fails is an error at once."""
    from pruning.client import ClientError

    net = Flaky(server)
    job_id = submit(capsys)
    api = ApiClient(token=server.token, client=net, sleep=lambda s: None)
    now, notes = [0.0], []

    def sleep(s):
        now[0] += s + 5  # each failed poll also waits out its own retries

    net.fail("GET", 4, "refuse")  # never seen (all 4 tries): a wrong address, not a restart
    with pytest.raises(ClientError, match="Connection refused"):
        next(api.watch(job_id))
    polls = api.watch(job_id, interval=1, sleep=sleep, patience=20, on_retry=notes.append,
                      clock=lambda: now[0])
    assert next(polls)["status"] == "queued"
    net.fail("GET", 1000, "refuse")
    with pytest.raises(ClientError, match="Connection refused"):
        next(polls)
    assert len(notes) == 3 and now[0] == 1 + 5 + 3 * 7  # failing since 6 s: 27 s ≥ 6 + 20


def test_answers_that_are_not_the_api_are_one_line(capsys, monkeypatch):
    """A wrong port, a captive portal or a proxy: JSON that is not this API's shape."""
    bodies = {"/v1/jobs/J1": [1, 2], "/v1/jobs": {"jobs": []}, "/v1/jobs/J2": {"id": "J2"}}

    def handler(request):
        if request.url.path == "/v1/jobs/J3":
            return httpx.Response(308, headers={"Location": "https://api.example/v1/jobs/J3"})
        return httpx.Response(200, json=bodies.get(request.url.path, {"x": 1}))

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fake")
    monkeypatch.setattr(cli, "_api_client", lambda a: ApiClient("http://fake", client=http))
    for argv, message in ((["status", "J1"], "an answer that is not a job"),
                          (["status", "J2"], "an answer that is not a job"),
                          (["watch", "J1"], "an answer that is not a job"),
                          (["cancel", "J1"], "an answer that is not a job"),
                          (["retry", "J1"], "an answer that is not a job"),
                          (["jobs"], "an answer that is not a page of jobs"),
                          ([*SUBMIT], "an answer that is not a job"),
                          (["status", "J3"], "redirects to https://api.example/v1/jobs/J3 "
                                             "(HTTP 308): give that address as --server")):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)


def test_a_token_is_never_printed(capsys, monkeypatch):
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"id": "J1", "status": "queued"})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fake")
    monkeypatch.setattr(cli, "_api_client",
                        lambda a: ApiClient("http://fake", token=a.token, client=http))
    rc, _, err = run(capsys, "status", "J1", "--token", " s3cret-tok\n")  # pasted: trimmed
    assert rc == 0 and seen == ["Bearer s3cret-tok"], err
    rc, _, err = run(capsys, *SUBMIT, "--idempotency-key", "key ")
    assert (rc, err) == (2, "metaprune: error: the idempotency key may not begin or end with "
                            "a space\n")


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:abc", "not a valid server URL: 'http://127.0.0.1:abc' (Invalid port"),
    ("http://[::1", "not a valid server URL: 'http://[::1'"),
    ("ftp://host", "must start with http:// or https://, got 'ftp://host'"),
    ("http://h:1?x=1", "may not hold a query or a fragment: 'http://h:1?x=1'"),
    ("http://:80", "names no host: 'http://:80'"),
])
def test_bad_server_urls_are_one_line(capsys, url, message):
    rc, _, err = run(capsys, "status", "J1", "--server", url)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_a_server_url_in_capitals_and_with_a_path_works():
    api = ApiClient("HTTPS://Example.org:8443/api/", token="")
    assert api.base_url == "https://Example.org:8443/api"
    api.close()


def test_download_keeps_verified_files_and_clears_stale_parts(fake, tmp_path, capsys):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "report.json").write_bytes(FILES["report.json"])   # already fetched, intact
    (dest / "config.json").write_bytes(b"{stale}")             # different: fetched again
    stale = dest / ".model.onnx.abc123.part"                   # a download killed long ago
    stale.write_bytes(b"onnx")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = dest / ".model.onnx.def456.part"                   # another download, live
    fresh.write_bytes(b"on")
    before = (dest / "report.json").stat().st_mtime_ns
    requested = []
    client = fake["client"]
    fake["client"] = httpx.Client(transport=httpx.MockTransport(
        lambda r: requested.append(r.url.path) or client._transport.handle_request(r)),
        base_url="http://fake")
    rc, _, err = run(capsys, "download", "J1", "--dest", str(dest))
    assert rc == 0, err
    assert all((dest / n).read_bytes() == b for n, b in FILES.items())
    assert (dest / "report.json").stat().st_mtime_ns == before
    assert "/v1/jobs/J1/artifacts/report.json" not in requested
    assert not stale.exists() and fresh.exists()


def test_download_without_the_sha256_header_says_so(fake, tmp_path, capsys):
    client = fake["client"]

    def strip(request):
        response = client._transport.handle_request(request)
        response.headers.pop("X-Content-SHA256", None)
        return response

    fake["client"] = httpx.Client(transport=httpx.MockTransport(strip), base_url="http://fake")
    rc, _, err = run(capsys, "download", "J1", "--dest", str(tmp_path / "o"), "--only",
                     "report.json")
    assert rc == 2 and "sent report.json without its X-Content-SHA256 header" in err
    assert list((tmp_path / "o").iterdir()) == []


def test_sigterm_stops_a_client_command_like_ctrl_c(tmp_path):
    """`timeout`, `docker stop`: SIGTERM ends a command waiting on a silent server at once, in
    one line, exit 143 (its cleanup runs: a download's temporary file goes)."""
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", "status", "J1",
                                 "--server", url], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "METAPRUNE_TOKEN": ""})
        silent.settimeout(30)
        conn, _ = silent.accept()  # the request has arrived: the client waits for the answer
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        conn.close()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip() == "metaprune: interrupted"
