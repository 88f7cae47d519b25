"""Budgets as small strategy objects: MACs, parameters, and (later) measured latency.

A :class:`Constraint` maps a candidate to one number with :meth:`~Constraint.value` and is
met when that number is at most its ``limit``. The search only calls ``value``/``satisfied``
and serialises ``to_dict()``, so a new kind of budget (a per-layer latency table lookup, say)
joins by subclassing and registering itself with :func:`register_constraint`; no search code
changes.

Every built-in value is **monotone in the widths**: widening any group never lowers it. So the
smallest candidate (every group at level 0) has the smallest value of the whole space, and a
budget it violates can never be met; :func:`check_feasible` says so at once, with the number
the budget would have to allow. A new constraint must keep this property (the search's repair
step and :func:`check_feasible` rely on it).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import ClassVar

from pruning import counting
from pruning.space import Candidate, SearchSpace


class BudgetError(ValueError):
    """A budget a pruning run cannot work with (a mistake in the input, not a crash)."""


class InfeasibleBudgetError(BudgetError):
    """No candidate of the space meets the budget (not even the smallest one)."""


class LooseBudgetError(BudgetError):
    """Every candidate of the space meets the budget (even the largest): nothing to prune."""


class TightBudgetError(BudgetError):
    """Only the smallest network meets the budget: nothing to search."""


# --- human-readable counts ------------------------------------------------------------------

_UNITS = (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3))
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
MAX_COUNT = 10**18
# ASCII digits (\d takes any script's), "_" only between digits as in Python's literals
_DIGITS = r"[0-9](?:_?[0-9])*"
_COUNT_RE = re.compile(rf"^\s*\+?({_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})"
                       rf"(?:[eE]([+-]?{_DIGITS}))?\s*([kKmMgGtT]?)\s*$")


def format_count(n: float, digits: int = 3) -> str:
    """``n`` with a decimal unit and ``digits`` significant digits: 12345 → ``"12.3k"``,
    10_000_000 → ``"10M"``, 1.5e9 → ``"1.5G"``, 999 → ``"999"``."""
    if not math.isfinite(n):
        return str(n)
    sign, n = ("-" if n < 0 else ""), abs(n)
    for i, (suffix, scale) in enumerate(_UNITS):
        if n >= scale:
            text = f"{n / scale:.{digits}g}"
            if float(text) >= 1000 and i > 0:  # 999_999 rounds up to the next unit: "1M"
                suffix, scale = _UNITS[i - 1]
                text = f"{n / scale:.{digits}g}"
            return f"{sign}{_plain(text)}{suffix}"
    if n == int(n):
        return f"{sign}{int(n)}"
    text = _plain(f"{n:.{digits}g}")
    if float(text) >= 1000:  # 999.5 rounds up to the next unit: "1k"
        return f"{sign}{_plain(f'{n / 1000:.{digits}g}')}k"
    return f"{sign}{text}"


def _plain(text: str) -> str:
    """``%g`` may answer in exponent form ("1e+03"); spell it out."""
    if "e" in text:
        text = f"{float(text):f}".rstrip("0").rstrip(".")
    return text


def parse_count(text: str | int) -> int:
    """Parse a count such as ``"12345"``, ``"250k"``, ``"10M"``, ``"1.5G"`` or ``"2e6"``.

    Suffixes are decimal (k = 10³, M = 10⁶, G = 10⁹, T = 10¹²) and case-insensitive, since
    "300m MACs" means mega, never milli. The result must be a whole, non-negative number.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a count: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a count cannot be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a count: {text!r} (expected a string like '10M' or '250k')")
    m = _COUNT_RE.match(text)
    negative = not m and _COUNT_RE.match(text.strip().removeprefix("-"))
    if negative:
        m = negative
        if any(c in "123456789" for c in m.group(1)):  # "-0" is zero
            raise ValueError(f"a count cannot be negative: {text!r}")
    if not m:
        raise ValueError(
            f"not a count: {text!r} (expected a number with an optional k/M/G/T suffix, "
            f"e.g. '12345', '250k', '10M', '1.5G')")
    number, exp, suffix = (g.replace("_", "") if g else g for g in m.groups())
    if len(number) > 40 or (exp is not None and abs(int(exp)) > 40):
        raise ValueError(f"not a count: {text!r} (too many digits)")
    with localcontext() as ctx:
        ctx.prec = 100  # exact for every accepted input
        value = Decimal(number).scaleb(int(exp or 0)) * _SUFFIX[suffix.lower()]
    if value != value.to_integral_value():
        raise ValueError(f"not a whole count: {text!r} is {float(value):g}")
    if value > MAX_COUNT:
        raise ValueError(f"count {text!r} is too large (at most {MAX_COUNT:.0e})")
    return int(value)


# --- constraints ----------------------------------------------------------------------------

class Constraint(ABC):
    """A budget: ``value(space, candidate) <= limit``.

    Subclasses set ``name`` (the JSON key, e.g. ``"macs"``), ``label`` (for messages, e.g.
    ``"MACs"``) and implement :meth:`value`, which must be monotone in the widths.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    limit: float

    @abstractmethod
    def value(self, space: SearchSpace, candidate: Candidate) -> float:
        """The quantity this budget bounds, for one candidate."""

    def satisfied(self, space: SearchSpace, candidate: Candidate) -> bool:
        return self.value(space, candidate) <= self.limit

    def describe(self) -> str:
        return f"{self.label} <= {format_count(self.limit)}"

    def format_value(self, value: float) -> str:
        return f"{format_count(value)} {self.label}"

    def format_limit(self) -> str:
        """The limit as :func:`check_feasible`'s message names it (e.g. ``"1.2M"``, ``"2.5 ms"``)."""
        return format_count(self.limit)

    def format_exact(self, value: float) -> str:
        """A note on ``value`` for :func:`check_feasible`'s message (ends with ``"; "``)."""
        return f"{value:,} exactly; "

    def to_dict(self) -> dict:
        """JSON-ready settings; :func:`constraint_from_dict` rebuilds an equal constraint."""
        return {"name": self.name, "limit": self.limit}


def _check_limit(name: str, limit) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        raise ValueError(f"{name} limit must be a number, got {limit!r}")
    if not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"{name} limit must be a positive finite number, got {limit!r}")


@dataclass(frozen=True)
class MacsConstraint(Constraint):
    """Multiply-accumulates of one forward pass (the paper's "FLOPs"), counted exactly by
    :func:`pruning.counting.macs` without building a module."""

    limit: float
    name: ClassVar[str] = "macs"
    label: ClassVar[str] = "MACs"

    def __post_init__(self):
        _check_limit(self.name, self.limit)

    def value(self, space: SearchSpace, candidate: Candidate) -> float:
        return counting.macs(space, candidate)


@dataclass(frozen=True)
class ParamsConstraint(Constraint):
    """Number of parameters of the pruned network (:func:`pruning.counting.params`)."""

    limit: float
    name: ClassVar[str] = "params"
    label: ClassVar[str] = "params"

    def __post_init__(self):
        _check_limit(self.name, self.limit)

    def value(self, space: SearchSpace, candidate: Candidate) -> float:
        return counting.params(space, candidate)


_CONSTRAINTS: dict[str, Callable[..., Constraint]] = {}


def register_constraint(name: str, factory: Callable[..., Constraint]) -> None:
    """Make ``constraint_from_dict({"name": name, ...})`` call ``factory(**rest)``."""
    if name in _CONSTRAINTS:
        raise ValueError(f"constraint {name!r} is already registered")
    _CONSTRAINTS[name] = factory


register_constraint(MacsConstraint.name, MacsConstraint)
register_constraint(ParamsConstraint.name, ParamsConstraint)


def constraint_from_dict(d: dict) -> Constraint:
    """Rebuild a constraint from :meth:`Constraint.to_dict`."""
    d = dict(d)
    name = d.pop("name", None)
    if name not in _CONSTRAINTS:
        raise ValueError(f"unknown constraint {name!r}; known: {', '.join(sorted(_CONSTRAINTS))}")
    return _CONSTRAINTS[name](**d)


def as_constraints(constraints: Constraint | Iterable[Constraint]) -> tuple[Constraint, ...]:
    """Accept one constraint or several; names must be distinct."""
    out = (constraints,) if isinstance(constraints, Constraint) else tuple(constraints)
    for c in out:
        if not isinstance(c, Constraint):
            raise TypeError(f"not a Constraint: {c!r}")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"each kind of budget may appear once, got {names}")
    return out


def satisfies(space: SearchSpace, candidate: Candidate,
              constraints: Iterable[Constraint]) -> bool:
    return all(c.satisfied(space, candidate) for c in constraints)


def budget_use(space: SearchSpace, candidate: Candidate,
               constraints: Iterable[Constraint]) -> float:
    """How much of its budgets ``candidate`` uses: ``max_k value_k / limit_k`` (at most 1 iff
    every budget is met; 0 without budgets). Monotone in the widths, as every value is."""
    return max((c.value(space, candidate) / c.limit for c in constraints), default=0.0)


def check_feasible(space: SearchSpace, constraints: Constraint | Iterable[Constraint]
                   ) -> tuple[Constraint, ...]:
    """Raise :class:`InfeasibleBudgetError` unless the smallest candidate meets every budget.

    Values are monotone in the widths, so the smallest candidate (``space.smallest()``) has the
    smallest value of each budget: if it fails, nothing in the space passes. Returns the
    constraints as a tuple.
    """
    constraints = as_constraints(constraints)
    smallest = space.smallest()
    for c in constraints:
        v = c.value(space, smallest)
        if v > c.limit:
            raise InfeasibleBudgetError(
                f"{c.label} budget {c.format_limit()} is infeasible for {space.arch}: the "
                f"smallest candidate needs {c.format_value(v)} ({c.format_exact(v)}every group "
                f"at {space.levels[0]:g}x of its maximum width"
                + (f", at least {space.min_channels} channels)" if space.min_channels > 1
                   else ")"))
    return constraints


def check_binding(space: SearchSpace, constraints: Constraint | Iterable[Constraint]
                  ) -> tuple[Constraint, ...]:
    """Raise :class:`LooseBudgetError` when the largest candidate meets every budget, and
    :class:`TightBudgetError` when only the smallest network does.

    Values are monotone in the widths, so in the first case every candidate meets it: the
    search would only rediscover the largest network (a ratio of 1.5 typed for 0.15 would train
    for nothing). In the second, no group can take its next wider width, and every candidate
    the search could score is the smallest network under another key. Returns the constraints
    as a tuple.
    """
    constraints = as_constraints(constraints)
    largest = space.largest()
    if constraints and satisfies(space, largest, constraints):
        uses = ", ".join(f"{c.format_value(c.value(space, largest))} within "
                         f"{c.format_limit()}" for c in constraints)
        raise LooseBudgetError(
            f"the budget does not prune {space.arch}: its largest candidate (every group at "
            f"{space.levels[-1]:g}x of its maximum width, max_width_mult "
            f"{space.max_width_mult:g}) already meets it ({uses}); give a smaller budget, or "
            "search wider networks with a larger max_width_mult (--max-width-mult)")
    if constraints:
        _check_room(space, constraints)
    return constraints


def one_step_wider(space: SearchSpace) -> list[Candidate]:
    """The smallest network with one group at its next wider width, for each group that has
    one: a budget that admits none of them admits the smallest network alone."""
    smallest = space.smallest()
    steps = []
    for g, table in enumerate(space.width_table):
        level = next((i for i, w in enumerate(table) if w > table[smallest.choices[g]]), None)
        if level is not None:
            steps.append(Candidate(smallest.choices[:g] + (level,) + smallest.choices[g + 1:]))
    return steps


def _check_room(space: SearchSpace, constraints: tuple[Constraint, ...]) -> None:
    smallest = space.smallest()
    steps = one_step_wider(space)
    if not steps or any(satisfies(space, c, constraints) for c in steps):
        return
    needs = "; ".join(f"{c.label} budget {c.format_limit()}: the smallest network needs "
                      f"{c.format_value(c.value(space, smallest))}, the next one "
                      f"{c.format_value(min(c.value(space, s) for s in steps))}"
                      for c in constraints)
    raise TightBudgetError(
        f"the budget admits only the smallest network of {space.arch} (every group at "
        f"{space.levels[0]:g}x of its maximum width, at least {space.min_channels} channels): "
        f"there is nothing to search ({needs}); give a larger budget")
