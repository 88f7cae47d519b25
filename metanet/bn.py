"""BatchNorm recalibration (MetaPruning §3.4: statistics are re-estimated for every candidate).

Running statistics are reset and re-estimated in train mode with ``momentum=None``, which makes
PyTorch keep the exact cumulative average over the K batches instead of the official code's
exponential moving average with momentum 0.1 (a weaker estimate for small K).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Reset every BN's running stats and average them over ``batches``; returns ``net`` in
    eval mode.

    Raises ``ValueError`` if no batch was given; that is found before anything is reset, so the
    net keeps its statistics. If a forward pass raises, every BN gets its previous statistics
    and momentum back and the net its previous train/eval mode.
    """
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("BN recalibration needs at least one batch")
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    saved = [{k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bns]
    was_training = net.training
    ok = False
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        net.train()
        for x in itertools.chain([first], it):
            net(x)
        ok = True
    finally:
        for bn, m, buffers in zip(bns, momenta, saved):
            bn.momentum = m
            if not ok:
                for k, v in buffers.items():
                    getattr(bn, k).copy_(v)
        if not ok:
            net.train(was_training)
    return net.eval()


def bn_statistics(net: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (running_mean, running_var)}`` of every BN in ``net``."""
    return {name: (m.running_mean, m.running_var) for name, m in net.named_modules()
            if isinstance(m, _BatchNorm)}
