"""What the benchmark scripts do alike besides timing (``timing.py``): defaults that
``--tiny`` replaces, and printing the result's JSON (also written to ``--out``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(ap: argparse.ArgumentParser, argv, defaults: dict, tiny: dict
               ) -> argparse.Namespace:
    """``ap``'s arguments over ``defaults``, or over ``tiny`` where ``--tiny`` is given
    (options given on the command line win in both cases)."""
    ap.set_defaults(**defaults)
    first, _ = ap.parse_known_args(argv)
    if first.tiny:
        ap.set_defaults(**tiny)
    return ap.parse_args(argv)


def emit(result: dict, out: str | None) -> dict:
    """Print ``result`` as JSON, write it to ``out`` too when given; returns it."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return result
