"""Response bodies of the REST API (requests are validated by the engine's own models, e.g.
:class:`pruning.spec.PipelineSpec`). Each carries an example for the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.models import Job, JobStatus

_KEY = "20-20-18-18-15-15-12-12-12-12-12-12-10-10"  # MobileNetV1 0.25x on Fashion-MNIST
_WIDTHS = {"stem": 5, "l1": 11, "l2": 20, "l3": 20, "l4": 35, "l5": 35, "l6": 58, "l7": 58,
           "l8": 58, "l9": 58, "l10": 58, "l11": 58, "l12": 102, "l13": 102}

JOB_EXAMPLE = {
    "id": "5b0f3f0e-8a4e-4c1e-9a57-0d3f1c2b7e11",
    "status": "running",
    "stage": "search",
    "progress": 0.42,
    "detail": {"stage": "search", "generation": 7, "generations": 20, "evaluated": 400,
               "new": 50, "best_score": 0.861, "best_macs": 828_924, "best_params": 46_537,
               "best_key": _KEY, "objective": "accuracy", "eta_s": 95.0, "attempt": 1,
               "best": {"score": 0.861, "macs": 828_924, "params": 46_537, "key": _KEY}},
    "spec": {"arch": "mobilenet_v1", "dataset": "fashion-mnist",
             "width_mult": 0.25, "budget": {"macs_ratio": 0.3}, "preset": "quick", "seed": 0},
    "attempt": 1,
    "max_attempts": 3,
    "cancel_requested": False,
    "error_kind": None,
    "error_message": None,
    "waiting_reason": None,
    "created_at": "2030-01-01T12:00:00Z",
    "started_at": "2030-01-01T12:00:02Z",
    "finished_at": None,
    "updated_at": "2030-01-01T12:03:10Z",
}


class JobOut(BaseModel):
    """A job: its queue state, the current stage and progress, and how it ended."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str = Field(description="the job id (a UUID)")
    status: JobStatus = Field(description="queued → running → succeeded | failed | cancelled")
    stage: str | None = Field(description="current pipeline stage (data, latency, metanet, "
                                          "search, final, baseline, evaluate, export, done); "
                                          "null before the first")
    progress: float = Field(ge=0, le=1, description="overall progress, 0–1")
    detail: dict[str, Any] = Field(description="the stage's latest progress event (step and "
                                               "total, epoch and loss, or generation; eta_s), "
                                               "`best` so far in the search, the `attempt`; "
                                               "on success the `result`")
    spec: dict[str, Any] = Field(description="the validated job spec, defaults filled in")
    attempt: int = Field(description="how many times a worker has claimed the job")
    max_attempts: int = Field(description="claims allowed before a lost lease or a retried "
                                          "error fails the job (a retry allows as many more)")
    cancel_requested: bool = Field(description="a cancel was asked for; a running job stops "
                                               "at its next checkpoint of progress")
    error_kind: str | None = Field(description="why the job failed, or while it is retried why "
                                               "its last attempt did (a short code); null once "
                                               "it succeeds or is cancelled")
    error_message: str | None = Field(description="that failure's message, else null")
    waiting_reason: str | None = Field(
        None, description="why a queued job cannot start now: no worker is running, or none "
                          "that takes jobs asking for CUDA, or naming a data_root; null "
                          "otherwise")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, job: Job, waiting_reason: str | None = None) -> JobOut:
        return cls.model_validate({**{name: getattr(job, name) for name in cls.model_fields
                                      if name != "waiting_reason"},
                                   "waiting_reason": waiting_reason})


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"items": [JOB_EXAMPLE], "total": 41, "limit": 1, "offset": 0, "next_offset": 1}]})

    items: list[JobOut]
    total: int = Field(description="jobs matching the filters, over all pages")
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


class JobDeleted(BaseModel):
    """A deleted job: its record and its run folder (checkpoints and artifacts) are gone."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": JOB_EXAMPLE["id"], "deleted": True, "freed_bytes": 312_475_648}]})

    id: str
    deleted: bool = True
    freed_bytes: int = Field(ge=0, description="bytes of files removed with the run folder")


class ErrorOut(BaseModel):
    """An error: ``detail`` is a message, or for 422 a list of {loc, msg, type} entries."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "job not found"},
        {"detail": [{"loc": ["body", "arch"], "type": "value_error",
                     "msg": "Value error, unknown architecture 'vgg99'"}]}]})

    detail: str | list[dict[str, Any]]


class ArchList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"archs": ["mobilenet_v1", "mobilenet_v2", "resnet18", "resnet34", "resnet50"]}]})

    archs: list[str] = Field(description="architecture names a job's `arch` may take")


class DatasetList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"datasets": ["fashion-mnist", "imagefolder", "synthetic"]}]})

    datasets: list[str] = Field(description="dataset names a job's `dataset` may take")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class ArtifactOut(BaseModel):
    name: str = Field(description="the artifact's name (download it by this name)")
    size: int = Field(ge=0, description="bytes")
    sha256: str = Field(description="hex sha256 (from config.json; computed for config.json)")
    intact: bool = Field(description="the file still has this sha256 (false: corrupted since "
                                     "it was written; its download is refused with 409)")


class ArtifactList(BaseModel):
    """The artifacts of a succeeded job: config.json and every file its `files` map names."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [
        {"name": "config.json", "size": 5120, "sha256": _SHA, "intact": True},
        {"name": "model.onnx", "size": 912_384, "sha256": _SHA, "intact": True},
        {"name": "model.safetensors", "size": 905_216, "sha256": _SHA, "intact": True},
        {"name": "model.ts", "size": 1_020_928, "sha256": _SHA, "intact": True},
        {"name": "pareto.png", "size": 48_213, "sha256": _SHA, "intact": True},
        {"name": "report.json", "size": 2_301, "sha256": _SHA, "intact": True},
        {"name": "search.json", "size": 88_412, "sha256": _SHA, "intact": True}]}]})

    items: list[ArtifactOut]


_RECORD = {"key": _KEY, "generation": 2, "widths": _WIDTHS, "macs": 828_924, "params": 46_537,
           "score": 0.861}


class CandidateOut(BaseModel):
    """One evaluated candidate of the search."""

    key: str = Field(description="the candidate's key (its width choices)")
    generation: int = Field(description="the generation that evaluated it")
    widths: dict[str, int] = Field(description="channels per width group")
    macs: int
    params: int
    score: float = Field(description="estimated validation accuracy (PruningNet weights)")


class SearchOut(BaseModel):
    """The search history (every evaluated candidate, in evaluation order) and its Pareto front
    of score vs MACs (non-dominated candidates, by MACs)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "job_id": "5b0f3f0e-8a4e-4c1e-9a57-0d3f1c2b7e11", "status": "succeeded",
        "source": "artifacts", "finished": True, "generations": 20, "evaluated": 1,
        "best": _KEY, "history": [_RECORD], "pareto_front": [_RECORD]}]})

    job_id: str
    status: JobStatus
    source: str = Field(description="`artifacts` (artifacts/search.json of a finished run) or "
                                    "`state` (the search state of a search in progress)")
    finished: bool = Field(description="whether the search has finished")
    generations: int | None = Field(description="generations run (so far)")
    evaluated: int = Field(description="candidates evaluated (so far)")
    best: str | None = Field(description="key of the best candidate (so far)")
    history: list[CandidateOut]
    pareto_front: list[CandidateOut] = Field(
        description="candidates no other beats on both score and MACs, sorted by MACs")


_CONFIGURATION = {"job_id": "5b0f3f0e-8a4e-4c1e-9a57-0d3f1c2b7e11", "arch": "mobilenet_v1",
                  "dataset": "fashion-mnist", "width_mult": 0.25,
                  "budget": {"macs_ratio": 0.3}, "candidate": _KEY, "widths": _WIDTHS,
                  "macs": 828_924, "params": 46_537, "test_accuracy": 0.874,
                  "created_at": "2030-01-01T12:00:00Z"}


class ConfigurationOut(BaseModel):
    """A pruned configuration: the MetaPruning winner of a succeeded job."""

    job_id: str = Field(description="the job that found it (its artifacts hold the model)")
    arch: str | None
    dataset: str | None
    width_mult: float | None = Field(default=None, description="the spec's width multiplier")
    budget: dict[str, Any] | None = Field(description="the budget the job pruned to")
    candidate: str | None = Field(description="the candidate's key (its width choices)")
    widths: dict[str, int] | None = Field(description="channels per width group (null for jobs "
                                                      "stored before widths were recorded)")
    macs: int
    params: int | None
    test_accuracy: float | None
    created_at: datetime


class ConfigurationPage(BaseModel):
    """A page of stored configurations, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"items": [_CONFIGURATION], "total": 7, "limit": 1, "offset": 0, "next_offset": 1}]})

    items: list[ConfigurationOut]
    total: int = Field(description="configurations matching the filters, over all pages")
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


def errors(*codes: int, says: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error status codes (``says``: an endpoint's own
    meaning of a code)."""
    text = {401: "missing or invalid API token",
            404: "no such job among the caller's",
            409: "the job's state does not allow this",
            413: "request body larger than the server's limit",
            415: "request body is not JSON (Content-Type: application/json)",
            416: "the Range lies beyond the file (Content-Range: bytes */<size>)",
            422: "invalid request: the reason is in detail",
            429: "too many queued jobs for this owner",
            503: "the database is unreachable"}
    text.update(says or {})
    return {code: {"model": ErrorOut, "description": text[code]} for code in codes}
