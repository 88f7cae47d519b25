"""The plain pruned network (DESIGN.md §3, "Materialisation"): real channels, no masks,
TorchScript-able, allocated on any device."""

from __future__ import annotations

import pytest
import torch
from conftest import (ALL_ARCHS, TEST_ARCHS, check_widths, image_batch, random_candidates,
                      space_of)
from torch import nn

from pruning.modules import PrunedNet, ResidualBlock, build, conv_path
from pruning.space import Candidate, CandidateError, ConvSpec

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")]

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_built_net_has_the_candidate_widths(arch):
    space = space_of(arch, input_size=32)
    for cand in [space.smallest(), space.largest(), *random_candidates(space, 3, seed=1)]:
        net = build(space, cand, device="meta")
        assert type(net) is PrunedNet
        check_widths(space, cand, net)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_no_masks_or_hooks(arch):
    space = space_of(arch, input_size=32)
    net = build(space, random_candidates(space, 1, seed=2)[0], device="meta")
    for name, buf in net.named_buffers():
        assert name.rsplit(".", 1)[-1] in BN_BUFFERS, name
    for name, _ in net.named_parameters():
        assert name.rsplit(".", 1)[-1] in ("weight", "bias"), name
        assert "mask" not in name and "orig" not in name
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not getattr(m, "parametrizations", None)


def test_module_names_follow_the_plan():
    space = space_of("test_resnet_bottleneck")
    net = build(space, space.largest())
    assert [name for name, _ in net.named_children()] == (
        [b.name for b in space.plan.blocks] + ["classifier"])
    keys = set(net.state_dict())
    assert "s1b0.body.conv1.conv.weight" in keys
    assert "s1b0.shortcut.downsample.bn.running_var" in keys
    assert "stem.conv.conv.weight" in keys and "classifier.fc.bias" in keys
    assert isinstance(net.s1b0, ResidualBlock) and isinstance(net.stem, nn.Sequential)
    v2 = space_of("test_mobilenet_v2")
    net = build(v2, v2.largest())
    assert isinstance(net.s2b1, ResidualBlock) and isinstance(net.s2b1.shortcut, nn.Identity)
    assert not isinstance(net.s2b0, ResidualBlock)  # stride 2 / new width: no shortcut
    assert isinstance(net.s2b0.expand.act, nn.ReLU6) and isinstance(net.s2b0.project.act,
                                                                    nn.Identity)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_forward_shapes_and_residual_semantics(arch):
    space = space_of(arch)
    cand = random_candidates(space, 1, seed=3)[0]
    net = build(space, cand).eval()
    x = image_batch(space, 3)
    y = net(x)
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    # a residual block computes act(body(x) + shortcut(x))
    for block in space.plan.blocks:
        if block.shortcut is None:
            continue
        mod = net.get_submodule(block.name)
        h = torch.randn(2, mod.body[0].conv.in_channels, 6, 6)
        ref = mod.body(h) + mod.shortcut(h)
        if block.act == "relu":
            ref = ref.relu()
        torch.testing.assert_close(mod(h), ref)


def _scripted_and_traced(space, cand):
    net = build(space, cand).eval()
    x = image_batch(space, 2, seed=5)
    with torch.no_grad():
        ref = net(x)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x, check_trace=False)  # outputs are compared below
        x2 = image_batch(space, 3, seed=6)  # another batch size than the trace saw
        return net, ref, scripted(x), traced(x), net(x2), scripted(x2), traced(x2)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_torchscript_script_and_trace(arch):
    space = space_of(arch)
    cand = random_candidates(space, 1, seed=4)[0]
    net, ref, s, t, ref2, s2, t2 = _scripted_and_traced(space, cand)
    assert isinstance(s, torch.Tensor)
    torch.testing.assert_close(s, ref, rtol=0, atol=0)
    torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s2, ref2, rtol=0, atol=0)
    torch.testing.assert_close(t2, ref2, rtol=1e-6, atol=1e-6)


def test_scripted_net_saves_and_loads(tmp_path):
    space = space_of("test_mobilenet_v2")
    net = build(space, space.uniform(12)).eval()
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    loaded = torch.jit.load(str(path))
    x = image_batch(space, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert dict(loaded.state_dict()).keys() == net.state_dict().keys()


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2", "test_resnet"])
def test_meta_device_allocates_nothing(arch):
    space = space_of(arch)
    net = build(space, space.largest(), device="meta")
    tensors = list(net.parameters()) + list(net.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert sum(t.untyped_storage().nbytes() for t in tensors if not t.is_meta) == 0
    # the network is still usable for shapes
    y = net(torch.empty(2, 3 if arch != "test_resnet" else 1, 64, 64, device="meta"))
    assert y.is_meta and y.shape == (2, space.plan.head.cout)


def test_default_device_is_cpu_and_build_is_fresh():
    space = space_of("test_resnet")
    cand = space.uniform(20)
    a, b = build(space, cand), build(space, cand)
    assert all(p.device.type == "cpu" for p in a.parameters())
    assert a.stem.conv.conv.weight is not b.stem.conv.conv.weight
    b.load_state_dict(a.state_dict())  # same structure, strict keys and shapes


def test_build_rejects_invalid_candidates():
    space = space_of("test_resnet")
    with pytest.raises(CandidateError):
        build(space, Candidate((1, 2)))


def test_conv_path():
    space = space_of("test_resnet")
    blocks = {b.name: b for b in space.plan.blocks}
    stem = blocks["stem"]
    assert conv_path(stem, stem.body[0]) == "stem.conv"
    s2 = blocks["s2b0"]
    assert conv_path(s2, s2.body[0]) == "s2b0.body.conv1"
    assert conv_path(s2, s2.shortcut[0], True) == "s2b0.shortcut.downsample"
    assert isinstance(s2.shortcut[0], ConvSpec)
