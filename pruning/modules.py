"""The plain pruned network: real channels, no masks, scriptable, loadable in plain PyTorch.

:func:`build` turns (space, candidate) into a :class:`PrunedNet`, an ``nn.Sequential`` of
blocks named after the plan (``stem``, ``s2b0``, …, ``classifier``), so state-dict keys read
like ``s2b0.body.expand.conv.weight``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from pruning.space import Block, Candidate, ConvSpec, MaxPoolSpec, SearchSpace


def activation(name: str | None) -> nn.Module:
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, None: nn.Identity}[name]()


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, depthwise: bool,
                 act: str | None):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=cin if depthwise else 1,
                           bias=False),
            bn=nn.BatchNorm2d(cout),
            act=activation(act)))


class ResidualBlock(nn.Module):
    """``act(body(x) + shortcut(x))``; the shortcut is the identity or a projection."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module, act: str | None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Classifier(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.fc = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PrunedNet(nn.Sequential):
    """A network of the plan at concrete widths (the same class for every family)."""


def _layer(spec: ConvSpec | MaxPoolSpec, space: SearchSpace, widths) -> nn.Module:
    if isinstance(spec, MaxPoolSpec):
        return nn.MaxPool2d(3, 2, 1)
    return ConvBNAct(space.resolve(spec.cin, widths), space.resolve(spec.cout, widths),
                     spec.kernel, spec.stride, spec.depthwise, spec.act)


def _block(block: Block, space: SearchSpace, widths) -> nn.Module:
    body = nn.Sequential(OrderedDict((s.name, _layer(s, space, widths)) for s in block.body))
    if block.shortcut is None:
        return body
    shortcut = (nn.Sequential(OrderedDict((s.name, _layer(s, space, widths))
                                          for s in block.shortcut))
                if block.shortcut else nn.Identity())
    return ResidualBlock(body, shortcut, block.act)


def build(space: SearchSpace, candidate: Candidate, device: torch.device | str | None = None
          ) -> PrunedNet:
    """The plain network of ``candidate``, randomly initialised (PyTorch defaults).

    With ``device="meta"`` no memory is allocated (for loading generated weights with
    ``load_state_dict(..., assign=True)``).
    """
    widths = space.widths(candidate)
    with torch.device(device) if device is not None else nullcontext():
        modules = OrderedDict((b.name, _block(b, space, widths)) for b in space.plan.blocks)
        head = space.plan.head
        modules[head.name] = Classifier(space.resolve(head.cin, widths), head.cout)
        return PrunedNet(modules)


def conv_path(block: Block, spec: ConvSpec, in_shortcut: bool = False) -> str:
    """The module path of a conv inside :class:`PrunedNet` (matches :func:`build`)."""
    if block.shortcut is None:
        return f"{block.name}.{spec.name}"
    return f"{block.name}.{'shortcut' if in_shortcut else 'body'}.{spec.name}"


@contextmanager
def inference_layout(net: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """``net`` with its conv weights channels-last (NHWC) while inside, on the CPU only; in the
    default layout on leaving (what is saved, trained and exported never changes). For
    eval-mode forward passes (scoring candidates, testing).

    A conv whose weight is channels-last computes, and hands on, channels-last activations: on
    the CPU oneDNN's NHWC kernels ran 19 of 20 pruned nets measured in eval mode faster than
    NCHW (median 1.46×, 0.98–2.9×; ``bench/bench_layout.py``), the same function rounded
    differently. Not for training: with the odd channel counts of pruned nets, NHWC training
    steps were faster for only 8 of the 20 (0.63–1.33×). Elsewhere the layout is left alone
    (not measured on a GPU).
    """
    if torch.device(device).type != "cpu":
        yield net
        return
    try:
        with torch.inference_mode(False):  # weights made in inference mode could not train on
            net.to(memory_format=torch.channels_last)
        yield net
    finally:
        with torch.inference_mode(False):
            net.to(memory_format=torch.contiguous_format)
