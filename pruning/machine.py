"""What machine this is, for benchmark reports and latency-table keys (no PyTorch needed)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """:func:`cpu_model` with the family and model numbers and the core count, e.g. ``AMD EPYC
    (family 25, model 17), 2 cores``: one model name covers processors that compute (and round)
    differently, so CPU results name both."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("cpu family", "model") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    ids = (f" (family {fields['cpu family']}, model {fields['model']})"
           if len(fields) == 2 else "")
    return f"{cpu_model()}{ids}, {os.cpu_count()} cores"
