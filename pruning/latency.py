"""Latency budgets in milliseconds from a measured per-layer lookup table (MetaPruning §4.2).

A :class:`LatencyTable` holds, for every layer of a space's plan — each conv+BN+activation, the
max pool, each residual add (+ activation) and the classifier head with its global pooling —
the time of that layer alone at its spatial size, at batch size ``batch``, on one device, as a
function of its actual channel widths. :meth:`LatencyTable.predict` sums the layer entries of a
candidate: a pure lookup (no module is built), so the search can call it for every proposal.

**Grid, not every pair.** Measuring every ``(c_in, c_out)`` pair of every layer is far too slow
(31 × 31 levels). Each layer is measured on a grid: along each width axis, the distinct widths
the space's levels give that axis's group, subsampled evenly to at most ``max_points`` (always
including the smallest and the largest). Layers with the same signature (kind, kernel, stride,
spatial size, activation, grid) are measured once: the blocks of a MobileNetV2 stage share
their measurements. Widths between grid points are interpolated bilinearly.

**Monotone by construction.** The search repairs an over-budget candidate by lowering levels
until the budget holds, and :func:`pruning.constraints.check_feasible` trusts the all-level-0
candidate to be the cheapest; both need a value that never drops when a width grows. Timings
are noisy, so each measured grid is made monotone — a cumulative maximum along the ``c_in``
axis, then along the ``c_out`` axis (the second pass keeps the first's order) — before use.
Bilinear interpolation of a grid monotone along both axes is monotone in both widths, and a sum
of such terms is monotone in every group's level.

**Overhead.** Timed alone, the layers add up to less than the whole network (the module call
chain between them, allocations, caches: on a 2-core CPU, MobileNetV2 at 28 px measures about
twice the layer sum). After measuring the layers, the build times the smallest and the largest
candidate end to end and stores the mean of (measured − layer sum) over the two, clamped at 0,
as one constant ``overhead_ms`` added to every prediction; a constant keeps the prediction
monotone. Residual adds are timed as layers of their own (add + activation).

**Threads.** On a CPU, latency is measured with ``$METAPRUNE_LATENCY_THREADS`` intra-op threads,
1 by default: one thread times steadily beside other work, where threads that wait for each
other on busy cores stall (measured here: layers 100× slower with 2 threads on 2 loaded cores,
unchanged with 1), and an app's inference thread on a phone is one.

**Timing.** Other work on the machine only ever adds time (a descheduled thread, on a CPU whose
cores are all busy, stalls an operator for a whole time slice: 40 ms spikes among 0.05 ms
runs), so every entry — each grid point, and the two end-to-end runs the overhead is fitted
to — is the *fastest* of its timed runs: a prediction estimates the network on an idle device.
The measured side of a report (:func:`measure_latency`) gives the fastest, the median and the
90th percentile of its runs, and says when they spread (the machine was busy).

**Cache.** A table is written as JSON (never pickle) to ``$METAPRUNE_CACHE_DIR`` or
``~/.cache/metaprune/latency``, named after a hash of its key: the device (CUDA device name, or
the CPU model with its family and model numbers, core count and the measuring thread count),
the torch version, the space's settings, the batch size and the measuring settings. The same key
loads the file instead of measuring; an unreadable or inconsistent file is ignored with a
warning and measured again. Writes are atomic (:func:`pruning.checkpoint.atomic_write_json`).
A table whose layers were timed while the machine was too busy even for their fastest runs
predicts too much: its layers *alone* then add up to over ``STALE_FACTOR`` (1.5) times what the
smallest or the largest candidate runs in, end to end. Such a cached table is measured again;
a table just measured is measured once more with four times the runs, and if that fails too the
build stops with :class:`~pruning.machine.MachineBusyError` (nothing cached): a latency budget
on a table that means nothing would be worse. A table that predicts *faster* than now is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from pruning.checkpoint import atomic_write_json, differences, read_json
from pruning.constraints import Constraint, _check_limit, register_constraint
from pruning.machine import MachineBusyError, cpu_description
from pruning.modules import Classifier, ConvBNAct, activation
from pruning.space import (Candidate, Channels, ConvSpec, MaxPoolSpec, SearchSpace,
                           same_space)

FORMAT = "metaprune.latency_table/1"
DEFAULT_MAX_POINTS = 6
DEFAULT_REPEATS = 5
# layers that add up to more than this many times what the smallest or the largest candidate
# runs in end to end were timed while the machine was busy
STALE_FACTOR = 1.5
# a measurement whose 90th percentile run is this many times its fastest ran on a busy machine
SPREAD_FACTOR = 1.5
THREADS_ENV = "METAPRUNE_LATENCY_THREADS"


def latency_threads() -> int:
    """The intra-op threads CPU latency is measured with (see the module docstring)."""
    text = os.environ.get(THREADS_ENV, "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{THREADS_ENV} must be a whole number of threads, at least 1, "
                         f"got {text!r}")
    return int(text)


@contextmanager
def _measuring_threads(device: torch.device) -> Iterator[None]:
    """Within the block, a CPU runs :func:`latency_threads` threads (restored afterwards)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(latency_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- timing ---------------------------------------------------------------------------------

def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one call over repeated timed runs: the ``fastest`` (the call on an idle
    device: load only adds time), the ``median`` and the 90th percentile ``p90``."""

    fastest: float
    median: float
    p90: float

    @property
    def busy(self) -> bool:
        """Whether the runs spread as they do on a busy machine."""
        return self.p90 > SPREAD_FACTOR * self.fastest


def _timing(fn: Callable[[], object], device: torch.device, repeats: int = DEFAULT_REPEATS,
            warmup: int = 3, min_run_s: float = 1e-3) -> Timing:
    """``warmup`` calls, then ``repeats`` timed runs of as many calls as take about
    ``min_run_s`` (at most 100), synchronising CUDA around each; milliseconds per call."""
    sync = _sync(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        once = time.perf_counter() - t0
        number = max(1, min(100, int(min_run_s / max(once, 1e-7))))
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            times.append(1000.0 * (time.perf_counter() - t0) / number)
    p90 = float(np.percentile(times, 90)) if len(times) > 1 else times[0]
    return Timing(min(times), statistics.median(times), p90)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int = DEFAULT_REPEATS
             ) -> float:
    """One table entry: the fastest of ``repeats`` timed runs (see the module docstring)."""
    return _timing(fn, device, repeats).fastest


def measure_latency(net: nn.Module, input_shape: tuple[int, ...],
                    device: torch.device | str = "cpu", batch: int = 1,
                    repeats: int = 20) -> Timing:
    """End-to-end milliseconds of one forward pass of ``net`` (eval mode) on a random
    ``(batch, *input_shape)`` input: the measured side of a predicted-vs-measured report."""
    device = torch.device(device)
    net = net.eval().to(device)
    x = torch.randn(batch, *input_shape, device=device)
    with _measuring_threads(device):
        return _timing(lambda: net(x), device, repeats=repeats, warmup=5)


def predicted_and_measured(table: LatencyTable, space: SearchSpace, candidate: Candidate,
                           net: nn.Module, device: torch.device | str = "cpu") -> dict:
    """A report's latency of one network (batch 1): the table's prediction, the median of its
    measured runs with their fastest and 90th percentile, and a ``warning`` when the runs spread
    (a busy machine) or were measured on another device than the table's (e.g. another
    thread count)."""
    t = measure_latency(net, space.input_shape, device)
    out = {"predicted": round(table.predict(space, candidate), 4), "measured": round(t.median, 4),
           "measured_fastest": round(t.fastest, 4), "measured_p90": round(t.p90, 4)}
    notes = []
    if t.busy:
        notes.append(f"the machine was busy while measuring (runs took {t.fastest:.3g} to "
                     f"{t.p90:.3g} ms); the prediction is for an idle device")
    here = device_name(device)
    if here != table.key["device"]:
        notes.append(f"measured on {here}, but the table on {table.key['device']}")
    if notes:
        out["warning"] = "; ".join(notes)
    return out


def device_name(device: torch.device | str) -> str:
    """What a latency table is keyed by: the CUDA device name, or the CPU (model name, family
    and model numbers, core count) and the measuring thread count (timings on a CPU depend on
    all of them: one model name covers several processor generations)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{cpu_description()}:{latency_threads()} threads"


def default_cache_dir() -> Path:
    env = os.environ.get("METAPRUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "metaprune" / "latency"


def _extremes(space: SearchSpace) -> tuple[Candidate, Candidate]:
    return space.smallest(), space.largest()


def _extremes_ms(space: SearchSpace, device: torch.device, batch: int, repeats: int
                 ) -> list[float]:
    """End-to-end milliseconds (the fastest run) of the smallest and the largest candidate,
    built as plain nets."""
    from pruning.modules import build

    return [measure_latency(build(space, c), space.input_shape, device, batch,
                            max(repeats, 20)).fastest for c in _extremes(space)]


# --- the layers of a plan -------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    """One timed unit. ``refs`` are its width axes (one or two channel references); ``sig``
    is everything else its time depends on."""

    name: str
    kind: str  # "conv", "maxpool", "add", "head"
    refs: tuple[Channels, ...]
    sig: dict


def _layers(space: SearchSpace) -> list[_Layer]:
    out: list[_Layer] = []
    cur: Channels | None = None
    hw = None

    def chain(layers, cur, prefix):
        hw = None
        for spec in layers:
            if isinstance(spec, MaxPoolSpec):
                out.append(_Layer(f"{prefix}.{spec.name}", "maxpool", (cur,),
                                  {"kind": "maxpool", "hw": list(spec.in_hw)}))
            else:
                refs = (spec.cin,) if spec.depthwise else (spec.cin, spec.cout)
                out.append(_Layer(f"{prefix}.{spec.name}", "conv", refs, {
                    "kind": "conv", "hw": list(spec.in_hw), "kernel": spec.kernel,
                    "stride": spec.stride, "depthwise": spec.depthwise, "act": spec.act}))
                cur = spec.cout
            hw = spec.out_hw
        return cur, hw

    for block in space.plan.blocks:
        start = cur if cur is not None else next(
            s for s in block.body if isinstance(s, ConvSpec)).cin
        cur, hw = chain(block.body, start, block.name)
        if block.shortcut is not None:
            if block.shortcut:
                chain(block.shortcut, start, block.name + ".shortcut")
            out.append(_Layer(f"{block.name}.add", "add", (cur,),
                              {"kind": "add", "hw": list(hw), "act": block.act}))
    head = space.plan.head
    out.append(_Layer(head.name, "head", (head.cin,),
                      {"kind": "head", "hw": list(hw), "classes": head.cout}))
    return out


def _axis(space: SearchSpace, ref: Channels, max_points: int) -> list[int]:
    """Grid widths along one axis: the group's distinct widths, evenly subsampled."""
    if isinstance(ref, int):
        return [ref]
    widths = sorted(set(space.width_table[space.group_index[ref]]))
    if len(widths) <= max_points:
        return widths
    idx = np.unique(np.round(np.linspace(0, len(widths) - 1, max_points)).astype(int))
    return [widths[i] for i in idx]


def _runner(sig: dict, widths: tuple[int, ...], batch: int, device: torch.device
            ) -> Callable[[], object]:
    """A zero-argument call running one layer at the given widths."""
    kind, (h, w) = sig["kind"], sig["hw"]
    c = widths[0]
    x = torch.randn(batch, c, h, w, device=device)
    if kind == "conv":
        cout = c if sig["depthwise"] else widths[1]
        m = ConvBNAct(c, cout, sig["kernel"], sig["stride"], sig["depthwise"], sig["act"])
    elif kind == "maxpool":
        m = nn.MaxPool2d(3, 2, 1)
    elif kind == "head":
        m = Classifier(c, sig["classes"])
    elif kind == "add":
        act = activation(sig["act"]).to(device)
        y = torch.randn_like(x)
        return lambda: act(x + y)
    else:  # pragma: no cover - the plan walker makes only the kinds above
        raise ValueError(f"unknown layer kind {kind!r}")
    m = m.to(device).eval()
    return lambda: m(x)


def _sig_key(sig: dict, grids: list[list[int]]) -> str:
    return json.dumps({**sig, "grids": grids}, sort_keys=True)


def _monotone(ms: np.ndarray) -> np.ndarray:
    """Cumulative maximum along every axis: never cheaper when a width grows."""
    ms = np.maximum(np.asarray(ms, dtype=float), 0.0)
    for axis in range(ms.ndim):
        ms = np.maximum.accumulate(ms, axis=axis)
    return ms


def _locate(grid: np.ndarray, v: np.ndarray):
    if len(grid) == 1:
        z = np.zeros(v.shape, dtype=int)
        return z, z, np.zeros(v.shape)
    v = np.clip(v, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, v, side="right") - 1, 0, len(grid) - 2)
    return i, i + 1, (v - grid[i]) / (grid[i + 1] - grid[i])


def _interp(ms: np.ndarray, grids: list[np.ndarray], x: np.ndarray, y: np.ndarray | None
            ) -> np.ndarray:
    """Linear (1 axis) or bilinear (2 axes) interpolation of a grid at widths ``x`` (, ``y``)."""
    i0, i1, tx = _locate(grids[0], np.asarray(x, dtype=float))
    if ms.ndim == 1:
        return (1 - tx) * ms[i0] + tx * ms[i1]
    j0, j1, ty = _locate(grids[1], np.asarray(y, dtype=float))
    return ((1 - tx) * (1 - ty) * ms[i0, j0] + tx * (1 - ty) * ms[i1, j0]
            + (1 - tx) * ty * ms[i0, j1] + tx * ty * ms[i1, j1])


# --- the table ------------------------------------------------------------------------------

class LatencyTableError(ValueError):
    """A latency table file that cannot be used for this space."""


class LatencyTable:
    """Per-layer latency of a space on one device (see the module docstring).

    Build (or load from the cache) with :meth:`build`; :meth:`predict` gives milliseconds.
    ``measured_s`` is the time its measurement took (when it was measured, loaded from the
    file too), ``from_cache`` whether it was loaded rather than measured now.
    """

    def __init__(self, space: SearchSpace, key: dict, measurements: dict[str, list],
                 measured_s: float = 0.0, from_cache: bool = False, path: Path | None = None,
                 overhead_ms: float = 0.0):
        if not (isinstance(overhead_ms, int | float) and 0 <= overhead_ms < 1e9):
            raise LatencyTableError(f"bad overhead_ms {overhead_ms!r}")
        self.overhead_ms = float(overhead_ms)
        self.space, self.key, self.measurements = space, key, measurements
        self.measured_s, self.from_cache, self.path = measured_s, from_cache, path
        self._space_dict = json.loads(json.dumps(space.to_dict()))
        if not same_space(key["space"], self._space_dict):
            stored = key["space"] if isinstance(key["space"], dict) else {}
            what = "; ".join(f"{k}: {a!r} in the table, {b!r} here" for k, a, b in
                             list(differences(stored, self._space_dict))[:3])
            raise LatencyTableError(f"latency table belongs to another search space ({what})")
        self.digest = hashlib.sha256(
            json.dumps([measurements, self.overhead_ms], sort_keys=True).encode()
        ).hexdigest()[:16]
        self._compile()

    # --- compiled lookup --------------------------------------------------------------------
    def _layer_grid(self, layer: _Layer):
        grids = [_axis(self.space, r, self.key["max_points"]) for r in layer.refs]
        k = _sig_key(layer.sig, grids)
        if k not in self.measurements:
            raise LatencyTableError(f"latency table has no entry for layer {layer.name}")
        ms = np.asarray(self.measurements[k], dtype=float)
        if ms.shape != tuple(len(g) for g in grids) or not np.all(np.isfinite(ms)):
            raise LatencyTableError(f"latency table entry of layer {layer.name} is malformed")
        return _monotone(ms), [np.asarray(g, dtype=float) for g in grids]

    def _compile(self) -> None:
        space = self.space
        L = space.num_levels
        levels = np.arange(L)
        terms: dict[tuple[int | None, int | None], np.ndarray] = {}
        self._layers: list[tuple[_Layer, np.ndarray, list[np.ndarray]]] = []
        const = 0.0
        for layer in _layers(space):
            ms, grids = self._layer_grid(layer)
            self._layers.append((layer, ms, grids))
            gi = [space.group_index[r] if isinstance(r, str) else None for r in layer.refs]
            wt = [np.asarray(space.width_table[g], dtype=float) if g is not None
                  else np.full(L, float(r)) for g, r in zip(gi, layer.refs)]
            if len(gi) == 1 or gi[0] == gi[1] or gi[1] is None or gi[0] is None:
                # one free axis (or the same group on both): a table over one group's levels
                free = next((g for g in gi if g is not None), None)
                y = wt[1] if len(wt) == 2 else None
                vals = _interp(ms, grids, wt[0], y)  # indexed by the free group's level
                if free is None:
                    const += float(vals[0])
                    continue
                key: tuple = (free, None)
                table = vals[:, None]
            else:
                X, Y = np.meshgrid(wt[0][levels], wt[1][levels], indexing="ij")
                key, table = (gi[0], gi[1]), _interp(ms, grids, X, Y)
            terms[key] = terms.get(key, 0.0) + table
        self._const = const + self.overhead_ms
        self._terms = [(a, b, t) for (a, b), t in terms.items()]

    def predict(self, space: SearchSpace, candidate: Candidate) -> float:
        """Predicted milliseconds of one forward pass of ``candidate`` (a table lookup)."""
        if space is not self.space and space.to_dict() != self._space_dict:
            raise LatencyTableError(f"this latency table was built for another space than "
                                    f"{space.arch} {space.to_dict()}")
        c = space.check(candidate).choices
        return self._const + float(sum(t[c[a], 0 if b is None else c[b]]
                                       for a, b, t in self._terms))

    def predict_widths(self, widths: tuple[int, ...] | list[int]) -> float:
        """Predicted milliseconds for arbitrary group widths (interpolated; clamped to each
        axis's measured range), e.g. the full 1.0× network inside a 1.4× space."""
        space = self.space
        total = self.overhead_ms
        for layer, ms, grids in self._layers:
            w = [space.resolve(r, tuple(widths)) for r in layer.refs]
            total += float(_interp(ms, grids, np.asarray(w[0]),
                                   np.asarray(w[1]) if len(w) == 2 else None))
        return total

    def per_layer(self, space: SearchSpace, candidate: Candidate) -> dict[str, float]:
        """Predicted milliseconds of every layer (for reports and debugging)."""
        widths = space.widths(candidate)
        out = {}
        for layer, ms, grids in self._layers:
            w = [space.resolve(r, widths) for r in layer.refs]
            out[layer.name] = float(_interp(ms, grids, np.asarray(w[0]),
                                            np.asarray(w[1]) if len(w) == 2 else None))
        return out

    def layer_sums(self) -> list[float]:
        """The layers' milliseconds (no overhead) of the smallest and the largest candidate."""
        return [self.predict(self.space, c) - self.overhead_ms for c in _extremes(self.space)]

    def __eq__(self, other) -> bool:
        return (isinstance(other, LatencyTable) and self.key == other.key
                and self.digest == other.digest)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return (f"LatencyTable({self.space.arch}, device={self.key['device']!r}, "
                f"batch={self.key['batch']}, digest={self.digest})")

    # --- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": self.key, "digest": self.digest,
                "overhead_ms": self.overhead_ms,
                "measured_s": round(self.measured_s, 3), "measurements": self.measurements}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, space: SearchSpace | None = None) -> LatencyTable:
        """Read a table file; raises :class:`LatencyTableError` (a ``ValueError``) when it is
        unreadable, malformed, or (given ``space``) belongs to another space."""
        path = Path(path)
        try:
            d = read_json(path)
        except (OSError, ValueError) as e:  # read_json's advice is for run files: the reason
            raise LatencyTableError(f"cannot read latency table {path}: "
                                    f"{getattr(e, 'reason', e)}") from None
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise LatencyTableError(f"{path} is not a latency table ({FORMAT})")
            key, measurements = d["key"], d["measurements"]
            if space is None:
                space = SearchSpace.from_dict(key["space"])
            table = cls(space, key, measurements, from_cache=True, path=path,
                        overhead_ms=d.get("overhead_ms", 0.0),
                        measured_s=float(d.get("measured_s", 0.0)))
        except LatencyTableError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatencyTableError(f"latency table {path} is malformed: {e!r}") from None
        if d.get("digest") not in (None, table.digest):
            raise LatencyTableError(f"latency table {path} does not match its digest")
        return table

    @staticmethod
    def make_key(space: SearchSpace, device: torch.device | str = "cpu", batch: int = 1,
                 max_points: int = DEFAULT_MAX_POINTS, repeats: int = DEFAULT_REPEATS) -> dict:
        return {"format": FORMAT, "device": device_name(device), "torch": torch.__version__,
                "space": json.loads(json.dumps(space.to_dict())), "batch": batch,
                "max_points": max_points, "repeats": repeats, "timing": "fastest"}

    @staticmethod
    def cache_path(key: dict, cache_dir: str | os.PathLike | None = None) -> Path:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return folder / f"{key['space']['arch']}-{h}.json"

    @classmethod
    def build(cls, space: SearchSpace, device: torch.device | str = "cpu", batch: int = 1, *,
              cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
              max_points: int = DEFAULT_MAX_POINTS, repeats: int = DEFAULT_REPEATS,
              progress: Callable[[dict], None] | None = None) -> LatencyTable:
        """The table of ``space`` on ``device``: loaded from the cache when there, otherwise
        measured (each distinct layer signature once, on its width grid) and cached."""
        if not 2 <= max_points <= 64:
            raise ValueError("max_points must be in [2, 64]")
        if not 1 <= batch <= 4096 or not 1 <= repeats <= 1000:
            raise ValueError("batch must be in [1, 4096] and repeats in [1, 1000]")
        device = torch.device(device)
        key = cls.make_key(space, device, batch, max_points, repeats)
        path = cls.cache_path(key, cache_dir)
        if use_cache and path.exists():
            try:
                cached = cls.load(path, space)
                if cached.key != key:
                    raise LatencyTableError(f"latency table {path} has another key")
            except LatencyTableError as e:
                warnings.warn(f"ignoring the cached latency table ({e}); measuring again",
                              RuntimeWarning, stacklevel=2)
            else:
                measured = _extremes_ms(space, device, batch, repeats)
                sums = cached.layer_sums()
                if not _inflated(sums, measured):
                    return cached
                warnings.warn(f"the cached latency table {path} {_mismatch(sums, measured)}: "
                              "they were timed on a busy machine (or a slower one); measuring "
                              "again", RuntimeWarning, stacklevel=2)
        t0 = time.perf_counter()
        for runs in (repeats, 4 * repeats):  # layers timed on a busy machine: once more, longer
            with _measuring_threads(device):
                measurements = _measure_layers(space, device, batch, max_points, runs, progress)
            table = cls(space, key, measurements, path=path)
            measured = _extremes_ms(space, device, batch, repeats)
            sums = table.layer_sums()
            if not _inflated(sums, measured):
                break
            if runs != repeats:
                fewer = (f", or with fewer threads ({THREADS_ENV}=1)"
                         if device.type == "cpu" and latency_threads() > 1 else "")
                raise MachineBusyError(
                    f"cannot measure the latency table of {space.arch}: the machine is too busy "
                    f"(its layers, timed twice, {_mismatch(sums, measured)}); run again when it "
                    f"is idle{fewer}")
            warnings.warn(f"the latency table just measured {_mismatch(sums, measured)}: the "
                          "machine was busy while they were timed; measuring again",
                          RuntimeWarning, stacklevel=2)
        gaps = [m - t for t, m in zip(sums, measured)]  # the overhead (the module docstring)
        table = cls(space, key, measurements, measured_s=time.perf_counter() - t0, path=path,
                    overhead_ms=round(max(0.0, sum(gaps) / len(gaps)), 6))
        if use_cache:
            try:
                table.save(path)
            except OSError as e:  # the measured table serves this run all the same
                warnings.warn(f"could not cache the latency table in {path.parent} ({e}); set "
                              "METAPRUNE_CACHE_DIR to a writable folder", RuntimeWarning,
                              stacklevel=2)
        return table


def _measure_layers(space: SearchSpace, device: torch.device, batch: int, max_points: int,
                    repeats: int, progress: Callable[[dict], None] | None) -> dict[str, list]:
    """Milliseconds of each distinct layer signature on its width grid (the table's data)."""
    measurements: dict[str, list] = {}
    layers = _layers(space)
    for n, layer in enumerate(layers):
        grids = [_axis(space, r, max_points) for r in layer.refs]
        k = _sig_key(layer.sig, grids)
        if k in measurements:
            continue
        ms = np.zeros(tuple(len(g) for g in grids))
        for idx in np.ndindex(*ms.shape):
            widths = tuple(g[i] for g, i in zip(grids, idx))
            ms[idx] = _time_ms(_runner(layer.sig, widths, batch, device), device, repeats)
        measurements[k] = ms.round(6).tolist()
        if progress is not None:
            progress({"stage": "latency", "step": n + 1, "total": len(layers)})
    return measurements


def _inflated(layer_sums: list[float], measured: list[float]) -> bool:
    """Whether the layers of the smallest or the largest candidate alone add up to over
    :data:`STALE_FACTOR` times what the whole candidate runs in: they were timed on a busy
    machine (alone, they can only take less)."""
    return any(s > STALE_FACTOR * m for s, m in zip(layer_sums, measured))


def _mismatch(layer_sums: list[float], measured: list[float]) -> str:
    return (f"add up to {' and '.join(f'{t:.3g}' for t in layer_sums)} ms for the smallest and "
            f"the largest candidate, which run in {' and '.join(f'{m:.3g}' for m in measured)} "
            "ms end to end")


# --- the budget -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LatencyConstraint(Constraint):
    """Predicted milliseconds of one forward pass (:meth:`LatencyTable.predict`) at most
    ``limit`` — on the table's device and batch size. Monotone in the widths because the table
    is (see the module docstring)."""

    limit: float
    table: LatencyTable
    name: ClassVar[str] = "latency"
    label: ClassVar[str] = "latency"

    def __post_init__(self):
        _check_limit(self.name, self.limit)
        if not isinstance(self.table, LatencyTable):
            raise TypeError(f"table must be a LatencyTable, got {type(self.table).__name__}")

    def value(self, space: SearchSpace, candidate: Candidate) -> float:
        return self.table.predict(space, candidate)

    def describe(self) -> str:
        return f"{self.label} <= {self.format_limit()}"

    def format_limit(self) -> str:
        return f"{self.limit:.4g} ms"

    def format_value(self, value: float) -> str:
        return f"{value:.4g} ms"

    def format_exact(self, value: float) -> str:
        return f"predicted on {self.table.key['device']}, batch {self.table.key['batch']}; "

    def to_dict(self) -> dict:
        """The limit and the table's identity (its key and a digest of its measurements): a
        resumed search matches only with the very same table."""
        return {"name": self.name, "limit": self.limit,
                "table": {"key": self.table.key, "digest": self.table.digest}}

    def __eq__(self, other) -> bool:
        return (isinstance(other, LatencyConstraint) and self.limit == other.limit
                and self.table == other.table)

    def __hash__(self) -> int:
        return hash((self.limit, self.table))


def _constraint_from_dict(limit: float, table: LatencyTable | dict,
                          cache_dir: str | os.PathLike | None = None) -> LatencyConstraint:
    """Rebuild from :meth:`LatencyConstraint.to_dict`: the table is read from the cache by its
    key and must have the recorded digest (it is never re-measured here)."""
    if isinstance(table, dict):
        path = LatencyTable.cache_path(table["key"], cache_dir)
        if not path.exists():
            raise LatencyTableError(
                f"no cached latency table for {table['key']['space']['arch']} on "
                f"{table['key']['device']} (looked for {path}); build it with LatencyTable.build")
        loaded = LatencyTable.load(path)
        if loaded.digest != table["digest"]:
            raise LatencyTableError(f"the cached latency table {path} was measured again "
                                    "since; its values differ from the recorded ones")
        table = loaded
    return LatencyConstraint(limit, table)


register_constraint(LatencyConstraint.name, _constraint_from_dict)


__all__ = ["LatencyConstraint", "LatencyTable", "LatencyTableError", "default_cache_dir",
           "device_name", "measure_latency", "predicted_and_measured", "Timing"]
