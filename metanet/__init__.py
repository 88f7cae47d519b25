"""PruningNet: weight generators, the meta forward pass, materialisation, BN recalibration."""

from metanet.bn import bn_statistics, recalibrate_bn
from metanet.pruningnet import PruningNet

__all__ = ["PruningNet", "bn_statistics", "recalibrate_bn"]
