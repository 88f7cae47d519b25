"""The pipeline stage by stage (``metaprune train-metanet / search / train / evaluate / export``)
and "train once, search many" (``metanet_from``).

One ``metaprune prune`` run on the tiny ``test_mobilenet_v2`` and ``synthetic`` data is shared
by the module: the stage-by-stage run must reproduce it exactly, and the runs that reuse its
PruningNet must never train one and, at the same budget, search exactly as it did.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pruning import cli
from pruning.checkpoint import json_bytes, read_json
from pruning.pipeline import (Budget, PipelineSpec, RunFolderError, StageError, prepare, run,
                              stage_metanet, stage_search, stage_train)
from pruning.spec import PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

ARCH = "test_mobilenet_v2"
SETTINGS = {"train_limit": 256, "test_limit": 64, "val_size": 64, "eval_images": 64,
            "calib_batches": 1,
            "metanet": {"max_steps": 6},
            "search": {"population": 4, "keep_top": 4, "parents": 2, "mutants": 2,
                       "crossovers": 2, "generations": 2},
            "final": {"max_steps": 3}}
OPTIONS = ["--arch", ARCH, "--dataset", "synthetic", "--preset", "smoke", "--device", "cpu",
           "--quiet", "--set", json.dumps(SETTINGS)]


def spec(**kw) -> PipelineSpec:
    base = dict(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                budget=Budget(macs_ratio=0.5), **SETTINGS)
    return PipelineSpec(**{**base, **kw})


def call(capsys, *argv) -> tuple[int, str, list[str]]:
    """``(exit status, stdout, error lines)``; an error is always one line, no traceback."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, [line for line in err.splitlines() if line.startswith("metaprune: error:")]


@pytest.fixture(scope="module")
def reference(single_thread, tmp_path_factory):
    """``metaprune prune`` in one go (the run the others are compared with)."""
    folder = tmp_path_factory.mktemp("runs") / "a"
    assert cli.main(["prune", *OPTIONS, "--macs-ratio", "0.5", "--json", "--out",
                     str(folder)]) == 0
    return folder, read_json(folder / "artifacts" / "report.json")


def history(folder: Path) -> list:
    return read_json(folder / "artifacts" / "search.json")["history"]


def test_stage_by_stage_equals_prune(reference, tmp_path, capsys):
    ref, ref_report = reference
    out = str(tmp_path / "b")

    # a later stage on a folder with no run, and stages out of order: one line, exit 2
    status, _, errors = call(capsys, "search", "--out", out)
    assert status == 2 and len(errors) == 1 and "holds no run (no spec.json)" in errors[0]
    assert not Path(out).exists()

    status, _, errors = call(capsys, "train-metanet", *OPTIONS, "--macs-ratio", "0.5",
                             "--out", out)
    assert status == 0 and not errors
    assert read_json(Path(out) / "spec.json") == read_json(ref / "spec.json")
    for command, needed in (("train", "search"), ("evaluate", "search"),
                            ("export", "evaluate")):
        status, _, errors = call(capsys, command, "--out", out, "--quiet")
        assert status == 2 and len(errors) == 1, command
        assert f"run `metaprune {needed} --out {out}` first" in errors[0]

    status, printed, _ = call(capsys, "search", "--out", out, "--quiet", "--json")
    assert status == 0
    assert json.loads(printed)["best"] == ref_report["metapruning"]["candidate"]
    status, _, errors = call(capsys, "evaluate", "--out", out, "--quiet")
    assert status == 2 and f"run `metaprune train --out {out}` first" in errors[0]
    assert call(capsys, "train", "--out", out, "--quiet")[0] == 0
    status, printed, _ = call(capsys, "evaluate", "--out", out, "--quiet")
    assert status == 0
    evaluation = json.loads(printed)
    assert evaluation["metapruning"]["test_accuracy"] == ref_report["metapruning"][
        "test_accuracy"]
    # it always prints JSON; --json, which every stage command takes, changes nothing
    assert json.loads(call(capsys, "evaluate", "--out", out, "--quiet", "--json")[1]) == \
        evaluation
    status, printed, _ = call(capsys, "export", "--out", out, "--quiet", "--json")
    assert status == 0
    report = json.loads(printed)

    out = Path(out)
    assert history(out) == history(ref)
    for rel in ("metanet/pruningnet.safetensors", "final/model.safetensors",
                "artifacts/model.safetensors"):
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel
    for key in ("metapruning", "uniform", "budget", "search", "full_network"):
        assert report[key] == ref_report[key], key
    assert report["metanet"]["loss"] == ref_report["metanet"]["loss"]
    assert report == read_json(out / "artifacts" / "report.json")

    # every stage again: nothing to do, the same results
    before = (out / "artifacts" / "config.json").read_bytes()
    for command in ("train-metanet", "search", "train", "evaluate", "export"):
        argv = ([command, *OPTIONS, "--macs-ratio", "0.5", "--resume"]
                if command == "train-metanet" else [command, "--quiet"])
        status, printed, _ = call(capsys, *argv, "--out", str(out))
        assert status == 0, command
    # export's summary, as prune's, but without a time: its elapsed_s is the export's alone
    assert printed.splitlines()[-1] == f"artifacts in {out / 'artifacts'}"
    assert (out / "artifacts" / "config.json").read_bytes() == before
    assert run(spec(), out, resume=True) == report  # a finished run is read back


def test_metanet_from_skips_training_and_searches_identically(reference, tmp_path, capsys,
                                                              monkeypatch):
    ref, ref_report = reference

    def no_training(*args, **kwargs):
        raise AssertionError("trained a PruningNet despite metanet_from")

    monkeypatch.setattr("pruning.pipeline.train_pruningnet", no_training)

    # a new budget: search and final training only
    out = tmp_path / "b"
    status, printed, _ = call(capsys, "prune", *OPTIONS, "--macs-ratio", "0.3", "--json",
                              "--metanet-from", str(ref), "--out", str(out))
    assert status == 0
    report = json.loads(printed)
    assert report["metanet_from"]["run"] == str(ref.resolve())
    assert report["metanet"] == ref_report["metanet"]
    assert report["budget"]["macs"] < ref_report["budget"]["macs"]
    assert report["metapruning"]["macs"] <= report["budget"]["macs"]
    pnet = "metanet/pruningnet.safetensors"
    assert (out / pnet).read_bytes() == (ref / pnet).read_bytes()

    # the same budget: the very same search
    ctx = prepare(spec(metanet_from=str(ref)), tmp_path / "c")
    assert stage_metanet(ctx) == ref_report["metanet"]
    result = stage_search(ctx)
    assert json.loads(json_bytes(result.to_dict()))["history"] == history(ref)


def test_metanet_from_refuses_another_pruningnet(reference, tmp_path, capsys):
    ref = reference[0]
    out = tmp_path / "b"
    for kw, message in [
        ({"seed": 1}, "(seed: 0 there, 1 here)"),
        ({"width_mult": 2.0}, "(width_mult: 1.0 there, 2.0 here)"),
        ({"val_size": 32}, "(val_size: 64 there, 32 here)"),
        ({"metanet": {"max_steps": 7}}, "(metanet.max_steps: 6 there, 7 here)"),
        ({"image_size": 12}, "(image_size: None there, 12 here)"),
    ]:
        with pytest.raises(RunFolderError, match=f"trained with other settings {message[:-1]}"
                           .replace("(", r"\(").replace("{", r"\{")):
            prepare(spec(metanet_from=str(ref), **kw), out)
    # another budget, search settings, final training, checkpoint interval or test split are
    # fine to change (the PruningNet never saw the test split)
    prepare(spec(metanet_from=str(ref), budget=Budget(params_ratio=0.5), final_init="generated",
                 search={"generations": 1}, metanet={"max_steps": 6, "checkpoint_every": 5},
                 test_limit=32), tmp_path / "ok")

    status, _, errors = call(capsys, "prune", *OPTIONS, "--seed", "3", "--metanet-from",
                             str(ref), "--out", str(out))
    assert status == 2 and len(errors) == 1 and "seed: 0 there, 3 here" in errors[0]
    with pytest.raises(RunFolderError, match="missing does not exist"):
        prepare(spec(metanet_from=str(tmp_path / "missing")), out)
    (tmp_path / "other").mkdir()
    with pytest.raises(RunFolderError, match="is not a run folder"):
        prepare(spec(metanet_from=str(tmp_path / "other")), out)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(ref / "spec.json", unfinished / "spec.json")
    with pytest.raises(RunFolderError, match="has no trained PruningNet yet"):
        prepare(spec(metanet_from=str(unfinished)), out)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ref, corrupt)
    truncated = corrupt / "metanet" / "pruningnet.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])  # a copy cut short
    status, _, errors = call(capsys, "prune", *OPTIONS, "--metanet-from", str(corrupt),
                             "--out", str(out))
    assert status == 2 and errors == [(
        f"metaprune: error: metanet_from: {truncated} is unreadable, corrupt or truncated "
        "(Error while deserializing header: incomplete metadata, file not fully covered); "
        f"reuse another run, or delete {truncated} and train it again (the command that "
        "started that run, with --resume)")]
    assert not out.exists()  # nothing claimed


@pytest.mark.parametrize("damaged, command, redone", [
    ("final/model.safetensors", "export", "train"),
    ("evaluation.json", "export", "evaluate"),
    ("metanet/pruningnet.safetensors", "search", "train-metanet"),
])
def test_a_corrupt_file_in_a_run_is_named_and_deleting_it_redoes_its_step(
        reference, tmp_path, capsys, damaged, command, redone):
    """A file damaged after it was written (a disk error) gives one line naming it, not a
    traceback; deleted, the step that wrote it runs again, as it did before."""
    ref, ref_report = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    shutil.rmtree(run_dir / "artifacts")  # as before the export
    if command == "search":
        (run_dir / "search" / "state.json").unlink()
    path = run_dir / damaged
    path.write_bytes(b"garbage")
    status, _, errors = call(capsys, command, "--out", str(run_dir), "--quiet")
    assert status == 2 and len(errors) == 1
    assert errors[0].startswith(f"metaprune: error: {path} is unreadable, corrupt or truncated")
    assert errors[0].endswith("restore it, or delete it and run again to redo the step that "
                              "wrote it")
    path.unlink()
    # the first stage takes the run's options again (its command, with --resume)
    extra = [*OPTIONS, "--macs-ratio", "0.5", "--resume"] if redone == "train-metanet" else []
    assert call(capsys, redone, "--out", str(run_dir), "--quiet", *extra)[0] == 0
    assert path.is_file()
    assert cli.main(["prune", *OPTIONS, "--macs-ratio", "0.5", "--resume", "--out",
                     str(run_dir)]) == 0
    report = read_json(run_dir / "artifacts" / "report.json")
    assert report["metapruning"]["test_accuracy"] == ref_report["metapruning"]["test_accuracy"]


def test_redoing_a_step_redoes_the_steps_after_it(reference, tmp_path, capsys):
    """A deleted output is made again and so is everything made from it (the evaluation and
    the artifacts of a retrained winner); an export with a file missing or damaged is written
    again whole, each file matching config.json."""
    from pruning.export import sha256_file

    ref, ref_report = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    shutil.rmtree(run_dir / "final")
    assert call(capsys, "train", "--out", str(run_dir), "--quiet")[0] == 0
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert not (run_dir / "evaluation.json").exists() and not (run_dir / "artifacts").exists()
    assert cli.main(["prune", *OPTIONS, "--macs-ratio", "0.5", "--resume", "--out",
                     str(run_dir)]) == 0
    report = read_json(run_dir / "artifacts" / "report.json")
    assert report["metapruning"] == ref_report["metapruning"]

    art = run_dir / "artifacts"
    (art / "model.onnx").unlink()
    (art / "model.ts").write_bytes((art / "model.ts").read_bytes()[:100])
    assert call(capsys, "export", "--out", str(run_dir), "--quiet")[0] == 0
    files = read_json(art / "config.json")["files"]
    assert {"model.onnx", "model.ts"} <= set(files)
    for name, digest in files.items():
        assert sha256_file(art / name) == digest, name
    # config.json edited (the files it lists untouched): not the run's export, written again
    from pruning.export import export_problem

    def described() -> dict:  # all but the digests (report.json's elapsed_s is the export's)
        return {k: v for k, v in read_json(art / "config.json").items() if k != "files"}

    written = described()
    for key, value in (("macs", 1), ("candidate", "0-0-0-0-0-0"), ("input_shape", [3, 8, 8]),
                       ("files", ["report.json"])):  # the last: damaged
        (art / "config.json").write_text(json.dumps({**read_json(art / "config.json"),
                                                     key: value}))
        assert export_problem(art) is not None
        assert call(capsys, "export", "--out", str(run_dir), "--quiet")[0] == 0
        assert described() == written and export_problem(art) is None, key


def test_load_pruned_refuses_an_export_that_does_not_hold_together(reference, tmp_path):
    """``load_pruned`` names what is wrong in one line: weights replaced (their sha256), or of
    another network than config.json names (the candidate model.safetensors records); it takes
    a file of the export for its folder, and needs only config.json and the weights."""
    from pruning.export import load_pruned

    art = tmp_path / "art"
    shutil.copytree(reference[0] / "artifacts", art)
    assert load_pruned(art / "model.safetensors") is not None  # a file: its folder
    config = json.loads((art / "config.json").read_text())
    other = {**config, "candidate": "-".join("0" * len(config["candidate"].split("-")))}
    (art / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="holds another network than config.json describes"):
        load_pruned(art)
    (art / "config.json").write_text(json.dumps(config))
    safetensors = (art / "model.safetensors").read_bytes()
    (art / "model.safetensors").write_bytes(safetensors + b"\0")  # changed since the export
    with pytest.raises(ValueError, match="model.safetensors does not have the sha256 config.json"):
        load_pruned(art)
    (art / "model.safetensors").write_bytes(safetensors)
    # what a deployment copies: config.json and the weights (the other files are not needed)
    for name in ("model.ts", "model.onnx", "report.json", "search.json", "pareto.png"):
        (art / name).unlink()
    assert load_pruned(art) is not None


def test_resume_continues_a_run_from_its_spec_json(reference, tmp_path, capsys):
    """``metaprune resume --out DIR`` needs none of the options that started the run: a run
    stopped before its final training ends as the uninterrupted one did."""
    ref, ref_report = reference
    status, _, errors = call(capsys, "resume", "--out", str(tmp_path / "none"))
    assert status == 2 and "holds no run (no spec.json)" in errors[0]
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    for rel in ("final", "artifacts"):
        shutil.rmtree(run_dir / rel)
    (run_dir / "evaluation.json").unlink()
    status, out, errors = call(capsys, "resume", "--out", str(run_dir), "--quiet", "--json")
    assert status == 0 and not errors
    assert json.loads(out)["metapruning"] == ref_report["metapruning"]


def test_a_folder_with_other_files_and_no_run_is_refused(tmp_path, capsys):
    """A run folder that lost its spec.json, or any folder of other files: one line, nothing
    written; hidden files (a writer's temporary, .DS_Store) are no obstacle."""
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for resume in ([], ["--resume"]):
        status, _, errors = call(capsys, "prune", *OPTIONS, "--macs-ratio", "0.5",
                                 "--out", str(out), *resume)
        assert status == 2 and len(errors) == 1
        assert "is not empty and holds no run (no spec.json)" in errors[0]
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / ".spec.json.x1.tmp").write_text("{")
    (out / ".DS_Store").write_text("")
    assert call(capsys, "train-metanet", *OPTIONS, "--macs-ratio", "0.5", "--out",
                str(out))[0] == 0


def test_resume_of_a_folder_with_no_run_says_it_starts_one(tmp_path, capsys):
    """A typo in --out must not retrain quietly."""
    out = tmp_path / "typo"
    assert cli.main(["train-metanet", *OPTIONS, "--macs-ratio", "0.5", "--resume",
                     "--out", str(out)]) == 0
    assert capsys.readouterr().err == (f"metaprune: note: {out} holds no run to resume; "
                                       "starting a new one\n")
    assert cli.main(["train-metanet", *OPTIONS, "--macs-ratio", "0.5", "--resume",
                     "--out", str(out)]) == 0
    assert "note" not in capsys.readouterr().err  # a run to resume: no note


def test_stage_functions_refuse_to_run_out_of_order(tmp_path):
    ctx = prepare(spec(), tmp_path)
    with pytest.raises(StageError, match="run `metaprune resume --out .*` .the whole run., or "
                                         "the `metaprune train-metanet` command that started it "
                                         "again with --resume, first"):
        stage_search(ctx)
    with pytest.raises(StageError, match="run `metaprune search --out"):
        stage_train(ctx)


def test_a_run_keeps_the_search_settings_it_started_with(reference, tmp_path, capsys,
                                                         monkeypatch):
    """A newer version's preset may set the search otherwise (here: another objective, a
    budget floor and a start from the uniform network); a run whose search is recorded still
    reads back and finishes with the settings it started with. A state file written before a
    setting existed holds its default."""
    ref, ref_report = reference
    old = tmp_path / "old"
    shutil.copytree(ref, old)
    state_path = old / "search" / "state.json"
    state = read_json(state_path)
    assert state["config"].pop("min_budget_use") == 0
    assert state["config"].pop("objective") == "accuracy"
    assert state["config"].pop("include_uniform") is False
    state_path.write_text(json.dumps(state))
    shutil.rmtree(old / "artifacts")  # export again from the old search
    newer = {**PRESETS["smoke"], "search": {**PRESETS["smoke"]["search"], "objective": "loss",
                                            "min_budget_use": 0.9, "include_uniform": True}}
    monkeypatch.setitem(PRESETS, "smoke", newer)

    assert prepare(spec(), old, resume=True).search_result().best.key == \
        ref_report["metapruning"]["candidate"]
    status, printed, errors = call(capsys, "export", "--out", str(old), "--json")
    assert status == 0 and not errors
    assert json.loads(printed)["metapruning"] == ref_report["metapruning"]


def test_search_by_loss_reuses_the_pruningnet_and_reports_both_estimates(reference, tmp_path,
                                                                         capsys):
    """``objective: loss``: the search maximises minus the held-out cross-entropy; the report
    names the objective and gives both estimates of the pick and the baseline."""
    ref, _ = reference
    out = tmp_path / "by-loss"
    status, printed, errors = call(
        capsys, "prune", "--arch", ARCH, "--dataset", "synthetic", "--preset", "smoke",
        "--device", "cpu", "--quiet", "--macs-ratio", "0.5", "--json", "--metanet-from",
        str(ref), "--set", json.dumps({**SETTINGS, "search": {**SETTINGS["search"],
                                                              "objective": "loss"}}),
        "--out", str(out))
    assert status == 0 and not errors
    report = json.loads(printed)
    search = read_json(out / "artifacts" / "search.json")
    assert search["config"]["objective"] == report["search"]["objective"] == "loss"
    best = max(search["history"], key=lambda r: r["score"])
    assert all(r["score"] < 0 for r in search["history"])  # minus a cross-entropy
    assert report["search"]["best_score"] == best["score"]
    assert report["metapruning"]["estimated_val_loss"] == pytest.approx(-best["score"], abs=1e-6)
    for name in ("metapruning", "uniform"):
        assert 0 <= report[name]["estimated_val_accuracy"] <= 1
        assert report[name]["estimated_val_loss"] > 0
    status, printed, _ = call(capsys, "search", "--out", str(out), "--json")
    assert status == 0
    assert json.loads(printed)["objective"] == "loss"
    assert json.loads(printed)["score"] == best["score"]


def test_a_search_that_picks_the_uniform_network_trains_it_once(reference, tmp_path, capsys):
    """``include_uniform`` with a one-candidate search: the pick is the uniform baseline, so
    ``--baseline`` trains it once (no ``baseline/`` folder), both entries report the same
    network and the summary says so."""
    ref, _ = reference
    out = tmp_path / "uniform-pick"
    only_uniform = {"population": 1, "keep_top": 1, "parents": 1, "mutants": 0,
                    "crossovers": 0, "generations": 1, "include_uniform": True}
    status, printed, errors = call(
        capsys, "prune", "--arch", ARCH, "--dataset", "synthetic", "--preset", "smoke",
        "--device", "cpu", "--macs-ratio", "0.5", "--baseline", "--metanet-from", str(ref),
        "--set", json.dumps({**SETTINGS, "search": only_uniform}), "--out", str(out))
    assert status == 0 and not errors
    assert "the search picked the uniform network" in printed
    report = read_json(out / "artifacts" / "report.json")
    assert report["metapruning"] == report["uniform"]
    assert report["search"]["evaluated"] == 1
    assert (out / "final" / "model.safetensors").is_file() and not (out / "baseline").exists()
    status, printed, _ = call(capsys, "train", "--out", str(out), "--json")
    trained = json.loads(printed)["trained"]
    assert status == 0 and trained["metapruning"] == trained["uniform"]


def test_a_run_records_where_it_began_and_a_resume_elsewhere_says_so(tmp_path):
    """The same seed is bit-identical only on the same device, thread count and PyTorch: a run
    resumed with other ones says that its result can differ from an uninterrupted run's."""
    import torch

    out = tmp_path / "run"
    prepare(spec(), out)
    record = read_json(out / "environment.json")
    assert record["threads"] == torch.get_num_threads() and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and "cores" in record["device_name"]
    events = []
    prepare(spec(), out, resume=True, progress=events.append)
    assert not [e for e in events if "continues elsewhere" in e.get("message", "")]
    (out / "environment.json").write_text(json.dumps({**record, "threads": 99}))
    prepare(spec(), out, resume=True, progress=events.append)
    notes = [e["message"] for e in events if "continues elsewhere" in e.get("message", "")]
    assert notes == [f"this run continues elsewhere than it began (threads 99 then, "
                     f"{torch.get_num_threads()} now): its result can differ from an "
                     "uninterrupted run's"]
    assert read_json(out / "environment.json")["threads"] == 99  # the beginning is kept


def test_a_run_of_a_version_before_the_loss_objective_exports(reference, tmp_path, capsys):
    """Its evaluation.json has no estimated_val_loss and its report no search objective: the
    export is written again (its artifacts gone) and `export` summarises it."""
    old = tmp_path / "old"
    shutil.copytree(reference[0], old)
    evaluation = read_json(old / "evaluation.json")
    for name in ("metapruning", "uniform"):
        del evaluation[name]["estimated_val_loss"]
    (old / "evaluation.json").write_bytes(json_bytes(evaluation))
    shutil.rmtree(old / "artifacts")
    status, out, errors = call(capsys, "export", "--out", str(old))
    assert (status, errors) == (0, [])
    report = read_json(old / "artifacts" / "report.json")
    del report["search"]["objective"]
    (old / "artifacts" / "report.json").write_bytes(json_bytes(report))
    from pruning.cli import _write_summary
    _write_summary(report, str(old), timed=False)
    assert "MetaPruning" in capsys.readouterr().out


def test_a_lender_built_for_another_space_is_refused_before_the_folder_is_claimed(
        reference, tmp_path):
    from pruning.checkpoint import load_tensors, save_tensors

    lender = tmp_path / "lender"
    shutil.copytree(reference[0], lender)
    pnet = lender / "metanet" / "pruningnet.safetensors"
    tensors, meta = load_tensors(pnet)
    save_tensors(pnet, tensors, {**meta, "space": {**meta["space"], "min_channels": 1}})
    out = tmp_path / "new"
    with pytest.raises(RunFolderError, match="was built for another search space"):
        prepare(spec(metanet_from=str(lender), budget=Budget(macs_ratio=0.3)), out)
    assert not out.exists()  # nothing claimed: the same command without it starts afresh


def test_a_run_keeps_the_recipe_it_began_with(tmp_path, monkeypatch):
    """A preset changed by a newer version does not silently retrain a run begun with the old
    one: the stage that would train refuses in one line; finished stages are read back."""
    out = tmp_path / "run"
    ctx = prepare(spec(), out)
    assert read_json(out / "recipe.json")["final"]["epochs"] == PRESETS["smoke"]["final"]["epochs"]
    stage_metanet(ctx)
    changed = {**PRESETS["smoke"], "final": {**PRESETS["smoke"]["final"], "epochs": 7},
               "search": {**PRESETS["smoke"]["search"], "mutation_prob": 0.25}}
    monkeypatch.setitem(PRESETS, "smoke", changed)
    ctx = prepare(spec(), out, resume=True)
    assert stage_metanet(ctx)  # done: read back, whatever the preset says now
    with pytest.raises(RunFolderError, match=r"began with other search settings than this "
                       r"version's 'smoke' preset gives \(search.mutation_prob: 0.1 then, 0.25 now\): "
                       "finish it with the metaprune version that began it"):
        stage_search(ctx)
    # the widths every stage works in, and how the search scores, count for the later stages
    for setting, value, was in (("max_width_mult", 1.4, 1.0), ("calib_batch_size", 32, 64)):
        monkeypatch.setitem(PRESETS, "smoke", {**PRESETS["smoke"], "search": {
            **PRESETS["smoke"]["search"], "mutation_prob": 0.1}, setting: value})
        with pytest.raises(RunFolderError, match=re.escape(f"search.{setting}: {was} then, "
                                                           f"{value} now")):
            stage_search(prepare(spec(), out, resume=True))
