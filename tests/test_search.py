"""Evolutionary search, budgets and count parsing, on the tiny test architectures.

Scores are cheap synthetic functions of the candidate, so no training is needed: ``peak_score``
is 0 at a chosen target candidate and negative elsewhere; with a MACs budget equal to the
target's MACs the target is the known optimum under the budget.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import ClassVar

import pytest

from pruning import counting
from pruning.checkpoint import UnreadableFileError
from pruning.constraints import (
    Constraint,
    InfeasibleBudgetError,
    MacsConstraint,
    ParamsConstraint,
    budget_use,
    check_feasible,
    constraint_from_dict,
    format_count,
    parse_count,
)
from pruning.search import (
    Record,
    SearchConfig,
    SearchResult,
    SearchStateError,
    UniformCrossover,
    UniformMutation,
    evolve,
    generation_rng,
    random_feasible,
    uniform_baseline,
)
from pruning.space import Candidate, SearchSpace

pytestmark = pytest.mark.timeout(60)

SMALL = SearchConfig(population=16, keep_top=16, parents=4, mutants=6, crossovers=6,
                     generations=5)


@pytest.fixture(scope="module")
def resnet() -> SearchSpace:
    return SearchSpace.create("test_resnet")


@pytest.fixture(scope="module")
def mbv2() -> SearchSpace:
    return SearchSpace.create("test_mobilenet_v2")


def peak_score(target: Candidate):
    """0 at ``target``, minus the squared level distance elsewhere."""
    def score(c: Candidate) -> float:
        return -float(sum((a - b) ** 2 for a, b in zip(c.choices, target.choices)))
    return score


def target_budget(space: SearchSpace, seed: int = 0) -> tuple[Candidate, MacsConstraint]:
    target = space.random(random.Random(seed))
    return target, MacsConstraint(counting.macs(space, target))


class Interrupted(Exception):
    pass


class Counting:
    """Wraps a score function; counts and remembers calls; raises after ``fail_after`` calls."""

    def __init__(self, fn, fail_after: int | None = None):
        self.fn, self.fail_after, self.keys = fn, fail_after, []

    def __call__(self, c: Candidate) -> float:
        if self.fail_after is not None and len(self.keys) >= self.fail_after:
            raise Interrupted(f"killed after {self.fail_after} evaluations")
        self.keys.append(c.key())
        return self.fn(c)


# --- search quality and invariants ----------------------------------------------------------

@pytest.mark.parametrize("arch", ["test_resnet", "test_mobilenet_v2"])
def test_beats_uniform_baseline_within_budget(arch):
    space = SearchSpace.create(arch)
    target, budget = target_budget(space)
    score = peak_score(target)
    result = evolve(space, score, budget)
    base = uniform_baseline(space, budget)
    assert result.best.macs <= budget.limit
    assert result.best.score >= score(base)
    assert result.best.score > score(base)  # the target is not uniform: evolution must do better
    assert result.best.score >= -10  # near the known optimum (0 at the target)
    assert result.best == result.top[0] == max(result.history, key=lambda r: r.score)


def test_finds_known_optimum(resnet):
    target, budget = target_budget(resnet, seed=3)
    result = evolve(resnet, peak_score(target), budget)
    assert result.best.key == target.key() and result.best.score == 0


def test_every_record_is_feasible_unique_and_exact(mbv2):
    target, budget = target_budget(mbv2, seed=1)
    ev = Counting(peak_score(target))
    cfg = SearchConfig()
    result = evolve(mbv2, ev, budget, cfg)
    keys = [r.key for r in result.history]
    assert len(keys) == len(set(keys))  # duplicates are never re-evaluated
    assert ev.keys == keys  # evaluate called once per record, in history order
    assert len(keys) <= cfg.population * cfg.generations
    assert result.generations == cfg.generations and not result.stopped_early
    gens = [r.generation for r in result.history]
    assert gens == sorted(gens) and set(gens) == set(range(cfg.generations))
    for r in result.history:
        c = r.candidate
        assert r.key == c.key()
        assert r.macs == counting.macs(mbv2, c) <= budget.limit
        assert r.params == counting.params(mbv2, c)
        assert r.costs == {"macs": r.macs}
        assert r.widths == mbv2.widths_by_group(c)
    assert len(result.top) == cfg.keep_top
    scores = [r.score for r in result.top]
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] >= max(r.score for r in result.history if r not in result.top)


def test_same_seed_same_result_other_seed_other_history(resnet):
    target, budget = target_budget(resnet)
    score = peak_score(target)
    a = evolve(resnet, score, budget, SMALL)
    b = evolve(resnet, score, budget, SMALL)
    c = evolve(resnet, score, budget, SearchConfig(**{**SMALL.to_dict(), "seed": 1}))
    assert a == b
    assert [r.key for r in a.history] != [r.key for r in c.history]


def test_progress_reports_every_generation(resnet):
    target, budget = target_budget(resnet)
    events = []
    result = evolve(resnet, peak_score(target), budget, SMALL, progress=events.append)
    assert [e["generation"] for e in events] == list(range(SMALL.generations))
    assert {"generation", "generations", "evaluated", "best_score", "best_macs"} <= set(events[0])
    assert all(e["generations"] == SMALL.generations for e in events)
    best = [e["best_score"] for e in events]
    assert best == sorted(best)  # the best of all seen never gets worse
    assert events[-1]["evaluated"] == len(result.history)
    assert events[-1]["best_macs"] == result.best.macs


def test_result_json_round_trip(resnet):
    target, budget = target_budget(resnet)
    result = evolve(resnet, peak_score(target), budget, SMALL)
    text = result.to_json()
    back = SearchResult.from_json(text)
    assert back == result
    assert json.loads(back.to_json()) == json.loads(text)
    r = result.history[0]
    assert Record.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_non_finite_score_is_an_error(resnet):
    _, budget = target_budget(resnet)
    with pytest.raises(ValueError, match="finite"):
        evolve(resnet, lambda c: float("nan"), budget, SMALL)


# --- resuming -------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_after", [5, SMALL.population, 40])
def test_killed_search_resumes_identically(resnet, tmp_path, fail_after):
    target, budget = target_budget(resnet)
    score = peak_score(target)
    reference = evolve(resnet, score, budget, SMALL)
    state = tmp_path / "search.json"

    first = Counting(score, fail_after=fail_after)
    with pytest.raises(Interrupted):
        evolve(resnet, first, budget, SMALL, state_path=state)
    assert len(first.keys) == fail_after and state.exists()

    second = Counting(score)
    resumed = evolve(resnet, second, budget, SMALL, state_path=state)
    assert resumed == reference  # same best, same full history, same top
    assert not set(first.keys) & set(second.keys)  # nothing scored twice
    assert len(first.keys) + len(second.keys) == len(reference.history)

    third = Counting(score)  # a finished search resumes to its result without evaluating
    assert evolve(resnet, third, budget, SMALL, state_path=state) == reference
    assert third.keys == []


def test_resume_from_generation_checkpoint(resnet, tmp_path):
    """A hard kill (no chance to save) loses at most the running generation."""
    target, budget = target_budget(resnet)
    score = peak_score(target)
    state, copy = tmp_path / "state.json", tmp_path / "after_gen1.json"

    def snapshot(p):
        if p["generation"] == 1:
            copy.write_bytes(state.read_bytes())

    reference = evolve(resnet, score, budget, SMALL, state_path=state, progress=snapshot)
    saved = json.loads(copy.read_text())
    assert saved["generation"] == 1 and not saved["finished"]
    ev = Counting(score)
    assert evolve(resnet, ev, budget, SMALL, state_path=copy) == reference
    assert len(ev.keys) == len(reference.history) - len(saved["records"])


def test_state_file_is_json_not_pickle(resnet, tmp_path):
    target, budget = target_budget(resnet)
    state = tmp_path / "state.json"
    result = evolve(resnet, peak_score(target), budget, SMALL, state_path=state)
    raw = state.read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol 2+ header
    data = json.loads(raw.decode("utf-8"))
    assert data["space"] == resnet.to_dict() | {"levels": list(resnet.levels)}
    assert data["config"] == SMALL.to_dict()
    assert data["constraints"] == [{"name": "macs", "limit": budget.limit}]
    assert data["generation"] == SMALL.generations - 1 and data["finished"]
    assert [r["key"] for r in data["records"]] == [r.key for r in result.history]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp files left


@pytest.mark.parametrize("change", ["config", "constraints", "space"])
def test_resume_rejects_a_different_search(resnet, tmp_path, change):
    target, budget = target_budget(resnet)
    state = tmp_path / "state.json"
    evolve(resnet, peak_score(target), budget, SMALL, state_path=state)
    space, cfg = resnet, SMALL
    if change == "config":
        cfg = SearchConfig(**{**SMALL.to_dict(), "seed": 7})
    elif change == "constraints":
        budget = MacsConstraint(budget.limit + 1)
    else:
        space = SearchSpace.create("test_resnet", max_width_mult=1.5)
    ev = Counting(peak_score(target))
    with pytest.raises(SearchStateError, match=f"its {change} differs"):
        evolve(space, ev, budget, cfg, state_path=state)
    assert ev.keys == []


@pytest.mark.parametrize("edit, words", [
    ({"score": "0.9"}, "has no finite score"), ({"score": float("nan")}, "has no finite score"),
    ({"macs": 1}, "does not hold"), ({"widths": {}}, "does not hold"),
])
def test_resume_rejects_a_record_that_does_not_hold(resnet, tmp_path, edit, words):
    """A state file edited by hand (or damaged) is not resumed with a record whose score is
    not a number or whose MACs are not its network's: the pick would be reported wrong."""
    target, budget = target_budget(resnet)
    state = tmp_path / "state.json"
    evolve(resnet, peak_score(target), budget, SMALL, state_path=state)
    data = json.loads(state.read_text())
    data["records"][0].update(edit)
    state.write_text(json.dumps(data))
    with pytest.raises(SearchStateError, match=words):
        evolve(resnet, peak_score(target), budget, SMALL, state_path=state)


def test_resume_rejects_a_corrupt_file(resnet, tmp_path):
    _, budget = target_budget(resnet)
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(UnreadableFileError, match="state.json is unreadable, corrupt or truncated "
                                                  ".*; restore it, or delete it"):
        evolve(resnet, lambda c: 0.0, budget, SMALL, state_path=state)


# --- budgets --------------------------------------------------------------------------------

def test_infeasible_budget_fails_at_once(resnet, tmp_path):
    smallest = counting.macs(resnet, resnet.smallest())
    ev = Counting(lambda c: 0.0)
    with pytest.raises(InfeasibleBudgetError) as info:
        evolve(resnet, ev, MacsConstraint(smallest - 1), state_path=tmp_path / "s.json")
    msg = str(info.value)
    assert "test_resnet" in msg and format_count(smallest) in msg and f"{smallest:,}" in msg
    assert ev.keys == [] and not (tmp_path / "s.json").exists()
    assert isinstance(info.value, ValueError)
    with pytest.raises(InfeasibleBudgetError, match="params"):
        uniform_baseline(resnet, ParamsConstraint(10))
    check_feasible(resnet, MacsConstraint(smallest))  # exactly the smallest is feasible


@pytest.mark.parametrize("arch", ["test_resnet", "test_mobilenet_v2", "test_mobilenet_v1"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7, 1.0])
def test_uniform_baseline_is_the_largest_feasible_uniform(arch, fraction):
    space = SearchSpace.create(arch)
    lo, hi = (counting.macs(space, c) for c in (space.smallest(), space.largest()))
    budget = MacsConstraint(lo + fraction * (hi - lo))
    base = uniform_baseline(space, budget)
    level = base.choices[0]
    assert base == space.uniform(level) and budget.satisfied(space, base)
    if level + 1 < space.num_levels:
        assert not budget.satisfied(space, space.uniform(level + 1))
    else:
        assert fraction == 1.0


def test_params_budget(mbv2):
    target = mbv2.random(random.Random(2))
    budget = ParamsConstraint(counting.params(mbv2, target))
    result = evolve(mbv2, peak_score(target), budget, SMALL)
    assert all(r.params <= budget.limit and r.costs == {"params": r.params}
               for r in result.history)
    base = uniform_baseline(mbv2, budget)
    assert budget.satisfied(mbv2, base)
    assert not budget.satisfied(mbv2, mbv2.uniform(base.choices[0] + 1))


def test_several_budgets_all_hold(mbv2):
    target = mbv2.random(random.Random(4))
    budgets = [MacsConstraint(counting.macs(mbv2, target)),
               ParamsConstraint(counting.params(mbv2, target) * 0.8)]
    result = evolve(mbv2, peak_score(target), budgets, SMALL)
    assert all(r.macs <= budgets[0].limit and r.params <= budgets[1].limit
               for r in result.history)
    with pytest.raises(ValueError, match="once"):
        evolve(mbv2, peak_score(target), [budgets[0], budgets[0]], SMALL)


@dataclass(frozen=True)
class TableLatency(Constraint):
    """A stand-in for a latency lookup table: a per-group cost per channel."""

    limit: float
    per_channel: tuple[float, ...]
    name: ClassVar[str] = "table_latency"
    label: ClassVar[str] = "ms"

    def value(self, space, candidate):
        return sum(k * w for k, w in zip(self.per_channel, space.widths(candidate)))

    def to_dict(self):
        return {"name": self.name, "limit": self.limit, "per_channel": list(self.per_channel)}


def test_a_new_kind_of_budget_needs_no_search_change(resnet, tmp_path):
    table = tuple(0.01 * (i + 1) for i in range(resnet.num_groups))
    budget = TableLatency(limit=1.0, per_channel=table)
    target = random_feasible(resnet, [budget], random.Random(0))
    state = tmp_path / "s.json"
    result = evolve(resnet, peak_score(target), budget, SMALL, state_path=state)
    assert all(r.costs["table_latency"] <= 1.0 for r in result.history)
    assert evolve(resnet, Counting(peak_score(target)), budget, SMALL, state_path=state) == result


def test_constraint_round_trip_and_validation():
    for c in (MacsConstraint(1.5e6), ParamsConstraint(250_000)):
        assert constraint_from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert MacsConstraint(1.2e6).describe() == "MACs <= 1.2M"
    for bad in (0, -1, float("inf"), float("nan"), "10M", True):
        with pytest.raises(ValueError, match="limit"):
            MacsConstraint(bad)
    with pytest.raises(ValueError, match="unknown constraint"):
        constraint_from_dict({"name": "watts", "limit": 3})


# --- small spaces ---------------------------------------------------------------------------

def test_tiny_space_does_not_hang():
    space = SearchSpace.create("test_resnet", levels=(0.5, 1.0))  # 2**5 = 32 candidates
    every = [Candidate(tuple((i >> g) & 1 for g in range(space.num_groups)))
             for i in range(2 ** space.num_groups)]
    macs = sorted(counting.macs(space, c) for c in every)
    budget = MacsConstraint(macs[len(macs) // 2])
    feasible = {c.key() for c in every if budget.satisfied(space, c)}
    result = evolve(space, lambda c: float(sum(c.choices)), budget)  # the paper's defaults
    keys = [r.key for r in result.history]
    assert len(keys) == len(set(keys)) and set(keys) <= feasible
    assert set(keys) == feasible  # seed 0 finds all 17 within the bounded attempts
    assert result.stopped_early and result.generations < SearchConfig().generations


def test_single_candidate_space(resnet):
    space = SearchSpace.create("test_resnet", levels=(1.0,))
    ev = Counting(lambda c: 1.0)
    result = evolve(space, ev, MacsConstraint(1e12))
    assert ev.keys == [space.largest().key()] and result.best.candidate == space.largest()
    assert result.generations == 1 and result.stopped_early


# --- pieces ---------------------------------------------------------------------------------

def test_random_feasible_repairs_into_the_budget(mbv2):
    lo = counting.macs(mbv2, mbv2.smallest())
    budget = MacsConstraint(lo * 1.5)  # tight: a uniform draw almost never meets it
    rng = random.Random(0)
    draws = [random_feasible(mbv2, [budget], rng) for _ in range(50)]
    assert all(budget.satisfied(mbv2, c) for c in draws)
    assert len({c.key() for c in draws}) > 40
    again = random.Random(0)
    assert draws[:5] == [random_feasible(mbv2, [budget], again) for _ in range(5)]


def test_random_feasible_widens_to_the_budget(mbv2):
    full = counting.macs(mbv2, mbv2.largest())
    for share in (0.5, 0.25):
        budget = [MacsConstraint(full * share)]
        rng = random.Random(0)
        plain = [budget_use(mbv2, random_feasible(mbv2, budget, rng), budget) for _ in range(50)]
        assert min(plain) < 0.9  # without a floor, many random candidates waste the budget
        rng = random.Random(0)
        draws = [random_feasible(mbv2, budget, rng, min_use=0.9) for _ in range(50)]
        uses = [budget_use(mbv2, c, budget) for c in draws]
        assert all(0.9 <= u <= 1 for u in uses), uses
        assert len({c.key() for c in draws}) > 40


def test_search_keeps_to_the_budget_floor(mbv2):
    """Every candidate the search scores uses ≥ min_budget_use of the budget (or no gene of it
    can widen), and a score that favours small networks cannot pull it below."""
    full = counting.macs(mbv2, mbv2.largest())
    budget = MacsConstraint(full * 0.5)

    def smallest_first(c: Candidate) -> float:
        return -float(counting.macs(mbv2, c))

    cfg = SearchConfig(**{**SMALL.to_dict(), "min_budget_use": 0.95})
    result = evolve(mbv2, smallest_first, budget, cfg)
    for r in result.history:
        use = r.macs / budget.limit
        assert use <= 1
        if use < 0.95:  # only a random candidate that cannot widen any gene
            wider = [Candidate(r.choices[:i] + (x + 1,) + r.choices[i + 1:])
                     for i, x in enumerate(r.choices) if x + 1 < mbv2.num_levels]
            assert not any(budget.satisfied(mbv2, w) for w in wider), r.key
    assert result.best.macs >= 0.9 * budget.limit
    free = evolve(mbv2, smallest_first, budget, SMALL)  # the paper's search: no floor
    assert free.best.macs < 0.5 * budget.limit


def test_budget_floor_is_capped_by_the_largest_network(resnet):
    """A budget above the full network: the floor asks only for what the largest one uses."""
    budget = MacsConstraint(counting.macs(resnet, resnet.largest()) * 2)
    cfg = SearchConfig(**{**SMALL.to_dict(), "min_budget_use": 0.9})
    result = evolve(resnet, lambda c: 0.0, budget, cfg)
    assert [r.key for r in result.history] == [resnet.largest().key()]


def test_search_can_start_from_the_uniform_baseline(mbv2):
    """include_uniform: generation 0 scores the uniform baseline first, so the best is never
    below it; a score that peaks at uniform keeps it as the best; off, a tight budget's random
    candidates miss it."""
    budget = MacsConstraint(counting.macs(mbv2, mbv2.largest()) * 0.1)
    uniform = uniform_baseline(mbv2, budget)
    score = peak_score(uniform)
    cfg = SearchConfig(**{**SMALL.to_dict(), "include_uniform": True})
    result = evolve(mbv2, score, budget, cfg)
    first = [r for r in result.history if r.generation == 0]
    assert first[0].key == uniform.key() and len(first) == cfg.population
    assert result.best.key == uniform.key()
    paper = evolve(mbv2, score, budget, SMALL)
    assert uniform.key() not in {r.key for r in paper.history}
    assert paper.best.score < result.best.score


def test_resume_a_state_file_written_before_the_new_settings(resnet, tmp_path):
    target, budget = target_budget(resnet)
    state = tmp_path / "state.json"
    reference = evolve(resnet, peak_score(target), budget, SMALL, state_path=state)
    old = json.loads(state.read_text())
    for name in ("min_budget_use", "objective", "include_uniform"):
        del old["config"][name]
    state.write_text(json.dumps(old))
    ev = Counting(peak_score(target))
    assert evolve(resnet, ev, budget, SMALL, state_path=state) == reference and ev.keys == []


class StepMutation:
    """A user's strategy: a plain class, whose default repr shows a memory address."""

    def mutate(self, parent, space, rng):
        i = rng.randrange(space.num_groups)
        choices = list(parent.choices)
        choices[i] = max(0, choices[i] - 1)
        return type(parent)(tuple(choices))


def test_a_search_with_a_user_s_strategy_resumes(resnet, tmp_path):
    """A new instance of the same class (a new process) resumes the state file."""
    target, budget = target_budget(resnet)
    score = peak_score(target)
    reference = evolve(resnet, score, budget, SMALL, mutation=StepMutation())
    state = tmp_path / "search.json"
    with pytest.raises(Interrupted):
        evolve(resnet, Counting(score, fail_after=20), budget, SMALL, state_path=state,
               mutation=StepMutation())
    assert json.loads(state.read_text())["strategies"]["mutation"] == \
        f"{__name__}.StepMutation"
    assert evolve(resnet, Counting(score), budget, SMALL, state_path=state,
                  mutation=StepMutation()) == reference
    with pytest.raises(SearchStateError, match="strategies differs"):  # another strategy
        evolve(resnet, score, budget, SMALL, state_path=state, mutation=UniformMutation(0.2))


def test_strategies(resnet):
    rng = random.Random(0)
    parent = resnet.random(rng)
    assert UniformMutation(0.0).mutate(parent, resnet, rng) == parent
    mutants = [UniformMutation(1.0).mutate(parent, resnet, rng) for _ in range(20)]
    assert all(0 <= x < resnet.num_levels for m in mutants for x in m.choices)
    assert any(m != parent for m in mutants)
    other = resnet.random(rng)
    for _ in range(20):
        child = UniformCrossover().cross(parent, other, resnet, rng)
        assert all(x in (a, b) for x, a, b in zip(child.choices, parent.choices, other.choices))
    assert generation_rng(0, 3).random() == generation_rng(0, 3).random()
    assert generation_rng(0, 3).random() != generation_rng(0, 4).random()


@pytest.mark.parametrize("kwargs, match", [
    ({"parents": 60}, "parents"),
    ({"mutation_prob": 1.5}, "mutation_prob"),
    ({"mutation_prob": -0.1}, "mutation_prob"),
    ({"population": 0}, "population"),
    ({"generations": 0}, "generations"),
    ({"mutants": -1}, "mutants"),
    ({"mutants": 40, "crossovers": 20}, "exceed the population"),
    ({"keep_top": 2.5}, "keep_top"),
    ({"seed": "0"}, "seed"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"population": True}, "population"),
    ({"min_budget_use": 1.5}, "min_budget_use"),
    ({"min_budget_use": 0.99}, "the search turns random"),
    ({"min_budget_use": True}, "min_budget_use"),
    ({"objective": "top5"}, "objective must be one of accuracy, loss"),
    ({"include_uniform": 1}, "include_uniform must be true or false"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_config_defaults_and_round_trip():
    cfg = SearchConfig()
    assert (cfg.population, cfg.keep_top, cfg.parents, cfg.mutants, cfg.mutation_prob,
            cfg.crossovers, cfg.generations) == (50, 50, 10, 25, 0.1, 25, 20)
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.attempts(25) == 250 and SearchConfig(max_attempts=7).attempts(25) == 7
    with pytest.raises(ValueError, match="unknown"):
        SearchConfig.from_dict({"populaton": 3})


@pytest.mark.parametrize("text, value", [
    ("12345", 12345), ("250k", 250_000), ("250K", 250_000), ("10M", 10_000_000),
    ("1.5G", 1_500_000_000), ("300m", 300_000_000), ("2e6", 2_000_000), (" 1_000 ", 1000),
    ("0.5k", 500), ("1T", 10**12), (42, 42),
])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5", "1,5M", "10MB", "1.2345k", "M", "1e30",
                                  None, 1.5, True])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)


def test_a_negative_count_is_named_so():
    with pytest.raises(ValueError, match="a count cannot be negative: '-5k'"):
        parse_count("-5k")


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1k"), (12345, "12.3k"), (10_000_000, "10M"),
    (1.5e9, "1.5G"), (3_401_234, "3.4M"), (999_999, "1M"), (250_000, "250k"),
])
def test_format_count(n, text):
    assert format_count(n) == text
    if n:
        assert math.isclose(parse_count(text), n, rel_tol=5e-3)
