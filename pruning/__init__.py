"""MetaPruning engine: search spaces, counting, plain pruned networks, evolutionary search.

The names below are imported on first use (PEP 562), so that ``import pruning.cli`` — and with
it the client commands (``metaprune status`` …) — does not pay for importing PyTorch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {"macs": "pruning.counting", "params": "pruning.counting",
            "PrunedNet": "pruning.modules", "build": "pruning.modules",
            "get_arch": "pruning.registry", "list_archs": "pruning.registry",
            "register_arch": "pruning.registry", "Candidate": "pruning.space",
            "CandidateError": "pruning.space", "SearchSpace": "pruning.space"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pruning' has no attribute {name!r}")
