"""What the benchmark scripts do alike besides timing (``timing.py``): defaults that
``--tiny`` replaces, and printing the result's JSON (also written to ``--out``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(ap: argparse.ArgumentParser, argv, defaults: dict, tiny: dict,
               **profiles: dict) -> argparse.Namespace:
    """``ap``'s arguments over ``defaults``, or over ``tiny`` where ``--tiny`` is given, or
    over a named profile where its flag is (``cpu_quick``: ``--cpu-quick``); options given on
    the command line win in every case."""
    ap.set_defaults(**defaults)
    first, _ = ap.parse_known_args(argv)
    for name, values in {"tiny": tiny, **profiles}.items():
        if getattr(first, name):
            ap.set_defaults(**values)
    return ap.parse_args(argv)


def emit(result: dict, out: str | None) -> dict:
    """Print ``result`` as JSON, write it to ``out`` too when given; returns it."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return result
