"""Architecture families as plans, with the width groups of MetaPruning (Liu et al. 2019, §4).

* MobileNetV1 — no shortcuts, so every pointwise layer's output width is free (its depthwise
  conv inherits it).
* MobileNetV2 — the outputs of a stage are summed by identity shortcuts, so each stage output
  is one group; each block's expansion ("mid") width is free.
* ResNet (basic and bottleneck) — stage outputs shared; each block's inner width free (one mid
  width per bottleneck, as the official code does).

Inputs below 64 px use a small stem (stride-1 3×3 conv, no max pool; MobileNetV2 also keeps the
first stride-2 stage at stride 1), so 28/32 px images keep a useful spatial size.
"""

from __future__ import annotations

from pruning.registry import register_arch
from pruning.space import Block, ConvSpec, Head, MaxPoolSpec, Plan, WidthGroup

SMALL_INPUT = 64

MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))  # (expansion t, channels c, blocks n, stride s)
MBV1_SETTINGS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                 (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))  # (channels, stride)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never below 90% of ``value`` (torchvision)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


INPUT_SIZE_RANGE = (8, 1024)  # image sides (px) the families build networks for


class _PlanBuilder:
    """Tracks the current spatial size and width group while a family lays out its blocks.

    ``width_mult`` scales the base widths (torchvision's ``width_mult``: MobileNetV2 0.35 …),
    rounded to multiples of 8; the search then prunes below these bases.
    """

    def __init__(self, in_channels: int, input_size: int, width_mult: float = 1.0):
        if not 0.05 <= width_mult <= 4:
            raise ValueError("width_mult must be in [0.05, 4]")
        self.width_mult = width_mult
        if not 1 <= in_channels <= 64:
            raise ValueError("in_channels must be in [1, 64]")
        lo, hi = INPUT_SIZE_RANGE
        if not lo <= input_size <= hi:
            raise ValueError(f"input_size must be in [{lo}, {hi}]")
        self.hw = (input_size, input_size)
        self.small = input_size < SMALL_INPUT
        self.blocks: list[Block] = []
        self.groups: list[WidthGroup] = []
        self.base: dict[str, int] = {}

    def scaled(self, base: int) -> int:
        return base if self.width_mult == 1 else make_divisible(base * self.width_mult)

    def group(self, name: str, base: int) -> str:
        self.groups.append(WidthGroup(name, base))
        self.base[name] = base
        return name

    def conv(self, name, cin, cout, kernel, stride=1, *, depthwise=False, act="relu") -> ConvSpec:
        spec = ConvSpec(name, cin, cout, kernel, stride, self.hw, depthwise, act)
        self.hw = spec.out_hw
        return spec

    def maxpool(self, name) -> MaxPoolSpec:
        spec = MaxPoolSpec(name, self.hw)
        self.hw = spec.out_hw
        return spec

    def plan(self, cin, num_classes: int, family: str) -> Plan:
        if not 1 <= num_classes <= 100_000:
            raise ValueError("num_classes must be in [1, 100000]")
        return Plan(tuple(self.blocks), Head("classifier", cin, num_classes), tuple(self.groups),
                    family)


def mobilenet_v2_plan(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0, *,
                      settings=MBV2_SETTINGS, stem_width=32, head_width=1280) -> Plan:
    b = _PlanBuilder(in_channels, input_size, width_mult)
    cur = b.group("stem", b.scaled(stem_width))
    b.blocks.append(Block("stem", (b.conv("conv", in_channels, cur, 3, 1 if b.small else 2,
                                          act="relu6"),)))
    slowed = False
    for i, (t, c, n, s) in enumerate(settings, 1):
        if b.small and s == 2 and not slowed:
            s, slowed = 1, True
        out = b.group(f"stage{i}", b.scaled(c))
        for j in range(n):
            name, stride = f"s{i}b{j}", (s if j == 0 else 1)
            layers = []
            mid = cur
            if t != 1:
                mid = b.group(f"{name}.mid", b.base[cur] * t)
                layers.append(b.conv("expand", cur, mid, 1, act="relu6"))
            layers.append(b.conv("dw", mid, mid, 3, stride, depthwise=True, act="relu6"))
            layers.append(b.conv("project", mid, out, 1, act=None))
            b.blocks.append(Block(name, tuple(layers), () if cur == out else None))
            cur = out
    head = b.group("head", head_width if width_mult <= 1 else b.scaled(head_width))
    b.blocks.append(Block("last", (b.conv("conv", cur, head, 1, act="relu6"),)))
    return b.plan(head, num_classes, "mobilenet_v2")


def mobilenet_v1_plan(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0, *,
                      settings=MBV1_SETTINGS, stem_width=32) -> Plan:
    b = _PlanBuilder(in_channels, input_size, width_mult)
    cur = b.group("stem", b.scaled(stem_width))
    b.blocks.append(Block("stem", (b.conv("conv", in_channels, cur, 3, 1 if b.small else 2),)))
    for i, (c, s) in enumerate(settings, 1):
        out = b.group(f"l{i}", b.scaled(c))
        dw = b.conv("dw", cur, cur, 3, s, depthwise=True)
        b.blocks.append(Block(f"l{i}", (dw, b.conv("pw", cur, out, 1))))
        cur = out
    return b.plan(cur, num_classes, "mobilenet_v1")


def resnet_plan(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0, *,
                bottleneck=False, layers=(2, 2, 2, 2), planes=(64, 128, 256, 512),
                stem_width=64) -> Plan:
    if len(layers) != len(planes) or not layers:
        raise ValueError(f"resnet_plan: layers {tuple(layers)} and planes {tuple(planes)} must "
                         "give one block count and one width per stage")
    b = _PlanBuilder(in_channels, input_size, width_mult)
    expansion = 4 if bottleneck else 1
    planes, stem_width = [b.scaled(p) for p in planes], b.scaled(stem_width)
    # a basic ResNet's first stage keeps the stem width behind identity shortcuts
    cur = b.group("stem" if bottleneck or planes[0] != stem_width else "stage1", stem_width)
    if b.small:
        stem = (b.conv("conv", in_channels, cur, 3, 1),)
    else:
        stem = (b.conv("conv", in_channels, cur, 7, 2), b.maxpool("pool"))
    b.blocks.append(Block("stem", stem))
    for i, (n, p) in enumerate(zip(layers, planes), 1):
        out = f"stage{i}" if cur == f"stage{i}" else b.group(f"stage{i}", p * expansion)
        for j in range(n):
            name, stride = f"s{i}b{j}", (2 if i > 1 and j == 0 else 1)
            mid = b.group(f"{name}.mid", p)
            in_hw = b.hw
            if bottleneck:
                body = (b.conv("conv1", cur, mid, 1), b.conv("conv2", mid, mid, 3, stride),
                        b.conv("conv3", mid, out, 1, act=None))
            else:
                body = (b.conv("conv1", cur, mid, 3, stride), b.conv("conv2", mid, out, 3, act=None))
            shortcut = ()
            if stride != 1 or cur != out:
                shortcut = (ConvSpec("downsample", cur, out, 1, stride, in_hw, act=None),)
            b.blocks.append(Block(name, body, shortcut, act="relu"))
            cur = out
    return b.plan(cur, num_classes, "resnet")


@register_arch("mobilenet_v2")
def mobilenet_v2(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0) -> Plan:
    return mobilenet_v2_plan(num_classes, in_channels, input_size, width_mult)


@register_arch("mobilenet_v1")
def mobilenet_v1(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0) -> Plan:
    return mobilenet_v1_plan(num_classes, in_channels, input_size, width_mult)


@register_arch("resnet18")
def resnet18(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0) -> Plan:
    return resnet_plan(num_classes, in_channels, input_size, width_mult, layers=(2, 2, 2, 2))


@register_arch("resnet34")
def resnet34(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0) -> Plan:
    return resnet_plan(num_classes, in_channels, input_size, width_mult, layers=(3, 4, 6, 3))


@register_arch("resnet50")
def resnet50(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0) -> Plan:
    return resnet_plan(num_classes, in_channels, input_size, width_mult, bottleneck=True,
                       layers=(3, 4, 6, 3))


# --- tiny architectures for fast tests (same families, a few channels) ----------------------

@register_arch("test_mobilenet_v2")
def test_mobilenet_v2(num_classes=10, in_channels=1, input_size=28, width_mult=1.0) -> Plan:
    return mobilenet_v2_plan(num_classes, in_channels, input_size, width_mult, stem_width=8,
                             head_width=32, settings=((1, 8, 1, 1), (3, 12, 2, 2), (3, 16, 1, 2)))


@register_arch("test_mobilenet_v1")
def test_mobilenet_v1(num_classes=10, in_channels=1, input_size=28, width_mult=1.0) -> Plan:
    return mobilenet_v1_plan(num_classes, in_channels, input_size, width_mult, stem_width=8,
                             settings=((16, 1), (24, 2), (24, 1)))


@register_arch("test_resnet")
def test_resnet(num_classes=10, in_channels=1, input_size=28, width_mult=1.0) -> Plan:
    return resnet_plan(num_classes, in_channels, input_size, width_mult, layers=(2, 1),
                       planes=(8, 16), stem_width=8)


@register_arch("test_resnet_bottleneck")
def test_resnet_bottleneck(num_classes=10, in_channels=1, input_size=28, width_mult=1.0) -> Plan:
    return resnet_plan(num_classes, in_channels, input_size, width_mult, bottleneck=True,
                       layers=(1, 1), planes=(4, 8), stem_width=8)
