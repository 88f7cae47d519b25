"""``/v1/jobs/{id}/artifacts``, ``…/events`` (server-sent events) and ``…/search``."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from app.auth import JobId, Owner, bearer, owner_of_token
from app.deps import Db, SettingsDep
from app.schemas import JOB_EXAMPLE, ArtifactList, ErrorOut, JobOut, SearchOut, errors
from app.services import artifacts
from app.services.jobs import get_job, waiting_reasons

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses=errors(401))
ArtifactName = Annotated[str, Path(description="an artifact's name, from the list (any other: "
                                               "404)")]

NOT_SUCCEEDED = {"model": ErrorOut, "description": "the job has not succeeded (no artifacts)",
                 "content": {"application/json": {"example": {
                     "detail": "job is running: artifacts are available once it has "
                               "succeeded"}}}}
_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
_FILE_HEADERS = {
    "X-Content-SHA256": {"description": "hex sha256 of the whole file (as in config.json)",
                         "schema": {"type": "string", "example": _SHA}},
    "ETag": {"description": "the sha256 in quotes (a strong validator, for `If-Range`)",
             "schema": {"type": "string", "example": f'"{_SHA}"'}},
    "Content-Length": {"description": "bytes in this response", "schema": {"type": "integer"}},
    "Accept-Ranges": {"description": "`bytes`: Range requests are served",
                      "schema": {"type": "string"}},
    "Content-Disposition": {"description": "attachment; filename=<name>",
                            "schema": {"type": "string"}},
}
_FILE_CONTENT = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                 "application/json": {"schema": {"type": "object"}},
                 "image/png": {"schema": {"type": "string", "format": "binary"}}}


@router.get("/{job_id}/artifacts", response_model=ArtifactList, summary="List a job's artifacts",
            responses={**errors(404), 409: NOT_SUCCEEDED})
def list_artifacts(job_id: JobId, owner: Owner, db: Db, settings: SettingsDep) -> ArtifactList:
    """The artifacts of a succeeded job, with sizes and sha256: `config.json` and the files its
    `files` map names (`model.safetensors`, `model.ts`, `model.onnx`, `search.json`,
    `report.json`, `pareto.png`)."""
    return ArtifactList(items=artifacts.list_artifacts(db, settings, owner, job_id))


_DOWNLOAD_RESPONSES = {
    200: {"description": "the whole file", "headers": _FILE_HEADERS,
          "content": _FILE_CONTENT},
    206: {"description": "the requested byte range (`Content-Range: bytes a-b/size`)",
          "headers": {**_FILE_HEADERS, "Content-Range": {
              "description": "bytes first-last/size", "schema": {"type": "string"}}},
          "content": _FILE_CONTENT},
    404: {"model": ErrorOut, "description": "no such job among the caller's, or no artifact of "
                                            "that name (names come from config.json's files "
                                            "map; paths are refused)"},
    409: {"model": ErrorOut,
          "description": "the job has not succeeded, or the artifact is corrupted: its "
                         "sha256 does not match config.json (it is never served)",
          "content": {"application/json": {"examples": {
              "not succeeded": {"value": {"detail": "job is queued: artifacts are "
                                                    "available once it has succeeded"}},
              "corrupted": {"value": {"detail": "artifact model.onnx is corrupted "
                                                "(sha256 mismatch)"}}}}}},
    **errors(416)}


@router.get("/{job_id}/artifacts/{name}", summary="Download an artifact",
            response_class=StreamingResponse, responses=_DOWNLOAD_RESPONSES)
def download_artifact(job_id: JobId, name: ArtifactName, owner: Owner,
                      db: Db, settings: SettingsDep,
                      range_: Annotated[str | None, Header(
                          alias="Range", description="one range: `bytes=a-b`, `bytes=a-` or "
                                                     "`bytes=-n`")] = None,
                      if_range: Annotated[str | None, Header(
                          alias="If-Range", description="serve the Range only if the file's "
                                                        "ETag is still this one")] = None):
    """Stream one artifact. Its sha256 is checked against `config.json` before it is served and
    sent in `X-Content-SHA256` (and as the `ETag`); single HTTP byte ranges are honoured (206),
    a range beyond the file is 416, and a Range whose `If-Range` is not the ETag gets the whole
    file (200)."""
    return _artifact_response(db, settings, owner, job_id, name, range_, if_range)


@router.head("/{job_id}/artifacts/{name}", summary="An artifact's headers (size, sha256)",
             responses=_DOWNLOAD_RESPONSES)
def artifact_headers(job_id: JobId, name: ArtifactName, owner: Owner,
                     db: Db, settings: SettingsDep,
                     range_: Annotated[str | None, Header(alias="Range")] = None,
                     if_range: Annotated[str | None, Header(alias="If-Range")] = None):
    """The headers a download of the artifact would send (`curl -I`), without the file."""
    return _artifact_response(db, settings, owner, job_id, name, range_, if_range, body=False)


def _artifact_response(db, settings, owner: str, job_id: str, name: str, range_: str | None,
                       if_range: str | None, body: bool = True) -> Response:
    f = artifacts.open_artifact(db, settings, owner, job_id, name)
    etag = f'"{f.sha256}"'
    if if_range is not None and if_range.strip() != etag:
        range_ = None  # another version of the file (or a date: we send none): all of it
    try:
        span = artifacts.parse_range(range_, f.size)
    except artifacts.RangeNotSatisfiable as e:
        f.close()
        return JSONResponse({"detail": e.detail}, status_code=416,
                            headers={"Content-Range": f"bytes */{e.size}",
                                     "Accept-Ranges": "bytes"})
    headers = {"X-Content-SHA256": f.sha256, "ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{f.name}"',
               "X-Content-Type-Options": "nosniff"}
    if span is None:
        start, end, code = 0, f.size - 1, status.HTTP_200_OK
    else:
        (start, end), code = span, status.HTTP_206_PARTIAL_CONTENT
        headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
    headers["Content-Length"] = str(end - start + 1)
    if not body:
        f.close()
        return Response(status_code=code, headers=headers, media_type=f.media_type)
    return _FileStream(f, start, end, status_code=code, headers=headers)


class _FileStream(StreamingResponse):
    """Bytes ``start..end`` of an opened artifact, whose fd is closed however the response
    ends: a client that leaves before the first chunk cancels the body's generator before it
    starts, so the generator's own ``finally`` never runs (each read runs in a worker thread
    that a cancellation waits for, so none is reading when the fd closes)."""

    def __init__(self, f: artifacts.ArtifactFile, start: int, end: int, **kwargs):
        super().__init__(f.chunks(start, end), media_type=f.media_type, **kwargs)
        self.file = f

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.file.close()


TOKEN_RECHECK_S = 5.0  # an event stream ends this soon after its token is revoked

# one event, as the schema below describes it (on the wire: `event: progress` and `data: {…}`
# lines, then a blank line)
_EVENT_EXAMPLE = {"event": "progress", "data": json.dumps(JOB_EXAMPLE)}


# OpenAPI 3.1 without `itemSchema`: the schema of a `text/event-stream` describes one event (its
# fields); `data` is the job as JSON (comment lines such as heartbeats are not events)
_EVENT_SCHEMA = {"type": "object", "required": ["event", "data"],
                 "properties": {"event": {"type": "string", "enum": ["progress", "done"]},
                                "data": {"type": "string", "contentMediaType": "application/json",
                                         "contentSchema": {"$ref": "#/components/schemas/JobOut"}}}}


@router.get("/{job_id}/events", summary="Follow a job's progress (server-sent events)",
            response_class=StreamingResponse,
            responses={200: {"description": "a `text/event-stream`: `progress` events (the job "
                                            "as JSON) on every change of status, stage, "
                                            "progress or detail; `done` (the job) when it is "
                                            "succeeded, failed or cancelled, then the stream "
                                            "ends; `: heartbeat` comments while idle",
                             "content": {"text/event-stream": {"schema": _EVENT_SCHEMA,
                                                               "example": _EVENT_EXAMPLE}}},
                       **errors(404)})
async def job_events(job_id: JobId, request: Request, owner: Owner, db: Db,
                     settings: SettingsDep,
                     credentials: Annotated[HTTPAuthorizationCredentials | None,
                                            Depends(bearer)]) -> StreamingResponse:
    """The job's progress as server-sent events, starting with its current state. A job that
    has already finished yields one `progress` and the `done` event."""
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(get_job, db, owner, job_id)  # 404 before the stream starts

    def render(job):
        return JobOut.of(job, waiting_reasons(db, settings, [job]).get(job.id)).model_dump_json()

    shutting_down = request.app.state.shutting_down
    token = credentials.credentials if credentials is not None else None
    checked = time.monotonic()

    def revoked() -> bool:
        with request.app.state.sessions() as session:
            return owner_of_token(session, token) != owner

    async def stop() -> bool:  # the client left, the server is stopping, the token was revoked
        nonlocal checked
        if shutting_down.is_set() or await request.is_disconnected():
            return True
        if token is not None and time.monotonic() - checked >= TOKEN_RECHECK_S:
            checked = time.monotonic()
            return await run_in_threadpool(revoked)
        return False

    stream = artifacts.job_events(db, settings, owner, job_id, stop, render)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/search", response_model=SearchOut,
            summary="A job's search history and Pareto front",
            responses={404: {"model": ErrorOut, "description": "no such job among the "
                                                               "caller's, or no search results "
                                                               "yet"},
                       409: {"model": ErrorOut, "description": "the search record is "
                                                               "unreadable"}})
def job_search(job_id: JobId, owner: Owner, db: Db, settings: SettingsDep) -> SearchOut:
    """Every candidate the evolutionary search evaluated (key, generation, widths, MACs,
    params, score) and the Pareto front of score vs MACs: from the finished run's
    `search.json`, or from the search state while the search runs."""
    return SearchOut.model_validate(artifacts.search_history(db, settings, owner, job_id))
