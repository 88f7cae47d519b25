"""Latency budgets: the per-layer table (cache, corruption, monotonicity, correlation with
measured time), the ``latency`` constraint in the search, the pipeline report and the CLI."""

from __future__ import annotations

import json
import random

import pytest

from pruning import cli, latency
from pruning.constraints import InfeasibleBudgetError, check_feasible, constraint_from_dict
from pruning.latency import LatencyConstraint, LatencyTable, measure_latency
from pruning.modules import build
from pruning.pipeline import Budget, PipelineSpec, run
from pruning.search import SearchConfig, evolve
from pruning.space import Candidate, SearchSpace

pytestmark = pytest.mark.usefixtures("single_thread")

ARCH = "test_mobilenet_v2"
SMALL = SearchConfig(population=6, keep_top=6, parents=3, mutants=3, crossovers=3,
                     generations=2, seed=0)


@pytest.fixture(scope="module")
def space():
    return SearchSpace.create(ARCH, num_classes=10, in_channels=1, input_size=16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")


@pytest.fixture(scope="module")
def table(single_thread, space, cache):
    return LatencyTable.build(space, cache_dir=cache, max_points=4, repeats=3)


def _end_to_end_as(table, factor):
    """A stand-in for timing the smallest and the largest candidate: their layers' sums ×
    factor."""
    return lambda space, *a: [factor * t for t in table.layer_sums()]


def test_second_build_loads_the_cache_without_measuring(table, space, cache, monkeypatch):
    assert not table.from_cache and table.path.exists() and table.path.parent == cache
    layers = []
    monkeypatch.setattr(latency, "_runner", lambda *a, **k: layers.append(1) or (lambda: None))
    monkeypatch.setattr(latency, "_extremes_ms", _end_to_end_as(table, 1.0))
    again = LatencyTable.build(space, cache_dir=cache, max_points=4, repeats=3)
    assert layers == [] and again.from_cache and again == table
    assert again.predict(space, space.largest()) == table.predict(space, space.largest())
    json.loads(table.path.read_text())  # plain JSON


def test_a_cached_table_measured_under_load_is_measured_again(table, space, tmp_path,
                                                              monkeypatch):
    """A table whose layers alone add up to more than 1.5× what the smallest or the largest
    candidate runs in end to end was measured on a busy machine: it is measured again, and
    replaced. One that predicts faster than now is kept (the machine is the busy one then)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    path = LatencyTable.cache_path(table.key, cache)
    path.write_bytes(table.path.read_bytes())
    layers = []
    monkeypatch.setattr(latency, "_runner", lambda *a, **k: layers.append(1) or (lambda: None))
    monkeypatch.setattr(latency, "_time_ms", lambda *a, **k: 0.01)
    for factor in (0.7, 5.0):  # now a little faster than the layers' sum, or slower: kept
        monkeypatch.setattr(latency, "_extremes_ms", _end_to_end_as(table, factor))
        assert LatencyTable.build(space, cache_dir=cache, max_points=4, repeats=3) == table
    assert layers == []
    sums = table.layer_sums()
    monkeypatch.setattr(latency, "_extremes_ms",  # only the largest's layers are off
                        lambda space, *a: [sums[0], sums[1] / 2])
    with pytest.warns(RuntimeWarning, match="timed on a busy machine"):
        fresh = LatencyTable.build(space, cache_dir=cache, max_points=4, repeats=3)
    assert layers and not fresh.from_cache and fresh != table
    assert LatencyTable.load(path).digest == fresh.digest  # the cache file was replaced


def test_a_table_measured_under_load_is_measured_again_at_once(space, tmp_path, monkeypatch):
    """A table just measured whose layers alone add up to over 1.5× what the smallest or the
    largest candidate runs in end to end (the machine was busy while the layers were timed) is
    measured once more, with four times the runs; if that one is no better, the build stops
    with MachineBusyError and caches nothing."""
    from pruning.machine import MachineBusyError

    busy = [True, True]  # per measuring pass
    passes = []
    real = latency._measure_layers

    def measure(*args):
        passes.append(args[4])  # the runs per grid point
        return real(*args)

    monkeypatch.setattr(latency, "_measure_layers", measure)
    monkeypatch.setattr(latency, "_runner", lambda *a, **k: (lambda: None))
    monkeypatch.setattr(latency, "_time_ms", lambda *a, **k: 5.0 if busy[len(passes) - 1]
                        else 0.001)
    monkeypatch.setattr(latency, "_extremes_ms", lambda space, *a: [0.05, 0.5])
    busy[1] = False
    with pytest.warns(RuntimeWarning, match="just measured add up to .* measuring again"):
        fresh = LatencyTable.build(space, cache_dir=tmp_path / "a", max_points=4, repeats=2)
    assert passes == [2, 8] and fresh.predict(space, space.largest()) < 1.5 * 0.5
    passes.clear()
    busy[1] = True
    with pytest.warns(RuntimeWarning), pytest.raises(MachineBusyError, match="too busy"):
        LatencyTable.build(space, cache_dir=tmp_path / "b", max_points=4, repeats=2)
    assert len(passes) == 2 and not list((tmp_path / "b").glob("*"))


def test_timing_takes_the_fastest_run_and_flags_a_spread(monkeypatch):
    """Load only adds time: a table entry is the fastest run, and a spread of runs (here one
    in three stalled 40×) is flagged as a busy machine."""
    ticks = iter([0.0, 1.0] + [x for i in range(9) for x in (0.0, 40.0 if i % 3 == 2 else 1.0)])
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(ticks))
    timing = latency._timing(lambda: None, latency.torch.device("cpu"), repeats=9, warmup=0,
                             min_run_s=0.5)
    assert timing.fastest == 1000.0 and timing.median == 1000.0 and timing.p90 == 40000.0
    assert timing.busy and not latency.Timing(1.0, 1.1, 1.2).busy


def test_env_cache_dir(space, tmp_path, monkeypatch):
    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(tmp_path))
    key = LatencyTable.make_key(space)
    assert LatencyTable.cache_path(key).parent == tmp_path


def test_corrupted_cache_is_rebuilt(table, space, tmp_path, monkeypatch):
    path = LatencyTable.cache_path(table.key, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"format": "metaprune.latency_table/1", "key": ')
    calls = []
    monkeypatch.setattr(latency, "_time_ms", lambda *a, **k: calls.append(1) or 0.5)
    monkeypatch.setattr(latency, "_extremes_ms", lambda space, *a: [50.0, 50.0])
    with pytest.warns(RuntimeWarning, match="ignoring the cached latency table"):
        rebuilt = LatencyTable.build(space, cache_dir=tmp_path, max_points=4, repeats=3)
    assert calls and not rebuilt.from_cache
    assert LatencyTable.load(path).digest == rebuilt.digest  # the file was rewritten


def test_an_unwritable_cache_costs_only_the_cache(space, tmp_path, monkeypatch):
    """The table just measured is used all the same; the warning names the setting to fix."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache folder would have to be made under a file
    monkeypatch.setattr(latency, "_time_ms", lambda *a, **k: 0.5)
    monkeypatch.setattr(latency, "_extremes_ms", lambda space, *a: [50.0, 50.0])
    with pytest.warns(RuntimeWarning, match="could not cache the latency table in .*a-file.*; "
                                            "set METAPRUNE_CACHE_DIR to a writable folder"):
        table = LatencyTable.build(space, cache_dir=blocked, max_points=4, repeats=3)
    assert table.predict(space, space.largest()) > 0 and not table.from_cache


def test_predict_is_monotone_in_every_group(table, space):
    rng = random.Random(0)
    for _ in range(30):
        c = list(space.random(rng).choices)
        base = table.predict(space, Candidate(tuple(c)))
        for g in range(space.num_groups):
            if c[g] + 1 < space.num_levels:
                up = c.copy()
                up[g] += 1
                assert table.predict(space, Candidate(tuple(up))) >= base - 1e-12
    assert table.predict(space, space.smallest()) > 0


def test_monotone_even_for_a_noisy_table(space, tmp_path, monkeypatch):
    rng = random.Random(1)
    monkeypatch.setattr(latency, "_time_ms", lambda *a, **k: rng.random())
    monkeypatch.setattr(latency, "_extremes_ms", lambda space, *a: [50.0, 50.0])
    noisy = LatencyTable.build(space, cache_dir=tmp_path, max_points=4, repeats=1)
    for level in range(space.num_levels - 1):
        assert noisy.predict(space, space.uniform(level)) <= noisy.predict(
            space, space.uniform(level + 1)) + 1e-12


def test_predicted_tracks_measured(table, space):
    """Predictions order the smallest and largest net as measurement does, and the largest's
    prediction is within a factor of 5 of its measured latency. At batch 1 these tiny nets are
    bound by per-operator overhead (measured 1.7 vs 1.8 ms on CPU-2), so the measured order is
    taken at batch 32, where their arithmetic differs, as the least of three interleaved runs
    (robust to other load on a shared machine)."""
    small, large = space.smallest(), space.largest()
    p_s, p_l = table.predict(space, small), table.predict(space, large)
    nets = {"small": build(space, small), "large": build(space, large)}
    runs = {k: [] for k in nets}
    for _ in range(3):
        for k, net in nets.items():
            runs[k].append(measure_latency(net, (1, 16, 16), batch=32, repeats=5).fastest)
    assert p_l > 1.1 * p_s and min(runs["large"]) > 1.1 * min(runs["small"])
    assert 0.2 < p_l / measure_latency(nets["large"], (1, 16, 16)).median < 5


def test_latency_constraint_in_evolve(table, space, tmp_path):
    lo, hi = table.predict(space, space.smallest()), table.predict(space, space.largest())
    budget = LatencyConstraint(lo + 0.4 * (hi - lo), table)
    assert budget.describe().endswith(" ms")
    result = evolve(space, lambda c: sum(c.choices), budget, SMALL, state_path=tmp_path / "s.json")
    assert all(r.costs["latency"] <= budget.limit for r in result.history)
    # the state file round-trips, and the constraint rebuilds from its dict (cached table)
    assert evolve(space, lambda c: sum(c.choices), budget, SMALL,
                  state_path=tmp_path / "s.json") == result
    d = json.loads(json.dumps(budget.to_dict()))
    assert constraint_from_dict({**d, "cache_dir": str(table.path.parent)}) == budget


def test_infeasible_latency_budget_fails_at_once(table, space):
    smallest = table.predict(space, space.smallest())
    with pytest.raises(InfeasibleBudgetError) as e:
        check_feasible(space, LatencyConstraint(smallest / 2, table))
    msg = str(e.value)
    assert "latency budget" in msg and " ms is infeasible" in msg
    assert f"the smallest candidate needs {smallest:.4g} ms" in msg
    with pytest.raises(ValueError, match="limit"):
        LatencyConstraint(0, table)


def test_pipeline_reports_predicted_and_measured_latency(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        budget=Budget(latency_ratio=0.9),  # tiny net: level 0 needs ~0.8x
                        min_channels=1,  # the table's space (a floor leaves no room here)
                        metanet={"epochs": 1},
                        search={"population": 4, "keep_top": 4, "parents": 2, "mutants": 2,
                                "crossovers": 2, "generations": 1})
    report = run(spec, tmp_path / "run")
    limit = report["budget"]["latency"]
    for name in ("metapruning", "uniform"):
        lat = report[name]["latency_ms"]
        assert lat["predicted"] <= limit + 1e-4 and lat["measured"] > 0
        assert report[name]["budget_use"] == pytest.approx(lat["predicted"] / limit, abs=1e-3)
    assert (tmp_path / "run" / "latency_table.json").exists()
    saved = json.loads((tmp_path / "run" / "artifacts" / "report.json").read_text())
    assert saved["metapruning"]["latency_ms"] == report["metapruning"]["latency_ms"]
    measured_s = report["latency_table"]["measured_s"]
    assert measured_s > 0
    again = run(spec, tmp_path / "again")  # the table of this device and space is cached now
    assert again["latency_table"]["measured_s"] == measured_s  # what measuring it took
    # the CLI's summary names the budget in milliseconds and gives both latencies per network
    cli._print_summary(report, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert f"budget latency ≤ {limit:.2f} ms (batch 1)" in out
    for name, key in (("MetaPruning", "metapruning"), ("uniform", "uniform")):
        lat = report[key]["latency_ms"]
        assert (f"latency {lat['predicted']:.2f} ms predicted, {lat['measured']:.2f} ms measured"
                in next(line for line in out.splitlines() if line.strip().startswith(name)))


def test_an_infeasible_latency_ratio_names_the_smallest_ratio(tmp_path, monkeypatch):
    """The hint divides by the full network's predicted latency from the run's own table (the
    1.0× network's space is another one, which the table refuses)."""
    from pruning.constraints import InfeasibleBudgetError
    from pruning.pipeline import prepare

    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        budget=Budget(latency_ratio=0.05))
    with pytest.raises(InfeasibleBudgetError, match=r"as a latency_ratio \(--latency-ratio\): "
                                                    r"at least 0\.\d+$"):
        prepare(spec, tmp_path / "run")


def test_measuring_a_table_shows_progress_and_stops_when_asked(tmp_path, monkeypatch):
    """A run's table takes seconds to minutes to measure: its layers are reported as progress,
    and a cancel (``should_stop``) stops it between two layers, leaving no run folder."""
    from pruning.pipeline import prepare
    from pruning.train import Cancelled

    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    events = []
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        budget=Budget(latency_ratio=0.9))
    with pytest.raises(Cancelled):
        prepare(spec, tmp_path / "run", progress=events.append,
                should_stop=lambda: sum("step" in e for e in events) >= 2)
    steps = [e for e in events if e.get("stage") == "latency" and "step" in e]
    assert len(steps) == 2 and steps[0]["total"] > steps[-1]["step"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_budget_validation():
    with pytest.raises(ValueError, match="exactly one budget"):
        Budget(latency_ms=2.0, macs_ratio=0.5)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            Budget(latency_ms=bad)


@pytest.mark.parametrize("value", ["-1", "0", "abc", "nan"])
def test_cli_bad_latency_is_a_one_line_error(capsys, tmp_path, value):
    status = cli.main(["prune", "--arch", ARCH, f"--max-latency-ms={value}", "--quiet",
                       "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("metaprune: error: --max-latency-ms")
    assert not (tmp_path / "run").exists()


def test_cli_measure_latency(capsys, tmp_path, monkeypatch):
    """``measure --latency`` shows the table's progress, and gives the prediction beside the
    measured median, fastest and 90th percentile run; ``--latency-table`` predicts with a given
    table (a run's) instead, and a table of another space is a one-line error."""
    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(tmp_path))
    assert cli.main(["measure", ARCH, "--input-size", "16", "--latency"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)["latency_ms"]
    assert out["predicted"] > 0 and 0 < out["measured_fastest"] <= out["measured"] <= \
        out["measured_p90"]
    assert "[latency] 1/" in captured.err
    cached = next(tmp_path.glob("*.json"))
    table = LatencyTable.load(cached)  # a table of its own: its predictions show through
    LatencyTable(table.space, table.key, table.measurements,
                 overhead_ms=table.overhead_ms + 100.0).save(tmp_path / "run-table.json")
    assert cli.main(["measure", ARCH, "--input-size", "16",
                     "--latency-table", str(tmp_path / "run-table.json")]) == 0
    again = json.loads(capsys.readouterr().out)["latency_ms"]
    assert again["predicted"] == pytest.approx(out["predicted"] + 100.0, abs=1e-3)
    assert cli.main(["measure", ARCH, "--input-size", "24",
                     "--latency-table", str(tmp_path / "run-table.json")]) == 2
    err = capsys.readouterr().err
    assert "another search space (arch_args.input_size: 16 in the table, 24 here)" in err
    assert err.count("\n") == 1


def test_a_report_flags_a_busy_or_another_device(table, space, monkeypatch):
    net = build(space, space.largest())
    steady = latency.Timing(1.0, 1.05, 1.1)
    monkeypatch.setattr(latency, "measure_latency", lambda *a, **k: steady)
    entry = latency.predicted_and_measured(table, space, space.largest(), net)
    assert entry["measured"] == 1.05 and entry["measured_fastest"] == 1.0
    assert "warning" not in entry
    monkeypatch.setattr(latency, "measure_latency", lambda *a, **k: latency.Timing(1.0, 1.2, 9.0))
    monkeypatch.setenv("METAPRUNE_LATENCY_THREADS", "7")  # not the table's threads
    warning = latency.predicted_and_measured(table, space, space.largest(), net)["warning"]
    assert warning.startswith("the machine was busy while measuring (runs took 1 to 9 ms)")
    assert "measured on cpu:" in warning and ":7 threads, but the table on " in warning


def test_cpu_latency_is_measured_on_one_thread_unless_set(space, monkeypatch):
    """One thread times steadily beside other work; ``METAPRUNE_LATENCY_THREADS`` asks for
    more; torch's own thread count is restored afterwards, and the table's key names the
    measuring threads."""
    import torch

    seen = []
    real = latency._timing
    monkeypatch.setattr(latency, "_timing", lambda *a, **k: seen.append(
        torch.get_num_threads()) or real(*a, **k))
    net = build(space, space.smallest())
    torch.set_num_threads(2)
    try:
        measure_latency(net, (1, 16, 16), repeats=2)
        monkeypatch.setenv("METAPRUNE_LATENCY_THREADS", "2")
        measure_latency(net, (1, 16, 16), repeats=2)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        assert latency.device_name("cpu").endswith(":2 threads")
    finally:
        torch.set_num_threads(1)
    monkeypatch.setenv("METAPRUNE_LATENCY_THREADS", "0")
    with pytest.raises(ValueError, match="METAPRUNE_LATENCY_THREADS must be a whole number"):
        latency.device_name("cpu")


def test_a_latency_with_a_unit_is_explained(capsys, tmp_path):
    status = cli.main(["prune", "--arch", ARCH, "--max-latency-ms", "5ms", "--quiet",
                       "--out", str(tmp_path / "run")])
    assert status == 2 and capsys.readouterr().err == (
        "metaprune: error: --max-latency-ms: not a number: '5ms' (a plain number: "
        "milliseconds, or a ratio)\n")


def test_cli_shows_its_own_warnings_in_one_line(capsys, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(blocked))
    monkeypatch.setattr(latency, "_time_ms", lambda *a, **k: 0.5)
    monkeypatch.setattr(latency, "_extremes_ms", lambda space, *a: [50.0, 50.0])  # consistent
    assert cli.main(["measure", ARCH, "--input-size", "16", "--latency"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("[latency] ")]  # the table's progress
    assert len(err) == 1
    assert err[0].startswith(f"metaprune: warning: could not cache the latency table in {blocked} ")
    assert err[0].endswith("set METAPRUNE_CACHE_DIR to a writable folder")


def test_a_latency_ratio_needs_the_full_network_in_its_space(tmp_path, monkeypatch):
    """Its table measures the space only: a 0.5× space's table would take its own largest
    network for the full one (clamped), so the ratio is refused before anything is measured."""
    from pruning.constraints import BudgetError
    from pruning.pipeline import prepare

    monkeypatch.setenv("METAPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = PipelineSpec(arch=ARCH, dataset="synthetic", preset="smoke", device="cpu",
                        max_width_mult=0.5, budget=Budget(latency_ratio=0.9))
    for check in (spec.check_budget, lambda: prepare(spec, tmp_path / "run")):
        with pytest.raises(BudgetError, match=r"relative to the full \(1.0×\) network, which a "
                                              r"space of max_width_mult 0.5 does not hold"):
            check()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
