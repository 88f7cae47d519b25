"""Exact MACs and parameters (DESIGN.md §3, "Counting"): pure functions of (space, candidate) that
must equal ``FlopCounterMode`` ÷ 2 and ``sum(p.numel())`` on the built network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import ALL_ARCHS, TEST_ARCHS, candidates, image_batch, space_of
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from pruning.counting import macs, macs_many, params, params_many
from pruning.modules import build
from pruning.space import Candidate

pytestmark = pytest.mark.usefixtures("single_thread")


def measured(space, candidate, device="cpu"):
    """(MACs, params) of the built network as PyTorch counts them, on a 1-image batch.

    ``device="uninit"`` builds on the meta device and then allocates zeroed CPU memory: a real
    CPU forward pass of the same network without the cost of random initialisation (the values
    do not matter for counting).
    """
    if device == "uninit":
        net = build(space, candidate, device="meta").to_empty(device="cpu").eval()
        with torch.no_grad():
            for t in net.state_dict().values():
                t.zero_()
        device = "cpu"
    else:
        net = build(space, candidate, device=device).eval()
    x = image_batch(space, 1).to(device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = net(x)
    assert out.shape == (1, space.plan.head.cout)
    return counter.get_total_flops() // 2, sum(p.numel() for p in net.parameters())


def small_space(arch):
    return space_of(arch, input_size=32, in_channels=3)


def device_for(arch):
    """Real networks skip the (slow, irrelevant) weight initialisation."""
    return "cpu" if arch in TEST_ARCHS else "uninit"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_counts_match_pytorch_at_the_extremes(arch):
    space = small_space(arch)
    for cand in (space.smallest(), space.largest(), space.uniform(15)):
        expected = macs(space, cand), params(space, cand)
        assert expected == measured(space, cand, device_for(arch))
    # the shortcuts count what a plain run counts (the smallest real nets are cheap to build)
    smallest = space.smallest()
    assert measured(space, smallest, "cpu") == measured(space, smallest, "meta") == measured(
        space, smallest, "uninit")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_counts_match_pytorch_on_random_candidates(arch):
    space = small_space(arch)

    @settings(max_examples=20 if arch in TEST_ARCHS else 15)
    @given(cand=candidates(space))
    def check(cand):
        expected = macs(space, cand), params(space, cand)
        assert expected == measured(space, cand, device_for(arch))

    check()


@pytest.mark.parametrize("arch, kwargs", [
    ("resnet18", dict(input_size=224)),
    ("mobilenet_v2", dict(input_size=224)),
    ("resnet50", dict(input_size=96, num_classes=100)),
    ("mobilenet_v2", dict(input_size=64, max_width_mult=1.4, channel_divisor=8, in_channels=1)),
    ("test_mobilenet_v2", dict(input_size=31, num_classes=3, in_channels=2, max_width_mult=1.4)),
    ("test_resnet_bottleneck", dict(input_size=65)),
])
def test_counts_match_pytorch_at_other_sizes(arch, kwargs):
    """Large inputs (ImageNet stem), odd sizes, other class/channel counts, the 1.4× space."""
    space = space_of(arch, **kwargs)

    @settings(max_examples=3)
    @given(cand=candidates(space))
    def check(cand):
        # the meta device: shapes only (a 224-px CPU forward pass would dominate the suite)
        assert (macs(space, cand), params(space, cand)) == measured(space, cand, "meta")

    check()


@pytest.mark.parametrize("arch, tv", [("resnet18", torchvision.models.resnet18),
                                      ("resnet34", torchvision.models.resnet34),
                                      ("resnet50", torchvision.models.resnet50),
                                      ("mobilenet_v2", torchvision.models.mobilenet_v2)])
def test_full_width_equals_torchvision(arch, tv):
    """At 1.0× and 224 px the real families are exactly torchvision's networks."""
    space = space_of(arch)
    with torch.device("meta"):
        ref = tv().eval()
    counter = FlopCounterMode(display=False)
    with counter:
        ref(torch.empty(1, 3, 224, 224, device="meta"))
    full = space.largest()
    assert macs(space, full) == counter.get_total_flops() // 2
    assert params(space, full) == sum(p.numel() for p in ref.parameters())


def test_known_totals():
    """Published numbers: ResNet-18 1.82 GMACs / 11.69 M params, MobileNetV2 300.8 M / 3.50 M,
    MobileNetV1 569 M / 4.23 M."""
    r18, v2, v1 = space_of("resnet18"), space_of("mobilenet_v2"), space_of("mobilenet_v1")
    assert (macs(r18, r18.largest()), params(r18, r18.largest())) == (1_814_073_344, 11_689_512)
    assert (macs(v2, v2.largest()), params(v2, v2.largest())) == (300_774_272, 3_504_872)
    assert round(macs(v1, v1.largest()) / 1e6) == 569
    assert round(params(v1, v1.largest()) / 1e4) == 423


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_many_agrees_with_scalar(arch):
    space = space_of(arch)
    rng = np.random.default_rng(0)
    choices = rng.integers(0, space.num_levels, size=(40, space.num_groups))
    choices[0] = 0
    choices[1] = space.num_levels - 1
    m, p = macs_many(space, choices), params_many(space, choices)
    assert m.shape == p.shape == (40,)
    assert m.dtype == p.dtype == np.int64
    for row, mi, pi in zip(choices, m, p):
        cand = Candidate(tuple(int(c) for c in row))
        assert int(mi) == macs(space, cand)
        assert int(pi) == params(space, cand)
    # lists work too, and a single row
    assert macs_many(space, choices[:3].tolist()).tolist() == m[:3].tolist()
    assert params_many(space, choices[5:6]).tolist() == [p[5]]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_monotone_in_every_group(arch):
    space = space_of(arch, input_size=32)

    @settings(max_examples=15)
    @given(data=st.data())
    def check(data):
        cand = data.draw(candidates(space, max_level=space.num_levels - 2))
        g = data.draw(st.integers(0, space.num_groups - 1))
        step = data.draw(st.integers(1, space.num_levels - 1 - cand.choices[g]))
        bigger = list(cand.choices)
        bigger[g] += step
        bigger = Candidate(tuple(bigger))
        assert macs(space, bigger) >= macs(space, cand)
        assert params(space, bigger) >= params(space, cand)
        if space.widths(bigger)[g] > space.widths(cand)[g]:  # a wider group costs parameters
            assert params(space, bigger) > params(space, cand)

    check()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_uniform_levels_strictly_ordered(arch):
    space = space_of(arch)
    m = macs_many(space, np.repeat(np.arange(space.num_levels)[:, None], space.num_groups, 1))
    assert np.all(np.diff(m) >= 0)
    assert m[-1] > m[0] > 0


def test_counts_validate_the_candidate():
    space = space_of("test_resnet")
    with pytest.raises(ValueError):
        macs(space, Candidate((0,) * (space.num_groups + 1)))
    with pytest.raises(ValueError):
        params(space, Candidate((31,) * space.num_groups))


def test_counts_scale_with_resolution_and_classes():
    """Conv MACs scale with the output area; the classifier adds in×classes MACs."""
    a, b = space_of("test_resnet", input_size=16), space_of("test_resnet", input_size=32)
    c = a.largest()
    head_a = a.widths(c)[a.group_index[a.plan.head.cin]] * a.plan.head.cout
    assert macs(b, c) - head_a == 4 * (macs(a, c) - head_a)
    assert params(b, c) == params(a, c)
    more = space_of("test_resnet", input_size=16, num_classes=20)
    width = a.widths(c)[a.group_index[a.plan.head.cin]]
    assert params(more, c) - params(a, c) == 10 * (width + 1)
    assert macs(more, c) - macs(a, c) == 10 * width
