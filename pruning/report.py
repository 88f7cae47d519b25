"""Human-readable run reports: the Pareto plot of a search (``pareto.png``, DESIGN.md §4).

Rendered with matplotlib's Agg canvas on a private :class:`~matplotlib.figure.Figure` (no
``pyplot``, so no global state, no GUI backend and safe from worker threads), to bytes, so that
the file can be written atomically and hashed in ``config.json`` like every other artifact.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pruning.checkpoint import atomic_write_bytes

Point = tuple[float, float]  # (MACs, score)


def _point(item: Any) -> Point:
    """``(macs, score)`` of a :class:`~pruning.search.Record`, a record dict or a pair."""
    if isinstance(item, Mapping):
        return float(item["macs"]), float(item["score"])
    if hasattr(item, "macs") and hasattr(item, "score"):
        return float(item.macs), float(item.score)
    macs, score = item
    return float(macs), float(score)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points (no other point has fewer-or-equal MACs and a higher score),
    sorted by MACs."""
    front: list[Point] = []
    for macs, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or score > front[-1][1]:
            front.append((macs, score))
    return front


def pareto_png(history: Iterable[Any], best: Any, uniform: Any | None = None,
               budget_macs: float | None = None, *, title: str | None = None,
               score_label: str = "score (estimated held-out accuracy)",
               dpi: int = 100) -> bytes:
    """PNG bytes of the search's score (``score_label``) against MACs for every evaluated
    candidate in ``history``, with the non-dominated front, ``best`` and the ``uniform``
    baseline marked and the MACs budget as a vertical line (each of the last two optional).

    Records may be :class:`~pruning.search.Record` objects, their ``to_dict()`` form, or
    ``(macs, score)`` pairs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [_point(r) for r in history]
    if not points:
        raise ValueError("pareto plot: the search history is empty")
    fig = Figure(figsize=(7, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max([m for m, _ in points] + [_point(best)[0]] + [float(budget_macs or 0)])
    scale, unit = next(((f, u) for f, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= f),
                       (1.0, ""))
    ax.scatter([m / scale for m, _ in points], [s for _, s in points], s=14, alpha=0.45,
               color="tab:gray", linewidths=0, label=f"evaluated candidates ({len(points)})")
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([m / scale for m, _ in front], [s for _, s in front], where="post",
                color="tab:blue", linewidth=1, alpha=0.8, label="Pareto front")
    bm, bs = _point(best)
    ax.scatter([bm / scale], [bs], s=120, marker="*", color="tab:red", zorder=5,
               edgecolors="black", linewidths=0.5, label=f"best ({bs:.4g})")
    if uniform is not None:
        um, us = _point(uniform)
        ax.scatter([um / scale], [us], s=70, marker="s", color="tab:green", zorder=4,
                   edgecolors="black", linewidths=0.5, label=f"uniform baseline ({us:.4g})")
    if budget_macs is not None:
        ax.axvline(float(budget_macs) / scale, color="tab:orange", linestyle="--", linewidth=1.2,
                   label=f"budget ({float(budget_macs) / scale:.4g} {unit}MACs)")
    ax.set_xlabel(f"{unit}MACs")
    ax.set_ylabel(score_label)
    ax.set_title(title or "MetaPruning search: score vs MACs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    # no timestamp or version in the metadata: the same search gives the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_pareto(history: Iterable[Any], best: Any, uniform: Any | None, budget_macs: float | None,
                path: str | Path, **kwargs) -> bytes:
    """Render :func:`pareto_png` and write it atomically to ``path``; returns the bytes."""
    data = pareto_png(history, best, uniform, budget_macs, **kwargs)
    atomic_write_bytes(path, data)
    return data
