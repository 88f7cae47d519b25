"""Prometheus metrics, written by hand in the text exposition format (version 0.0.4): no
client library. ``GET /metrics`` (no auth, like ``/healthz``) exposes only counts: jobs per
status, live workers, HTTP requests per (method, route template, status), request durations and
the build version; never owners, job ids, specs or paths.

Request metrics come from :class:`HttpMetrics`, a pure ASGI middleware; a request is labelled by
its route template (``/v1/jobs/{job_id}``), never its raw path (bounded cardinality); requests
that match no route are labelled ``route="unmatched"``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "unmatched"


def escape(value: str) -> str:
    """A label value escaped as the exposition format requires."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**values: str) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in values.items()) + "}"


def number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Registry:
    """Request counts and duration histograms of one app (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        # (method, route) -> [bucket counts..., sum, count]
        self.durations: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.durations.setdefault((method, route), [0] * len(BUCKETS) + [0.0, 0])
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self) -> list[str]:
        with self._lock:
            requests = sorted(self.requests.items())
            durations = sorted((k, list(v)) for k, v in self.durations.items())
        out = ["# HELP metaprune_http_requests_total HTTP requests by method, route template "
               "and status code.",
               "# TYPE metaprune_http_requests_total counter"]
        for (method, route, status), n in requests:
            out.append(f"metaprune_http_requests_total"
                       f"{labels(method=method, route=route, status=status)} {n}")
        out += ["# HELP metaprune_http_request_duration_seconds HTTP request duration (to the "
                "end of the response body) by method and route template.",
                "# TYPE metaprune_http_request_duration_seconds histogram"]
        for (method, route), h in durations:
            for bound, n in zip((*BUCKETS, float("inf")), (*h[:len(BUCKETS)], h[-1])):
                out.append(f"metaprune_http_request_duration_seconds_bucket"
                           f"{labels(method=method, route=route, le=number(bound))} {int(n)}")
            out.append(f"metaprune_http_request_duration_seconds_sum"
                       f"{labels(method=method, route=route)} {h[-2]!r}")
            out.append(f"metaprune_http_request_duration_seconds_count"
                       f"{labels(method=method, route=route)} {int(h[-1])}")
        return out


def render_jobs(counts: dict[str, int], statuses: Iterable[str]) -> list[str]:
    out = ["# HELP metaprune_jobs Jobs by status (all owners).", "# TYPE metaprune_jobs gauge"]
    out += [f"metaprune_jobs{labels(status=s)} {counts.get(s, 0)}" for s in statuses]
    return out


def render_workers(n: int, n_cuda: int) -> list[str]:
    return ["# HELP metaprune_workers Workers that reported within a lease (all machines).",
            "# TYPE metaprune_workers gauge", f"metaprune_workers {n}",
            "# HELP metaprune_workers_cuda Of those, the workers that claim jobs asking for "
            "CUDA.", "# TYPE metaprune_workers_cuda gauge", f"metaprune_workers_cuda {n_cuda}"]


def render_database_up(up: bool) -> list[str]:
    return ["# HELP metaprune_database_up Whether this scrape could read the database.",
            "# TYPE metaprune_database_up gauge", f"metaprune_database_up {int(up)}"]


def render_build_info(version: str) -> list[str]:
    return ["# HELP metaprune_build_info The service's version (always 1).",
            "# TYPE metaprune_build_info gauge",
            f"metaprune_build_info{labels(version=version)} 1"]


class HttpMetrics:
    """Count requests and time them into ``registry`` (pure ASGI; streaming responses are timed
    to their last body chunk)."""

    def __init__(self, app, registry: Registry):
        self.app = app
        self.registry = registry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.registry.observe(scope["method"], _route_template(scope), status,
                                  time.perf_counter() - start)


def _route_template(scope) -> str:
    """The matched route's template: FastAPI's routes put themselves in the scope; Starlette's
    (``/docs``, ``/openapi.json``) leave only their endpoint, found among the app's routes."""
    template = getattr(scope.get("route"), "path_format", None)
    endpoint = scope.get("endpoint")
    app = scope.get("app")
    if template is None and endpoint is not None:
        template = next((r.path_format for r in getattr(app, "routes", ())
                         if getattr(r, "endpoint", None) is endpoint), None)
    if template is None and app is not None:
        # answered before routing (a 413 or 415 of RequestBodyGuard): the route it was for
        template = next(iter(api_routes(app, scope.get("path", ""))), None)
    return template or UNMATCHED


def api_routes(app, path: str) -> dict[str, set[str]]:
    """The API's route templates that match ``path`` (those of the OpenAPI document), each with
    the methods it serves."""
    table = getattr(app.state, "route_table", None)
    if table is None:
        table = app.state.route_table = [
            (re.compile("^" + re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template)) + "$"),
             template, {m.upper() for m in operations})
            for template, operations in app.openapi().get("paths", {}).items()]
    return {template: methods for pattern, template, methods in table if pattern.match(path)}
