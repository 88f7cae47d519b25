"""Registry, search spaces, width groups and candidates (DESIGN.md §3, "Search space")."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from fractions import Fraction

import numpy as np
import pytest
from conftest import ALL_ARCHS, REAL_ARCHS, TEST_ARCHS, candidates, space_of
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning import registry
from pruning.registry import UnknownArchError, get_arch, list_archs, register_arch
from pruning.space import (DEFAULT_LEVELS, Block, Candidate, CandidateError, ConvSpec, Head,
                           MaxPoolSpec, Plan, SearchSpace, WidthGroup, conv_layers)

# --- registry -------------------------------------------------------------------------------


def test_registry_lists_real_and_test_archs():
    real = list_archs()
    assert set(REAL_ARCHS) <= set(real)
    assert not [a for a in real if a.startswith("test_")], "test archs are hidden by default"
    everything = list_archs(include_test=True)
    assert set(real) <= set(everything)
    assert {"test_mobilenet_v1", "test_mobilenet_v2", "test_resnet",
            "test_resnet_bottleneck"} <= set(everything)
    assert everything == sorted(everything)


def test_unknown_arch_message_lists_available_names():
    with pytest.raises(KeyError) as info:
        get_arch("resnet9000")
    assert isinstance(info.value, UnknownArchError)
    msg = str(info.value)
    assert "resnet9000" in msg
    for name in list_archs(include_test=True):
        assert name in msg
    with pytest.raises(KeyError, match="available"):
        SearchSpace.create("no_such_net")


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(registry, "_ARCHS", dict(registry._ARCHS))  # leave the real one alone
    with pytest.raises(ValueError, match="already registered"):
        register_arch("resnet18")(lambda **kw: None)

    def fresh(num_classes=10, in_channels=1, input_size=28):
        return get_arch("test_resnet")(num_classes, in_channels, input_size)

    register_arch("test_fresh_arch")(fresh)
    assert "test_fresh_arch" in list_archs(include_test=True)
    assert get_arch("test_fresh_arch") is fresh
    with pytest.raises(ValueError, match="test_fresh_arch"):
        register_arch("test_fresh_arch")(fresh)
    assert get_arch("test_fresh_arch") is fresh, "a failed registration must not replace"


# --- levels and widths ----------------------------------------------------------------------


def test_default_levels():
    assert len(DEFAULT_LEVELS) == 31
    assert DEFAULT_LEVELS[0] == 0.10 and DEFAULT_LEVELS[-1] == 1.00
    assert [round(b - a, 10) for a, b in zip(DEFAULT_LEVELS, DEFAULT_LEVELS[1:])] == [0.03] * 30
    # exact decimal values, so that width formulas do not suffer from float drift
    assert [Fraction(str(s)) for s in DEFAULT_LEVELS] == [Fraction(10 + 3 * k, 100)
                                                         for k in range(31)]
    space = space_of("test_resnet")
    assert space.levels == DEFAULT_LEVELS and space.num_levels == 31
    assert space.size == 31 ** space.num_groups


@pytest.mark.parametrize("mult", [1.0, 1.4, 0.5, 2.0])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_widths_follow_the_paper_formula(arch, mult):
    """max = floor(base × mult); width = max(1, floor(max × scale)), computed exactly."""
    space = space_of(arch, max_width_mult=mult)
    m = Fraction(str(mult))
    for g, gmax, table in zip(space.groups, space.max_widths, space.width_table):
        assert gmax == max(1, math.floor(g.base * m))
        assert table == tuple(max(1, math.floor(gmax * Fraction(str(s)))) for s in space.levels)
        assert table[-1] == gmax
        assert list(table) == sorted(table)


def test_mobilenet_v2_at_1_4x():
    space = space_of("mobilenet_v2", max_width_mult=1.4)
    base = {g.name: g.base for g in space.groups}
    assert base["stem"] == 32 and base["head"] == 1280 and base["stage1"] == 16
    assert base["s2b0.mid"] == 16 * 6 and base["s3b0.mid"] == 24 * 6
    widest = space.widths_by_group(space.largest())
    assert widest["stem"] == 44          # floor(32 × 1.4) = floor(44.8)
    assert widest["head"] == 1792        # 1280 × 1.4
    assert widest["stage1"] == 22        # floor(22.4)
    assert widest["s2b0.mid"] == 134     # floor(96 × 1.4) = floor(134.4)
    narrowest = space.widths_by_group(space.smallest())
    assert narrowest["head"] == 179      # floor(1792 × 0.10) = floor(179.2)
    assert narrowest["stem"] == 4        # floor(44 × 0.10)
    # at 1.0× the maximum is the base width
    assert space_of("mobilenet_v2").widths_by_group(space_of("mobilenet_v2").largest()) == base


@pytest.mark.parametrize("divisor", [2, 8, 16])
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet50", "test_mobilenet_v2"])
def test_channel_divisor_rounds_to_multiples(arch, divisor):
    space = space_of(arch, max_width_mult=1.4, channel_divisor=divisor)
    plain = space_of(arch, max_width_mult=1.4)
    for gmax, table, plain_max in zip(space.max_widths, space.width_table, plain.max_widths):
        assert gmax % divisor == 0 and abs(gmax - plain_max) <= divisor / 2 or gmax == divisor
        assert list(table) == sorted(table), "width_table must be non-decreasing"
        assert table[-1] == gmax
        for w, s in zip(table, space.levels):
            raw = max(1, math.floor(gmax * Fraction(str(s))))
            assert w % divisor == 0 and divisor <= w <= gmax
            # the nearest multiple of the (rounded) unrounded width, or the divisor itself
            assert abs(w - raw) <= divisor / 2 or w == divisor


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_width_table_non_decreasing_and_bounded(arch):
    space = space_of(arch)
    assert len(space.width_table) == space.num_groups
    for gmax, table in zip(space.max_widths, space.width_table):
        assert len(table) == space.num_levels
        assert all(1 <= a <= b <= gmax for a, b in zip(table, table[1:]))


@pytest.mark.parametrize("kwargs", [dict(max_width_mult=0), dict(max_width_mult=5),
                                    dict(channel_divisor=0), dict(channel_divisor=65),
                                    dict(levels=()), dict(levels=(0.5, 0.3)),
                                    dict(levels=(0.0, 0.5)), dict(levels=(0.5, 1.1)),
                                    dict(levels=(0.5, 0.5, 1.0))])
def test_invalid_space_settings(kwargs):
    with pytest.raises(ValueError):
        SearchSpace.create("test_resnet", **kwargs)


def test_custom_levels():
    space = space_of("test_resnet", levels=(0.25, 0.5, 1.0))
    assert space.num_levels == 3 and space.size == 3 ** space.num_groups
    stage2 = space.group_index["stage2"]
    assert space.width_table[stage2] == (4, 8, 16)
    with pytest.raises(CandidateError):
        space.check(Candidate((3,) * space.num_groups))


# --- candidates -----------------------------------------------------------------------------


def test_check_rejects_bad_candidates():
    space = space_of("test_mobilenet_v2")
    n = space.num_groups
    ok = Candidate((0,) * n)
    assert space.check(ok) is ok
    for bad in [(0,) * (n - 1), (0,) * (n + 1), ()]:
        with pytest.raises(CandidateError, match=f"{n} choices"):
            space.check(Candidate(bad))
    for level in (-1, 31, 100, 1.0, "3", None):
        choices = list(ok.choices)
        choices[2] = level
        with pytest.raises(CandidateError, match=space.groups[2].name):
            space.check(Candidate(tuple(choices)))
    with pytest.raises(CandidateError):
        space.widths(Candidate((31,) * n))
    with pytest.raises(CandidateError):
        space.uniform(31)
    assert issubclass(CandidateError, ValueError)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_uniform_largest_smallest(arch):
    space = space_of(arch)
    assert space.widths(space.largest()) == space.max_widths
    assert space.widths(space.smallest()) == tuple(t[0] for t in space.width_table)
    assert space.uniform(7).choices == (7,) * space.num_groups


def test_random_is_seeded_and_valid():
    space = space_of("resnet50")
    a = [space.random(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(4)
    draws = [space.random(rng) for _ in range(300)]
    for c in draws:
        space.check(c)
    seen = {level for c in draws for level in c.choices}
    assert seen == set(range(space.num_levels)), "uniform per group reaches every level"


@settings(max_examples=25)
@given(data=st.data(), arch=st.sampled_from(ALL_ARCHS))
def test_from_widths_round_trips(data, arch):
    space = space_of(arch)
    cand = data.draw(candidates(space))
    widths = space.widths_by_group(cand)
    assert list(widths) == [g.name for g in space.groups]
    back = space.from_widths(widths)
    assert space.widths_by_group(back) == widths
    # without duplicate widths in a table, the level itself round-trips
    for i, (level, table) in enumerate(zip(cand.choices, space.width_table)):
        if table.count(table[level]) == 1:
            assert back.choices[i] == level


def test_from_widths_errors():
    space = space_of("test_resnet")
    widths = space.widths_by_group(space.largest())
    first = next(iter(widths))
    with pytest.raises(CandidateError, match=rf"do not match \(missing: \['{first}'\]\)$"):
        space.from_widths({k: v for k, v in list(widths.items())[1:]})
    with pytest.raises(CandidateError, match=r"do not match \(unknown: \['nope'\]\)$"):
        space.from_widths({**widths, "nope": 3})
    with pytest.raises(CandidateError, match="width 17 of group 'stage2' is not a level"):
        space.from_widths({**widths, "stage2": 17})
    # only integers: JSON's "4", 4.0 or true are not widths, though 4 == 4.0 == True * 4
    ok = space.widths_by_group(space.smallest())
    for bad in (str(ok[first]), float(ok[first]), True):
        with pytest.raises(CandidateError,
                           match=f"width {bad!r} of group '{first}' must be a whole number of "
                                 f"channels, like"):
            space.from_widths({**ok, first: bad})


@settings(max_examples=25)
@given(choices=st.lists(st.integers(0, 10_000), min_size=1, max_size=40))
def test_candidate_key_round_trips(choices):
    cand = Candidate(tuple(choices))
    key = cand.key()
    assert Candidate.from_key(key) == cand
    assert json.loads(json.dumps(key)) == key
    assert key.replace("-", "").isdigit()


def test_candidate_keys_distinguish_candidates():
    assert Candidate((1, 23)).key() != Candidate((12, 3)).key()
    assert hash(Candidate((1, 2))) == hash(Candidate((1, 2)))


@pytest.mark.parametrize("kwargs", [
    dict(arch="test_resnet"),
    dict(arch="mobilenet_v2", num_classes=10, in_channels=1, input_size=28, max_width_mult=1.4),
    dict(arch="resnet50", channel_divisor=8, levels=(0.25, 0.5, 0.75, 1.0)),
    dict(arch="mobilenet_v1", width_mult=0.25, min_channels=4),
])
def test_space_dict_round_trip(kwargs):
    kwargs = dict(kwargs)
    space = SearchSpace.create(kwargs.pop("arch"), **kwargs)
    d = json.loads(json.dumps(space.to_dict()))
    back = SearchSpace.from_dict(d)
    assert back.to_dict() == space.to_dict()
    assert back.plan == space.plan
    assert back.levels == space.levels and isinstance(back.levels, tuple)
    assert back.width_table == space.width_table
    assert back == space


# --- width groups of each family -------------------------------------------------------------


def _group_names(arch, **kw):
    return [g.name for g in space_of(arch, **kw).groups]


def test_mobilenet_v2_groups():
    names = _group_names("mobilenet_v2")
    stages = [n for n in names if n.startswith("stage")]
    mids = [n for n in names if n.endswith(".mid")]
    assert stages == [f"stage{i}" for i in range(1, 8)]
    # one free mid width per block with expansion != 1: stage 1 (t = 1) has none
    assert len(mids) == 2 + 3 + 4 + 3 + 3 + 1
    assert not [m for m in mids if m.startswith("s1b")]
    assert names[0] == "stem" and names[-1] == "head"
    assert len(names) == 25 == 7 + 16 + 2
    assert _group_names("mobilenet_v2", input_size=32) == names
    # inside a stage, every block writes the stage group (shared by the identity shortcuts)
    space = space_of("mobilenet_v2")
    for block in space.plan.blocks[1:-1]:  # between the stem and the last conv
        stage = f"stage{block.name[1]}"
        assert block.body[-1].cout == stage
        if block.shortcut is not None:
            assert block.shortcut == () and block.body[0].cin == stage


def test_mobilenet_v1_every_layer_free():
    space = space_of("mobilenet_v1")
    assert space.num_groups == 14
    assert [g.name for g in space.groups] == ["stem"] + [f"l{i}" for i in range(1, 14)]
    assert all(b.shortcut is None for b in space.plan.blocks)
    pointwise = [c for c in conv_layers(space.plan) if not c.depthwise]
    assert [c.cout for c in pointwise] == [g.name for g in space.groups]  # one group per layer


@pytest.mark.parametrize("arch, n_groups, blocks", [("resnet18", 12, (2, 2, 2, 2)),
                                                   ("resnet34", 20, (3, 4, 6, 3)),
                                                   ("resnet50", 21, (3, 4, 6, 3))])
def test_resnet_groups(arch, n_groups, blocks):
    space = space_of(arch)
    names = [g.name for g in space.groups]
    assert len(names) == n_groups
    assert [n for n in names if n.startswith("stage")] == [f"stage{i}" for i in range(1, 5)]
    assert len([n for n in names if n.endswith(".mid")]) == sum(blocks)
    assert ("stem" in names) == (arch == "resnet50")  # basic: stem feeds identity shortcuts
    for block in space.plan.blocks[1:]:
        stage = f"stage{block.name[1]}"
        assert block.body[-1].cout == stage
        inner = {c.cout for c in block.body[:-1]}
        assert inner == {f"{block.name}.mid"}
    base = {g.name: g.base for g in space.groups}
    expansion = 4 if arch == "resnet50" else 1
    assert [base[f"stage{i}"] for i in range(1, 5)] == [p * expansion for p in (64, 128, 256, 512)]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_group_is_used_and_plans_chain(arch):
    space = space_of(arch)
    refs = {c for conv in conv_layers(space.plan) for c in (conv.cin, conv.cout)}
    assert {g.name for g in space.groups} <= refs | {space.plan.head.cin}
    assert conv_layers(space.plan)[0].cin == (1 if arch in TEST_ARCHS else 3)


# --- input sizes ----------------------------------------------------------------------------


def _final_hw(space):
    return conv_layers(space.plan)[-1].out_hw


def test_small_vs_large_stem_resnet():
    big, small = space_of("resnet18", input_size=224), space_of("resnet18", input_size=32)
    assert isinstance(big.plan.blocks[0].body[1], MaxPoolSpec)
    assert not any(isinstance(layer, MaxPoolSpec) for b in small.plan.blocks for layer in b.body)
    assert big.plan.blocks[0].body[0].kernel == 7 and big.plan.blocks[0].body[0].stride == 2
    assert small.plan.blocks[0].body[0].kernel == 3 and small.plan.blocks[0].body[0].stride == 1
    assert _final_hw(big) == (7, 7)
    assert _final_hw(small) == (4, 4)
    # the threshold is 64 px
    assert not isinstance(space_of("resnet18", input_size=63).plan.blocks[0].body[-1], MaxPoolSpec)
    assert isinstance(space_of("resnet18", input_size=64).plan.blocks[0].body[-1], MaxPoolSpec)


def test_small_vs_large_stem_mobilenets():
    assert _final_hw(space_of("mobilenet_v2", input_size=224)) == (7, 7)
    assert _final_hw(space_of("mobilenet_v2", input_size=32)) == (4, 4)
    assert space_of("mobilenet_v2", input_size=32).plan.blocks[0].body[0].stride == 1
    assert space_of("mobilenet_v2", input_size=64).plan.blocks[0].body[0].stride == 2
    assert _final_hw(space_of("mobilenet_v1", input_size=224)) == (7, 7)
    assert _final_hw(space_of("mobilenet_v1", input_size=32)) == (2, 2)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_spatial_sizes_chain(arch):
    """Every layer's input size is its predecessor's output size (shortcuts: the block input)."""
    plan = space_of(arch, input_size=40).plan
    hw = (40, 40)
    for block in plan.blocks:
        start = hw
        for layer in block.body:
            assert layer.in_hw == hw, (block.name, layer.name)
            hw = layer.out_hw
        for conv in block.shortcut or ():
            assert conv.in_hw == start and conv.out_hw == hw


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("bad", [dict(input_size=4), dict(input_size=2000), dict(in_channels=0),
                                 dict(in_channels=65), dict(num_classes=0)])
def test_invalid_arch_args(arch, bad):
    with pytest.raises(ValueError):
        SearchSpace.create(arch, **bad)


def test_arch_args_reach_the_plan():
    space = space_of("resnet18", num_classes=7, in_channels=5, input_size=40)
    assert space.plan.head.cout == 7
    assert conv_layers(space.plan)[0].cin == 5
    assert conv_layers(space.plan)[0].in_hw == (40, 40)
    assert space.arch_args == dict(num_classes=7, in_channels=5, input_size=40)


# --- plan validation ------------------------------------------------------------------------


def _conv(name, cin, cout, **kw):
    return ConvSpec(name, cin, cout, 3, 1, (8, 8), **kw)


def _space(blocks, groups, head_cin="b"):
    plan = Plan(tuple(blocks), Head("classifier", head_cin, 10),
                tuple(WidthGroup(g, 8) for g in groups))
    return SearchSpace(arch="custom", arch_args={}, plan=plan)


def test_valid_custom_plan():
    space = _space([Block("stem", (_conv("c", 3, "a"),)),
                    Block("res", (_conv("c1", "a", "m"), _conv("c2", "m", "b")),
                          (_conv("p", "a", "b", act=None),), act="relu")], ["a", "m", "b"])
    assert space.num_groups == 3


def test_a_block_of_a_pool_alone_is_valid():
    space = _space([Block("stem", (_conv("c", 3, "a"),)), Block("pool", (MaxPoolSpec("p", (8, 8)),)),
                    Block("b", (ConvSpec("c1", "a", "b", 3, 1, (4, 4)),))], ["a", "b"])
    assert space.input_shape == (3, 8, 8)


@pytest.mark.parametrize("case, message", [
    ("branches", "residual branches end in 'b' and 'c'"),
    ("unused", "width groups never used: ['spare']"),
    ("unknown", "unknown width group 'zzz'"),
    ("chain", "input 'b' does not follow 'a'"),
    ("depthwise", "depthwise conv must keep its width"),
    ("head", "head input 'a' does not follow 'b'"),
    ("duplicate", "duplicate width group names"),
    ("activation", "unknown activation 'gelu'"),
    ("identity", "residual branches end in 'b' and 'a'"),
    # spatial sizes: a layer's in_hw ignoring the previous stride, a strided body beside an
    # identity-sized shortcut (the counts would be wrong, or the sum would not add up)
    ("hw", "b.c2: in_hw (8, 8) does not follow the previous output (4, 4)"),
    ("strided_projection", "residual branches end at (4, 4) and (8, 8) px"),
    # names: nn.Sequential would silently keep one of two modules of one name
    ("duplicate_block", "duplicate names ['stem']"),
    ("duplicate_layer", "b: duplicate names ['c1']"),
    ("head_clash", "duplicate names ['classifier']"),
    ("dot", "'b.x' is not a module name"),
    ("stride0", "b.c1: stride must be a positive integer"),
    ("kernel0", "b.c1: kernel must be a positive integer"),
    ("pool_first", "the first layer must be a convolution"),
    ("numpy", "b.c1: kernel must be a positive integer"),  # counts and JSON take plain ints
])
def test_invalid_plans_raise(case, message):
    stem = Block("stem", (_conv("c", 3, "a"),))
    blocks, groups, head = [stem, Block("b", (_conv("c1", "a", "b"),))], ["a", "b"], "b"
    if case == "branches":  # body ends in b, projection in c
        groups = ["a", "b", "c"]
        blocks[1] = Block("res", (_conv("c1", "a", "b"),), (_conv("p", "a", "c"),))
    elif case == "identity":  # identity shortcut from a, body ends in b
        blocks[1] = Block("res", (_conv("c1", "a", "b"),), ())
    elif case == "unused":
        groups = ["a", "b", "spare"]
    elif case == "unknown":
        blocks[1] = Block("b", (_conv("c1", "a", "zzz"),))
    elif case == "chain":  # second block reads b but a precedes it
        groups = ["a", "b"]
        blocks = [stem, Block("b", (_conv("c1", "b", "b"),))]
    elif case == "depthwise":
        blocks[1] = Block("b", (_conv("c1", "a", "b", depthwise=True),))
    elif case == "head":
        head = "a"
    elif case == "duplicate":
        groups = ["a", "b", "a"]
    elif case == "activation":
        blocks[1] = Block("b", (_conv("c1", "a", "b", act="gelu"),))
    elif case == "hw":
        blocks[1] = Block("b", (ConvSpec("c1", "a", "b", 3, 2, (8, 8)), _conv("c2", "b", "b")))
    elif case == "strided_projection":
        blocks[1] = Block("res", (ConvSpec("c1", "a", "b", 3, 2, (8, 8)),),
                          (ConvSpec("p", "a", "b", 1, 1, (8, 8)),))
    elif case == "duplicate_block":
        blocks[1] = Block("stem", (_conv("c1", "a", "b"),))
    elif case == "duplicate_layer":
        blocks[1] = Block("b", (_conv("c1", "a", "b"), _conv("c1", "b", "b")))
    elif case == "head_clash":
        blocks[1] = Block("classifier", (_conv("c1", "a", "b"),))
    elif case == "dot":
        blocks[1] = Block("b.x", (_conv("c1", "a", "b"),))
    elif case == "stride0":
        blocks[1] = Block("b", (ConvSpec("c1", "a", "b", 3, 0, (8, 8)),))
    elif case == "kernel0":
        blocks[1] = Block("b", (ConvSpec("c1", "a", "b", 0, 1, (8, 8)),))
    elif case == "numpy":
        blocks[1] = Block("b", (ConvSpec("c1", "a", "b", np.int64(3), 1, (8, 8)),))
    elif case == "pool_first":
        blocks[0] = Block("stem", (MaxPoolSpec("p", (16, 16)), _conv("c", 3, "a")))
    with pytest.raises(ValueError, match=re.escape(message)):
        _space(blocks, groups, head)


@pytest.mark.parametrize("builder, message", [
    (lambda **kw: 1 / 0, "its builder failed (ZeroDivisionError: division by zero)"),
    (lambda num_classes=10, in_channels=1, input_size=28: None,
     "its plan is a NoneType, not a pruning.space.Plan"),
    (lambda num_classes=10, in_channels=1, input_size=28: _stem_plan(3, 28, num_classes),
     "the plan was asked for in_channels=1 but has 3"),
    (lambda num_classes=10, in_channels=1, input_size=28: _stem_plan(in_channels, 28, 7),
     "the plan was asked for num_classes=10 but has 7"),
    (lambda num_classes=10, in_channels=1, input_size=28: _stem_plan(in_channels, 32, 10),
     "the plan was asked for input_size=28 but its first layer takes 32×32 px"),
])
def test_a_broken_architecture_is_one_clear_error(monkeypatch, builder, message):
    """A plugin's builder that fails, returns no plan, or ignores its arguments."""
    monkeypatch.setitem(registry._ARCHS, "my_broken", builder)
    with pytest.raises(ValueError, match=re.escape(f"architecture 'my_broken': {message}")):
        SearchSpace.create("my_broken", num_classes=10, in_channels=1, input_size=28)


def _stem_plan(in_channels, size, classes):
    return Plan((Block("stem", (ConvSpec("c", in_channels, "a", 3, 1, (size, size)),)),),
                Head("classifier", "a", classes), (WidthGroup("a", 8),))


@pytest.mark.parametrize("floor", [1, 4, 16])
def test_min_channels_floors_every_group_below_its_maximum(floor):
    """No width below ``min(min_channels, max_width)``; levels above the floor are unchanged."""
    plain = SearchSpace.create("mobilenet_v1", width_mult=0.25)
    space = SearchSpace.create("mobilenet_v1", width_mult=0.25, min_channels=floor)
    for row, plain_row, top in zip(space.width_table, plain.width_table, space.max_widths):
        assert row == tuple(max(min(floor, top), w) for w in plain_row)
    assert min(min(row) for row in space.width_table) == min(floor, min(space.max_widths))
    # spaces saved before the setting existed load with no floor
    old = {k: v for k, v in space.to_dict().items() if k != "min_channels"}
    assert SearchSpace.from_dict(old).width_table == plain.width_table
    with pytest.raises(ValueError, match="min_channels"):
        SearchSpace.create("mobilenet_v1", min_channels=0)


PLUGIN = '''
from pruning.archs import mobilenet_v1_plan
from pruning.registry import register_arch


@register_arch("test_plugin_short_v1")
def short_v1(num_classes=1000, in_channels=3, input_size=224, width_mult=1.0):
    return mobilenet_v1_plan(num_classes, in_channels, input_size, width_mult,
                             settings=((16, 1), (32, 2)))
'''


def test_plugins_register_architectures(tmp_path, monkeypatch, capsys):
    """$METAPRUNE_PLUGINS names modules that register architectures; the CLI sees them."""
    from pruning import cli

    (tmp_path / "my_archs_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_ARCHS", dict(registry._ARCHS))  # leave the real one alone
    monkeypatch.delitem(sys.modules, "my_archs_plugin", raising=False)
    monkeypatch.setenv("METAPRUNE_PLUGINS", " my_archs_plugin , ")
    assert "test_plugin_short_v1" in list_archs(include_test=True)
    assert cli.main(["space", "test_plugin_short_v1"]) == 0
    space = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in space["groups"]] == ["stem", "l1", "l2"]

    monkeypatch.setenv("METAPRUNE_PLUGINS", "my_archs_plugin,no_such_plugin_module")
    assert cli.main(["space", "mobilenet_v1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "metaprune: error: METAPRUNE_PLUGINS: cannot import 'no_such_plugin_module' "
        "(ModuleNotFoundError: ") and err.endswith("; is its folder on PYTHONPATH?)\n")
    # the service's processes fail at their start, before any job or database work
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    for argv in (["worker", "--database-url", db], ["serve", "--database-url", db]):
        assert cli.main(argv) == 2
        assert "cannot import 'no_such_plugin_module'" in capsys.readouterr().err
    assert not (tmp_path / "jobs.db").exists()


def test_a_plugin_that_fails_midway_is_reported_every_time(tmp_path, monkeypatch):
    """What a plugin registered before it failed is taken back (the next call reports its own
    error again, not a clash), and a plugin cannot take a built-in name."""
    (tmp_path / "half_plugin.py").write_text(PLUGIN.replace("test_plugin_short_v1", "half_ok")
                                             + "\nraise RuntimeError('broken at the end')\n")
    (tmp_path / "clash_plugin.py").write_text(PLUGIN.replace("test_plugin_short_v1", "resnet18"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_ARCHS", dict(registry._ARCHS))
    for name in ("half_plugin", "clash_plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("METAPRUNE_PLUGINS", "half_plugin")
    for _ in range(2):
        with pytest.raises(ValueError, match="RuntimeError: broken at the end"):
            list_archs()
        sys.modules.pop("half_plugin", None)
    assert "half_ok" not in registry._ARCHS
    monkeypatch.setenv("METAPRUNE_PLUGINS", "clash_plugin")
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        list_archs()


def test_the_paper_preset_knows_a_plugin_s_family(monkeypatch):
    """A variant built by a family builder gets its family's recipe and widths, whatever its
    name (MobileNetV2 searched up to 1.4×, the ResNets trained with step decay)."""
    from pruning.archs import mobilenet_v1_plan, mobilenet_v2_plan, resnet_plan
    from pruning.spec import Budget, PipelineSpec

    variants = {"my_v2": mobilenet_v2_plan, "mobilenet_v2_lookalike": mobilenet_v1_plan,
                "my_resnet": lambda *a, **k: resnet_plan(*a, layers=(1, 1), planes=(8, 16), **k)}
    for name, fn in variants.items():
        monkeypatch.setitem(registry._ARCHS, name, fn)

    def resolved(arch):
        return PipelineSpec(arch=arch, preset="paper", budget=Budget(macs_ratio=0.5)).resolved()

    assert resolved("my_v2").max_width_mult == 1.4
    assert resolved("mobilenet_v2_lookalike").max_width_mult == 1.0
    assert resolved("my_resnet").final.schedule == "step"
    assert resolved("my_v2").final.schedule == "linear"
    with pytest.raises(ValueError, match="layers \\(1, 1\\) and planes \\(8,\\) must"):
        resnet_plan(layers=(1, 1), planes=(8,))


def test_a_plugin_edited_under_the_same_name_is_told_apart(monkeypatch):
    """A plugin's plan is part of what a file records (``arch_sha256``): a space, a search
    state or an export made with one version of it is not read with another."""
    from pruning.spec import Budget, PipelineSpec, metanet_identity

    def version_1(num_classes=10, in_channels=1, input_size=28, width_mult=1.0):
        return _stem_plan(in_channels, input_size, num_classes)

    def version_2(num_classes=10, in_channels=1, input_size=28, width_mult=1.0):
        plan = _stem_plan(in_channels, input_size, num_classes)
        return Plan(plan.blocks, plan.head, (WidthGroup("a", 16),))

    monkeypatch.setitem(registry._ARCHS, "my_plugin", version_1)
    saved = SearchSpace.create("my_plugin").to_dict()
    assert len(saved["arch_sha256"]) == 64
    assert SearchSpace.from_dict(saved).to_dict() == saved
    spec = PipelineSpec(arch="my_plugin", budget=Budget(macs_ratio=0.5))
    before = metanet_identity(spec)
    monkeypatch.setitem(registry._ARCHS, "my_plugin", version_2)
    with pytest.raises(ValueError, match="'my_plugin' is not the one this was made with"):
        SearchSpace.from_dict(saved)
    assert metanet_identity(spec)["arch_sha256"] != before["arch_sha256"]
    assert "arch_sha256" not in SearchSpace.create("mobilenet_v2").to_dict()  # built-in: none
    monkeypatch.delitem(registry._ARCHS, "my_plugin")  # not loaded: said so, not "changed"
    with pytest.raises(ValueError, match="unknown architecture 'my_plugin': it is a plugin's; "
                                         "set METAPRUNE_PLUGINS"):
        SearchSpace.from_dict(saved)


def test_a_space_recorded_before_arch_sha256_still_matches(monkeypatch):
    """Files written before plugins' plans were recorded (no ``arch_sha256``) still match."""
    from pruning.space import same_space

    monkeypatch.setitem(registry._ARCHS, "my_old_plugin",
                        lambda num_classes=10, in_channels=1, input_size=28, width_mult=1.0:
                        _stem_plan(in_channels, input_size, num_classes))
    now = SearchSpace.create("my_old_plugin").to_dict()
    older = {k: v for k, v in now.items() if k != "arch_sha256"}
    assert same_space(older, now) and same_space(now, now)
    assert not same_space({**now, "arch_sha256": "0" * 64}, now)
    assert not same_space({**older, "min_channels": 4}, now)
    assert SearchSpace.from_dict(older).to_dict() == now
