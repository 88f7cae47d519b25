"""PruningNet reuse between jobs ("train once, search many", issue: the service): a job whose
architecture, data and PruningNet settings match an owner's earlier succeeded job adopts that
job's trained PruningNet and runs only search, final training, evaluation and export.

Real worker, real database (SQLite and PostgreSQL), the ``smoke`` preset on a tiny network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tests.conftest import emptied_engine
from app import queue
from app.settings import Settings
from app.worker import Worker
from pruning.pipeline import Budget, PipelineSpec, metanet_fingerprint

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(300)]

SEARCH = {"population": 6, "keep_top": 6, "parents": 3, "mutants": 3, "crossovers": 3,
          "generations": 1}
BASE = PipelineSpec(arch="test_mobilenet_v2", dataset="synthetic", preset="smoke", device="cpu",
                    budget=Budget(macs_ratio=0.5), metanet={"epochs": 2}, search=SEARCH)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                scope="module")
def setup(request, tmp_path_factory):
    url = request.getfixturevalue(f"{request.param}_url")
    engine = emptied_engine(url)
    settings = Settings(database_url=url, artifact_dir=tmp_path_factory.mktemp("artifacts"),
                        lease_seconds=30, heartbeat_seconds=5)
    yield engine, settings, Worker(settings, "w-reuse", device="cpu", engine=engine)
    engine.dispose()


def run_job(setup, spec: PipelineSpec, owner: str = "alice"):
    """Queue ``spec`` as the API does (with its fingerprint), let the worker run it, and return
    the finished row and its run folder."""
    engine, settings, worker = setup
    with Session(engine, expire_on_commit=False) as s:
        job = queue.submit(s, owner, spec.model_dump(mode="json"),
                           metanet_key=metanet_fingerprint(spec))
        s.commit()
    assert worker.run_once()
    with Session(engine, expire_on_commit=False) as s:
        row = queue.get_job(s, job.id, None)
    assert row.status == "succeeded", (row.error_kind, row.error_message)
    return row, Path(settings.artifact_dir) / "jobs" / job.id


def run_resumed(setup, spec: PipelineSpec, recorded: PipelineSpec, before=lambda: None):
    """Queue ``spec`` as if an attempt had begun it and stopped early (its run folder holds only
    ``recorded`` as ``spec.json``), call ``before``, let the worker run the next attempt, and
    return the succeeded row and the run folder."""
    engine, settings, worker = setup
    with Session(engine, expire_on_commit=False) as s:
        job = queue.submit(s, "alice", spec.model_dump(mode="json"),
                           metanet_key=metanet_fingerprint(spec))
        s.commit()
    run_dir = Path(settings.artifact_dir) / "jobs" / job.id
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(recorded.model_dump()))
    before()
    assert worker.run_once()
    with Session(engine, expire_on_commit=False) as s:
        row = queue.get_job(s, job.id, None)
    assert row.status == "succeeded", row.error_message
    return row, run_dir


def trained_here(run_dir: Path) -> bool:
    """Whether the run trained its own PruningNet (training leaves its step checkpoint)."""
    return (run_dir / "metanet" / "state.safetensors").exists()


def test_a_matching_job_reuses_the_pruningnet_and_others_do_not(setup):
    first, first_dir = run_job(setup, BASE)
    assert trained_here(first_dir) and "metanet_reused_from" not in first.detail["result"]

    # a new budget, same architecture, data, seed and PruningNet settings: reused
    second, second_dir = run_job(setup, BASE.model_copy(update={"budget":
                                                                Budget(macs_ratio=0.7)}))
    assert second.detail["result"]["metanet_reused_from"] == first.id
    assert not trained_here(second_dir)
    pnet = "metanet/pruningnet.safetensors"
    assert (second_dir / pnet).read_bytes() == (first_dir / pnet).read_bytes()
    report = json.loads((second_dir / "artifacts" / "report.json").read_text())
    assert Path(report["metanet_from"]["run"]).name == first.id
    assert second.detail["result"]["budget"] != first.detail["result"]["budget"]

    # another owner, another seed, other PruningNet settings: each trains its own
    for owner, spec in [("bob", BASE),
                        ("alice", BASE.model_copy(update={"seed": 1})),
                        ("alice", BASE.model_copy(update={"metanet": {"epochs": 1}}))]:
        job, run_dir = run_job(setup, spec, owner)
        assert trained_here(run_dir), (owner, spec.seed, spec.metanet)
        assert "metanet_reused_from" not in job.detail["result"]


def test_an_unusable_lender_is_skipped_not_fatal(setup):
    """A lender whose PruningNet is gone (or was trained by an older version) is passed over: the
    job trains its own instead of failing."""
    spec = BASE.model_copy(update={"seed": 7})
    lender, lender_dir = run_job(setup, spec)
    (lender_dir / "metanet" / "pruningnet.safetensors").unlink()
    job, run_dir = run_job(setup, spec.model_copy(update={"budget": Budget(macs_ratio=0.7)}))
    assert trained_here(run_dir) and "metanet_reused_from" not in job.detail["result"]


def test_a_lender_trained_on_other_data_is_passed_over(setup):
    """The lender's data.json differs from the data the job loads (an image folder changed
    between the jobs): the job trains its own PruningNet instead of failing."""
    spec = BASE.model_copy(update={"seed": 8})
    lender, lender_dir = run_job(setup, spec)
    record = json.loads((lender_dir / "data.json").read_text())
    (lender_dir / "data.json").write_text(json.dumps({**record, "sha256": "0" * 64,
                                                      "train_val_sha256": "0" * 64}))
    job, run_dir = run_job(setup, spec.model_copy(update={"budget": Budget(macs_ratio=0.7)}))
    assert trained_here(run_dir) and "metanet_reused_from" not in job.detail["result"]
    assert json.loads((run_dir / "spec.json").read_text())["metanet_from"] is None


def test_a_resumed_attempt_keeps_its_first_decision(setup):
    """An attempt that began training before a lender finished resumes its own training (its run
    folder's spec.json says so) instead of switching PruningNets halfway."""
    spec = BASE.model_copy(update={"seed": 9})
    run_job(setup, spec)  # the lender
    later = spec.model_copy(update={"budget": Budget(macs_ratio=0.7)})
    row, run_dir = run_resumed(setup, later, recorded=later)  # begun before the lender
    assert trained_here(run_dir) and "metanet_reused_from" not in row.detail["result"]


def delete_job(setup, job_id: str) -> None:
    """``DELETE /v1/jobs/{id}``'s service: the row, then the run folder."""
    from app.db import session_factory
    from app.deps import Database
    from app.services import jobs

    engine, settings, _ = setup
    db = Database(engine=engine, read=session_factory(engine), write=session_factory(engine))
    jobs.delete_job(db, settings, "alice", job_id)


def test_a_lender_deleted_before_the_copy_is_survived(setup, monkeypatch):
    """The lender is deleted (``DELETE /v1/jobs/{id}``) after the worker chose it and before
    its PruningNet was copied: the job starts over and trains its own instead of failing."""
    import pruning.pipeline

    spec = BASE.model_copy(update={"seed": 10})
    lender, lender_dir = run_job(setup, spec)
    adopt = pruning.pipeline._adopt_metanet

    def deleted_first(ctx, src):
        delete_job(setup, lender.id)
        return adopt(ctx, src)

    monkeypatch.setattr(pruning.pipeline, "_adopt_metanet", deleted_first)
    job, run_dir = run_job(setup, spec.model_copy(update={"budget": Budget(macs_ratio=0.7)}))
    assert not lender_dir.exists()
    assert trained_here(run_dir) and "metanet_reused_from" not in job.detail["result"]
    assert json.loads((run_dir / "spec.json").read_text())["metanet_from"] is None


def test_a_resumed_attempt_whose_lender_was_deleted_starts_over(setup):
    """An attempt chose a lender (its spec.json says so) and stopped before copying it; the
    lender is deleted; the next attempt starts the job over, with the owner's other lender."""
    spec = BASE.model_copy(update={"seed": 11})
    gone, gone_dir = run_job(setup, spec)
    other, other_dir = run_job(setup, spec.model_copy(update={"budget": Budget(macs_ratio=0.6)}))
    later = spec.model_copy(update={"budget": Budget(macs_ratio=0.7)})
    row, _ = run_resumed(setup, later, recorded=later.model_copy(
        update={"metanet_from": str(gone_dir)}), before=lambda: delete_job(setup, gone.id))
    assert row.detail["result"]["metanet_reused_from"] == other.id
