"""Artifacts (list, download with sha256 and ranges, corruption, traversal), progress events
(server-sent) and the search history / Pareto front, over the REST API on SQLite."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid

import pytest
from sqlalchemy import delete, update

from app.models import Job
from app.services import artifacts as artifacts_service
from tests.conftest import API_SPEC as SPEC, bearer, client_for, token_for

pytestmark = pytest.mark.timeout(60)

FILES = {"model.onnx": os.urandom(5000), "model.safetensors": os.urandom(3000),
         "pareto.png": b"\x89PNG\r\n\x1a\n" + os.urandom(100),
         "report.json": json.dumps({"arch": "x"}).encode()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def api(engine, sqlite_url, tmp_path):
    with client_for(sqlite_url, artifact_dir=tmp_path / "art", events_poll_seconds=0.05,
                    events_heartbeat_seconds=0.2) as client:
        client.alice = bearer(token_for(engine, "alice"))
        client.bob = bearer(token_for(engine, "bob"))
        client.art = tmp_path / "art"
        yield client


def _submit(api, headers=None):
    r = api.post("/v1/jobs", json={**SPEC, "seed": int(time.time() * 1e6) % 10**6},
                 headers=headers or api.alice)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _set(engine, job_id, **values):
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(**values))


def _succeeded(api, engine):
    """A succeeded job of alice's with a small artifacts folder."""
    job_id = _submit(api)
    folder = api.art / "jobs" / job_id / "artifacts"
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    config = {"arch": "test", "files": {n: _sha(d) for n, d in sorted(FILES.items())}}
    (folder / "config.json").write_text(json.dumps(config))
    _set(engine, job_id, status="succeeded", stage="done", progress=1.0)
    return job_id, folder


def test_list_artifacts(api, engine):
    job_id, folder = _succeeded(api, engine)
    r = api.get(f"/v1/jobs/{job_id}/artifacts", headers=api.alice)
    assert r.status_code == 200, r.text
    items = {i["name"]: i for i in r.json()["items"]}
    assert set(items) == {"config.json", *FILES}
    for name, data in FILES.items():
        assert items[name] == {"name": name, "size": len(data), "sha256": _sha(data),
                               "intact": True}
    cfg = (folder / "config.json").read_bytes()
    assert items["config.json"]["sha256"] == _sha(cfg) and items["config.json"]["size"] == len(cfg)


def test_download_with_sha256_and_types(api, engine):
    job_id, folder = _succeeded(api, engine)
    for name, data, ctype in (("model.onnx", FILES["model.onnx"], "application/octet-stream"),
                              ("pareto.png", FILES["pareto.png"], "image/png"),
                              ("config.json", (folder / "config.json").read_bytes(),
                               "application/json")):
        r = api.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=api.alice)
        assert r.status_code == 200, r.text
        assert r.content == data
        assert r.headers["x-content-sha256"] == _sha(data)
        assert r.headers["content-length"] == str(len(data))
        assert r.headers["content-type"].split(";")[0] == ctype
        assert r.headers["accept-ranges"] == "bytes"
        assert name in r.headers["content-disposition"]


def test_head_gives_the_download_s_headers_without_the_file(api, engine):
    """``curl -I``: size and sha256 before downloading; the same checks as a download."""
    job_id, folder = _succeeded(api, engine)
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    data = FILES["model.onnx"]
    r = api.head(url, headers=api.alice)
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["x-content-sha256"] == _sha(data)
    r = api.head(url, headers={**api.alice, "Range": "bytes=-7"})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 4993-4999/{len(data)}"
    assert api.head(url, headers=api.bob).status_code == 404
    assert api.head(f"/v1/jobs/{job_id}/artifacts/nope.bin", headers=api.alice).status_code == 404
    (folder / "model.onnx").write_bytes(b"not the model")
    assert api.head(url, headers=api.alice).status_code == 409  # corrupted: not even its headers


def test_digest_is_cached(api, engine):
    job_id, _ = _succeeded(api, engine)
    url = f"/v1/jobs/{job_id}/artifacts/model.safetensors"
    assert api.get(url, headers=api.alice).status_code == 200
    before = artifacts_service.digests.computed
    assert api.get(url, headers=api.alice).status_code == 200
    assert artifacts_service.digests.computed == before  # not hashed again


def test_range_requests(api, engine):
    job_id, _ = _succeeded(api, engine)
    data = FILES["model.onnx"]
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    cases = {"bytes=10-19": (10, 19), "bytes=4990-": (4990, 4999), "bytes=-7": (4993, 4999),
             "bytes=4000-99999": (4000, 4999), "bytes=-99999": (0, 4999)}
    for header, (a, b) in cases.items():
        r = api.get(url, headers={**api.alice, "Range": header})
        assert r.status_code == 206, (header, r.text)
        assert r.content == data[a:b + 1]
        assert r.headers["content-range"] == f"bytes {a}-{b}/{len(data)}"
        assert r.headers["content-length"] == str(b - a + 1)
        assert r.headers["x-content-sha256"] == _sha(data)  # of the whole file
    for header in ("bytes=5000-", "bytes=9000-9001", "bytes=-0"):
        r = api.get(url, headers={**api.alice, "Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{len(data)}"
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=x-"):  # ignored: whole
        r = api.get(url, headers={**api.alice, "Range": header})
        assert r.status_code == 200 and r.content == data, header
    huge, zeros = "9" * 5000, "0" * 30  # more digits than int() takes; leading zeros
    for header, code, body in ((f"bytes={huge}-", 416, None), (f"bytes=10-{huge}", 206, data[10:]),
                               (f"bytes=-{huge}", 206, data), (f"bytes={zeros}-", 206, data),
                               (f"bytes=-{zeros}10", 206, data[-10:])):
        for method in ("GET", "HEAD"):
            r = api.request(method, url, headers={**api.alice, "Range": header})
            assert r.status_code == code, (method, header[:20], r.text[:200])
            if method == "GET" and body is not None:
                assert r.content == body
    # a resumed download names the version it has: the range only if the file is still that
    etag = f'"{_sha(data)}"'
    assert api.get(url, headers=api.alice).headers["etag"] == etag
    for if_range, code in ((etag, 206), ('"0000"', 200), ("Wed, 21 Oct 2015 07:28:00 GMT", 200)):
        r = api.get(url, headers={**api.alice, "Range": "bytes=10-19", "If-Range": if_range})
        assert r.status_code == code, if_range
        assert r.content == (data[10:20] if code == 206 else data)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc/self/fd")
def test_a_download_closes_its_file_however_it_ends(api, engine, tmp_path):
    """Not one fd is kept: by downloads read whole, cut short, refused (416) or asked with
    HEAD, nor by a response whose client left before its first chunk (its body's generator
    never starts, so only the response can close the file)."""
    import asyncio

    from app.routes.artifacts import _FileStream

    job_id, _ = _succeeded(api, engine)
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    api.get(url, headers=api.alice)  # warm: the digest cache, the thread pool
    before = _open_fds()
    for _ in range(5):
        assert api.get(url, headers=api.alice).status_code == 200
        assert api.head(url, headers=api.alice).status_code == 200
        assert api.get(url, headers={**api.alice, "Range": "bytes=9999-"}).status_code == 416
        with api.stream("GET", url, headers=api.alice) as r:
            next(r.iter_bytes(100))  # and leave
    assert _open_fds() == before

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1 << 18))
    fd = os.open(path, os.O_RDONLY)
    f = artifacts_service.ArtifactFile("blob", fd, 1 << 18, "0" * 64, "application/octet-stream")
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        await asyncio.sleep(0.05)

    response = _FileStream(f, 0, (1 << 18) - 1)
    asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.0"}}, receive, send))
    assert f.fd == -1 and len(sent) < 5
    with pytest.raises(OSError):
        os.fstat(fd)


def test_corrupted_artifact_is_refused(api, engine):
    job_id, folder = _succeeded(api, engine)
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    assert api.get(url, headers=api.alice).status_code == 200  # digest now cached
    bad = bytearray(FILES["model.onnx"])
    bad[100] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(bad))
    os.utime(folder / "model.onnx", ns=(1, 1))  # even a changed mtime is not trusted blindly
    r = api.get(url, headers=api.alice)
    assert r.status_code == 409
    assert r.json() == {"detail": "artifact model.onnx is corrupted (sha256 mismatch)"}
    r = api.get(url, headers={**api.alice, "Range": "bytes=0-9"})
    assert r.status_code == 409
    listed = api.get(f"/v1/jobs/{job_id}/artifacts", headers=api.alice).json()["items"]
    assert {i["name"] for i in listed if not i["intact"]} == {"model.onnx"}


def test_unknown_names_traversal_and_symlinks_are_404(api, engine, tmp_path):
    job_id, folder = _succeeded(api, engine)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"top secret")
    (folder / "extra.bin").write_bytes(b"not in the files map")
    base = f"/v1/jobs/{job_id}/artifacts/"
    for name in ("nope.bin", "extra.bin", "..%2Fconfig.json", "..%2F..%2Fspec.json",
                 "%2Fetc%2Fpasswd", "%2Fetc", ".config.json", "model.onnx%00"):
        r = api.get(base + name, headers=api.alice)
        assert r.status_code == 404, (name, r.status_code, r.text)
        assert b"top secret" not in r.content
    # ".." and "." never reach the server as a name (URLs are normalised); the service
    # refuses them anyway, as it does every name that is not a plain file name
    for name in ("..", ".", "../config.json", str(folder / "config.json"), "a/b", ""):
        assert artifacts_service.open_inside(folder, name) is None, name
    # a file of the files map replaced by a symlink (even to a file with the right content)
    link_target = tmp_path / "copy.onnx"
    link_target.write_bytes(FILES["model.onnx"])
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(link_target)
    assert api.get(base + "model.onnx", headers=api.alice).status_code == 404
    names = [i["name"] for i in api.get(base[:-1], headers=api.alice).json()["items"]]
    assert "model.onnx" not in names and "extra.bin" not in names


def test_other_owner_and_unknown_job_404(api, engine):
    job_id, _ = _succeeded(api, engine)
    for path in ("artifacts", "artifacts/model.onnx", "events", "search"):
        r = api.get(f"/v1/jobs/{job_id}/{path}", headers=api.bob)
        assert r.status_code == 404 and r.json() == {"detail": "job not found"}, path
        assert api.get(f"/v1/jobs/{uuid.uuid4()}/{path}", headers=api.alice).status_code == 404
        assert api.get(f"/v1/jobs/{job_id}/{path}").status_code == 401


def test_not_succeeded_is_409(api, engine):
    job_id = _submit(api)
    for path in ("artifacts", "artifacts/model.onnx", "artifacts/config.json"):
        r = api.get(f"/v1/jobs/{job_id}/{path}", headers=api.alice)
        assert r.status_code == 409
        assert r.json()["detail"] == ("job is queued: artifacts are available once it has "
                                      "succeeded")


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        event = next(ln[7:] for ln in lines if ln.startswith("event: "))
        data = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
        out.append((event, json.loads(data)))
    return out


def test_events_stream_until_the_job_ends(api, engine):
    job_id = _submit(api)
    steps = [dict(status="running", attempt=1, lease_owner="w", stage="metanet", progress=0.1),
             dict(stage="search", progress=0.5, detail={"generation": 3}),
             dict(status="succeeded", stage="done", progress=1.0)]

    def drive():
        for values in steps:
            time.sleep(0.4)
            _set(engine, job_id, **values)

    t = threading.Thread(target=drive)
    t.start()
    started = time.monotonic()
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.alice) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    t.join()
    assert time.monotonic() - started < 10
    events = _events(text)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds[:-1] == ["progress"] * (len(kinds) - 1)
    seen = [(d["status"], d["stage"], d["progress"]) for _, d in events[:-1]]
    assert seen == [("queued", None, 0.0), ("running", "metanet", 0.1),
                    ("running", "search", 0.5), ("succeeded", "done", 1.0)]
    assert events[2][1]["detail"] == {"generation": 3}
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["id"] == job_id
    assert ": heartbeat" in text  # 0.4 s between changes, heartbeat every 0.2 s


def test_events_stream_ends_when_the_server_stops(api, engine):
    """An unfinished job's stream never ends by itself; ``serve`` sets ``shutting_down`` when it
    is told to stop, and the stream ends at its next poll, without a ``done`` event."""
    job_id = _submit(api)
    _set(engine, job_id, status="running", attempt=1, lease_owner="w", stage="metanet")
    threading.Timer(0.5, api.app.state.shutting_down.set).start()
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.alice) as r:
        text = "".join(r.iter_text())
    assert [kind for kind, _ in _events(text)] == ["progress"]
    assert ": heartbeat" in text  # it was still open 0.2 s in


def test_events_stream_ends_soon_after_its_token_is_revoked(api, engine, monkeypatch):
    """A revoked token gets 401 on its next request; an event stream it opened ends too (its
    token is looked up again every TOKEN_RECHECK_S), without a ``done`` event."""
    from app.models import ApiToken
    from app.routes import artifacts as artifacts_route

    monkeypatch.setattr(artifacts_route, "TOKEN_RECHECK_S", 0.1)
    carol = bearer(token_for(engine, "carol"))
    job_id = _submit(api, headers=carol)
    _set(engine, job_id, status="running", attempt=1, lease_owner="w", stage="metanet")

    def revoke():
        with engine.begin() as conn:
            conn.execute(delete(ApiToken).where(ApiToken.owner == "carol"))

    threading.Timer(0.5, revoke).start()
    started = time.monotonic()
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=carol) as r:
        text = "".join(r.iter_text())
    assert time.monotonic() - started < 5
    assert [kind for kind, _ in _events(text)] == ["progress"] and ": heartbeat" in text


def test_events_of_a_finished_job(api, engine):
    job_id = _submit(api)
    api.post(f"/v1/jobs/{job_id}/cancel", headers=api.alice)
    r = api.get(f"/v1/jobs/{job_id}/events", headers=api.alice)
    assert [(e, d["status"]) for e, d in _events(r.text)] == [("progress", "cancelled"),
                                                              ("done", "cancelled")]


def _record(i, macs, score, gen=0):
    return {"key": f"k{i}", "choices": [i], "widths": {"g": i}, "macs": macs, "params": 10 * i,
            "score": score, "generation": gen, "costs": {"macs": macs}}


RECORDS = [_record(0, 100, 0.50), _record(1, 200, 0.70), _record(2, 150, 0.40),
           _record(3, 300, 0.70), _record(4, 250, 0.80, 1), _record(5, 100, 0.55, 1),
           _record(6, 90, 0.30, 1), _record(7, 400, 0.79, 1)]


def _dominated(r, others):
    return any(o is not r and o["macs"] <= r["macs"] and o["score"] >= r["score"]
               and (o["macs"] < r["macs"] or o["score"] > r["score"]) for o in others)


def test_search_history_and_pareto(api, engine):
    job_id = _submit(api)
    assert api.get(f"/v1/jobs/{job_id}/search", headers=api.alice).json() == {
        "detail": "no search results yet"}
    state = api.art / "jobs" / job_id / "search"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps(
        {"format": "x", "generation": 0, "finished": False, "records": RECORDS[:4]}))
    r = api.get(f"/v1/jobs/{job_id}/search", headers=api.alice)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "state" and body["finished"] is False
    assert body["evaluated"] == 4 and body["generations"] == 1 and body["best"] == "k1"
    assert [p["key"] for p in body["pareto_front"]] == ["k0", "k1"]

    art = api.art / "jobs" / job_id / "artifacts"
    art.mkdir()
    (art / "search.json").write_text(json.dumps(
        {"format": "metaprune.search_result/1", "best": "k4", "generations": 2,
         "stopped_early": False, "top": ["k4"], "history": RECORDS}))
    body = api.get(f"/v1/jobs/{job_id}/search", headers=api.alice).json()
    assert body["source"] == "artifacts" and body["finished"] is True and body["best"] == "k4"
    assert [h["key"] for h in body["history"]] == [r["key"] for r in RECORDS]
    assert set(body["history"][0]) == {"key", "generation", "widths", "macs", "params", "score"}
    front = [p["key"] for p in body["pareto_front"]]
    assert front == ["k6", "k5", "k1", "k4"]
    assert front == [r["key"] for r in sorted(RECORDS, key=lambda r: r["macs"])
                     if not _dominated(r, RECORDS)]


def test_openapi_documents_the_new_endpoints(api):
    doc = api.get("/openapi.json").json()
    paths = doc["paths"]
    listing = paths["/v1/jobs/{job_id}/artifacts"]["get"]["responses"]
    assert {"200", "401", "404", "409"} <= set(listing)
    download = paths["/v1/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]
    assert {"200", "206", "401", "404", "409", "416"} <= set(download)
    assert "X-Content-SHA256" in download["200"]["headers"]
    assert download["409"]["content"]["application/json"]["examples"]["corrupted"]
    events = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert events["200"]["content"]["text/event-stream"]["example"]
    assert {"200", "404"} <= set(paths["/v1/jobs/{job_id}/search"]["get"]["responses"])
    for name in ("ArtifactList", "SearchOut"):
        assert doc["components"]["schemas"][name].get("examples"), name
