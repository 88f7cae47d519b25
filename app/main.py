"""The FastAPI application (DESIGN.md §5): ``create_app(settings)``.

Resources are opened in the ``lifespan`` (the database engine, a housekeeping thread that
reaps expired leases), never at import time. The API only queues jobs; training runs in worker
processes (``metaprune worker``, or the ones that ``metaprune serve`` starts), never in the API
process.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import make_engine, session_factory
from app.deps import Database
from app.metrics import HttpMetrics, Registry, api_routes
from app.middleware import RequestBodyGuard, RequestLog
from app.services import ServiceError
from app.settings import Settings, get_settings
from pruning import __version__

log = logging.getLogger("metaprune.api")

DESCRIPTION = """Submit MetaPruning jobs, follow their progress, cancel them, download the
pruned models.

Every `/v1` request carries `Authorization: Bearer <token>` (a token from
`metaprune token create`), unless the server binds only to loopback and runs without auth.
Errors are `{"detail": ...}` with the status code saying what went wrong."""


def _json_safe(value: Any) -> Any:
    """``value`` as a response can render it: non-finite floats as the JSON tokens a client sent
    (``"NaN"``, ``"Infinity"``, ``"-Infinity"``: strict JSON has no such numbers), and strings
    (keys too) with a lone surrogate (``"\\ud800"`` in a body) escaped: UTF-8 cannot hold it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


MAX_ERRORS_SHOWN = 20  # of a 422's validation errors (a list of 50,000 bad items has as many)


def _shortened(value: Any, limit: int = 200, items: int = 20) -> Any:
    """``value`` with every string (keys too) over ``limit`` characters cut to its first
    ``limit``, every list and object to its first ``items`` entries (a message: 5 × ``limit``)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"… ({len(value):,} characters)"
    if isinstance(value, dict):
        return {_shortened(k, limit): _shortened(v, limit if k != "msg" else 5 * limit, items)
                for k, v in list(value.items())[:items]}
    if isinstance(value, list):
        head = [_shortened(v, limit, items) for v in value[:items]]
        return head + ([f"… ({len(value):,} items)"] if len(value) > items else [])
    return value


def _first_sentence(exc: Exception) -> str:
    return str(exc).split(";")[0]


def _housekeeping(engine, settings: Settings, stop: threading.Event) -> None:
    """Every half lease, :func:`app.queue.housekeeping`, as workers do: the job of a worker
    that died is re-queued (or cancelled, or failed) even when no worker is left to do it, and
    then says why it waits instead of showing ``running`` for ever. And what deleted jobs left
    in the trash is removed."""
    from app import queue
    from app.services.jobs import empty_trash

    while not stop.wait(settings.lease_seconds / 2):
        try:
            for job_id, status in queue.housekeeping(
                    engine, lease_seconds=settings.lease_seconds).items():
                log.info("job %s: lease expired; now %s", job_id, status)
            empty_trash(settings.trash_dir)
        except Exception:  # noqa: BLE001 — the next round tries again
            log.warning("housekeeping failed", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, configured by ``settings`` (default: :func:`get_settings`, the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # one connection per request thread (anyio runs up to 40 sync handlers at once)
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                             max_overflow=10)
        write_engine = engine.execution_options(sqlite_begin="IMMEDIATE")
        app.state.database = Database(engine=engine, read=session_factory(engine),
                                      write=session_factory(write_engine))
        app.state.sessions = app.state.database.read
        # the objects made at start-up live as long as the process: keep every later full
        # garbage collection from walking them again (it did: ~0.1 s stalls under load, when
        # the API still imported PyTorch)
        gc.collect()
        gc.freeze()
        stop = threading.Event()
        reaper = threading.Thread(target=_housekeeping, args=(engine, settings, stop),
                                  name="housekeeping", daemon=True)
        reaper.start()
        try:
            yield
        finally:
            stop.set()
            reaper.join(timeout=10)
            engine.dispose()

    app = FastAPI(title="metaprune", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, redirect_slashes=False,
                  openapi_tags=[{"name": "jobs", "description": "pruning jobs and their queue"},
                                {"name": "artifacts", "description": "a job's artifacts, "
                                 "progress events and search history"},
                                {"name": "configurations", "description": "pruned "
                                 "configurations that succeeded jobs found"},
                                {"name": "catalog", "description": "what a spec may name"},
                                {"name": "health", "description": "probes"}])
    app.state.settings = settings  # app.deps.get_app_settings
    app.state.shutting_down = threading.Event()  # set by `metaprune serve`: event streams end

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler, except that an echoed NaN / Infinity (Python's json module
        # accepts them in a body) or lone surrogate cannot turn a 422 into a 500 (the body's
        # nesting is bounded by RequestBodyGuard, so the echo's is too), and a long value is
        # echoed cut short (a megabyte's field is not sent back twice)
        errors = jsonable_encoder(exc.errors())
        shown = [_shortened(e) for e in errors[:MAX_ERRORS_SHOWN]]
        if len(errors) > MAX_ERRORS_SHOWN:
            shown.append({"loc": ["body"], "type": "more_errors",
                          "msg": f"and {len(errors) - MAX_ERRORS_SHOWN:,} more errors"})
        return JSONResponse({"detail": _json_safe(shown)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's "error parsing the body": a JSON that Python's json cannot read into
            # values (an integer of more than 4,300 digits), a client's mistake like any other
            return JSONResponse({"detail": [{"loc": ["body"], "type": "json_invalid",
                                             "msg": f"the JSON body cannot be read: "
                                                    f"{_first_sentence(exc.__cause__)}"}]},
                                status_code=422)
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            methods = set().union(*api_routes(app, request.url.path).values())
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # a bug: the same {"detail"} shape as every other error (the log has the traceback;
        # Starlette logs it after this answer), answered outside RequestLog: its id added here
        request_id = request.scope.get("request_id")
        return JSONResponse({"detail": "internal server error"}, status_code=500,
                            headers={"X-Request-ID": request_id} if request_id else None)

    async def _database_unreachable(_request: Request, exc: Exception) -> JSONResponse:
        # the database went away while serving: a 503 like /readyz's, not a plain-text 500 (a
        # bug's error, an IntegrityError say, stays a 500); the log keeps the details
        log.warning("database unreachable: %s", exc.__class__.__name__, exc_info=True)
        return JSONResponse({"detail": f"database unreachable: {type(exc).__name__}"},
                            status_code=503)

    for outage in (OperationalError, InterfaceError, DisconnectionError, PoolTimeout):
        app.add_exception_handler(outage, _database_unreachable)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    from app.routes import artifacts, catalog, configurations, health, jobs, metrics

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(catalog.router)
    app.include_router(configurations.router)
    app.include_router(metrics.router)
    app.add_middleware(RequestBodyGuard, max_bytes=settings.max_body_bytes)
    app.state.metrics = Registry()
    app.add_middleware(HttpMetrics, registry=app.state.metrics)  # counts 413s too
    app.add_middleware(RequestLog)  # outermost: logs every request, with an id
    _keep_null_examples(app)
    return app


def _keep_null_examples(app: FastAPI) -> None:
    """FastAPI drops every null from the OpenAPI document, examples' included, which left the
    examples without fields their schemas require (``finished_at``…): put them back whole."""
    from app import schemas

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for name, component in generate().get("components", {}).get("schemas", {}).items():
                extra = getattr(getattr(schemas, name, None), "model_config", {})
                examples = (extra.get("json_schema_extra") or {}).get("examples")
                if examples is not None:
                    component["examples"] = jsonable_encoder(examples)
        return app.openapi_schema

    app.openapi = openapi
