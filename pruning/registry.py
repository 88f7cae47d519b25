"""The architecture registry: one name → one plan builder (timm-style ``@register_arch``).

A builder takes ``num_classes``, ``in_channels`` and ``input_size`` (plus family options) and
returns a :class:`pruning.space.Plan`. Unknown and duplicate names are errors. Besides the
built-in families (:mod:`pruning.archs`), the modules named in ``$METAPRUNE_PLUGINS``
(comma-separated, importable) are imported on first use, so the CLI, the API and the workers
know the architectures they register.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from pruning.space import Plan

ArchBuilder = Callable[..., Plan]

_ARCHS: dict[str, ArchBuilder] = {}


class UnknownArchError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


def register_arch(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    def wrap(fn: ArchBuilder) -> ArchBuilder:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = fn
        return fn

    return wrap


def get_arch(name: str) -> ArchBuilder:
    _load_builtin()
    try:
        return _ARCHS[name]
    except KeyError:
        raise UnknownArchError(
            f"unknown architecture {name!r}; available: {', '.join(list_archs(True))}") from None


def list_archs(include_test: bool = False) -> list[str]:
    """Registered names; the tiny ``test_*`` ones only when asked."""
    _load_builtin()
    return sorted(n for n in _ARCHS if include_test or not n.startswith("test_"))


PLUGINS_ENV = "METAPRUNE_PLUGINS"


def _load_builtin() -> None:
    import pruning.archs  # noqa: F401  (registers on import)

    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)  # once: later calls find it in sys.modules
        except Exception as e:  # noqa: BLE001 — a broken plugin is named, not a traceback
            hint = ("; is its folder on PYTHONPATH?" if isinstance(e, ModuleNotFoundError)
                    and e.name == module.split(".")[0] else "")
            raise ValueError(f"{PLUGINS_ENV}: cannot import {module!r} "
                             f"({type(e).__name__}: {e}{hint})") from None
