"""Exact MACs and parameters as pure functions of (space, candidate) — no module is built.

For a conv with ``c_in`` inputs, ``c_out`` outputs, groups ``g``, kernel ``k`` and an output of
``h × w``: MACs = ``h·w·c_out·(c_in/g)·k²``, weights = ``c_out·(c_in/g)·k²`` (no bias; the
following BatchNorm adds ``2·c_out`` parameters). The classifier adds ``c_in·c_out`` MACs and
``c_in·c_out + c_out`` parameters. These are the numbers ``FlopCounterMode`` (÷2) and
``sum(p.numel())`` report for the built network; BN, pooling and additions count no MACs, as in
the paper's "FLOPs".

Every term is ``coef × w_a × w_b`` with ``w`` a group width or the constant 1, so a space
compiles once into a short list of terms and a candidate costs one pass over them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pruning.space import Candidate, CandidateError, Channels, SearchSpace, conv_layers

ONE = -1  # index of the constant factor 1 in a term


@dataclass(frozen=True)
class _Terms:
    """``sum(coef * w[a] * w[b])`` with ``w[ONE] = 1``."""

    coef: tuple[int, ...]
    a: tuple[int, ...]
    b: tuple[int, ...]

    def value(self, w: list[int]) -> int:
        w = w + [1]  # w[ONE]
        return sum(c * w[i] * w[j] for c, i, j in zip(self.coef, self.a, self.b))

    def values(self, w: np.ndarray) -> np.ndarray:
        w = np.concatenate([w.astype(np.int64), np.ones((len(w), 1), np.int64)], axis=1)
        return (w[:, self.a] * w[:, self.b]) @ np.asarray(self.coef, np.int64)


@dataclass(frozen=True)
class CostModel:
    macs: _Terms
    params: _Terms


@lru_cache(maxsize=64)
def cost_model(space: SearchSpace) -> CostModel:
    """Compile the space's plan into MAC and parameter terms (cached per space)."""
    macs: dict[tuple[int, int], int] = defaultdict(int)
    params: dict[tuple[int, int], int] = defaultdict(int)

    def factor(c: Channels) -> tuple[int, int]:
        """(constant multiplier, group index or ONE)."""
        return (c, ONE) if isinstance(c, int) else (1, space.group_index[c])

    def add(terms, coef, x: Channels, y: Channels):
        (kx, ix), (ky, iy) = factor(x), factor(y)
        terms[tuple(sorted((ix, iy)))] += coef * kx * ky

    for conv in conv_layers(space.plan):
        area = conv.kernel * conv.kernel
        h, w = conv.out_hw
        cin = 1 if conv.depthwise else conv.cin
        add(macs, h * w * area, conv.cout, cin)
        add(params, area, conv.cout, cin)
        add(params, 2, conv.cout, 1)  # BatchNorm weight and bias
    head = space.plan.head
    add(macs, 1, head.cin, head.cout)
    add(params, 1, head.cin, head.cout)
    add(params, 1, head.cout, 1)

    def compile_(terms) -> _Terms:
        items = sorted((k, v) for k, v in terms.items() if v)
        return _Terms(tuple(v for _, v in items), tuple(k[0] for k, _ in items),
                      tuple(k[1] for k, _ in items))

    return CostModel(compile_(macs), compile_(params))


def macs(space: SearchSpace, candidate: Candidate) -> int:
    """Multiply-accumulates of one forward pass on a single image."""
    return cost_model(space).macs.value(list(space.widths(candidate)))


def params(space: SearchSpace, candidate: Candidate) -> int:
    """Number of parameters of the pruned network."""
    return cost_model(space).params.value(list(space.widths(candidate)))


def macs_many(space: SearchSpace, choices: np.ndarray) -> np.ndarray:
    """MACs of many candidates at once: ``choices`` is ``(n, groups)`` level indices."""
    return cost_model(space).macs.values(_widths_array(space, choices))


def params_many(space: SearchSpace, choices: np.ndarray) -> np.ndarray:
    """Parameters of many candidates at once (see :func:`macs_many`)."""
    return cost_model(space).params.values(_widths_array(space, choices))


def _widths_array(space: SearchSpace, choices: np.ndarray) -> np.ndarray:
    """``(n, groups)`` level indices → widths; raises :class:`CandidateError` on a bad shape,
    a non-integer dtype or a level outside ``0..num_levels - 1`` (numpy would wrap -1 around)."""
    arr = np.asarray(choices)
    if arr.size == 0 and arr.ndim <= 2:  # no candidates (``[]`` reads as float64)
        arr = arr.reshape(0, space.num_groups).astype(np.int64)
    if arr.ndim != 2 or arr.shape[1] != space.num_groups:
        raise CandidateError(
            f"{space.arch}: expected level indices of shape (n, {space.num_groups}) (one per "
            f"width group), got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise CandidateError(f"{space.arch}: level indices must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= space.num_levels)
    if bad.any():
        row, g = (int(i) for i in np.argwhere(bad)[0])
        raise CandidateError(
            f"{space.arch}: row {row}, group {space.groups[g].name!r}: level {arr[row, g]} is "
            f"outside 0..{space.num_levels - 1}")
    table = np.asarray(space.width_table, np.int64)  # (groups, levels)
    return table[np.arange(space.num_groups), arr]
