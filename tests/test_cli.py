"""The ``metaprune`` command line: archs, space, measure, build, and its one-line errors.

Commands run in-process through :func:`pruning.cli.main` (fast); one test runs the installed
console script to prove the entry point.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning import cli, counting
from pruning.modules import build
from pruning.registry import list_archs
from pruning.space import Candidate, SearchSpace
from pruning.spec import PipelineSpec

pytestmark = pytest.mark.usefixtures("single_thread")


def call(capsys, *argv) -> tuple[int, dict | None, str]:
    """``(exit status, parsed stdout JSON or None, stderr)``."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out.strip() else None), err


def space_of(arch: str, **kw) -> SearchSpace:
    """The space the CLI builds by default (1 × 28 × 28 inputs, 10 classes, the runs'
    min_channels)."""
    kw = {"min_channels": PipelineSpec.model_fields["min_channels"].default, **kw}
    return SearchSpace.create(arch, num_classes=10, in_channels=1, input_size=28, width_mult=1.0,
                              **kw)


def test_archs(capsys):
    status, out, err = call(capsys, "archs")
    assert status == 0 and err == ""
    assert out == {"archs": list_archs()}
    assert "mobilenet_v2" in out["archs"] and not any(a.startswith("test_") for a in out["archs"])
    status, out, _ = call(capsys, "archs", "--all")
    assert status == 0 and out == {"archs": list_archs(include_test=True)}
    assert "test_resnet" in out["archs"]


def test_version(capsys):
    from pruning import __version__
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"metaprune {__version__}"


def test_console_script_entry_point():
    script = Path(sys.executable).with_name("metaprune")
    done = subprocess.run([str(script), "archs"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"archs": list_archs()}


@pytest.mark.parametrize("arch,extra", [("test_resnet", []),
                                        ("test_mobilenet_v2", ["--max-width-mult", "1.4",
                                                               "--channel-divisor", "2"])])
def test_space(capsys, arch, extra):
    status, out, _ = call(capsys, "space", arch, *extra)
    assert status == 0
    kw = {"max_width_mult": 1.4, "channel_divisor": 2} if extra else {}
    space = space_of(arch, **kw)
    assert out["arch"] == arch and out["settings"] == space.to_dict()
    assert out["levels"] == list(space.levels) and out["size"] == space.size
    distinct = [len(set(t)) for t in space.width_table]
    assert out["networks"] == math.prod(distinct) < out["size"]  # small groups repeat widths
    assert [g["name"] for g in out["groups"]] == [g.name for g in space.groups]
    assert [g["base"] for g in out["groups"]] == [g.base for g in space.groups]
    assert [g["choices"] for g in out["groups"]] == [list(t) for t in space.width_table]
    assert out["max_macs"] == counting.macs(space, space.largest())
    assert out["min_macs"] == counting.macs(space, space.smallest())
    assert out["max_params"] == counting.params(space, space.largest())
    assert out["min_params"] == counting.params(space, space.smallest())
    assert out["min_macs"] < out["max_macs"]
    # ratio budgets' reference: the 1.0× network, smaller than the 1.4× space's largest
    full = space_of(arch, **{k: v for k, v in kw.items() if k != "max_width_mult"})
    assert out["full_network"] == {"macs": counting.macs(full, full.largest()),
                                   "params": counting.params(full, full.largest())}
    assert (out["full_network"]["macs"] < out["max_macs"]) == bool(extra)


def test_space_with_custom_scales(capsys):
    status, out, _ = call(capsys, "space", "test_resnet", "--scales", "0.5,0.75,1")
    assert status == 0 and out["levels"] == [0.5, 0.75, 1.0] and out["size"] == 3 ** 5
    for bad in ("0.5,x", "1,0.5", "0,1"):
        assert cli.main(["space", "test_resnet", "--scales", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("metaprune: error: ") and err.count("\n") == 1


def test_measure_widths_and_levels(capsys):
    space = space_of("test_resnet")
    # widths name the first level that has them (narrow groups repeat a width over levels)
    cand = space.from_widths(space.widths_by_group(Candidate((3, 30, 7, 12, 0))))
    widths = space.widths_by_group(cand)
    expected = {"arch": "test_resnet", "input_shape": [1, 28, 28], "candidate": cand.key(),
                "widths": widths,
                "macs": counting.macs(space, cand), "params": counting.params(space, cand)}
    status, by_widths, _ = call(capsys, "measure", "test_resnet", "--widths", json.dumps(widths))
    assert status == 0 and by_widths == expected
    status, by_levels, _ = call(capsys, "measure", "test_resnet", "--levels", cand.key())
    assert status == 0 and by_levels == expected
    status, full, _ = call(capsys, "measure", "test_resnet")  # neither: the full network
    assert full["macs"] == counting.macs(space, space.largest())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_build_writes_loadable_torchscript(capsys, tmp_path):
    space = space_of("test_mobilenet_v2")
    cand = space.uniform(11)
    out = tmp_path / "x.ts"
    status, info, _ = call(capsys, "build", "test_mobilenet_v2", "--levels", cand.key(),
                           "--out", str(out), "--seed", "3")
    assert status == 0
    assert info == {"out": str(out), "input_shape": [1, 28, 28], "candidate": cand.key(),
                    "macs": counting.macs(space, cand), "params": counting.params(space, cand)}
    ts = torch.jit.load(str(out))
    expected = build(space, cand).state_dict()
    got = ts.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        k: tuple(v.shape) for k, v in expected.items()}
    widths = space.widths_by_group(cand)
    assert got["stem.conv.conv.weight"].shape[0] == widths["stem"]
    torch.manual_seed(3)  # the same seed builds the same weights
    net = build(space, cand).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(ts(x), net(x))


def test_build_replaces_only_a_regular_file(capsys, tmp_path):
    """``--out`` naming a symlink, a pipe (or, as root, /dev/null) is refused: the atomic write
    would have replaced the link or the node itself with the model."""
    (tmp_path / "target.ts").write_bytes(b"keep")
    (tmp_path / "link.ts").symlink_to(tmp_path / "target.ts")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link.ts", "fifo"):
        assert cli.main(["build", "test_resnet", "--out", str(tmp_path / name)]) == 2
        assert "is a symlink, a device or a pipe" in capsys.readouterr().err
    assert (tmp_path / "link.ts").is_symlink() and (tmp_path / "target.ts").read_bytes() == b"keep"
    assert cli.main(["build", "test_resnet", "--out", str(tmp_path / "target.ts")]) == 0


def test_build_writes_onnx_for_an_onnx_file(capsys, tmp_path):
    from pruning.export import onnx_session

    space = space_of("test_mobilenet_v2")
    cand = space.uniform(11)
    out = tmp_path / "x.onnx"
    assert call(capsys, "build", "test_mobilenet_v2", "--levels", cand.key(), "--out", str(out),
                "--seed", "3")[0] == 0
    torch.manual_seed(3)
    net = build(space, cand).eval()
    x = torch.randn(2, 1, 28, 28)
    (got,) = onnx_session(out).run(["logits"], {"images": x.numpy()})
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(got), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["space", "nope"], "unknown architecture 'nope'; available:"),
    (["measure", "nope", "--levels", "1"], "unknown architecture 'nope'"),
    (["measure", "test_resnet", "--widths", "{bad"], "--widths is not valid JSON"),
    (["measure", "test_resnet", "--widths", ""], "--widths is not valid JSON"),  # not ignored
    (["measure", "test_resnet", "--levels", ""], "not a candidate key: ''"),
    (["space", "test_resnet", "--scales", ""], "--scales must be comma-separated numbers"),
    (["measure", "test_resnet", "--widths", "[1, 2]"], "--widths must be a JSON object"),
    (["measure", "test_resnet", "--widths",
      '{"stage1": 8, "s1b0.mid": 8, "s1b1.mid": 8, "stage2": 16, "s2b0.mid": 999}'],
     "width 999 of group 's2b0.mid' is not a level; choose from"),
    (["measure", "test_resnet", "--widths", '{"stem": 3}'], "width groups do not match"),
    (["measure", "test_resnet", "--levels", "1-2"],
     "a candidate needs 5 choices (one per width group), got 2"),
    (["measure", "test_resnet", "--levels", "1-2-3-4-31"], "level 31 is outside 0..30"),
    (["measure", "test_resnet", "--levels", "a-b"], "not a candidate key: 'a-b'"),
    (["measure", "test_resnet", "--levels", "+1-2-3-4-5"], "not a candidate key: '+1-2-3-4-5'"),
    (["measure", "test_resnet", "--levels", "\u0661-2-3-4-5"], "not a candidate key"),
    (["measure", "test_resnet", "--levels", "1-2-3-4-5", "--widths", "{}"],
     "give either --widths or --levels, not both"),
    (["space", "test_resnet", "--input-size", "2"], "input_size"),
    (["build", "test_resnet", "--out", "/nonexistent/dir/x.ts"], "does not exist"),
    (["build", "test_resnet", "--out", "/tmp"],
     "--out: /tmp is a folder; name the file to write, e.g. /tmp/model.ts"),
    (["prune", "--arch", "test_resnet", "--max-macs", "12Q"], "--max-macs: not a count: '12Q'"),
    # an empty value (an unset shell variable) is an error, not "no budget given"
    (["prune", "--arch", "test_resnet", "--max-params", ""], "--max-params: not a count: ''"),
    # a negative value is the option's value (not an unknown option), and said to be negative
    (["prune", "--arch", "test_resnet", "--max-macs", "-5k"], "a count cannot be negative"),
    (["prune", "--arch", "test_resnet", "--max-latency-ms", "-2"],
     "--max-latency-ms: must be a positive finite number, got '-2'"),
    (["build", "test_resnet", "--out", "/proc/x.ts"],
     "--out: cannot write /proc/x.ts: No such file or directory"),
    (["prune", "--arch", "nope"], "--arch: unknown architecture 'nope'"),
    (["prune", "--arch", "test_resnet", "--seed", "-1"], "--seed: Input should be greater"),
    (["prune", "--arch", "test_resnet", "--set", '{"metanet": {"epoch": 2}}'],
     "metanet: unknown training settings: epoch"),
    (["prune", "--arch", "test_resnet", "--set", '{"final": {"lr": -1}}'],
     "final: invalid training settings: lr=-1"),
    (["prune", "--arch", "test_resnet", "--set", "[1]"], "--set must be a JSON object"),
    (["prune", "--arch", "test_resnet", "--set", "{x"], "--set is not valid JSON"),
    (["prune", "--arch", "test_resnet", "--set", '{"seed": 4}'], "--set may not give seed"),
    (["prune", "--arch", "test_resnet", "--set", '{"eval_image": 4}'],
     "--set: unknown settings: eval_image (known: calib_batch_size, calib_batches, "),
    (["prune", "--arch", "test_resnet", "--set", '{"search": {"generation": 4}}'],
     "search: unknown search settings: generation (known: crossovers, generations, "),
    (["prune", "--arch", "test_resnet", "--max-macs", "0"],
     "--max-macs: Input should be greater than 0"),
    (["prune", "--arch", "test_resnet", "--params-ratio", "-1"],
     "--params-ratio: Input should be greater than 0"),
    (["prune", "--arch", "test_resnet", "--dataset", "synthetic", "--data-root", "/data"],
     "--data-root: the synthetic dataset is generated and reads no folder"),
    (["prune", "--arch", "test_resnet", "--out", __file__],
     f"--out: {__file__} is a file, not a folder"),
    (["prune", "--arch", "test_resnet", "--out", f"{__file__}/run", "--resume"],
     f"--out: {__file__} is a file, not a folder"),
])
def test_bad_input_is_a_one_line_error(capsys, tmp_path, argv, message):
    if argv[0] == "prune" and "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "run"), "--quiet"]
    status, out, err = call(capsys, *argv)
    assert status == 2 and out is None
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("metaprune: error: "), err
    assert message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["prune", "--preset", "fast"], ("argument --preset: invalid choice: 'fast' (choose from "
                                     "'smoke', 'quick', 'standard', 'paper')")),
    (["prune", "--out", " "], "argument --out: must not be empty"),
    (["serve", "--port", "99999"],
     "argument --port: must be a port number in [1, 65535], got '99999'"),
    (["search"], "the following arguments are required: --out"),
    (["search", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["token", "create", "--owner", "a", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    # no abbreviations: a typo for --max-macs does not run under --macs-ratio
    (["prune", "--arch", "test_resnet", "--macs", "0.3"], "unrecognized arguments: --macs 0.3"),
    (["jobs", "--lim", "3"], "unrecognized arguments: --lim 3"),
])
def test_command_line_mistakes_are_one_line_too(capsys, argv, message):
    """What argparse itself refuses: one line naming the --help to read (of the subcommand
    given), not the usage."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    command = " ".join(argv[:2] if argv[0] == "token" else argv[:1])
    assert capsys.readouterr().err == (f"metaprune: error: {message} (see `metaprune "
                                       f"{command} --help`)\n")


def test_a_bad_service_setting_is_named_by_its_environment_variable(capsys, tmp_path,
                                                                    monkeypatch):
    """What the user typed was METAPRUNE_MAX_ATTEMPTS, not the field max_attempts."""
    monkeypatch.setenv("METAPRUNE_MAX_ATTEMPTS", "0")
    status, _, err = call(capsys, "worker", "--once", "--database-url",
                          f"sqlite:///{tmp_path / 'm.db'}", "--artifact-dir", str(tmp_path))
    assert status == 2 and "Traceback" not in err
    assert err == ("metaprune: error: METAPRUNE_MAX_ATTEMPTS: Input should be greater than or "
                   "equal to 1\n")


def test_missing_dataset_folder_is_a_one_line_error(capsys, tmp_path):
    out = tmp_path / "run"
    status, _, err = call(capsys, "prune", "--arch", "test_resnet", "--preset", "smoke",
                          "--data-root", "/nonexistent", "--out", str(out), "--quiet")
    assert status == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("metaprune: error: Fashion-MNIST not found in "
                                                   "/nonexistent")
    assert not out.exists()  # the folder is not claimed, so the corrected command just works


def test_progress_lines_count_finished_work(capsys, monkeypatch):
    """Without a terminal, progress is plain lines; search generations are numbered from 0 in
    the events, so the last one reads N/N."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    printer = cli.ProgressPrinter()
    printer({"stage": "data", "message": "loading synthetic"})
    for g in range(3):
        printer({"stage": "search", "generation": g, "generations": 3, "best_score": 0.5 + g / 10})
    printer({"stage": "metanet", "step": 10, "total": 10, "loss": 1.25})
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[data] loading synthetic"
    assert err[-2] == "[search] 3/3 best_score=0.7"
    assert err[-1] == "[metanet] 10/10 loss=1.25"
    assert not any(line.startswith("[search] 0/") for line in err)


def test_progress_lines_give_the_stage_eta(capsys, monkeypatch):
    """Plain lines (logs, CI, nohup) carry the stage's remaining time, as the bars do."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    printer = cli.ProgressPrinter()
    for step, eta in ((1, 42.4), (2, 185.0), (3, 7322.0), (4, None), (5, 0.0)):
        printer({"stage": "final", "step": step, "total": 5, "loss": 1.0, "eta_s": eta})
    assert capsys.readouterr().err.splitlines() == [
        "[final] 1/5 loss=1 eta 42s", "[final] 2/5 loss=1 eta 3m05s",
        "[final] 3/5 loss=1 eta 2h02m", "[final] 4/5 loss=1", "[final] 5/5 loss=1"]
    # a long stage: the first ETA (known after step 1) is printed at once, not at the first tenth
    for step in range(1, 101):
        printer({"stage": "metanet", "step": step, "total": 100, "loss": 2.0,
                 "eta_s": None if step == 1 else 100.0 - step})
    assert capsys.readouterr().err.splitlines()[:4] == [
        "[metanet] 1/100 loss=2", "[metanet] 2/100 loss=2 eta 1m38s",
        "[metanet] 10/100 loss=2 eta 1m30s", "[metanet] 20/100 loss=2 eta 1m20s"]
    watch = cli._WatchPrinter()  # `metaprune watch`: the job's detail holds its stage's eta_s
    watch({"status": "queued", "stage": None, "progress": 0.0, "detail": {}})
    watch({"status": "running", "stage": None, "progress": 0.0, "detail": {}})  # just claimed
    watch({"status": "running", "stage": "metanet", "progress": 0.2, "detail": {"eta_s": 95.2}})
    watch({"status": "succeeded", "stage": "done", "progress": 1.0, "detail": {"eta_s": 3}})
    assert capsys.readouterr().err.splitlines() == [
        "[-] queued 0%", "[starting] running 0%", "[metanet] running 20%  (stage eta 1m35s)",
        "[done] succeeded 100%"]


@pytest.mark.parametrize("limits, text", [
    ({"macs": 924_612}, "MACs ≤ 925k"),
    ({"params": 1_500_000}, "params ≤ 1.5M"),
    ({"latency": 6.2507}, "latency ≤ 6.25 ms (batch 1)"),
])
def test_summary_names_the_budget_in_words(limits, text):
    assert cli._budget_text(limits) == text


@pytest.mark.parametrize("objective, pick, note", [
    ("accuracy", {"estimated_val_accuracy": 0.476, "estimated_val_loss": 1.2}, True),
    ("accuracy", {"estimated_val_accuracy": 0.53, "estimated_val_loss": 1.9}, False),
    ("loss", {"estimated_val_accuracy": 0.53, "estimated_val_loss": 1.9}, True),
    ("loss", {"estimated_val_accuracy": 0.476, "estimated_val_loss": 1.2}, False),
])
def test_summary_notes_a_pick_its_search_scores_below_uniform(capsys, objective, pick, note):
    """By the search's own objective: lower accuracy, or higher cross-entropy, than uniform."""
    entry = {"macs": 286_816, "params": 20_000, "test_accuracy": 0.7}
    report = {"arch": "mobilenet_v1", "dataset": "fashion-mnist", "budget": {"macs": 289_513},
              "search": {"objective": objective}, "elapsed_s": 60.0,
              "metapruning": {**entry, **pick, "candidate": "0-9-13"},
              "uniform": {**entry, "candidate": "5-5-5", "estimated_val_accuracy": 0.526,
                          "estimated_val_loss": 1.5}}
    cli._print_summary(report, "runs/x")
    assert ("note: the search's pick scores below the uniform network"
            in capsys.readouterr().out) is note


@pytest.mark.parametrize("pick, uniform, note", [  # note: the shares in %, or None
    (0.69, 0.99, (69, 99)),
    (0.93, 0.99, None),  # enough
    (0.69, 0.66, None),  # uniform uses less
    (0.69, None, None),  # a report from before budget_use
])
def test_summary_notes_a_pick_that_leaves_its_budget_unused(capsys, pick, uniform, note):
    """Below 90 % of the budget, and below the uniform network's share (the entries'
    ``budget_use``): the note names both shares and the setting."""
    entry = {"macs": 1, "params": 1, "test_accuracy": 0.7, "estimated_val_accuracy": 0.5,
             "estimated_val_loss": 1.5}
    report = {"arch": "mobilenet_v1", "dataset": "fashion-mnist", "budget": {"macs": 289_513},
              "search": {"objective": "accuracy"}, "elapsed_s": 60.0,
              "metapruning": {**entry, "budget_use": pick, "candidate": "0-9-13"},
              "uniform": {**entry, "candidate": "5-5-5",
                          **({} if uniform is None else {"budget_use": uniform})}}
    cli._print_summary(report, "runs/x")
    notes = [line for line in capsys.readouterr().out.splitlines() if "of the budget" in line]
    if note is None:
        assert notes == []
    else:
        expected = (f"  note: the pick uses {note[0]}% of the budget, the uniform network "
                    f"{note[1]}%; to hold the search to 90% of it, run again with --set "
                    """'{"search": {"min_budget_use": 0.9}}' (and --metanet-from runs/x to """
                    "reuse this PruningNet)")
        assert notes == [expected]


@pytest.mark.parametrize("raised, message", [
    (KeyboardInterrupt(), "metaprune: interrupted; to continue where it stopped, run the "
                          "same command with --resume (or `metaprune resume --out {run}`)\n"),
    (OSError(28, "No space left on device"),
     "metaprune: error: no space left on the device ([Errno 28] No space left on device); "
     "to continue where it stopped, run the same command with --resume (or `metaprune resume "
     "--out {run}`)\n"),
])
def test_a_stopped_run_says_how_to_continue(capsys, monkeypatch, tmp_path, raised, message):
    def stopped(a):
        raise raised
    monkeypatch.setattr(cli, "cmd_prune", stopped)
    status = cli.main(["prune", "--arch", "test_resnet", "--out", str(tmp_path / "run")])
    assert status == (130 if isinstance(raised, KeyboardInterrupt) else 2)
    assert capsys.readouterr().err == message.format(run=tmp_path / "run")


@pytest.mark.parametrize("argv, hint", [
    (["train-metanet", "--out", "r"], "the same command with --resume"),
    (["search", "--out", "r"], "run the same command again"),  # stages resume by themselves
    (["export", "--out", "r"], "run the same command again"),
    (["resume", "--out", "r"], "run the same command again"),
    (["watch", "J1"], None),  # nothing to continue: no hint
    (["measure", "test_resnet"], None),
])
def test_how_to_continue_fits_the_command(argv, hint):
    text = cli._how_to_continue(cli.make_parser().parse_args(argv))
    assert (hint in text) if hint else text == ""


PRUNE = ["prune", "--arch", "test_mobilenet_v2", "--dataset", "synthetic", "--preset", "smoke",
         "--quiet"]


def test_diverged_training_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    import pruning.pipeline

    def diverge(*args, **kwargs):
        raise FloatingPointError("metanet: the loss became nan by step 11 of 60; training "
                                 "diverged: lower the learning rate")

    monkeypatch.setattr(pruning.pipeline, "run", diverge)
    status, _, err = call(capsys, *PRUNE, "--out", str(tmp_path / "run"))
    assert status == 2 and err == ("metaprune: error: metanet: the loss became nan by step 11 "
                                   "of 60; training diverged: lower the learning rate\n")


def test_a_reader_that_left_after_the_run_is_no_error(capsys, tmp_path, monkeypatch):
    """``metaprune prune … | head -1``: the run is done when its summary finds stdout closed."""
    import pruning.pipeline

    monkeypatch.setattr(pruning.pipeline, "run", lambda *a, **k: {})

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_write_summary", closed)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # _run points it at os.devnull
    status, _, err = call(capsys, *PRUNE, "--out", str(tmp_path / "run"))
    assert status == 0 and err == ""


def test_a_stop_before_the_run_began_promises_no_checkpoint(capsys, tmp_path, monkeypatch):
    """Stopped while measuring a latency table, say: no spec.json yet, nothing to resume."""
    import pruning.pipeline
    from pruning.train import Cancelled

    def stopped(*args, **kwargs):
        raise Cancelled("latency")

    monkeypatch.setattr(pruning.pipeline, "run", stopped)
    status, _, err = call(capsys, *PRUNE, "--out", str(tmp_path / "run"))
    assert status == 130 and err == ("metaprune: stopped before the run began; nothing was "
                                     "saved\n")


def test_a_run_folder_that_cannot_hold_a_lock_runs_unguarded(tmp_path, monkeypatch):
    """A read-only folder (a finished run exported again, another user's) takes no lock."""
    from pruning import pipeline

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pipeline.os, "open", read_only)
    assert pipeline.lock_run_dir(tmp_path) is False and not pipeline._held_locks


def test_out_as_a_dangling_symlink_is_named(capsys, tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    status, _, err = call(capsys, *PRUNE, "--out", str(link))
    assert status == 2 and err == (f"metaprune: error: --out: {link} is a symlink to "
                                   f"{tmp_path / 'gone'}, which does not exist\n")


def test_relative_run_folders_in_a_spec_are_stored_absolute(tmp_path, monkeypatch):
    """``--data-root`` and ``--metanet-from`` are kept absolute in spec.json, so ``resume``
    finds them from any working folder."""
    monkeypatch.chdir(tmp_path)
    a = cli.make_parser().parse_args([*PRUNE, "--dataset", "imagefolder", "--metanet-from", "ref",
                                      "--data-root", "data"])
    spec = cli._local_spec(a)
    assert spec.metanet_from == str(tmp_path / "ref") and spec.data_root == str(tmp_path / "data")


def test_a_second_stop_signal_leaves_at_once_with_its_own_status(capsys, tmp_path,
                                                                  monkeypatch):
    import signal

    import pruning.pipeline

    stop = cli._StopOnCtrlC()
    stop._on_signal(signal.SIGTERM, None)  # the first: stop at the next step
    with pytest.raises(cli._Interrupted) as e:
        stop._on_signal(signal.SIGTERM, None)  # the second: at once
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise e.value

    monkeypatch.setattr(pruning.pipeline, "run", interrupted)
    status, _, err = call(capsys, *PRUNE, "--out", str(tmp_path / "run"))
    assert status == 143 and err.startswith("metaprune: interrupted")


def test_a_run_recorded_with_relative_paths_resumes(tmp_path, monkeypatch):
    """Older versions stored ``--metanet-from`` and ``--data-root`` as typed; resumed from the
    same folder, that spec is the one the command line now gives with the paths made
    absolute."""
    from pruning.checkpoint import atomic_write_json
    from pruning.pipeline import _check_run_dir

    monkeypatch.chdir(tmp_path)
    spec = PipelineSpec(arch="test_mobilenet_v2", dataset="imagefolder", metanet_from="ref",
                        data_root="images")
    atomic_write_json(tmp_path / "run" / "spec.json", spec.model_dump())
    now = spec.model_copy(update={"metanet_from": str(tmp_path / "ref"),
                                  "data_root": str(tmp_path / "images")})
    _check_run_dir(tmp_path / "run", now, resume=True)  # no "different specification"
    _check_run_dir(tmp_path / "run", spec, resume=True)  # as stage commands and Python give it


def test_a_run_of_an_unknown_plugin_architecture_says_so(capsys, tmp_path):
    """Resuming (or exporting) a plugin's run without METAPRUNE_PLUGINS names the architecture
    and the variable, instead of calling the spec unreadable."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps({"arch": "my_gone_plugin",
                                               "budget": {"macs_ratio": 0.5}}))
    for argv in (["resume", "--out", str(run)], ["export", "--out", str(run)]):
        status, _, err = call(capsys, *argv)
        assert status == 2 and err.count("\n") == 1
        assert "unknown architecture 'my_gone_plugin'" in err and "METAPRUNE_PLUGINS" in err


def test_the_summary_shows_what_the_search_ranked(capsys):
    """With ``objective: loss`` the pick can estimate a lower accuracy than the uniform network
    and still have won: the summary gives the loss it ranked by; counts take their unit."""
    def entry(candidate, macs, params, acc, loss):
        return {"candidate": candidate, "macs": macs, "params": params, "test_accuracy": 0.5,
                "estimated_val_accuracy": acc, "estimated_val_loss": loss}

    report = {"arch": "test_resnet", "dataset": "synthetic", "budget": {"macs": 200_000},
              "search": {"objective": "loss"}, "elapsed_s": 1.0,
              "metapruning": entry("1-1", 13_250, 445, 0.09375, 2.1),
              "uniform": entry("2-2", 199_000, 999.5, 0.1172, 2.3)}
    cli._print_summary(report, "runs/x")
    out = capsys.readouterr().out
    assert "MetaPruning  MACs 13.25k  params    445  est. val loss 2.1000 (9.38%)" in out
    assert "uniform      MACs   199k  params  999.5  est. val loss 2.3000 (11.72%)" in out
    assert "scores below the uniform" not in out  # it won on loss
