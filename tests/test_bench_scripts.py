"""Smoke tests of the GPU benchmark scripts: their ``--tiny`` modes run on a CPU and print the
JSON the docs describe (the numbers are not results, only their ranges are checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning.data import FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_ENV

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 120) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def fashion_mnist_present() -> bool:
    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)
    return any((f / "train-images-idx3-ubyte.gz").is_file() or (f / "train-images-idx3-ubyte")
               .is_file() for f in (folder, folder / "fashion-mnist"))


def test_pipeline_speed_tiny(tmp_path):
    out = tmp_path / "speed.json"
    d = run_script("bench_pipeline_speed.py", "--device", "cpu", "--tiny", "--eval-batch-size",
                   "100", "--out", str(out))
    assert json.loads(out.read_text()) == d
    assert d["bench"] == "pipeline_speed" and d["tiny"] is True and d["device"] == "cpu"
    t = d["training"]
    for part in ("pruningnet", "plain_max_width"):
        assert t[part]["images_per_s"] > 0 and t[part]["steps"] == 3
    assert t["throughput_ratio_pruningnet_vs_plain"] > 0
    assert t["pruningnet_default_mode"] == "cropped"  # on a CPU
    assert t["pruningnet"] == t["pruningnet_by_mode"]["cropped"]
    assert t["pruningnet_by_mode"]["fixed_shapes"]["images_per_s"] > 0
    s = d["search"]
    assert s["images_per_candidate"] == s["calibration_images"] + s["validation_images"] > 0
    assert s["evaluator"]["candidates_per_s"] > 0 and s["evaluator"]["mode"] == "cropped"
    # the validation pass in batches of 100 (one), timed against calibration-sized batches
    assert s["evaluator"]["eval_batch_size"] == 100
    small = s["evaluator_calibration_sized_batches"]
    assert small["eval_batch_size"] < 100 and small["candidates_per_s"] > 0
    assert small["default_speedup"] == pytest.approx(
        s["evaluator"]["candidates_per_s"] / small["candidates_per_s"], rel=0.01)
    assert s["evaluator_other_mode"]["mode"] == "fixed_shapes"
    assert s["evaluator_other_mode"]["candidates_per_s"] > 0
    assert s["plain_max_width_forward"]["candidates_per_s"] > 0
    assert s["slowdown_vs_plain_max_width_forward"] > 0
    assert s["same_candidates_forward"]["median_slowdown"] > 0
    assert s["evolve"]["evaluated"] >= 1 and s["evolve"]["candidates_per_s"] > 0
    lay = d["layouts"]
    assert lay["forward_images"] == s["validation_images"]
    assert set(lay["forward_images_per_s"]) == {"batch32_nchw", "batch128_nchw",
                                               "batch32_channels_last", "batch128_channels_last"}
    assert all(v > 0 for v in lay["forward_images_per_s"].values())
    assert lay["plain_max_width_training_channels_last"]["images_per_s"] > 0
    assert t["plain_by_mode"] == {}  # eager vs graphed: CUDA only
    prof = d["profiles"]
    assert set(prof) == {"steps", "candidates", "budget_uniform_training_eager",
                         "pruningnet_training", "candidate_evaluation"}
    for name in ("budget_uniform_training_eager", "pruningnet_training", "candidate_evaluation"):
        assert prof[name]["wall_s"] > 0 and prof[name]["gpu_busy_share"] is None  # no GPU
        ops = dict(prof[name]["top_kernels"])  # on a CPU: the operators with most own time
        assert any("conv" in op for op in ops) and all(t >= 0 for t in ops.values())


@pytest.mark.parametrize("jobs", [1, 2])
def test_quality_tiny(tmp_path, jobs):
    """Seeds in turn, or each in its own process at once (merged into the same JSON; there
    both networks are fine-tuned from generated weights, the search starts from the uniform
    network and has a budget-use floor: settings the children must get)."""
    include_uniform = jobs > 1
    args = ["--tiny", "--out", str(tmp_path / "quality.json"), "--work-dir", str(tmp_path / "w"),
            "--jobs", str(jobs), "--include-uniform", "yes" if include_uniform else "no"]
    final_init = "generated" if jobs > 1 else "scratch"
    min_budget_use = 0.5 if jobs > 1 else None
    if jobs > 1:
        args += ["--final-init", final_init, "--min-budget-use", str(min_budget_use)]
    if not fashion_mnist_present():
        args += ["--dataset", "synthetic"]
    d = run_script("bench_quality.py", *args, timeout=170)
    assert json.loads((tmp_path / "quality.json").read_text()) == d
    for seed in (0, 1):  # each seed's process wrote its own JSON beside --out
        assert (tmp_path / f"quality.seed{seed}.json").is_file() is (jobs > 1)
    assert d["bench"] == "quality" and d["tiny"] is True and d["status"] == "complete"
    assert d["device"] == "cpu" and d["device_name"].endswith(f"{os.cpu_count()} cores")
    assert sorted(d["seeds_done"]) == [0, 1] and not d["seeds_skipped"]
    assert d["cancelled"] == [] and d["failures"] == [] and d["settings"]["jobs"] == jobs
    assert [(r["seed"], r["macs_ratio"]) for r in d["runs"]] == [
        (seed, b) for seed in (0, 1) for b in (0.5, 0.25, 0.1)]
    assert d["metanet_reuse"] == "metanet_from"
    assert len(d["runs"]) == 6
    for seed in (0, 1):
        for budget in ("0.5", "0.1"):
            spec = json.loads((tmp_path / "w" / f"seed{seed}" / f"macs{budget}" / "spec.json")
                              .read_text())
            assert spec.get("final_init", "scratch") == final_init
            assert spec["search"]["include_uniform"] is include_uniform
            assert spec["search"].get("min_budget_use") == min_budget_use
    assert [r["metanet_reused"] for r in d["runs"]] == [False, True, True] * 2
    for r in d["runs"]:
        for name in ("metapruning", "uniform"):
            e = r[name]
            assert 0 <= e["test_accuracy"] <= 1 and 0 <= e["estimated_val_accuracy"] <= 1
            assert 0 < e["macs_vs_full"] <= r["macs_ratio"]
    assert set(d["summary"]) == {"0.5", "0.25", "0.1"}
    for s in d["summary"].values():
        for key in ("metapruning_test_accuracy", "uniform_test_accuracy"):
            assert s[key]["n"] == 2 and 0 <= s[key]["mean"] <= 1 and s[key]["std"] >= 0
    k = d["kendall"]
    assert k["candidates"] == 10 and not k["skipped_candidates"]
    assert -1 <= k["kendall_tau"] <= 1 and -1 <= k["kendall_tau_macs_vs_trained"] <= 1
    ratios = [row["macs_vs_full"] for row in k["rows"]]
    assert max(ratios) > 2 * min(ratios)  # spread over the MACs range, not one cluster
    for row in k["rows"]:
        assert 0 <= row["estimated_val_accuracy"] <= 1 and 0 <= row["trained_test_accuracy"] <= 1


def test_quality_seeds_at_once_write_beside_out_and_stop_past_the_budget(tmp_path,
                                                                          monkeypatch):
    """Seeds at once: each process writes its JSON beside --out (a benchmark killed before the
    merge still leaves their finished runs there; an earlier benchmark's is removed first), and
    processes still running CHILD_GRACE_S past the time budget are stopped, so the merged JSON
    is written before the driver's kill."""
    import time

    bench = import_bench_quality()
    out = tmp_path / "out" / "quality.json"
    stale = out.with_name("quality.seed1.json")
    stale.parent.mkdir()
    stale.write_text(json.dumps({"runs": [{"seed": 1}]}))
    budget = time.perf_counter() - bench.T0 + 1.0
    a = bench.parse_args(["--tiny", "--seeds", "0,1", "--jobs", "2", "--tau-candidates", "0",
                          "--out", str(out), "--work-dir", str(tmp_path / "w"),
                          "--time-budget-s", str(budget)])
    argvs, real_popen = [], subprocess.Popen

    def hanging_child(argv, **kwargs):
        argvs.append(argv)
        return real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)

    monkeypatch.setattr(bench.subprocess, "Popen", hanging_child)
    monkeypatch.setattr(bench, "CHILD_GRACE_S", 0.5)
    b = bench.Bench(a)
    t = time.perf_counter()
    b.seeds_in_parallel()
    assert time.perf_counter() - t < 15
    assert [argv[argv.index("--out") + 1] for argv in argvs] == [
        str(out.with_name(f"quality.seed{seed}.json")) for seed in (0, 1)]
    assert [f["seed"] for f in b.failures] == [0, 1]
    assert all(f["error"].endswith("after the time budget: stopped") for f in b.failures)
    assert not stale.exists() and b.runs == []


def import_bench_quality():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_quality
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return bench_quality


def test_quality_keeps_accuracies_when_export_fails(tmp_path, monkeypatch):
    """A one-shot GPU run must not lose its trained accuracies to a broken exporter."""
    import pruning.pipeline

    def broken_export(ctx):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(pruning.pipeline, "stage_export", broken_export)
    args = ["--tiny", "--seeds", "0", "--budgets", "0.5,0.25", "--tau-candidates", "0",
            "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "quality.json")]
    if not fashion_mnist_present():
        args += ["--dataset", "synthetic"]
    d = import_bench_quality().main(args)
    assert d["status"] == "incomplete" and not d["failures"]
    assert [r["metanet_reused"] for r in d["runs"]] == [False, True]
    for r in d["runs"]:
        assert "exporter broke" in r["error"]
        for name in ("metapruning", "uniform"):
            assert 0 <= r[name]["test_accuracy"] <= 1
            assert 0 < r[name]["macs_vs_full"] <= r["macs_ratio"]
    assert d["summary"]["0.25"]["metapruning_test_accuracy"]["n"] == 1


def test_quality_tau_at_one_budget(tmp_path):
    args = ["--tiny", "--seeds", "0", "--budgets", "0.5", "--tau-range", "0.2,0.2",
            "--tau-candidates", "3", "--work-dir", str(tmp_path / "w")]
    if not fashion_mnist_present():
        args += ["--dataset", "synthetic"]
    k = import_bench_quality().main(args)["kendall"]
    assert k["macs_range"] == [0.2, 0.2] and k["candidates"] == 3
    assert all(0.19 <= row["macs_vs_full"] <= 0.2 for row in k["rows"])


def test_quality_cpu_quick_profile_sets_the_cpu_design(tmp_path, capsys):
    """``--cpu-quick``: MobileNetV2 0.35× at the quick preset's scale on the CPU; an option given
    beside it wins; it excludes ``--tiny``; seeds run in other processes get the settings."""
    bench_quality = import_bench_quality()
    a = bench_quality.parse_args(["--cpu-quick", "--seeds", "3", "--lr", "0.1",
                                  "--work-dir", str(tmp_path)])
    assert (a.arch, a.width_mult, a.preset, a.device) == ("mobilenet_v2", 0.35, "quick", "cpu")
    assert (a.budgets, a.batch_size, a.train_limit, a.tau_candidates) == (
        "0.5,0.25,0.1", 64, 5000, 0)
    assert (a.seeds, a.lr) == ("3", 0.1)
    child = bench_quality.Bench(a).child_args()
    assert "--cpu-quick" not in child
    assert child[child.index("--width-mult") + 1] == "0.35"
    assert bench_quality.parse_args([]).width_mult is None  # the GPU defaults: 1.0×
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--cpu-quick", "--tiny"])
    assert "not allowed with" in capsys.readouterr().err


def test_kendall_tau_own_implementation(monkeypatch):
    bench_quality = import_bench_quality()
    monkeypatch.setitem(sys.modules, "scipy", None)  # force the fallback
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    tau = bench_quality.kendall_tau
    assert tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert tau([1, 1, 1], [1, 2, 3]) is None
    # tau-b with one tie in each variable: 4 concordant, 0 discordant → 4 / √(5·5)
    assert abs(tau([1, 2, 2, 3], [1, 3, 2, 3]) - 0.8) < 1e-12


def test_service_smoke(tmp_path):
    """The service load benchmark end to end, tiny: 5 clients for 2 s on SQLite, one closed-loop
    and one paced load, while the worker trains (counts and fields only, never timings)."""
    d = run_script("bench_service.py", "--db", "sqlite", "--clients", "5", "--duration-s", "2",
                   "--warmup-s", "0.5", "--interval-ms", "0,100", "--owners", "2",
                   "--seed-jobs", "2", "--submit-fraction", "0.2", "--work-dir", str(tmp_path),
                   timeout=240)
    assert d["bench"] == "service" and d["clients"] == 5 and d["server_workers"] == 1
    assert d["machine"]["cores"] >= 1 and d["machine"]["cpu"]
    assert list(d["backends"]) == ["sqlite"]
    b = d["backends"]["sqlite"]
    assert b["database"] == "sqlite"
    assert b["training_job"]["when_measurement_began"]["stage"] == "metanet"
    assert b["training_job"]["cancel_answer"] in ("running", "cancelled")
    assert [load["interval_ms"] for load in b["loads"]] == [0, 100]
    for load in b["loads"]:
        assert load["window_s"] > 0
        assert load["training_job"]["at_start"]["status"] == "running"
        for kind in ("polls", "submissions"):
            s = load[kind]
            assert s["errors"] == 0 and s["error_kinds"] == {}, s
            assert s["count"] > 0 and s["throughput_per_s"] > 0
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert load["jobs_submitted"] == load["submissions"]["count"]
        assert set(load["cpu_seconds"]) == {"api", "worker", "client", "machine_busy_cores"}
    assert set(d["goal_met"]) == {"sqlite interval 0 ms", "sqlite interval 100 ms"}


def test_launches_counts_the_pruningnet_against_the_plain_network(tmp_path):
    out = tmp_path / "launches.json"
    d = run_script("bench_launches.py", "--arch", "test_mobilenet_v2", "--device", "cpu",
                   "--out", str(out))
    assert json.loads(out.read_text()) == d
    n = d["forward_backward_launches"]
    assert set(n) == {"plain_max_width", "plain_same_candidate", "pruningnet_fixed_shapes",
                      "pruningnet_cropped"}
    # the PruningNet runs the plain network's layers plus a weight generator per layer
    assert n["pruningnet_fixed_shapes"] > n["plain_max_width"] > 0
    assert n["pruningnet_cropped"] > n["plain_same_candidate"] > 0
    assert d["ratio_vs_plain_max_width"]["plain_max_width"] == 1.0
    assert d["parameter_tensors"]["pruningnet"] > 0


def test_quality_checks_cuda_graphs_before_trusting_them():
    """The check passes graphs that replay the real steps (plain net and PruningNet) and fails
    ones that do not apply the learning rate (on the CPU: the capture runs the step eagerly)."""
    import pruning.train
    from tests.conftest import EagerGraphs

    check = import_bench_quality().check_cuda_graphs

    good = check("test_mobilenet_v2", device="cpu", steps=6, graphs=EagerGraphs)
    assert good["ok"], good
    assert good["plain"]["relative_distance"] < 1e-3 and good["pruningnet"]["relative_distance"] < 1e-3

    real_update = pruning.train.sgd_update

    class FrozenLrGraphs(EagerGraphs):
        @staticmethod
        def capture(body):
            def replay():
                pruning.train.sgd_update = lambda opt, neg_lr: real_update(opt, 0 * neg_lr)
                try:
                    body()
                finally:
                    pruning.train.sgd_update = real_update
            return replay

    bad = check("test_mobilenet_v2", device="cpu", steps=6, graphs=FrozenLrGraphs)
    assert not bad["ok"], bad
    assert min(bad["plain"]["relative_distance"], bad["pruningnet"]["relative_distance"]) > 0.1


def test_cuda_graphs_check_fails_when_the_capture_fails():
    """A capture that raises falls back to eager steps, whose weights match the eager runs: the
    check must still say no (the seeds' own processes would otherwise try the capture)."""
    from tests.conftest import EagerGraphs

    class BrokenGraphs(EagerGraphs):
        @classmethod
        def capture(cls, body):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    v = import_bench_quality().check_cuda_graphs("test_mobilenet_v2", device="cpu", steps=6,
                                                 graphs=BrokenGraphs)
    assert not v["ok"], v
    for part in ("plain", "pruningnet"):
        assert not v[part]["ok"] and v[part]["relative_distance"] == 0.0
        assert v[part]["error"].startswith("CUDA graph capture failed (operation not permitted")


def test_pruningnet_fit_tiny(tmp_path):
    out = tmp_path / "fit.json"
    d = run_script("bench_pruningnet_fit.py", "--tiny", "--epochs", "1,2", "--seeds", "0,1",
                   "--out", str(out))
    assert json.loads(out.read_text()) == d and d["tiny"] is True
    assert [(r["epochs"], r["seed"]) for r in d["pruningnet"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for s in d["by_epochs"]:  # each epoch count summarised over its two seeds
        runs = [r["mean_estimate"] for r in d["pruningnet"] if r["epochs"] == s["epochs"]]
        assert s["seeds"] == 2
        assert s["mean_estimate"]["mean"] == pytest.approx(sum(runs) / 2, abs=1e-4)
        assert s["mean_estimate"]["std"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5, abs=2e-4)
    for r in d["pruningnet"]:
        assert r["steps"] == 3 and len(r["estimates"]) == len(d["candidates"]) == 2
        assert all(0 <= v <= 1 for v in r["estimates"]) and 0 <= r["largest_estimate"] <= 1
        assert r["loss_curve"] and all(v > 0 for v in r["loss_curve"])
    assert d["plain"]["epochs"] == 1.0 and len(d["plain"]["val_accuracy"]) == 1


@pytest.mark.parametrize("code, timeout_s, expected", [
    ("print('{\"ok\": true, \"steps\": 12}')", 30, {"ok": True, "steps": 12}),
    ("import sys; sys.stderr.write('capture broke\\n'); sys.exit(3)", 30,
     {"ok": False, "error": "the check ended with status 3: capture broke"}),
    ("import os; os.abort()", 30,
     {"ok": False, "error": "the check ended with status -6: no output"}),
    ("print('hello')", 30, {"ok": False, "error": "the check printed no verdict"}),
    ("import time; time.sleep(30)", 0.5, {"ok": False, "error": "the check took over 0.5 s"}),
])
def test_cuda_graphs_verdict_survives_a_broken_check(code, timeout_s, expected):
    """The check runs in its own process, so whatever happens there (a crash, a hang, no
    answer) the benchmark gets a verdict against graphs and goes on."""
    verdict = import_bench_quality().cuda_graphs_verdict([sys.executable, "-c", code], timeout_s)
    assert verdict == expected


def test_cuda_graphs_check_flag_runs_the_check():
    """The real child command: on a machine without CUDA the check itself fails, and says so."""
    bench = import_bench_quality()
    verdict = bench.cuda_graphs_verdict([sys.executable, str(ROOT / "bench" / "bench_quality.py"),
                                         "--check-cuda-graphs", "--arch", "test_mobilenet_v2"])
    if torch.cuda.is_available():
        assert isinstance(verdict["ok"], bool) and "plain" in verdict
    else:
        assert verdict["ok"] is False
        assert verdict["error"].startswith("the check ended with status 1")


def test_gpu_benchmarks_driver_runs_the_quality_benchmark(tmp_path):
    """The one-shot device call's driver script, its quality mode, with the tiny settings on
    this machine's Python (as `python3`, which the GPU machines provide): it writes the JSON
    and the summary lines the call returns."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "out"
    args = ["--tiny", "--seeds", "0", "--budgets", "0.5", "--tau-candidates", "0"]
    if not fashion_mnist_present():
        args += ["--dataset", "synthetic"]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu_benchmarks.sh"), str(out), "150",
                           "quality", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quality: exit 0 after" in proc.stdout, proc.stdout
    d = json.loads((out / "quality.json").read_text())
    assert d["status"] == "complete" and d["seeds_done"] == [0] and d["tiny"] is True
    assert d["settings"]["time_budget_s"] < 150  # the driver leaves time to write the JSON
    assert (out / "nvidia-smi.txt").is_file() and (out / "quality.log").is_file()


def test_gpu_benchmarks_driver_skips_quality_without_time_left(tmp_path):
    """With no time budget left for the quality benchmark the driver skips it: `timeout 0` would
    never kill it, and a negative one fails."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu_benchmarks.sh"), str(out), "45",
                           "quality", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quality: skipped, " in proc.stdout and "left of 45" in proc.stdout, proc.stdout
    assert not (out / "quality.json").exists() and not (out / "quality.log").exists()


def test_engine_tiny():
    d = run_script("bench_engine.py", "--arch", "test_mobilenet_v2", "--input-size", "16",
                   "--threads", "1", "--candidates", "1", "--repeat", "1", "--val-images", "64",
                   "--batch-size", "32", "--calib-batches", "1", "--train-batch", "16")
    ev = d["evaluation"]
    assert len(ev["seconds_per_candidate"]) == len(ev["nchw_seconds_per_candidate"]) == 1
    assert ev["median_ratio"] > 0 and ev["speedup_vs_nchw"] > 0
    assert d["layout"]["inference"] == "channels_last"  # on the CPU
    assert set(d["layout"]["speedup"]) == {"plain_step", "plain_forward"}


def test_layout_tiny():
    d = run_script("bench_layout.py", "--archs", "test_mobilenet_v2:1.0,test_resnet:1.0",
                   "--input-size", "16", "--threads", "1")
    assert len(d["nets"]) == 10 and d["threads"] == 1
    timed = ["eval_forward_speedup"]
    if d["channels_last_training_fault"] is None:
        timed.append("train_step_speedup")
    else:  # e.g. torch 2.14.1 on an AMD EPYC (Zen 3): the probe's child process aborted
        assert "crashes PyTorch" in d["channels_last_training_fault"]
        assert "train_step_speedup" not in d["summary"]
        assert all("train_step_speedup" not in r for r in d["nets"])
    for key in timed:
        s = d["summary"][key]
        assert s["of"] == 10 and 0 < s["min"] <= s["median"] <= s["max"]
        assert s["faster_in"] == sum(r[key] > 1 for r in d["nets"])
    assert all(r["macs"] > 0 and r["nchw_s"]["eval_forward"] > 0 for r in d["nets"])
