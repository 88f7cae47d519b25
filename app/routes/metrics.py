"""``/metrics``: Prometheus text format (no auth, like ``/healthz``: counts only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.deps import Db, SettingsDep
from app.models import STATUSES
from app.services.configurations import job_counts
from app.services.jobs import live_workers

router = APIRouter(tags=["health"])

_EXAMPLE = ('# TYPE metaprune_jobs gauge\nmetaprune_jobs{status="queued"} 2\n'
            '# TYPE metaprune_workers gauge\nmetaprune_workers 2\n'
            '# TYPE metaprune_http_requests_total counter\n'
            'metaprune_http_requests_total{method="GET",route="/v1/jobs/{job_id}",'
            'status="200"} 17\n')


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format 0.0.4: jobs per "
                                            "status and live workers (left out while the "
                                            "database is unreachable: "
                                            "metaprune_database_up 0), HTTP requests and "
                                            "durations per route template, build info. Counts "
                                            "only: no owners, job ids or specs.",
                             "content": {"text/plain": {"schema": {"type": "string"},
                                                        "example": _EXAMPLE}}}})
async def prometheus(request: Request, db: Db, settings: SettingsDep) -> PlainTextResponse:
    try:
        counts = await run_in_threadpool(job_counts, db)
        workers = await run_in_threadpool(live_workers, db, settings)
        queue = (metrics.render_jobs(counts, STATUSES)
                 + metrics.render_workers(workers.total, workers.cuda))
    except SQLAlchemyError:  # the HTTP metrics still tell what the outage does to the API
        queue = []
    lines = (metrics.render_database_up(bool(queue)) + queue + request.app.state.metrics.render()
             + metrics.render_build_info(request.app.version))
    return PlainTextResponse("\n".join(lines) + "\n", media_type=metrics.CONTENT_TYPE)
