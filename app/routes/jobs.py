"""``/v1/jobs``: submit, get, list, cancel, retry, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response, status

from app.auth import JobId, Owner
from app.deps import Database, Db, SettingsDep
from app.models import Job, JobStatus
from app.schemas import JobDeleted, JobOut, JobPage, errors
from app.services import InvalidRequest, jobs
from app.settings import Settings
from pruning.spec import PipelineSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=errors(401))

SPEC_EXAMPLES = {
    "quick": {"summary": "MobileNetV1 on Fashion-MNIST at 30% of its MACs",
              "value": {"arch": "mobilenet_v1", "dataset": "fashion-mnist", "width_mult": 0.25,
                        "budget": {"macs_ratio": 0.3}, "preset": "quick", "seed": 0}},
    "latency": {"summary": "ResNet-18 under a latency budget, with search overrides",
                "value": {"arch": "resnet18", "dataset": "fashion-mnist",
                          "budget": {"latency_ms": 4.0}, "preset": "standard",
                          "search": {"generations": 30}}},
}


def _out(items: list[Job], db: Database, settings: Settings) -> list[JobOut]:
    """The jobs as answered, with the reason each queued one waits (if it does)."""
    reasons = jobs.waiting_reasons(db, settings, items)
    return [JobOut.of(job, reasons.get(job.id)) for job in items]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut,
             summary="Submit a pruning job",
             responses={200: {"model": JobOut, "description": "an Idempotency-Key replay: the "
                                                              "job that key made"},
                        **errors(409, 413, 415, 422, 429, says={
                            409: "this Idempotency-Key was used with a different spec"})})
def submit_job(spec: Annotated[PipelineSpec, Body(openapi_examples=SPEC_EXAMPLES)],
               request: Request, response: Response, owner: Owner, db: Db,
               settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(
                   min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$",
                   description="a client-chosen key (no control characters); the same key "
                               "gives back the same job")
               ] = None) -> JobOut:
    """Queue a job. The body is a pipeline spec (architecture, dataset, budget, preset and
    overrides, seed); it is validated in full, with every hyperparameter bounded."""
    if len(request.headers.getlist("idempotency-key")) > 1:  # which one would be meant?
        raise InvalidRequest([{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                               "msg": "send one Idempotency-Key, not several"}])
    job, created = jobs.submit_job(db, settings, owner, spec, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _out([job], db, settings)[0]


@router.get("", response_model=JobPage, summary="List jobs", responses=errors(422))
def list_jobs(owner: Owner, db: Db, settings: SettingsDep,
              status_: Annotated[list[JobStatus] | None, Query(
                  alias="status", description="only these statuses (repeatable)")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> JobPage:
    """The caller's jobs, newest first, a page at a time."""
    statuses = tuple(s.value for s in status_ or ())
    items, total = jobs.list_jobs(db, owner, statuses, limit, offset)
    more = offset + len(items) < total
    return JobPage(items=_out(items, db, settings), total=total, limit=limit, offset=offset,
                   next_offset=offset + len(items) if more else None)


@router.get("/{job_id}", response_model=JobOut, summary="Get a job",
            responses=errors(404, 422))
def get_job(job_id: JobId, owner: Owner, db: Db, settings: SettingsDep) -> JobOut:
    """Status, stage, progress, stage detail, attempts, timestamps and any error; for a queued
    job that cannot start now, why (``waiting_reason``)."""
    return _out([jobs.get_job(db, owner, job_id)], db, settings)[0]


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a job",
             responses={202: {"model": JobOut, "description": "the job is running: its worker "
                                                              "was asked to stop"},
                        **errors(404, 409, 422)})
def cancel_job(job_id: JobId, response: Response, owner: Owner, db: Db) -> JobOut:
    """A queued job is cancelled at once (200); a running one is asked to stop (202) and
    becomes ``cancelled`` when its worker acknowledges (at its next training step or search
    generation: a job already evaluating or exporting, seconds from its end, succeeds instead);
    a finished one is a conflict (409)."""
    job = jobs.cancel_job(db, owner, job_id)
    if job.status == JobStatus.RUNNING.value:
        response.status_code = status.HTTP_202_ACCEPTED
    return JobOut.of(job)


@router.post("/{job_id}/retry", response_model=JobOut, summary="Retry a failed or cancelled job",
             responses=errors(404, 409, 422, 429, says={
                 409: "the job is queued, running or succeeded: only a failed or cancelled job "
                      "can be retried"}))
def retry_job(job_id: JobId, owner: Owner, db: Db, settings: SettingsDep) -> JobOut:
    """Queue a failed or cancelled job again, with a fresh set of attempts: its worker resumes
    it from the last checkpoint in its run folder (at most one checkpoint interval is redone).
    Its error stays until it ends again; a queued, running or succeeded job is a conflict
    (409); the per-owner queue limit applies (429)."""
    return _out([jobs.retry_job(db, settings, owner, job_id)], db, settings)[0]


@router.delete("/{job_id}", response_model=JobDeleted, summary="Delete a finished job",
               responses=errors(404, 409, 422, says={
                   409: "the job is queued or running: cancel it first"}))
def delete_job(job_id: JobId, owner: Owner, db: Db, settings: SettingsDep) -> JobDeleted:
    """Delete a succeeded, failed or cancelled job with its run folder: checkpoints, PruningNet
    and artifacts (download what you keep first). Its id is then unknown (404), its
    configuration leaves ``/v1/configurations``, and later jobs no longer reuse its PruningNet.
    A queued or running job is a conflict (409): cancel it first."""
    return JobDeleted(id=job_id, freed_bytes=jobs.delete_job(db, settings, owner, job_id))
