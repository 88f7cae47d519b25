"""Search spaces: the layer plan of an architecture, its width groups, and candidates.

An architecture is described once, as a *plan*: a sequence of blocks whose convolutions name
their input and output channels either by a fixed count (the image channels, the classes) or by
a **width group**, a set of channels that must share one width (MetaPruning, Liu et al. 2019,
§3.3: the outputs of a residual stage, or the mid width of one block). Three interpreters read
the same plan, so they cannot drift apart: exact counting (`pruning.counting`), the plain
pruned network (`pruning.modules.build`) and the PruningNet's meta forward (`metanet`).

A candidate is one level index per group; group ``g`` at level ``s`` has width
``max(min(min_channels, max_g), floor(max_g × s))``, where ``max_g = base_g × max_width_mult``
(the paper searched MobileNetV2 up to 1.4× its base widths), optionally rounded to a
``channel_divisor``. ``min_channels`` (1 here, a few in the pipeline) keeps the lowest levels of
narrow groups from becoming 1–2-channel bottlenecks: a ReLU after a single channel can die in
training and take the whole network with it.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from dataclasses import dataclass, field
from functools import cached_property

Channels = str | int
"""A channel count: a width-group name, or a fixed number (image channels, classes)."""

ACTIVATIONS = ("relu", "relu6", None)

# 31 levels 0.10, 0.13, …, 1.00 as in the paper; integers/100 keep them exact.
DEFAULT_LEVELS: tuple[float, ...] = tuple(round(0.10 + 0.03 * k, 2) for k in range(31))


@dataclass(frozen=True)
class ConvSpec:
    """Conv → BatchNorm → activation. ``depthwise`` means groups = channels (cin == cout)."""

    name: str
    cin: Channels
    cout: Channels
    kernel: int
    stride: int
    in_hw: tuple[int, int]
    depthwise: bool = False
    act: str | None = "relu"

    @property
    def out_hw(self) -> tuple[int, int]:
        return conv_out_hw(self.in_hw, self.kernel, self.stride)


@dataclass(frozen=True)
class MaxPoolSpec:
    """3×3 max pool, stride 2, padding 1 (the ImageNet ResNet stem)."""

    name: str
    in_hw: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        return conv_out_hw(self.in_hw, 3, 2)


@dataclass(frozen=True)
class Block:
    """A chain of layers, optionally residual.

    ``shortcut`` is ``None`` for a plain chain, ``()`` for an identity shortcut, or a chain of
    convs (a projection). ``act`` is the activation applied after the residual sum.
    """

    name: str
    body: tuple[ConvSpec | MaxPoolSpec, ...]
    shortcut: tuple[ConvSpec, ...] | None = None
    act: str | None = None


@dataclass(frozen=True)
class Head:
    """Global average pool → flatten → linear classifier."""

    name: str
    cin: Channels
    cout: int


@dataclass(frozen=True)
class WidthGroup:
    """Channels that share one width; ``base`` is the unpruned (1.0×) width."""

    name: str
    base: int


@dataclass(frozen=True)
class Plan:
    """What an architecture builder returns: the blocks, the head and the width groups;
    ``family`` names the family builder of :mod:`pruning.archs` that laid it out
    ("mobilenet_v1", "mobilenet_v2", "resnet"), whose recipes the ``paper`` preset follows."""

    blocks: tuple[Block, ...]
    head: Head
    groups: tuple[WidthGroup, ...]
    family: str | None = None


def conv_out_hw(in_hw: tuple[int, int], kernel: int, stride: int) -> tuple[int, int]:
    """Output size with padding ``kernel // 2``: ``floor((n + 2p - k) / s) + 1``."""
    pad = kernel // 2
    return tuple((n + 2 * pad - kernel) // stride + 1 for n in in_hw)  # type: ignore[return-value]


def conv_layers(plan: Plan) -> list[ConvSpec]:
    """Every convolution of the plan, in forward order (body before shortcut)."""
    out = []
    for block in plan.blocks:
        out += [layer for layer in block.body if isinstance(layer, ConvSpec)]
        out += list(block.shortcut or ())
    return out


class CandidateError(ValueError):
    """A candidate or width assignment that does not fit its search space."""


@dataclass(frozen=True)
class Candidate:
    """One level index per width group, in the order of ``SearchSpace.groups``.

    ``choices`` may be any sequence (a list, a numpy row); it is stored as a tuple, with integral
    values (numpy integers included) as plain ``int``, so keys, hashes and JSON agree. Other
    values are kept as given for :meth:`SearchSpace.check` to reject.
    """

    choices: tuple[int, ...]

    def __post_init__(self):
        c = self.choices
        if type(c) is not tuple or any(type(x) is not int for x in c):  # fast path: plain ints
            object.__setattr__(self, "choices", tuple(_plain_int(x) for x in c))

    def key(self) -> str:
        """A compact, stable string key (JSON-safe)."""
        return "-".join(map(str, self.choices))

    @classmethod
    def from_key(cls, key: str) -> Candidate:
        """Parse :meth:`key` output, e.g. ``"30-12-4"``."""
        try:
            parts = str(key).split("-")
            if not all(p.isascii() and p.isdigit() for p in parts):  # int() takes " 1", "+1", "١"
                raise ValueError
            return cls(tuple(int(c) for c in parts))
        except ValueError:
            raise CandidateError(f"not a candidate key: {key!r} (expected level indices joined "
                                 "by '-', e.g. '30-12-4')") from None


def _plain_int(x):
    """Integral values (``int``, numpy integers) as ``int``; anything else unchanged (bools too)."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return int(x)
    return x


@dataclass(frozen=True)
class SearchSpace:
    """An architecture's plan plus the width levels of each group.

    Build one with :meth:`create` (or ``pruning.registry.make_space``); the plan is validated
    once here, so every candidate of the space builds a consistent network.
    """

    arch: str
    arch_args: dict
    plan: Plan = field(repr=False)
    levels: tuple[float, ...] = DEFAULT_LEVELS
    max_width_mult: float = 1.0
    channel_divisor: int = 1
    min_channels: int = 1

    def __post_init__(self):
        if not self.levels or any(not 0 < s <= 1 for s in self.levels):
            raise ValueError("levels must be a non-empty list of scales in (0, 1]")
        if list(self.levels) != sorted(set(self.levels)):
            raise ValueError("levels must be strictly increasing")
        if not 0 < self.max_width_mult <= 4:
            raise ValueError("max_width_mult must be in (0, 4]")
        if not 1 <= self.channel_divisor <= 64:
            raise ValueError("channel_divisor must be in [1, 64]")
        if not 1 <= self.min_channels <= 64:
            raise ValueError("min_channels must be in [1, 64]")
        if not isinstance(self.plan, Plan):
            raise ValueError(f"architecture {self.arch!r}: its plan is a "
                             f"{type(self.plan).__name__}, not a pruning.space.Plan")
        try:
            _validate_plan(self.plan, self.arch_args)
        except ValueError as e:
            raise ValueError(f"architecture {self.arch!r}: {e}") from None

    # hashing by identity keeps frozen-dataclass semantics without hashing the dict
    __hash__ = object.__hash__

    @property
    def groups(self) -> tuple[WidthGroup, ...]:
        return self.plan.groups

    @cached_property
    def group_index(self) -> dict[str, int]:
        return {g.name: i for i, g in enumerate(self.groups)}

    @cached_property
    def max_widths(self) -> tuple[int, ...]:
        return tuple(self._round(max(1, math.floor(g.base * self.max_width_mult + 1e-9)))
                     for g in self.groups)

    @cached_property
    def width_table(self) -> tuple[tuple[int, ...], ...]:
        """``width_table[g][level]``: the width of group ``g`` at each level (non-decreasing)."""
        return tuple(
            tuple(min(m, self._round(max(self.min_channels, math.floor(m * s + 1e-9))))
                  for s in self.levels)
            for m in self.max_widths)

    def _round(self, width: int) -> int:
        d = self.channel_divisor
        return width if d == 1 else max(d, (width + d // 2) // d * d)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def size(self) -> int:
        """Number of candidates (``levels ** groups``)."""
        return self.num_levels ** self.num_groups

    # --- candidates -------------------------------------------------------------------------
    def check(self, candidate: Candidate) -> Candidate:
        """Raise :class:`CandidateError` unless ``candidate`` has one valid level per group."""
        c = candidate.choices
        if len(c) != self.num_groups:
            raise CandidateError(
                f"{self.arch}: a candidate needs {self.num_groups} choices (one per width "
                f"group), got {len(c)}")
        for i, level in enumerate(c):
            if type(level) is not int and (isinstance(level, bool)
                                           or not isinstance(level, numbers.Integral)):
                raise CandidateError(
                    f"{self.arch}: group {self.groups[i].name!r} level {level!r} is not an "
                    f"integer level index (0..{self.num_levels - 1})")
            if not 0 <= level < self.num_levels:
                raise CandidateError(
                    f"{self.arch}: group {self.groups[i].name!r} level {level!r} is outside "
                    f"0..{self.num_levels - 1}")
        return candidate

    def widths(self, candidate: Candidate) -> tuple[int, ...]:
        """Width of every group, in group order."""
        self.check(candidate)
        return tuple(t[level] for t, level in zip(self.width_table, candidate.choices))

    def widths_by_group(self, candidate: Candidate) -> dict[str, int]:
        return {g.name: w for g, w in zip(self.groups, self.widths(candidate))}

    def uniform(self, level: int) -> Candidate:
        """Every group at the same level (the uniform-width baseline)."""
        return self.check(Candidate((level,) * self.num_groups))

    def largest(self) -> Candidate:
        return self.uniform(self.num_levels - 1)

    def smallest(self) -> Candidate:
        return self.uniform(0)

    def random(self, rng: random.Random) -> Candidate:
        """A candidate drawn uniformly per group."""
        return Candidate(tuple(rng.randrange(self.num_levels) for _ in self.groups))

    def from_widths(self, widths: dict[str, int]) -> Candidate:
        """The candidate with exactly these group widths (each must be one of the group's levels)."""
        unknown = set(widths) - set(self.group_index)
        missing = set(self.group_index) - set(widths)
        if unknown or missing:
            raise CandidateError(f"{self.arch}: width groups do not match (" + ", ".join(
                f"{what}: {sorted(names)}" for what, names in
                (("unknown", unknown), ("missing", missing)) if names) + ")")
        choices = []
        for g, table in zip(self.groups, self.width_table):
            w = widths[g.name]
            if type(w) is not int:  # not 8.0, "8" or True
                raise CandidateError(f"{self.arch}: width {w!r} of group {g.name!r} must be a "
                                     f"whole number of channels, like {table[-1]}")
            if w not in table:
                raise CandidateError(
                    f"{self.arch}: width {w!r} of group {g.name!r} is not a level; choose from "
                    f"{sorted(set(table))}")
            choices.append(table.index(w))
        return Candidate(tuple(choices))

    def resolve(self, channels: Channels, widths: tuple[int, ...]) -> int:
        """The channel count of a plan reference under the given group widths."""
        return channels if isinstance(channels, int) else widths[self.group_index[channels]]

    @classmethod
    def create(cls, arch: str, *, max_width_mult: float = 1.0,
               levels: tuple[float, ...] = DEFAULT_LEVELS, channel_divisor: int = 1,
               min_channels: int = 1, **arch_args) -> SearchSpace:
        """The space of a registered architecture, e.g. ``create("mobilenet_v2", num_classes=10,
        in_channels=1, input_size=28, max_width_mult=1.4)``."""
        from pruning.registry import get_arch

        builder = get_arch(arch)
        try:
            plan = builder(**arch_args)
        except ValueError:  # the builder's own checks of its arguments: the user's to read
            raise
        except Exception as e:  # noqa: BLE001 — a plugin's bug, named in one line
            raise ValueError(f"architecture {arch!r}: its builder failed "
                             f"({type(e).__name__}: {e})") from None
        return cls(arch=arch, arch_args=dict(arch_args), plan=plan, levels=tuple(levels),
                   max_width_mult=max_width_mult, channel_divisor=channel_divisor,
                   min_channels=min_channels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the plan was built for (its first
        conv's input)."""
        stem = self.plan.blocks[0].body[0]
        return (stem.cin, *stem.in_hw)

    def full_network(self) -> tuple[SearchSpace, Candidate]:
        """The unpruned 1.0× network of this architecture (``max_width_mult`` 1.0): the space
        and its largest candidate, which ratio budgets and reports refer to."""
        full = SearchSpace.create(self.arch, **self.arch_args)
        return full, full.largest()

    def to_dict(self) -> dict:
        """JSON-ready settings; :meth:`from_dict` rebuilds an equal space. A plugin's
        architecture adds its ``arch_sha256`` (:func:`pruning.registry.arch_digest`)."""
        from pruning.registry import arch_digest

        digest = arch_digest(self.arch)
        return {"arch": self.arch, "arch_args": dict(self.arch_args), "levels": list(self.levels),
                "max_width_mult": self.max_width_mult, "channel_divisor": self.channel_divisor,
                "min_channels": self.min_channels,
                **({"arch_sha256": digest} if digest is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        """The space of :meth:`to_dict`; ``ValueError`` if its plugin architecture has changed
        since."""
        from pruning.registry import PLUGINS_ENV, arch_digest, list_archs

        if d.get("arch_sha256") is not None and d["arch"] not in list_archs(include_test=True):
            raise ValueError(f"unknown architecture {d['arch']!r}: it is a plugin's; set "
                             f"{PLUGINS_ENV} to the module that registers it")
        if d.get("arch_sha256") is not None and d["arch_sha256"] != arch_digest(d["arch"]):
            raise ValueError(f"architecture {d['arch']!r} is not the one this was made with: "
                             "its plugin has changed since (restore that version of it)")
        return cls.create(d["arch"], max_width_mult=d["max_width_mult"],
                          levels=tuple(d["levels"]), channel_divisor=d["channel_divisor"],
                          min_channels=d.get("min_channels", 1),  # older files: none
                          **d["arch_args"])


def same_space(stored: dict, current: dict) -> bool:
    """Whether a space recorded by :meth:`SearchSpace.to_dict` (a file's) is ``current``'s; a
    record made before ``arch_sha256`` existed is compared without it."""
    stored, current = json.loads(json.dumps(stored)), json.loads(json.dumps(current))
    if isinstance(stored, dict) and "arch_sha256" not in stored:
        current.pop("arch_sha256", None)
    return stored == current


def _positive_int(x) -> bool:
    """A plain ``int`` of at least 1 (not a bool, not numpy's: counts, JSON and the meta
    forward take plain ints)."""
    return type(x) is int and x >= 1


def _validate_plan(plan: Plan, arch_args: dict | None = None) -> None:
    """Check that a plan describes one network, so every candidate builds, counts and runs as
    its figures say: layer settings in range; module names unique and usable; channels that
    chain up (widths through the layers and both branches of a residual block); spatial sizes
    that chain up (each layer's ``in_hw`` the previous one's output, both branches ending at
    the same size); the first layer a conv taking the image; and, where ``arch_args`` give
    them, the image's channels and size and the classes."""
    names = [g.name for g in plan.groups]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate width group names in {names}")
    if not all(_positive_int(g.base) for g in plan.groups):
        raise ValueError("every width group's base width must be a positive integer")
    known = set(names)
    used: set[str] = set()

    def ref(c: Channels, where: str) -> Channels:
        if isinstance(c, str):
            if c not in known:
                raise ValueError(f"{where}: unknown width group {c!r}")
            used.add(c)
        elif not _positive_int(c):
            raise ValueError(f"{where}: channel count must be a positive integer")
        return c

    def module_names(items, where: str) -> None:
        seen = [x.name for x in items]
        for name in seen:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"{where}: {name!r} is not a module name (non-empty, no '.')")
        dup = sorted({n for n in seen if seen.count(n) > 1})
        if dup:
            raise ValueError(f"{where}: duplicate names {dup}")

    def chain(layers, cur: Channels, hw, where: str):
        module_names(layers, where)
        for layer in layers:
            at = f"{where}.{layer.name}"
            if tuple(layer.in_hw) != tuple(hw):
                raise ValueError(f"{at}: in_hw {tuple(layer.in_hw)} does not follow the "
                                 f"previous output {tuple(hw)}")
            if isinstance(layer, MaxPoolSpec):
                hw = layer.out_hw
                continue
            if not isinstance(layer, ConvSpec):
                raise ValueError(f"{at}: a {type(layer).__name__}, not a ConvSpec or MaxPoolSpec")
            for name in ("kernel", "stride"):
                if not _positive_int(getattr(layer, name)):
                    raise ValueError(f"{at}: {name} must be a positive integer")
            ref(layer.cin, at)
            ref(layer.cout, at)
            if layer.cin != cur:
                raise ValueError(f"{at}: input {layer.cin!r} does not follow {cur!r}")
            if layer.depthwise and layer.cin != layer.cout:
                raise ValueError(f"{at}: depthwise conv must keep its width")
            if layer.act not in ACTIVATIONS:
                raise ValueError(f"{at}: unknown activation {layer.act!r}")
            cur, hw = layer.cout, layer.out_hw
        return cur, hw

    if not plan.blocks or not plan.blocks[0].body or \
            not isinstance(plan.blocks[0].body[0], ConvSpec):
        raise ValueError("the first layer must be a convolution (it takes the image)")
    stem = plan.blocks[0].body[0]
    in_hw = tuple(stem.in_hw)
    if len(in_hw) != 2 or not all(_positive_int(n) for n in in_hw):
        raise ValueError(f"the first layer's in_hw {stem.in_hw!r} is not a (height, width) "
                         "in pixels")
    module_names([*plan.blocks, plan.head], "the blocks and the head")
    cur, hw = stem.cin, in_hw
    for block in plan.blocks:
        start, start_hw = cur, hw
        cur, hw = chain(block.body, start, start_hw, block.name)
        if block.shortcut is not None:
            short, short_hw = (chain(block.shortcut, start, start_hw, block.name + ".shortcut")
                               if block.shortcut else (start, start_hw))
            if short != cur:
                raise ValueError(f"{block.name}: residual branches end in {cur!r} and "
                                 f"{short!r}")
            if short_hw != hw:
                raise ValueError(f"{block.name}: residual branches end at {hw} and {short_hw} "
                                 "px (a strided body needs a strided projection shortcut)")
    if plan.head.cin != cur:
        raise ValueError(f"head input {plan.head.cin!r} does not follow {cur!r}")
    ref(plan.head.cin, "head")
    if not _positive_int(plan.head.cout):
        raise ValueError("the head's classes must be a positive integer")
    if known - used:
        raise ValueError(f"width groups never used: {sorted(known - used)}")
    args = arch_args or {}
    for name, got in (("in_channels", stem.cin), ("num_classes", plan.head.cout)):
        if args.get(name) is not None and got != args[name]:
            raise ValueError(f"the plan was asked for {name}={args[name]} but has {got}")
    if args.get("input_size") is not None and in_hw != (args["input_size"],) * 2:
        raise ValueError(f"the plan was asked for input_size={args['input_size']} but its "
                         f"first layer takes {in_hw[0]}×{in_hw[1]} px")
