"""The architecture registry: one name → one plan builder (timm-style ``@register_arch``).

A builder takes ``num_classes``, ``in_channels`` and ``input_size`` (plus family options) and
returns a :class:`pruning.space.Plan`. Unknown and duplicate names are errors. Besides the
built-in families (:mod:`pruning.archs`), the modules named in ``$METAPRUNE_PLUGINS``
(comma-separated, importable) are imported on first use, so the CLI, the API and the workers
know the architectures they register.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections.abc import Callable

from pruning.space import Plan

ArchBuilder = Callable[..., Plan]

_ARCHS: dict[str, ArchBuilder] = {}
BUILTIN_MODULE = "pruning.archs"


class UnknownArchError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


def register_arch(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    def wrap(fn: ArchBuilder) -> ArchBuilder:
        if fn.__module__ != BUILTIN_MODULE:  # the built-in names first: a plugin cannot take one
            import pruning.archs  # noqa: F401
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


def _default_plan(builder: ArchBuilder) -> Plan | None:
    """``builder``'s plan at its default arguments; ``None`` where they do not build one."""
    try:
        return builder()
    except Exception:  # noqa: BLE001 — a builder without usable defaults
        return None


def arch_family(name: str) -> str | None:
    """The family (:attr:`pruning.space.Plan.family`) of a registered architecture, from its
    plan at the builder's defaults; ``None`` when it has none or they do not build."""
    try:
        builder = get_arch(name)
    except Exception:  # noqa: BLE001 — an unknown name, a plugin that does not import
        return None
    return getattr(_default_plan(builder), "family", None)


def arch_digest(name: str) -> str | None:
    """sha256 of a plugin architecture's plan at its builder's defaults (of its source where
    they do not build), so that a plugin edited under the same name is not taken for the one a
    file was made with; ``None`` for the built-in architectures (they change with this package's
    version only) and for names not registered."""
    try:
        builder = get_arch(name)
    except UnknownArchError:
        return None
    if builder.__module__ == BUILTIN_MODULE:
        return None
    plan = _default_plan(builder)
    if plan is not None:
        text = repr(plan)
    else:
        try:
            text = inspect.getsource(builder)
        except (OSError, TypeError):
            return None
    return hashlib.sha256(text.encode()).hexdigest()


def _load_builtin() -> None:
    import pruning.archs  # noqa: F401  (registers on import)

    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        before = set(_ARCHS)
        try:
            importlib.import_module(module)  # once: later calls find it in sys.modules
        except Exception as e:  # noqa: BLE001 — a broken plugin is named, not a traceback
            for name in set(_ARCHS) - before:  # what it registered before failing: the next
                del _ARCHS[name]               # call reports its error again, not a clash
            hint = ("; is its folder on PYTHONPATH?" if isinstance(e, ModuleNotFoundError)
                    and e.name == module.split(".")[0] else "")
            raise ValueError(f"{PLUGINS_ENV}: cannot import {module!r} "
                             f"({type(e).__name__}: {e}{hint})") from None
