"""Evolutionary search over per-group channel widths (MetaPruning, Liu et al., ICCV 2019, §3.3).

A candidate is one level index per width group (its "gene"). The search keeps every candidate
it has scored and, each generation:

1. scores the new candidates with ``evaluate(candidate)`` (higher is better, e.g. held-out
   accuracy of the PruningNet's generated weights after BN recalibration);
2. keeps the top ``keep_top`` of *all* candidates seen so far and takes the top ``parents``;
3. makes ``mutants`` mutants (a random parent, each gene redrawn uniformly with probability
   ``mutation_prob``) and ``crossovers`` uniform crossovers (each gene from one of two random
   parents), rejecting any that violate the budget or were seen before — duplicates are never
   re-evaluated — with at most ``max_attempts`` draws per kind;
4. fills the rest of the population with random feasible candidates.

Generation 0 is ``population`` random feasible candidates. With the paper's defaults
(population 50, top 50, 10 parents, 25 + 25 children, p = 0.1, 20 generations) the search scores
at most 1000 candidates.

**Random feasible candidates.** A uniform draw rarely meets a tight budget (most of the space is
far above it), so a draw that violates it is *repaired*: a randomly chosen gene that is not at
level 0 is lowered by one level, repeatedly, until every budget is met. Budgets are monotone in
the widths and :func:`pruning.constraints.check_feasible` has shown that the all-level-0
candidate meets them, so the repair always terminates. Repaired candidates lie just under the
budget, where the good ones are.

**Using the budget** (``min_budget_use``, not in the paper; 0 turns it off). A user who asks for
a budget expects a network that spends it, as the uniform baseline does, yet a noisy accuracy
estimate can rank first a network that leaves a fifth of it unused. So every candidate must use
at least this share of its budgets (:func:`pruning.constraints.budget_use`, the largest
``value / limit``; capped at what the largest network uses): mutants and crossovers below it
are rejected like those above the budget, and a random candidate below it is widened, one
level of a random gene at a time, while every budget still holds (a candidate no gene of which
can widen is kept). In our measurements (``docs/benchmarks.md``) a floor of 0.9 raised the
picks that had used under 90 % of their budget (9 of 11 seed-runs) and did not help the others,
so it is off by default; ``metaprune prune`` notes a pick that leaves that much unused.

**Starting from the baseline** (``include_uniform``, not in the paper; off by default).
Generation 0 holds the uniform baseline (:func:`uniform_baseline`) beside ``population − 1``
random candidates, so the search's best scores at least as well as the network it is compared
with, and the next generations mutate and cross it with the best random ones. At tight budgets
the repaired random candidates sit far from uniform (many groups at level 0), and a short search
may otherwise end below the baseline's own score.

**Small spaces.** Every loop is bounded: when too few unseen feasible candidates exist, a
generation goes on with fewer, and a generation that cannot produce a single new candidate
ends the search early (``SearchResult.stopped_early``).

**Determinism and resuming.** All randomness comes from :func:`generation_rng`, a
``random.Random`` derived from ``(seed, generation)``; the candidates of a generation depend only
on it and on the records of earlier generations. The state (settings and every record) is
written as JSON after each generation — and also when ``evaluate`` raises, and at most every
``save_interval`` seconds mid-generation — atomically (temp file, fsync, ``os.replace``). A run
started with an existing ``state_path`` checks that the file belongs to the same space, budget
and settings, re-creates the interrupted generation, reuses the scores already recorded (it
never calls ``evaluate`` for them) and finishes with exactly the result an uninterrupted run
gives.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Protocol

from pruning import counting
from pruning.checkpoint import UnreadableFileError, atomic_write_json, differences
from pruning.constraints import (
    Constraint,
    InfeasibleBudgetError,
    budget_use,
    check_feasible,
    satisfies,
)
from pruning.space import Candidate, CandidateError, SearchSpace, same_space

STATE_FORMAT = "metaprune.evolve/1"

Evaluate = Callable[[Candidate], float]
Progress = Callable[[dict], None]


class SearchStateError(ValueError):
    """A search state file that is unreadable or belongs to a different search."""


# --- settings -------------------------------------------------------------------------------

MAX_COUNT = 10_000  # bound of population, keep_top, parents, mutants, crossovers, generations
MAX_ATTEMPTS = 10**6  # bound of max_attempts
MAX_BUDGET_USE = 0.95  # of min_budget_use: at 0.99 few mutants or crossovers meet it


OBJECTIVES = ("accuracy", "loss")
"""What the scores mean (:class:`pruning.evaluate.CandidateEvaluator`): held-out top-1
accuracy of the generated weights (the paper), or minus their held-out cross-entropy."""


def check_objective(objective: str) -> str:
    """``objective`` if it is one of :data:`OBJECTIVES`, else a ValueError naming them."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return objective


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SearchConfig:
    """Evolutionary-search settings; the defaults are the paper's (§3.3, Table 9 setup).

    ``max_attempts`` bounds the draws per kind (mutation, crossover, random fill) in one
    generation; ``None`` allows ten times the number wanted, as the official code does.
    ``min_budget_use`` and ``include_uniform``: see "Using the budget" and "Starting from the
    baseline" above. ``objective`` names what the scores
    measure (:data:`OBJECTIVES`); the search itself only maximises them, and records it so a
    resumed search never mixes two kinds of score.
    """

    population: int = 50
    keep_top: int = 50
    parents: int = 10
    mutants: int = 25
    mutation_prob: float = 0.1
    crossovers: int = 25
    generations: int = 20
    seed: int = 0
    max_attempts: int | None = None
    min_budget_use: float = 0.0
    objective: str = "accuracy"
    include_uniform: bool = False

    def __post_init__(self):
        for name in ("population", "keep_top", "parents", "generations"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= MAX_COUNT:
                raise ValueError(f"{name} must be an integer in [1, {MAX_COUNT}], got {v!r}")
        for name in ("mutants", "crossovers"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= MAX_COUNT:
                raise ValueError(f"{name} must be an integer in [0, {MAX_COUNT}], got {v!r}")
        if self.parents > self.keep_top:
            raise ValueError(f"parents ({self.parents}) cannot exceed keep_top ({self.keep_top}): "
                             "parents are taken from the kept top candidates")
        if self.mutants + self.crossovers > self.population:
            raise ValueError(f"mutants + crossovers ({self.mutants} + {self.crossovers}) cannot "
                             f"exceed the population ({self.population})")
        p = self.mutation_prob
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ValueError(f"mutation_prob must be a probability in [0, 1], got {p!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        check_objective(self.objective)
        if not isinstance(self.include_uniform, bool):  # ValueError: a bad setting (422)
            raise ValueError("include_uniform must be true or false, got "  # noqa: TRY004
                             f"{self.include_uniform!r}")
        u = self.min_budget_use
        if isinstance(u, bool) or not isinstance(u, int | float) or not 0 <= u <= MAX_BUDGET_USE:
            raise ValueError(f"min_budget_use must be a share of the budget in [0, "
                             f"{MAX_BUDGET_USE}], got {u!r} (nearer the budget too few networks "
                             f"are left for mutation and crossover: the search turns random)")
        if self.max_attempts is not None and (not _is_int(self.max_attempts)
                                              or not 1 <= self.max_attempts <= MAX_ATTEMPTS):
            raise ValueError(f"max_attempts must be an integer in [1, {MAX_ATTEMPTS}] or null, "
                             f"got {self.max_attempts!r}")

    def attempts(self, wanted: int) -> int:
        """Draws allowed to produce ``wanted`` candidates of one kind."""
        return 10 * wanted if self.max_attempts is None else self.max_attempts

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown search settings: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known - {'seed'}))}; the seed is the "
                             "run's)")
        return cls(**d)


# --- strategies -----------------------------------------------------------------------------

class Mutation(Protocol):
    def mutate(self, parent: Candidate, space: SearchSpace, rng: random.Random) -> Candidate: ...


class Crossover(Protocol):
    def cross(self, a: Candidate, b: Candidate, space: SearchSpace,
              rng: random.Random) -> Candidate: ...


@dataclass(frozen=True)
class UniformMutation:
    """Each gene is redrawn uniformly over all levels with probability ``prob``; it may draw its
    old level again (a per-gene change rate of ``prob`` × 30/31 with 31 levels), where the
    official code adds a random offset of 1–30 levels, so that a mutated gene always changes."""

    prob: float

    def mutate(self, parent: Candidate, space: SearchSpace, rng: random.Random) -> Candidate:
        n = space.num_levels
        return Candidate(tuple(rng.randrange(n) if rng.random() < self.prob else c
                               for c in parent.choices))


@dataclass(frozen=True)
class UniformCrossover:
    """Each gene is taken from either parent with probability ½."""

    def cross(self, a: Candidate, b: Candidate, space: SearchSpace,
              rng: random.Random) -> Candidate:
        return Candidate(tuple(x if rng.random() < 0.5 else y
                               for x, y in zip(a.choices, b.choices)))


def _strategy_identity(strategy) -> str:
    """A strategy as the state file names it: its ``repr`` (a dataclass's shows its settings),
    or its class's path where the ``repr`` is the default one (it shows a memory address, which
    differs in every process, so a resumed search would never match; such a strategy's own
    settings are not compared: give it a ``repr`` that shows them)."""
    if type(strategy).__repr__ is not object.__repr__:
        return repr(strategy)
    return f"{type(strategy).__module__}.{type(strategy).__qualname__}"


def generation_rng(seed: int, generation: int) -> random.Random:
    """The RNG of one generation, derived from ``(seed, generation)`` only (stable across
    processes and Python versions), so resuming needs no saved RNG state."""
    digest = hashlib.sha256(f"metaprune.evolve:{seed}:{generation}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def random_feasible(space: SearchSpace, constraints: Iterable[Constraint],
                    rng: random.Random, min_use: float = 0.0) -> Candidate:
    """A uniform random draw, repaired to meet every budget.

    While the candidate violates a budget, a random gene above level 0 is lowered by one level.
    Values are monotone in the widths, so this ends at the latest at the smallest candidate,
    which :func:`~pruning.constraints.check_feasible` has shown to be feasible. Then, while it
    uses less than ``min_use`` of its budgets (:func:`~pruning.constraints.budget_use`), a
    random gene below the top level is raised by one level where every budget still holds.
    """
    constraints = tuple(constraints)
    choices = [rng.randrange(space.num_levels) for _ in range(space.num_groups)]
    movable = [i for i, c in enumerate(choices) if c > 0]
    while not satisfies(space, Candidate(tuple(choices)), constraints):
        if not movable:
            raise InfeasibleBudgetError(
                f"the smallest candidate of {space.arch} violates "
                f"{', '.join(c.describe() for c in constraints)}")
        j = rng.randrange(len(movable))
        i = movable[j]
        choices[i] -= 1
        if choices[i] == 0:
            movable[j] = movable[-1]
            movable.pop()
    if min_use > 0:
        _widen(space, choices, constraints, min_use, rng)
    return Candidate(tuple(choices))


def _widen(space: SearchSpace, choices: list[int], constraints: tuple[Constraint, ...],
           min_use: float, rng: random.Random) -> None:
    """Raise random genes of the feasible ``choices`` (in place) one level at a time, keeping
    every budget, until they use ``min_use`` of it or no gene can widen."""
    top = space.num_levels - 1
    raisable = [i for i, c in enumerate(choices) if c < top]
    use = budget_use(space, Candidate(tuple(choices)), constraints)
    while raisable and use < min_use:
        j = rng.randrange(len(raisable))
        i = raisable[j]
        choices[i] += 1
        wider = Candidate(tuple(choices))
        fits = satisfies(space, wider, constraints)
        if fits:
            use = budget_use(space, wider, constraints)
        else:
            choices[i] -= 1
        if not fits or choices[i] == top:
            raisable[j] = raisable[-1]
            raisable.pop()


# --- records and results --------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One evaluated candidate. ``costs`` holds the value of every budget of the search."""

    key: str
    choices: tuple[int, ...]
    widths: dict[str, int]
    macs: int
    params: int
    score: float
    generation: int
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.choices)

    def to_dict(self) -> dict:
        return {"key": self.key, "choices": list(self.choices), "widths": dict(self.widths),
                "macs": self.macs, "params": self.params, "score": self.score,
                "generation": self.generation, "costs": dict(self.costs)}

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        return cls(key=d["key"], choices=tuple(d["choices"]), widths=dict(d["widths"]),
                   macs=d["macs"], params=d["params"], score=d["score"],
                   generation=d["generation"], costs=dict(d.get("costs", {})))


def _rank(records: Iterable[Record]) -> list[Record]:
    """Best first: higher score, then fewer MACs, then evaluated earlier (stable)."""
    return sorted(records, key=lambda r: (-r.score, r.macs))


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`evolve`: ``history`` holds every record in evaluation order,
    ``top`` the final top ``keep_top``, ``best`` the first of them."""

    best: Record
    history: tuple[Record, ...]
    top: tuple[Record, ...]
    generations: int
    stopped_early: bool
    config: SearchConfig
    space: dict
    constraints: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {"format": "metaprune.search_result/1", "best": self.best.key,
                "generations": self.generations, "stopped_early": self.stopped_early,
                "config": self.config.to_dict(), "space": self.space,
                "constraints": [dict(c) for c in self.constraints],
                "top": [r.key for r in self.top],
                "history": [r.to_dict() for r in self.history]}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> SearchResult:
        history = tuple(Record.from_dict(r) for r in d["history"])
        by_key = {r.key: r for r in history}
        return cls(best=by_key[d["best"]], history=history,
                   top=tuple(by_key[k] for k in d["top"]), generations=d["generations"],
                   stopped_early=d["stopped_early"], config=SearchConfig.from_dict(d["config"]),
                   space=d["space"], constraints=tuple(dict(c) for c in d["constraints"]))

    @classmethod
    def from_json(cls, text: str) -> SearchResult:
        return cls.from_dict(json.loads(text))


# --- the search -----------------------------------------------------------------------------

def _jsonable(x):
    """What ``x`` reads back as after a JSON round trip (tuples become lists, …)."""
    return json.loads(json.dumps(x))


class _Search:
    """The state of one run of :func:`evolve` (records, seen keys, the state file)."""

    def __init__(self, space, evaluate, constraints, config, state_path, progress, mutation,
                 crossover, save_interval):
        self.space, self.evaluate, self.constraints = space, evaluate, constraints
        self.config, self.progress = config, progress
        self.mutation, self.crossover = mutation, crossover
        self.state_path = Path(state_path) if state_path is not None else None
        self.save_interval = save_interval
        # no candidate uses more of the budget than the largest network does
        self.min_use = min(config.min_budget_use,
                           budget_use(space, space.largest(), constraints))
        self.header = _jsonable({
            "format": STATE_FORMAT,
            "space": space.to_dict(),
            "config": config.to_dict(),
            "constraints": [c.to_dict() for c in constraints],
            "strategies": {"mutation": _strategy_identity(mutation),
                           "crossover": _strategy_identity(crossover)},
        })
        self.records: list[Record] = []
        self.completed = 0  # generations fully evaluated
        self.finished = False
        self.stopped_early = False
        self.pending: list[Record] = []  # records of a generation interrupted before the resume
        self.last_save = time.monotonic()

    # --- state file -------------------------------------------------------------------------
    def save(self) -> None:
        if self.state_path is None:
            return
        atomic_write_json(self.state_path, {
            **self.header,
            "generation": self.completed - 1,  # the last fully evaluated generation
            "finished": self.finished,
            "stopped_early": self.stopped_early,
            "records": [r.to_dict() for r in self.records],
        })
        self.last_save = time.monotonic()

    def load(self) -> None:
        path = self.state_path
        try:
            state = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # as every damaged run file
            raise UnreadableFileError(path, e) from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SearchStateError(f"{path} is not a search state file ({STATE_FORMAT})")
        try:  # a file written before a setting existed holds its default
            state["config"] = _jsonable(SearchConfig.from_dict(state["config"]).to_dict())
        except (KeyError, TypeError, ValueError):
            pass  # reported as a different config below
        for part in ("space", "constraints", "strategies", "config"):
            same = same_space if part == "space" else operator.eq
            if not same(state.get(part), self.header[part]):
                raise SearchStateError(
                    f"search state {path} belongs to a different search: its {part} differs "
                    f"({_diff(state.get(part), self.header[part])}); use a new state path or "
                    "the original settings")
        try:
            completed = state["generation"] + 1
            records = [Record.from_dict(r) for r in state["records"]]
            finished, stopped = bool(state["finished"]), bool(state["stopped_early"])
        except (KeyError, TypeError, ValueError) as e:
            raise SearchStateError(f"search state {path} is malformed: {e!r}") from e
        keys = set()
        for r in records:
            try:
                self.space.check(r.candidate)
            except CandidateError as e:
                raise SearchStateError(f"search state {path}: {e}") from e
            if r.key != r.candidate.key() or r.key in keys or not 0 <= r.generation <= completed:
                raise SearchStateError(f"search state {path}: inconsistent record {r.key!r}")
            if isinstance(r.score, bool) or not isinstance(r.score, int | float) \
                    or not math.isfinite(r.score):
                raise SearchStateError(f"search state {path}: record {r.key!r} has no finite "
                                       f"score ({r.score!r})")
            again = self.record(r.candidate, r.score, r.generation)  # what it says of its network
            if not r.costs:  # a state written before the costs were recorded
                again = replace(again, costs={})
            if again != r or not satisfies(self.space, r.candidate, self.constraints):
                raise SearchStateError(f"search state {path}: record {r.key!r} does not hold "
                                       f"(its widths, MACs, params or costs are not its "
                                       f"network's, or it exceeds the budget)")
            keys.add(r.key)
        self.records = [r for r in records if r.generation < completed]
        self.pending = [r for r in records if r.generation == completed]
        if self.pending and finished:
            raise SearchStateError(f"search state {path}: a finished search has pending records")
        self.completed, self.finished, self.stopped_early = completed, finished, stopped

    # --- generations ------------------------------------------------------------------------
    def propose(self, generation: int) -> list[Candidate]:
        """The new candidates of one generation (depends on earlier records and the seed only)."""
        space, cons, cfg = self.space, self.constraints, self.config
        rng = generation_rng(cfg.seed, generation)
        seen = {r.key for r in self.records}
        new: list[Candidate] = []

        def offer(c: Candidate, widened: bool) -> bool:
            k = c.key()
            if k in seen or not satisfies(space, c, cons) or (
                    self.min_use > 0 and not widened
                    and budget_use(space, c, cons) < self.min_use):
                return False
            seen.add(k)
            new.append(c)
            return True

        def produce(wanted: int, draw: Callable[[], Candidate], widened: bool = False) -> None:
            made = 0
            for _ in range(cfg.attempts(wanted)):
                if made >= wanted:
                    return
                made += offer(draw(), widened)

        if generation > 0 and self.records:
            parents = [r.candidate for r in _rank(self.records)[:cfg.parents]]

            def pair() -> tuple[Candidate, Candidate]:
                return tuple(rng.sample(parents, 2)) if len(parents) > 1 else (parents[0],) * 2

            produce(cfg.mutants, lambda: self.mutation.mutate(rng.choice(parents), space, rng))
            produce(cfg.crossovers, lambda: self.crossover.cross(*pair(), space, rng))
        elif generation == 0 and cfg.include_uniform:
            offer(uniform_baseline(space, cons), widened=True)  # whatever share it uses
        produce(cfg.population - len(new),
                lambda: random_feasible(space, cons, rng, self.min_use), widened=True)
        return new

    def record(self, c: Candidate, score, generation: int) -> Record:
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise TypeError(f"evaluate must return a number, got {score!r}") from None
        if not math.isfinite(score):
            raise ValueError(f"evaluate returned {score} for candidate {c.key()}; scores must "
                             "be finite")
        space = self.space
        return Record(key=c.key(), choices=c.choices, widths=space.widths_by_group(c),
                      macs=counting.macs(space, c), params=counting.params(space, c),
                      score=score, generation=generation,
                      costs={k.name: k.value(space, c) for k in self.constraints})

    def run_generation(self, g: int) -> bool:
        """Evaluate generation ``g``; False when it has no new candidate (the search ends)."""
        candidates = self.propose(g)
        if not candidates:
            self.stopped_early = True
            return False
        reuse = {r.key: r for r in self.pending}
        if [c.key() for c in candidates[:len(self.pending)]] != list(reuse):
            raise SearchStateError(
                f"search state {self.state_path}: the recorded part of generation {g} does not "
                "match the candidates this search proposes (was the file edited?)")
        self.pending = []
        try:
            for c in candidates:
                rec = reuse.get(c.key()) or self.record(c, self.evaluate(c), g)
                self.records.append(rec)
                if time.monotonic() - self.last_save > self.save_interval:
                    self.save()
        except BaseException:
            self.save()  # keep the scores paid for; a resumed run will not evaluate them again
            raise
        return True

    def run(self) -> SearchResult:
        if self.state_path is not None and self.state_path.exists():
            self.load()
        cfg = self.config
        while not self.finished and self.completed < cfg.generations:
            g = self.completed
            if not self.run_generation(g):
                self.finished = True
                self.save()
                break
            self.completed += 1
            self.finished = self.completed == cfg.generations
            self.save()
            if self.progress is not None:
                best = _rank(self.records)[0]
                self.progress({
                    "generation": g, "generations": cfg.generations,
                    "evaluated": len(self.records),
                    "new": sum(r.generation == g for r in self.records),
                    "best_score": best.score, "best_macs": best.macs,
                    "best_params": best.params, "best_key": best.key})
        ranked = _rank(self.records)
        top = tuple(ranked[:cfg.keep_top])
        return SearchResult(best=top[0], history=tuple(self.records), top=top,
                            generations=self.completed, stopped_early=self.stopped_early,
                            config=cfg, space=self.header["space"],
                            constraints=tuple(self.header["constraints"]))


def _diff(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        return "; ".join(f"{k}: {a!r} in the file, {b!r} now" for k, a, b in differences(old, new))
    return f"{old!r} in the file, {new!r} now"


def evolve(space: SearchSpace, evaluate: Evaluate,
           constraints: Constraint | Iterable[Constraint],
           config: SearchConfig = SearchConfig(), state_path: str | os.PathLike | None = None,
           progress: Progress | None = None, *, mutation: Mutation | None = None,
           crossover: Crossover | None = None, save_interval: float = 60.0) -> SearchResult:
    """Search ``space`` for the candidate with the highest ``evaluate`` score under the budget.

    ``constraints`` is one :class:`~pruning.constraints.Constraint` or several (all must hold).
    An infeasible budget raises :class:`~pruning.constraints.InfeasibleBudgetError` before
    anything is evaluated. ``progress`` receives ``{generation, generations, evaluated, new,
    best_score, best_macs, best_params, best_key}`` after every generation. ``mutation`` and
    ``crossover`` default to :class:`UniformMutation` (``config.mutation_prob``) and
    :class:`UniformCrossover`. See the module docstring for the algorithm and resuming.
    """
    constraints = check_feasible(space, constraints)
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    mutation = mutation if mutation is not None else UniformMutation(config.mutation_prob)
    crossover = crossover if crossover is not None else UniformCrossover()
    return _Search(space, evaluate, constraints, config, state_path, progress, mutation,
                   crossover, save_interval).run()


def uniform_baseline(space: SearchSpace, constraints: Constraint | Iterable[Constraint]
                     ) -> Candidate:
    """The uniform-width candidate (every group at one level) with the largest MACs meeting
    every budget: the highest such level, since MACs are monotone in the level."""
    constraints = check_feasible(space, constraints)
    for level in reversed(range(space.num_levels)):
        c = space.uniform(level)
        if satisfies(space, c, constraints):
            return c
    raise InfeasibleBudgetError(  # unreachable for monotone budgets (level 0 passed above)
        f"no uniform candidate of {space.arch} meets "
        f"{', '.join(c.describe() for c in constraints)}")


__all__ = ["OBJECTIVES", "Crossover", "Mutation", "Record", "SearchConfig", "SearchResult",
           "SearchStateError", "UniformCrossover", "UniformMutation", "check_objective", "evolve",
           "generation_rng", "random_feasible", "uniform_baseline"]
