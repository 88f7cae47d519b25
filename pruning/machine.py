"""What machine this is, for benchmark reports and latency-table keys (no PyTorch needed)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


class MachineBusyError(RuntimeError):
    """A measurement the machine was too busy to make (latency tables): worth trying again
    when it is idle."""


def _cpuinfo() -> dict[str, str]:
    """The first value of every key of ``/proc/cpuinfo`` (the first processor's), or ``{}``."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _model_name(info: dict[str, str]) -> str:
    if "model name" in info:
        return info["model name"]
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    return _model_name(_cpuinfo())


def cpu_description() -> str:
    """:func:`cpu_model` with the family and model numbers and the core count, e.g. ``AMD EPYC
    (family 25, model 17), 2 cores``: one model name covers processors that compute (and round)
    differently, so CPU results name both."""
    info = _cpuinfo()
    ids = (f" (family {info['cpu family']}, model {info['model']})"
           if "cpu family" in info and "model" in info else "")
    return f"{_model_name(info)}{ids}, {os.cpu_count()} cores"
