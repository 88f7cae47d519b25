"""BatchNorm recalibration (MetaPruning §3.4: statistics are re-estimated for every candidate).

Running statistics are reset and re-estimated in train mode with ``momentum=None``, which makes
PyTorch keep the exact cumulative average over the K batches instead of the official code's
exponential moving average with momentum 0.1 (a weaker estimate for small K).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Reset every BN's running stats and average them over ``batches``; returns ``net`` in
    eval mode. Raises ``ValueError`` if no batch was given."""
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    seen = 0
    for x in batches:
        net(x)
        seen += 1
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    net.eval()
    if not seen:
        raise ValueError("BN recalibration needs at least one batch")
    return net


def bn_statistics(net: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (running_mean, running_var)}`` of every BN in ``net``."""
    return {name: (m.running_mean, m.running_var) for name, m in net.named_modules()
            if isinstance(m, _BatchNorm)}
