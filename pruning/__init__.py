"""MetaPruning engine: search spaces, counting, plain pruned networks, evolutionary search."""

__version__ = "0.1.0"

from pruning.counting import macs, params
from pruning.modules import PrunedNet, build
from pruning.registry import get_arch, list_archs, register_arch
from pruning.space import Candidate, CandidateError, SearchSpace

__all__ = ["Candidate", "CandidateError", "PrunedNet", "SearchSpace", "build", "get_arch",
           "list_archs", "macs", "params", "register_arch"]
