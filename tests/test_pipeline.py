"""The end-to-end pipeline: artifacts, budgets, resume after SIGKILL, run-folder errors, the
``generated`` final init and the uniform baseline — plus regressions of the engine defects the
pipeline relies on (level validation in batch counting, numpy levels, BN recalibration).

The runs use the ``smoke`` preset on the tiny ``test_mobilenet_v2`` (seconds on one CPU thread).
One reference run is shared by the module; the SIGKILL test repeats it in a subprocess and
compares.
"""

from __future__ import annotations

import hashlib
import json
import signal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import EagerGraphs, sigkill_at
from tests.test_data import write_tree
from metanet.bn import bn_statistics, recalibrate_bn
from metanet.pruningnet import PruningNet
from pruning import cli, counting
from pruning.checkpoint import atomic_write_json, load_tensors, read_json
from pruning.constraints import (InfeasibleBudgetError, LooseBudgetError, TightBudgetError,
                                 format_count)
from pruning.data import load_dataset
from pruning.export import load_pruned
from pruning.modules import build
from pruning.pipeline import Budget, PipelineSpec, RunFolderError, resolve_budget, run
from pruning.space import Candidate, CandidateError, SearchSpace
from pruning.train import Cancelled

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_mobilenet_v2"
OVERRIDES = {"metanet": {"epochs": 4, "checkpoint_every": 3},
             "search": {"population": 8, "keep_top": 8, "parents": 4, "mutants": 4,
                        "crossovers": 4, "generations": 2}}
# the reference run as `metaprune prune` arguments (the subprocess runs exactly this)
CLI_ARGS = ["prune", "--arch", ARCH, "--dataset", "synthetic", "--preset", "smoke",
            "--device", "cpu", "--macs-ratio", "0.5", "--baseline", "--quiet", "--json",
            "--set", json.dumps(OVERRIDES)]
STAGES = ("spec.json", "metanet/pruningnet.safetensors", "search/state.json",
          "final/model.safetensors", "baseline/model.safetensors")
ARTIFACTS = ("config.json", "model.safetensors", "model.ts", "model.onnx", "search.json",
             "report.json", "pareto.png")


def synthetic_space() -> SearchSpace:
    """The space the pipeline builds for ``synthetic`` (1 × 16 × 16 images, 10 classes)."""
    return SearchSpace.create(ARCH, num_classes=10, in_channels=1, input_size=16,
                              min_channels=PipelineSpec.model_fields["min_channels"].default)


@pytest.fixture(scope="module")
def reference(single_thread, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        budget=Budget(macs_ratio=0.5), train_baseline=True, **OVERRIDES)
    events = []
    report = run(spec, folder, progress=events.append)
    return folder, report, events


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("metaprune: error:")]


# --- a whole run ----------------------------------------------------------------------------


def test_run_writes_every_stage_and_artifact(reference):
    folder, report, events = reference
    for rel in STAGES:
        assert (folder / rel).is_file(), rel
    for name in ARTIFACTS:
        assert (folder / "artifacts" / name).is_file(), name
    stages = [e["stage"] for e in events]
    for stage in ("data", "metanet", "search", "final", "baseline", "export", "done"):
        assert stage in stages
    assert stages[-1] == "done" and events[-1]["report"] == report
    assert read_json(folder / "artifacts" / "report.json") == report


def test_config_hashes_match_the_files(reference):
    art = reference[0] / "artifacts"
    config = read_json(art / "config.json")
    assert set(config["files"]) == set(ARTIFACTS) - {"config.json"}
    for name, digest in config["files"].items():
        assert sha256(art / name) == digest, name


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_load_pruned(reference):
    folder = reference[0] / "artifacts"
    ts = torch.jit.load(str(folder / "model.ts"))  # plain PyTorch, no project code
    net = load_pruned(folder)
    x = next(iter(load_dataset("synthetic", train_limit=64, test_limit=32, val_size=16)
                  .test.batches(32)))[0]
    with torch.inference_mode():
        expected, got = net(x), ts(x)
    assert expected.shape == (32, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the run folder itself will do too
        torch.testing.assert_close(load_pruned(reference[0])(x), expected)
    with pytest.raises(FileNotFoundError, match="holds no exported model .* runs/NAME/artifacts"):
        load_pruned(folder / "search")
    config = read_json(folder / "config.json")
    space = SearchSpace.from_dict(config["space"])
    cand = Candidate.from_key(config["candidate"])
    assert config["widths"] == space.widths_by_group(cand)
    assert config["macs"] == counting.macs(space, cand)
    assert config["params"] == counting.params(space, cand) == sum(
        p.numel() for p in net.parameters())


def test_report_compares_winner_and_uniform_within_the_budget(reference):
    folder, report, events = reference
    space = synthetic_space()
    full = counting.macs(space, space.largest())
    budget = report["budget"]["macs"]
    assert budget == int(0.5 * full)
    assert report["full_network"]["macs"] == full
    search = read_json(folder / "artifacts" / "search.json")
    for name in ("metapruning", "uniform"):
        entry = report[name]
        cand = Candidate.from_key(entry["candidate"])
        assert entry["macs"] == counting.macs(space, cand) <= budget
        assert entry["params"] == counting.params(space, cand)
        assert entry["widths"] == space.widths_by_group(cand)
        assert entry["budget_use"] == round(entry["macs"] / budget, 4) <= 1
        assert 0 <= entry["estimated_val_accuracy"] <= 1
        assert 0 <= entry["test_accuracy"] <= 1  # the baseline was trained too
    # the winner is the search's best; the uniform baseline the widest uniform candidate
    assert report["metapruning"]["candidate"] == search["best"]
    assert read_json(folder / "artifacts" / "config.json")["candidate"] == search["best"]
    level = Candidate.from_key(report["uniform"]["candidate"]).choices
    assert len(set(level)) == 1
    assert counting.macs(space, space.uniform(level[0] + 1)) > budget
    assert all(r["macs"] <= budget for r in search["history"])
    assert report["search"]["evaluated"] == len(search["history"]) == 16
    best = max(search["history"], key=lambda r: r["score"])
    assert report["search"]["best_score"] == best["score"]
    assert search["config"]["objective"] == report["search"]["objective"]
    estimate = report["metapruning"]["estimated_val_" + report["search"]["objective"]]
    assert estimate == pytest.approx(best["score"] if report["search"]["objective"] == "accuracy"
                                     else -best["score"], abs=1e-6)
    assert report["uniform"]["estimated_val_loss"] > 0
    # how the two were trained: the preset's final recipe, from scratch (the paper)
    assert report["final"]["init"] == "scratch" and report["final"]["epochs"] == 1
    assert report["final"]["steps"] == max(e["step"] for e in events if e["stage"] == "final")


# --- resuming, and the run folder -----------------------------------------------------------


def test_resume_after_sigkill_gives_the_uninterrupted_result(reference, tmp_path, capsys):
    ref_folder, ref_report, _ = reference
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", *CLI_ARGS, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sigkill_at(proc, out / "metanet" / "state.safetensors", 120)  # first checkpoint
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not (out / "artifacts").exists()
    assert read_json(out / "spec.json") == read_json(ref_folder / "spec.json")

    # without --resume an existing run folder is a one-line error, and nothing changes
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli.main([*CLI_ARGS, "--out", str(out)]) == 2
    (line,) = error_lines(capsys)
    assert "already holds a run; pass --resume" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    assert cli.main([*CLI_ARGS, "--out", str(out), "--resume"]) == 0
    report = json.loads(capsys.readouterr().out)
    history = read_json(out / "artifacts" / "search.json")["history"]
    assert history == read_json(ref_folder / "artifacts" / "search.json")["history"]
    for rel in ("metanet/pruningnet.safetensors", "artifacts/model.safetensors"):
        assert (out / rel).read_bytes() == (ref_folder / rel).read_bytes(), rel
    for name in ("metapruning", "uniform"):
        assert report[name] == ref_report[name]
    assert report["metanet"]["loss"] == ref_report["metanet"]["loss"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_where_it_stopped(tmp_path, signum):
    """The first SIGINT (Ctrl-C) or SIGTERM (`timeout`, `docker stop`) stops ``prune`` at its
    next training step, with that step's state saved (no periodic checkpoint is due:
    ``checkpoint_every`` is beyond the run) and a one-line note, exit status 128 + the signal;
    a resumed run continues from that step."""

    out = tmp_path / "run"
    overrides = {**OVERRIDES, "metanet": {"epochs": 200, "checkpoint_every": 100_000}}
    args = [a if a != json.dumps(OVERRIDES) else json.dumps(overrides) for a in CLI_ARGS]
    args.remove("--quiet")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", *args, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stderr:  # progress lines: wait until the PruningNet trains
            if line.startswith("[metanet] "):
                break
        proc.send_signal(signum)
        err = proc.stderr.read()
        assert proc.wait(60) == 128 + signum, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert "Traceback" not in err
    assert ("metaprune: stopped; checkpoint saved; to continue where it stopped, run the same "
            "command with --resume") in err
    saved = load_tensors(out / "metanet" / "state.safetensors")[1]
    assert 0 < saved["step"] < saved["total"]
    assert not (out / "metanet" / "pruningnet.safetensors").exists()

    events = []

    def first_step_only():  # resumed: stop again after one step
        return any(e.get("stage") == "metanet" and "step" in e for e in events)

    spec = PipelineSpec.model_validate(read_json(out / "spec.json"))
    with pytest.raises(Cancelled):
        run(spec, out, resume=True, progress=events.append, should_stop=first_step_only)
    assert next(e["step"] for e in events if "step" in e) == saved["step"] + 1


def test_a_closed_stderr_does_not_stop_a_run(tmp_path):
    """``metaprune prune … 2>&1 | head -1``: once the reader of the progress lines has gone,
    the run goes on quietly to the end instead of dying of a broken pipe."""
    out = tmp_path / "run"
    args = [a for a in CLI_ARGS if a != "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pruning.cli", *args, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.stderr.readline()  # the first progress line, then the reader leaves
        proc.stderr.close()
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out / "artifacts" / "report.json").is_file()


def test_a_second_process_on_a_run_folder_is_refused(tmp_path, capsys):
    """Two runs writing one folder would mix their files: while another process holds the
    folder's lock, a run there is refused in one line naming that process, and writes nothing;
    once it has gone, the folder is free."""
    from pruning.pipeline import lock_run_dir, unlock_run_dirs

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True); time.sleep(120)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert cli.main([*CLI_ARGS, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"metaprune: error: another metaprune process (pid {holder.pid}) is using {out}; "
            "wait for it to end, or stop it\n")
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert lock_run_dir(out) and not lock_run_dir(out)  # taken, and re-entrant
    unlock_run_dirs(out)


def test_a_damaged_evaluation_record_is_named(reference, tmp_path, capsys):
    """An ``evaluation.json`` that is JSON but not an evaluation (``[]``, ``{}``) reads as a
    damaged file, with the usual advice, not a traceback or a bare key."""
    ref_folder = reference[0]
    for text in ("[]", "{}"):
        out = tmp_path / ("list" if text == "[]" else "dict")
        shutil.copytree(ref_folder, out)
        (out / "evaluation.json").write_text(text)
        (out / "artifacts" / "model.onnx").unlink()  # the export is redone from the record
        assert cli.main(["resume", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == (f"metaprune: error: {out / 'evaluation.json'} is unreadable, corrupt or "
                       "truncated (no metapruning and uniform entries); restore it, or delete "
                       "it and run again to redo the step that wrote it\n")


def test_resume_with_another_spec_is_refused(reference, capsys):
    folder = reference[0]
    spec_before = (folder / "spec.json").read_bytes()
    assert cli.main([*CLI_ARGS, "--seed", "1", "--out", str(folder), "--resume"]) == 2
    (line,) = error_lines(capsys)
    assert "holds a run with a different specification (seed: 0 there, 1 now)" in line
    with pytest.raises(RunFolderError, match="different specification.*final_init"):
        run(PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                         budget=Budget(macs_ratio=0.5), train_baseline=True,
                         final_init="generated", **OVERRIDES), folder, resume=True)
    assert (folder / "spec.json").read_bytes() == spec_before


def test_infeasible_budget_fails_before_training(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained despite an infeasible budget")

    monkeypatch.setattr("pruning.pipeline.train_pruningnet", no_training)
    out = tmp_path / "run"
    args = [a if a != "--macs-ratio" else "--max-macs" for a in CLI_ARGS]
    args[args.index("--max-macs") + 1] = "1"
    assert cli.main([*args, "--out", str(out)]) == 2
    (line,) = error_lines(capsys)
    space = synthetic_space()
    smallest = counting.macs(space, space.smallest())
    assert "MACs budget 1 is infeasible" in line and f"{smallest:,}" in line
    assert not (out / "metanet").exists()
    assert not out.exists()  # nothing claimed: the same folder works once the budget is fixed


@pytest.mark.parametrize("option, name", [("--macs-ratio", "MACs"), ("--params-ratio", "params")])
def test_tiny_ratio_reads_as_an_infeasible_budget(tmp_path, capsys, option, name):
    """A ratio so small it rounds to 0 is named as the infeasible budget it is (with the
    smallest reachable value), not as a "limit 0" the user never typed."""
    args = [a if a != "--macs-ratio" else option for a in CLI_ARGS]
    args[args.index(option) + 1] = "1e-12"
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == 2
    (line,) = error_lines(capsys)
    assert f"{name} budget 1 is infeasible" in line and "smallest candidate needs" in line
    # ...and gives the smallest ratio that leaves something to search (a network beside the
    # smallest), which works, and a step below it does not
    field = option[2:].replace("-", "_")
    least = float(line.rpartition(f"as a {field} ({option}): at least ")[2])
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke",
                        budget=Budget(**{field: least}))
    spec.check_budget()
    with pytest.raises((InfeasibleBudgetError, TightBudgetError)) as e:
        spec.model_copy(update={"budget": Budget(**{field: least - 0.001})}).check_budget()
    assert f"as a {field} ({option}): at least {least:g}" in str(e.value)


def test_a_budget_for_the_smallest_network_only_fails_before_training(tmp_path, capsys):
    """Just above the smallest network, below every network one step wider: nothing to
    search (every candidate would be the smallest network under another key)."""
    space = synthetic_space()
    smallest = counting.macs(space, space.smallest())
    args = [a if a != "--macs-ratio" else "--max-macs" for a in CLI_ARGS]
    args[args.index("--max-macs") + 1] = str(smallest + 1)
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == 2
    (line,) = error_lines(capsys)
    assert "the budget admits only the smallest network of" in line
    assert f"the smallest network needs {format_count(smallest)} MACs, the next one " in line
    assert not (tmp_path / "run").exists()
    PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke",  # room for a search: fine
                 budget=Budget(macs=2 * smallest)).check_budget()


@pytest.mark.parametrize("option, value", [("--macs-ratio", "1.5"), ("--params-ratio", "1")])
def test_a_budget_that_prunes_nothing_fails_before_training(tmp_path, capsys, monkeypatch,
                                                            option, value):
    """A budget the largest candidate already meets (a ratio of 1.5 typed for 0.15) would only
    rediscover the full network: it fails at once, naming the largest network's value."""
    def no_training(*args, **kwargs):
        raise AssertionError("trained despite a budget that prunes nothing")

    monkeypatch.setattr("pruning.pipeline.train_pruningnet", no_training)
    args = [a if a != "--macs-ratio" else option for a in CLI_ARGS]
    args[args.index(option) + 1] = value
    out = tmp_path / "run"
    assert cli.main([*args, "--out", str(out)]) == 2
    (line,) = error_lines(capsys)
    space = synthetic_space()
    count = counting.macs if option == "--macs-ratio" else counting.params
    largest = format_count(count(space, space.largest()))
    assert f"the budget does not prune {ARCH}" in line and largest in line, line
    assert not out.exists()


def test_spec_checks_count_budgets_where_the_data_shape_is_known():
    """fashion-mnist and synthetic have a fixed shape, so a MACs/params budget is checked from
    the spec alone (the service's submission does this); an image folder's shape and a latency
    table are known only to the run, which checks them once its data is loaded."""
    with pytest.raises(InfeasibleBudgetError, match="smallest candidate needs"):
        PipelineSpec(arch=ARCH, dataset="fashion-mnist", budget=Budget(macs=1)).check_budget()
    with pytest.raises(LooseBudgetError, match="does not prune"):
        PipelineSpec(arch=ARCH, dataset="synthetic", budget=Budget(params_ratio=1)).check_budget()
    PipelineSpec(arch=ARCH, dataset="synthetic", budget=Budget(macs_ratio=0.5)).check_budget()
    PipelineSpec(arch=ARCH, dataset="imagefolder", budget=Budget(macs=1)).check_budget()
    PipelineSpec(arch=ARCH, dataset="synthetic", budget=Budget(latency_ratio=2)).check_budget()
    space = synthetic_space()
    (c,) = resolve_budget(space, Budget(macs_ratio=0.5))
    assert c.limit == int(0.5 * counting.macs(*space.full_network()))


@pytest.mark.timeout(120)
def test_an_image_folder_smaller_than_one_batch_fails_before_training(tmp_path, capsys):
    """30 images, some for the test split, 16 held out: the sub-train split is smaller than the
    smoke recipe's batch of 64, so no training step could run; the error says what to change."""
    write_tree(tmp_path / "tree", n=10)
    args = ["prune", "--arch", "test_mobilenet_v1", "--dataset", "imagefolder", "--data-root",
            str(tmp_path / "tree"), "--macs-ratio", "0.5", "--preset", "smoke", "--quiet",
            "--set", '{"val_size": 16}']
    out = tmp_path / "run"
    assert cli.main([*args, "--out", str(out)]) == 2
    (line,) = error_lines(capsys)
    assert "sub-train split holds" in line and "metanet.batch_size 64" in line, line
    assert not out.exists()


@pytest.mark.timeout(120)
def test_val_size_may_be_a_fraction_of_the_training_data(tmp_path, monkeypatch):
    """A small image folder, where a count of held-out images (16 at least) is a large share:
    ``val_size`` 0.25 holds out a quarter of the training images, and the run completes."""
    from pruning import data, pipeline

    write_tree(tmp_path / "tree", n=30)
    sizes = {}

    def load(*args, **kwargs):
        bundle = data.load_dataset(*args, **kwargs)
        sizes.update(train=len(bundle.train), val=len(bundle.val))
        return bundle

    monkeypatch.setattr(pipeline, "load_dataset", load)
    overrides = {"val_size": 0.25, "metanet": {"batch_size": 16}, "final": {"batch_size": 16}}
    assert cli.main(["prune", "--arch", "test_mobilenet_v1", "--dataset", "imagefolder",
                     "--data-root", str(tmp_path / "tree"), "--macs-ratio", "0.5", "--preset",
                     "smoke", "--quiet", "--set", json.dumps(overrides),
                     "--out", str(tmp_path / "run")]) == 0
    assert sizes["val"] == round(0.25 * (sizes["train"] + sizes["val"])) > 0, sizes
    assert (tmp_path / "run" / "artifacts" / "model.ts").is_file()


def test_a_relative_data_root_is_stored_absolute(tmp_path, monkeypatch, capsys):
    """``--data-root tree`` from one folder; the next stage, run from another, reads the same
    images (the run records the absolute path)."""
    write_tree(tmp_path / "tree", n=30)
    monkeypatch.chdir(tmp_path)
    overrides = {"val_size": 0.25, "metanet": {"batch_size": 16, "max_steps": 2},
                 "final": {"batch_size": 16}}
    assert cli.main(["train-metanet", "--arch", "test_mobilenet_v1", "--dataset", "imagefolder",
                     "--data-root", "tree", "--macs-ratio", "0.5", "--preset", "smoke",
                     "--quiet", "--set", json.dumps(overrides), "--out", "run"]) == 0
    assert read_json(tmp_path / "run" / "spec.json")["data_root"] == str(tmp_path / "tree")
    monkeypatch.chdir("/")
    assert cli.main(["search", "--out", str(tmp_path / "run"), "--quiet"]) == 0, \
        capsys.readouterr().err


def test_a_run_continues_only_on_the_data_it_started_with(tmp_path, capsys):
    """Images deleted from the folder after the PruningNet was trained: the next stage refuses
    the run (the split it would score on is another), in one line, and so does a run that would
    reuse that PruningNet; with the images back, the run goes on."""
    tree = tmp_path / "tree"
    write_tree(tree, n=30)
    overrides = json.dumps({"val_size": 0.25, "metanet": {"batch_size": 16, "max_steps": 2},
                            "final": {"batch_size": 16, "max_steps": 2},
                            "search": {"population": 4, "keep_top": 4, "parents": 2,
                                       "mutants": 2, "crossovers": 2, "generations": 1}})
    options = ["--arch", "test_mobilenet_v1", "--dataset", "imagefolder", "--data-root",
               str(tree), "--preset", "smoke", "--quiet", "--set", overrides]
    run_dir = tmp_path / "run"
    assert cli.main(["train-metanet", *options, "--macs-ratio", "0.5", "--out",
                     str(run_dir)]) == 0
    assert read_json(run_dir / "data.json")["images"]["train"] > 0
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in sorted((tree / "dog").iterdir())[:3]:
        f.rename(moved / f.name)
    capsys.readouterr()
    assert cli.main(["search", "--out", str(run_dir)]) == 2
    (line,) = error_lines(capsys)
    before = read_json(run_dir / "data.json")["images"]
    assert f"the data differs from the data the run in {run_dir} started with (train/val/test " \
           f"images: {before['train']}/{before['val']}/{before['test']} then, " in line
    assert "restore it, or start a new run" in line
    assert not (run_dir / "search").exists()
    assert cli.main(["prune", *options, "--macs-ratio", "0.4", "--metanet-from", str(run_dir),
                     "--out", str(tmp_path / "reuse")]) == 2
    (line,) = error_lines(capsys)
    assert f"metanet_from: the PruningNet of {run_dir} was trained on other data" in line
    assert not (tmp_path / "reuse").exists()
    # as many images in every class, two swapped between classes
    for f in moved.iterdir():
        f.rename(tree / "dog" / f.name)
    owl, cat = sorted((tree / "owl").iterdir())[0], sorted((tree / "cat").iterdir())[0]
    owl.rename(tree / "cat" / "x-owl.png")
    cat.rename(tree / "owl" / "x-cat.png")
    assert cli.main(["search", "--out", str(run_dir)]) == 2
    (line,) = error_lines(capsys)
    assert "(the same numbers of train/val/test images (" in line
    assert "but other images or labels)" in line
    (tree / "cat" / "x-owl.png").rename(owl)
    (tree / "owl" / "x-cat.png").rename(cat)
    # a record of an older version: streamed data was hashed otherwise then, so only its counts
    # are compared; data in memory (version 1 then and now) is compared whole
    from pruning.pipeline import _data_change

    record = read_json(run_dir / "data.json")
    assert record["version"] == 1
    older = {"sha256": "0" * 64, "images": record["images"]}
    assert _data_change(older, {**record, "version": 2}) is None
    assert "train/val/test images" in _data_change(
        {**older, "images": {**record["images"], "train": 1}}, {**record, "version": 2})
    assert "other images or labels" in _data_change(older, record)
    # held in memory then, streamed now (images resized or made colour, as many of them): the
    # hashes cover other things, the shape still tells
    c, h, w = record["shape"]
    assert _data_change(record, {**record, "version": 2, "shape": [3, h, w]}) == (
        f"images of {c} × {h} × {w} px then, images of 3 × {h} × {w} px now")
    assert "3 classes then, 4 classes now" in _data_change(record, {**record, "num_classes": 4})
    # a damaged record is said to be one, and is kept
    for damaged in ("[]", "null", "{}"):
        (run_dir / "data.json").write_text(damaged)
        assert cli.main(["search", "--out", str(run_dir)]) == 2
        (line,) = error_lines(capsys)
        assert "data.json is unreadable" in line and "not a record of the run's data" in line
        assert (run_dir / "data.json").read_text() == damaged
    atomic_write_json(run_dir / "data.json", record)
    # the same images under another path are the same data: its PruningNet is reused
    shutil.copytree(tree, tmp_path / "copy")
    copy_options = [o if o != str(tree) else str(tmp_path / "copy") for o in options]
    assert cli.main(["prune", *copy_options, "--macs-ratio", "0.5", "--metanet-from",
                     str(run_dir), "--out", str(tmp_path / "reuse")]) == 0, capsys.readouterr()
    assert "metanet_from" in read_json(tmp_path / "reuse" / "artifacts" / "report.json")
    # the data has moved: a stage command finds it where it is told (the same images, checked)
    # and spec.json names the new place from then on; other images there are refused
    tree.rename(tmp_path / "moved")
    assert cli.main(["search", "--out", str(run_dir)]) == 2
    assert "does not exist" in error_lines(capsys)[0]
    assert cli.main(["search", "--out", str(run_dir), "--data-root", str(tmp_path / "copy"),
                     "--quiet"]) == 0
    assert read_json(run_dir / "spec.json")["data_root"] == str(tmp_path / "copy")
    capsys.readouterr()
    (tmp_path / "copy" / "cat" / "000.png").unlink()
    assert cli.main(["train", "--out", str(run_dir), "--data-root", str(tmp_path / "moved")]) == 0
    assert "the run's data has moved from" in capsys.readouterr().err
    assert read_json(run_dir / "spec.json")["data_root"] == str(tmp_path / "moved")
    assert cli.main(["evaluate", "--out", str(run_dir), "--data-root",
                     str(tmp_path / "copy")]) == 2
    assert "the data differs from the data the run" in error_lines(capsys)[0]
    assert read_json(run_dir / "spec.json")["data_root"] == str(tmp_path / "moved")
    # prune --resume without --data-root: the recorded one, not "moved to None"
    no_root = [o for i, o in enumerate(options)
               if o != "--data-root" and (i == 0 or options[i - 1] != "--data-root")]
    assert cli.main(["prune", *no_root, "--macs-ratio", "0.5", "--resume", "--out",
                     str(run_dir)]) == 2
    assert "data_root: " in error_lines(capsys)[0]
    assert read_json(run_dir / "spec.json")["data_root"] == str(tmp_path / "moved")


def test_image_size_resizes_an_image_folder(tmp_path, capsys):
    """Photos larger than a network takes are refused before they are decoded, with the option
    that resizes them; --image-size gives the side the run (and its exports) use."""
    tree = tmp_path / "tree"
    write_tree(tree, n=30, sizes=((1200, 1100),))
    overrides = json.dumps({"val_size": 0.25, "metanet": {"batch_size": 16, "max_steps": 2},
                            "final": {"batch_size": 16, "max_steps": 2},
                            "search": {"population": 4, "keep_top": 4, "parents": 2,
                                       "mutants": 2, "crossovers": 2, "generations": 1}})
    options = ["prune", "--arch", "test_mobilenet_v1", "--dataset", "imagefolder",
               "--data-root", str(tree), "--preset", "smoke", "--quiet", "--set", overrides,
               "--out", str(tmp_path / "run")]
    assert cli.main(options) == 2
    assert error_lines(capsys) == [
        "metaprune: error: the images are mostly 1200×1100 px: a network takes 8 to 1024 px; "
        "give image_size (--image-size), e.g. 224, to resize them"]
    assert not (tmp_path / "run").exists()
    assert cli.main([*options, "--image-size", "12"]) == 0, capsys.readouterr().err
    config = read_json(tmp_path / "run" / "artifacts" / "config.json")
    assert config["input_shape"] == [1, 12, 12]
    assert read_json(tmp_path / "run" / "spec.json")["image_size"] == 12
    assert cli.main([*options[:-2], "--out", str(tmp_path / "x"), "--image-size", "4"]) == 2
    assert error_lines(capsys) == [
        "metaprune: error: --image-size: Input should be greater than or equal to 8"]


def test_a_streamed_image_folder_runs_as_an_in_memory_one(tmp_path, monkeypatch):
    """An image folder too large for memory streams through a DataLoader (StreamSplit); the
    whole pipeline on it (with worker processes) gives what it gives on the same folder held as
    tensors: the same search, the same trained networks."""
    from pruning import data, pipeline

    write_tree(tmp_path / "tree", n=30, sizes=((12, 12), (16, 14)))
    spec = PipelineSpec(arch="test_mobilenet_v1", dataset="imagefolder",
                        data_root=str(tmp_path / "tree"), preset="smoke", device="cpu",
                        budget=Budget(macs_ratio=0.5), train_baseline=True, val_size=16,
                        metanet={"batch_size": 16}, final={"batch_size": 16, "epochs": 12})
    reports, splits = {}, {}
    for name, limit_mb in (("memory", 2048), ("stream", 0)):
        def load(*args, limit_mb=limit_mb, name=name, **kwargs):
            bundle = data.load_dataset(*args, in_memory_limit_mb=limit_mb, num_workers=2,
                                       **kwargs)
            splits[name] = type(bundle.train)
            return bundle

        monkeypatch.setattr(pipeline, "load_dataset", load)
        reports[name] = run(spec, tmp_path / name)
    assert splits == {"memory": data.TensorSplit, "stream": data.StreamSplit}
    mem, stream = reports["memory"], reports["stream"]
    for entry in ("metapruning", "uniform"):
        for key in ("candidate", "estimated_val_accuracy", "test_accuracy"):
            assert stream[entry][key] == mem[entry][key], (entry, key)
    assert mem["uniform"]["test_accuracy"] > 0.5  # three classes: it learnt


def test_generated_init_on_fashion_mnist(tmp_path):
    """``final_init="generated"`` fine-tunes the PruningNet's weights: after one step at a tiny
    learning rate the exported convs are still the generated ones. No baseline was asked for,
    so the uniform entry has no test accuracy."""
    spec = PipelineSpec(arch=ARCH, dataset="fashion-mnist", preset="smoke", device="cpu",
                        budget=Budget(macs_ratio=0.4), final_init="generated",
                        train_limit=320, test_limit=64, val_size=64, eval_images=64,
                        metanet={"max_steps": 4},
                        search={"population": 4, "keep_top": 4, "parents": 2, "mutants": 2,
                                "crossovers": 2, "generations": 1},
                        final={"max_steps": 1, "lr": 1e-6})
    report = run(spec, tmp_path)
    assert "test_accuracy" in report["metapruning"]
    assert "test_accuracy" not in report["uniform"]
    assert report["final"] == {"init": "generated", "epochs": 1, "steps": 1}
    assert not (tmp_path / "baseline").exists()
    config = read_json(tmp_path / "artifacts" / "config.json")
    assert config["dataset"]["name"] == "fashion-mnist" and config["input_shape"] == [1, 28, 28]
    space = SearchSpace.from_dict(config["space"])
    cand = Candidate.from_key(config["candidate"])
    pnet = PruningNet(space)
    pnet.load_state_dict(load_tensors(tmp_path / "metanet" / "pruningnet.safetensors")[0])
    generated = pnet.generate(cand)
    weights, _ = load_tensors(tmp_path / "artifacts" / "model.safetensors")
    torch.manual_seed(0)
    scratch = build(space, cand).state_dict()
    for path, w in generated.items():
        key = path + (".weight" if path == pnet.head_path else ".conv.weight")
        torch.testing.assert_close(weights[key], w.detach(), rtol=0, atol=1e-4)
        assert not torch.allclose(weights[key], scratch[key], atol=1e-3)
    bn_scales = [v for k, v in weights.items() if k.endswith("bn.weight")]
    assert bn_scales and all(torch.allclose(v, torch.ones_like(v), atol=1e-4) for v in bn_scales)


def test_width_mult_and_levels_reach_the_searched_space(tmp_path):
    """``width_mult`` and ``levels`` reach the search space, and a ratio budget is relative to
    that scaled full network (a regression: the pipeline once searched the 1.0× network)."""
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        width_mult=2.0, levels=[0.25, 0.5, 0.75, 1.0],
                        budget=Budget(macs_ratio=0.5),
                        train_limit=128, test_limit=32, val_size=32, eval_images=32,
                        metanet={"max_steps": 2},
                        search={"population": 4, "keep_top": 4, "parents": 2, "mutants": 2,
                                "crossovers": 2, "generations": 1},
                        final={"max_steps": 1})
    report = run(spec, tmp_path)
    space = SearchSpace.from_dict(read_json(tmp_path / "artifacts" / "config.json")["space"])
    assert space.arch_args["width_mult"] == 2.0 and space.levels == (0.25, 0.5, 0.75, 1.0)
    wide = SearchSpace.create(ARCH, **{**space.arch_args, "width_mult": 1.0})
    assert space.max_widths != wide.max_widths and max(space.max_widths) > max(wide.max_widths)
    full_macs = counting.macs(space, space.largest())
    assert report["full_network"]["macs"] == full_macs
    assert report["budget"]["macs"] == int(0.5 * full_macs)


def test_a_collapsed_training_is_reported(tmp_path, monkeypatch, capsys):
    """A trained network at chance accuracy (a dead ReLU made one constant once) is flagged in
    the report and by the CLI, not passed off as a result; after very few training steps the
    warning says the training was too short rather than that it collapsed."""
    import pruning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "accuracy", lambda net, split, device: 0.1)  # 10 classes
    argv = ["prune", "--arch", ARCH, "--dataset", "synthetic", "--preset", "smoke",
            "--device", "cpu", "--macs-ratio", "0.5", "--quiet",
            "--set", json.dumps({"train_limit": 128, "test_limit": 32, "val_size": 32,
                                 "eval_images": 32, "metanet": {"max_steps": 2},
                                 "final": {"max_steps": 1},
                                 "search": {"population": 4, "keep_top": 4, "parents": 2,
                                            "mutants": 2, "crossovers": 2,
                                            "generations": 1}})]
    assert cli.main([*argv, "--out", str(tmp_path / "short")]) == 0
    warning = read_json(tmp_path / "short" / "artifacts" / "report.json")["metapruning"]["warning"]
    assert "at or near chance level (10.0%): the training was too short to learn (1 step with the " \
        "smoke preset" in warning, warning
    assert "warning: MetaPruning: test accuracy 10.00% is at or near chance" in capsys.readouterr().err
    # a training long enough to have learnt (here: declared so) that ends at chance collapsed
    monkeypatch.setattr(pipeline, "SHORT_TRAINING_STEPS", 1)
    assert cli.main([*argv, "--out", str(tmp_path / "long"),
                     "--metanet-from", str(tmp_path / "short")]) == 0
    warning = read_json(tmp_path / "long" / "artifacts" / "report.json")["metapruning"]["warning"]
    assert "at or near chance level (10.0%): its training collapsed" in warning, warning


def test_the_chance_warning_does_not_call_an_accuracy_above_chance_below_it():
    """The warning covers accuracies up to a point above chance (10.16% of 256 test images is
    26 right): its message must not say such an accuracy is at or below chance."""
    import pruning.pipeline as pipeline

    warning = pipeline._chance_warning(0.1015625, 0.1, 6, "smoke")
    assert warning.startswith("test accuracy 10.16% is at or near chance level (10.0%)"), warning
    assert "below" not in warning


# --- regressions: engine defects ------------------------------------------------------------


def test_batch_counting_validates_levels():
    space = synthetic_space()
    n, top = space.num_groups, space.num_levels - 1
    ok = np.full((2, n), 3, dtype=np.uint8)
    assert counting.macs_many(space, ok).tolist() == [counting.macs(space, space.uniform(3))] * 2
    assert counting.macs_many(space, np.zeros((0, n), np.int64)).shape == (0,)
    for bad, message in [
        (np.r_[[3] * (n - 1), -1][None], f"level -1 is outside 0..{top}"),  # used to wrap
        (np.full((1, n), top + 1), f"level {top + 1} is outside 0..{top}"),  # IndexError before
        (np.zeros((1, n)), "must be integers, got float64"),
        (np.zeros((1, n), bool), "must be integers, got bool"),
        (np.zeros(n, np.int64), rf"shape \(n, {n}\)"),
        (np.zeros((1, n + 1), np.int64), rf"shape \(n, {n}\)"),
    ]:
        for fn in (counting.macs_many, counting.params_many):
            with pytest.raises(CandidateError, match=message):
                fn(space, bad)


def test_numpy_levels_are_plain_int_candidates():
    space = synthetic_space()
    row = np.random.default_rng(0).integers(0, space.num_levels, space.num_groups)
    cand = Candidate(row)  # from an array: stored as a tuple of plain ints
    assert isinstance(cand.choices, tuple) and all(type(c) is int for c in cand.choices)
    assert cand == Candidate(tuple(row.tolist()))
    assert hash(cand) == hash(Candidate(tuple(row.tolist())))
    assert space.check(cand) is cand
    assert json.loads(json.dumps(cand.choices)) == row.tolist()
    assert counting.macs(space, cand) == int(counting.macs_many(space, row[None])[0])
    assert space.check(Candidate(tuple(np.int32(5) for _ in range(space.num_groups))))
    for bad in (True, 2.0, "3"):
        with pytest.raises(CandidateError, match="is not an integer level index"):
            space.check(Candidate((bad,) + (0,) * (space.num_groups - 1)))
    with pytest.raises(CandidateError, match="outside"):
        space.check(Candidate((np.int64(space.num_levels),) * space.num_groups))
    with pytest.raises(CandidateError, match="not a candidate key"):
        Candidate.from_key("3-x-4")


def _stale_net():
    space = synthetic_space()
    net = build(space, space.uniform(12))
    for i, m in enumerate(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        m.running_mean.fill_(0.5 + i)
        m.running_var.fill_(2.0 + i)
        m.num_batches_tracked.fill_(7)
        m.momentum = 0.2
    return net


def _bn_state(net):
    return {k: v.clone() for k, v in net.state_dict().items()
            if "running" in k or "num_batches" in k}


def test_recalibrate_bn_without_batches_keeps_the_statistics():
    net = _stale_net()
    before = _bn_state(net)
    for empty in ([], iter([]), (x for x in [])):
        with pytest.raises(ValueError, match="at least one batch"):
            recalibrate_bn(net, empty)
        after = _bn_state(net)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(m.momentum == 0.2 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_recalibrate_bn_restores_momentum_and_stats_when_a_forward_raises():
    net = _stale_net().train()
    before = _bn_state(net)
    good = torch.randn(4, 1, 16, 16)
    bad = torch.randn(4, 3, 16, 16)  # wrong channel count: the stem conv raises
    with pytest.raises(RuntimeError):
        recalibrate_bn(net, [good, bad])
    assert all(m.momentum == 0.2 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    after = _bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training  # as it was
    out = recalibrate_bn(net, [good])  # and it still works afterwards
    assert out is net and not net.training
    assert all(m.momentum == 0.2 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(s[0].abs().sum() > 0 for s in bn_statistics(net).values())


def test_a_run_takes_the_gpu_paths_on_a_cpu(tmp_path, monkeypatch):
    """The CUDA defaults — fixed shapes in PruningNet training and scoring, training steps
    replayed from CUDA graphs (here a stand-in that runs the captured step), the loss read every
    few steps — forced on the CPU: the whole run completes with verified exports and progress
    (that fixed shapes and graphs compute the same is tested in test_pruningnet.py and
    test_train.py)."""
    import pruning.evaluate
    import pruning.train

    monkeypatch.setattr(EagerGraphs, "captures", 0)
    monkeypatch.setattr(pruning.train, "CudaGraphs", EagerGraphs)
    monkeypatch.setattr(pruning.train, "cuda_graphs_default", lambda device: True)
    monkeypatch.setattr(pruning.train, "fixed_shapes_default", lambda device: True)
    monkeypatch.setattr(pruning.evaluate, "fixed_shapes_default", lambda device: True)
    monkeypatch.setattr(pruning.train, "_sync_every", lambda device: 5)
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        budget=Budget(macs_ratio=0.5), train_baseline=True, **OVERRIDES)
    events = []
    report = run(spec, tmp_path, progress=events.append)
    for name in ARTIFACTS:
        assert (tmp_path / "artifacts" / name).is_file(), name
    total = report["metanet"]["steps"]
    steps = [e["step"] for e in events if e.get("stage") == "metanet" and "step" in e]
    # read at step 1, every 5 steps, at every checkpoint (every 3) and at the end
    assert steps == [k for k in range(1, total + 1)
                     if k in (1, total) or k % 5 == 0 or k % 3 == 0]
    assert report["search"]["evaluated"] > 0
    assert EagerGraphs.captures == 3  # the PruningNet, the pick and the uniform baseline
    assert not [e for e in events if "graph" in str(e.get("message", ""))]  # no fallback
    for name in ("metapruning", "uniform"):
        assert 0 <= report[name]["test_accuracy"] <= 1
