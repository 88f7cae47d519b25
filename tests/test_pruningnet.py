"""PruningNet (DESIGN.md §3): weight generators, meta forward, materialisation, BN recalibration."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_ARCHS, check_widths, image_batch, random_candidates, space_of
from torch import nn

from metanet import PruningNet, bn_statistics, recalibrate_bn
from metanet.pruningnet import WeightGenerator, _key
from pruning.modules import build
from pruning.space import Candidate, MaxPoolSpec, conv_layers

pytestmark = pytest.mark.usefixtures("single_thread")


def make_pn(arch, seed=0, **kwargs):
    torch.manual_seed(seed)
    return PruningNet(space_of(arch, **kwargs))


def calibration(space, k=3, n=8, seed=10):
    return [image_batch(space, n, seed=seed + i) for i in range(k)]


def assert_close_rel(actual, expected, rtol=1e-4):
    """Relative to the logits' scale (individual logits may be close to 0)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# --- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_one_generator_per_layer_with_full_size_output(arch):
    pn = make_pn(arch)
    space = pn.space
    convs = conv_layers(space.plan)
    assert len(pn.generators) == len(convs) + 1  # + the classifier
    group_of = space.group_index
    for block in space.plan.blocks:
        for spec in [*block.body, *(block.shortcut or ())]:
            if isinstance(spec, MaxPoolSpec):
                continue
            in_sc = spec in (block.shortcut or ())
            path = (f"{block.name}.{spec.name}" if block.shortcut is None
                    else f"{block.name}.{'shortcut' if in_sc else 'body'}.{spec.name}")
            gen = pn.generators[_key(path)]
            assert isinstance(gen, WeightGenerator)
            mx = {c: (c if isinstance(c, int) else space.max_widths[group_of[c]])
                  for c in (spec.cin, spec.cout)}
            cin = 1 if spec.depthwise else mx[spec.cin]
            assert gen.weight2.shape == (mx[spec.cout], cin, spec.kernel, spec.kernel, pn.hidden)
            assert gen.bias2.shape == (mx[spec.cout], cin, spec.kernel, spec.kernel)
            # the code holds the (distinct) groups the layer touches
            touched = {c for c in (spec.cin, spec.cout) if isinstance(c, str)}
            assert gen.fc1.in_features == len(touched)
            assert pn.layer_groups[path] == list(dict.fromkeys(  # (input group, output group)
                group_of[c] for c in (spec.cin, spec.cout) if isinstance(c, str)))
    head = pn.generators[_key(pn.head_path)]
    assert head.weight2.shape[:-1] == (10, space.max_widths[group_of[space.plan.head.cin]])
    # the meta-network's BN has no affine parameters: only generators and the classifier bias
    names = {n.split(".")[0] for n, _ in pn.named_parameters()}
    assert names == {"generators", "classifier_bias"}
    assert not [m for m in pn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def hidden_vector(gen: WeightGenerator, code: torch.Tensor) -> torch.Tensor:
    """The vector FC₂ multiplies, read off the generator itself: with ``weight2[k, 0, :]`` the
    k-th unit vector and a zero bias, the generated ``(hidden, 1)`` weight is that vector.
    (Independent of how the generator scales its hidden layer.)"""
    n = gen.weight2.shape[-1]
    probe = {"weight2": torch.eye(n)[:, None, :], "bias2": torch.zeros(n, 1)}
    return torch.func.functional_call(gen, probe, (code, n, 1))[:, 0]


def test_generator_is_fc_relu_fc_cropped():
    torch.manual_seed(0)
    gen = WeightGenerator(2, (6, 5, 3, 3), hidden=4)
    code = torch.tensor([0.5, 1.0])
    full = gen(code, 6, 5)
    assert full.shape == (6, 5, 3, 3)
    # a crop is a slice of the full-size weight
    torch.testing.assert_close(gen(code, 2, 3), full[:2, :3], rtol=0, atol=0)
    torch.testing.assert_close(gen(code, 6, 1), full[:, :1], rtol=0, atol=0)
    # FC₂ is affine in (weight2, bias2) on a vector proportional to ReLU(FC₁(code))
    h = hidden_vector(gen, code)
    torch.testing.assert_close(full, torch.einsum("oikld,d->oikl", gen.weight2, h) + gen.bias2)
    relu = F.relu(gen.fc1(code))
    assert (relu > 0).any()
    torch.testing.assert_close(h, relu * (h.norm() / relu.norm()))
    # a different code gives a different weight
    assert not torch.allclose(gen(torch.tensor([0.9, 0.2]), 6, 5), full)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_encoding_is_normalised_width(arch):
    pn = make_pn(arch)
    space = pn.space
    cand = random_candidates(space, 1, seed=1)[0]
    enc = pn.encoding(cand)
    expected = torch.tensor([w / m for w, m in zip(space.widths(cand), space.max_widths)])
    torch.testing.assert_close(enc, expected)
    assert torch.equal(pn.encoding(space.largest()), torch.ones(space.num_groups))
    assert ((enc > 0) & (enc <= 1)).all()


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_generated_weights_have_the_candidate_shapes(arch):
    pn = make_pn(arch)
    space = pn.space
    cand = random_candidates(space, 1, seed=2)[0]
    net = build(space, cand, device="meta")
    weights = pn.generate(cand)
    shapes = {name.removesuffix(".conv"): m.weight.shape for name, m in net.named_modules()
              if isinstance(m, nn.Conv2d)}
    shapes[pn.head_path] = net.get_submodule(pn.head_path).weight.shape
    assert {k: v.shape for k, v in weights.items()} == shapes


# --- the encoding matters -------------------------------------------------------------------


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_weights_depend_on_the_encoding(arch):
    pn = make_pn(arch)
    space = pn.space
    a, b = space.uniform(10), space.uniform(20)
    wa, wb = pn.generate(a), pn.generate(b)
    assert wa.keys() == wb.keys()
    for path in wa:
        out = min(wa[path].shape[0], wb[path].shape[0])
        inp = min(wa[path].shape[1], wb[path].shape[1])
        # same crop of the same generator, different code → different values
        assert not torch.allclose(wa[path][:out, :inp], wb[path][:out, :inp]), path
    # deterministic for one candidate
    again = pn.generate(a)
    assert all(torch.equal(wa[p], again[p]) for p in wa)


def test_weights_depend_only_on_the_groups_a_layer_touches():
    pn = make_pn("test_resnet")
    space = pn.space
    base = space.uniform(15)
    g = space.group_index["s2b0.mid"]
    other = Candidate(tuple(25 if i == g else c for i, c in enumerate(base.choices)))
    wa, wb = pn.generate(base), pn.generate(other)
    touched = {p for p, groups in pn.layer_groups.items() if g in groups}
    assert touched == {"s2b0.body.conv1", "s2b0.body.conv2"}
    for path in wa:
        if path in touched:
            assert wa[path].shape != wb[path].shape
        else:
            assert torch.equal(wa[path], wb[path]), path


# --- materialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_materialise_matches_meta_forward(arch):
    pn = make_pn(arch).eval()
    space = pn.space
    x = image_batch(space, 4, seed=99)
    batches = calibration(space)
    for cand in [space.smallest(), *random_candidates(space, 3, seed=3)]:
        net = pn.materialise(cand, calibration=batches)
        assert not net.training
        with torch.no_grad():
            got = net(x)
            want = pn(x, cand, bn_statistics(net))
        assert got.shape == (4, 10)
        assert_close_rel(got, want)
        # the BN statistics really were recalibrated (not left at 0 / 1)
        stats = bn_statistics(net)
        assert any(m.abs().max() > 1e-3 for m, _ in stats.values())
        assert any((v - 1).abs().max() > 1e-3 for _, v in stats.values())


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_materialised_net_is_a_plain_pruned_net(arch):
    pn = make_pn(arch)
    space = pn.space
    cand = random_candidates(space, 1, seed=4)[0]
    net = pn.materialise(cand, calibration=calibration(space, k=2))
    check_widths(space, cand, net)
    with torch.no_grad():  # as materialise does (autograd may pick another matmul kernel)
        weights = pn.generate(cand)
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            torch.testing.assert_close(m.weight, weights[name.removesuffix(".conv")],
                                       rtol=0, atol=0)
        elif isinstance(m, nn.BatchNorm2d):  # the meta BN is affine-free
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert m.num_batches_tracked.item() == 2
    fc = net.get_submodule(pn.head_path)
    assert torch.equal(fc.weight, weights[pn.head_path])
    assert torch.equal(fc.bias, pn.classifier_bias)
    assert all(not p.is_meta and p.requires_grad for p in net.parameters())
    assert all(not b.is_meta for b in net.buffers())
    # no ties to the PruningNet: changing the net leaves the generators alone, and back
    fc.bias.data.add_(1)
    assert not torch.equal(fc.bias, pn.classifier_bias)
    # a freshly built net of the candidate accepts its state dict (same keys and shapes)
    build(space, cand).load_state_dict(net.state_dict())
    # TorchScript-able, same outputs
    x = image_batch(space, 2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_train_mode_meta_forward_uses_batch_statistics(arch):
    """Without BN statistics the meta forward normalises with the batch's own statistics, as
    the materialised net does in train mode; without calibration its BN is the identity."""
    pn = make_pn(arch)
    space = pn.space
    cand = random_candidates(space, 1, seed=5)[0]
    net = pn.materialise(cand)
    stats = bn_statistics(net)
    assert all(torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.ones_like(v))
               for m, v in stats.values())
    x = image_batch(space, 6, seed=8)
    with torch.no_grad():
        assert_close_rel(net(x), pn(x, cand, stats))  # identity statistics, eval mode
        assert_close_rel(net.train()(x), pn(x, cand))  # batch statistics
        assert not torch.allclose(pn(x, cand), pn(x, cand, stats))


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_training_with_random_candidates_reduces_the_loss(arch):
    pn = make_pn(arch)
    space = pn.space
    x = image_batch(space, 16, seed=1)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    probes = random_candidates(space, 4, seed=3)

    def loss():
        with torch.no_grad():
            return sum(F.cross_entropy(pn(x, c), y).item() for c in probes) / len(probes)

    before = loss()
    opt = torch.optim.SGD(pn.parameters(), lr=0.1, momentum=0.9)
    rng = random.Random(5)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(pn(x, space.random(rng)), y).backward()
        opt.step()
    after = loss()
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_gradients_flow_through_the_crop(arch):
    pn = make_pn(arch)
    space = pn.space
    rng = random.Random(6)
    # every group strictly below its maximum, so each crop leaves something outside
    cand = Candidate(tuple(rng.randrange(0, 25) for _ in space.groups))
    x = image_batch(space, 4, seed=2)
    F.cross_entropy(pn(x, cand), torch.arange(4)).backward()
    assert pn.classifier_bias.grad is not None and pn.classifier_bias.grad.abs().sum() > 0
    shapes = pn._shapes(space.widths(cand))
    cropped_somewhere = 0
    for path, (out, inp) in shapes.items():
        gen = pn.generators[_key(path)]
        assert gen.fc1.weight.grad is not None and gen.fc1.weight.grad.abs().sum() > 0, path
        for t in (gen.weight2.grad, gen.bias2.grad):
            assert t[:out, :inp].abs().sum() > 0, path
            assert torch.count_nonzero(t[out:]) == 0, path
            assert torch.count_nonzero(t[:, inp:]) == 0, path
        cropped_somewhere += gen.bias2.shape[0] > out
    assert cropped_somewhere == len(shapes) - 1  # all but the classifier (fixed 10 outputs)


# --- fixed shapes (full width, zero-padded weights) ------------------------------------------


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_fixed_shapes_forward_and_gradients_equal_the_cropped_ones(arch):
    """Zero-padding the crop and computing at full width is the same function with the same
    gradients: padded channels stay 0 through batch-statistics BN, activations and adds."""
    space = space_of(arch)
    x = image_batch(space, 6, seed=4)
    y = torch.arange(6) % 10
    for cand in [space.smallest(), *random_candidates(space, 2, seed=8)]:
        grads = []
        for fixed in (False, True):
            pn = make_pn(arch)
            logits = pn(x, cand, fixed_shapes=fixed)
            F.cross_entropy(logits, y).backward()
            grads.append((logits.detach(), {n: p.grad.clone() for n, p in pn.named_parameters()
                                            if p.grad is not None}))
        (crop_logits, crop_grads), (fixed_logits, fixed_grads) = grads
        assert_close_rel(fixed_logits, crop_logits)
        assert crop_grads.keys() == fixed_grads.keys()
        for name, g in crop_grads.items():  # float noise only (a 1-channel layer's are ~1e-8)
            torch.testing.assert_close(fixed_grads[name], g, rtol=1e-3,
                                       atol=1e-4 * g.abs().max().item() + 1e-6, msg=name)


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_fixed_shapes_materialise_scores_like_the_cropped_net(arch):
    pn = make_pn(arch).eval()
    space = pn.space
    x = image_batch(space, 5, seed=12)
    batches = calibration(space)
    cand = random_candidates(space, 1, seed=13)[0]
    crop = pn.materialise(cand, calibration=batches)
    full = pn.materialise(cand, calibration=batches, fixed_shapes=True)
    check_widths(space, space.largest(), full)
    with torch.no_grad():
        assert_close_rel(full(x), crop(x))
        # running statistics padded as the identity give the same meta forward too
        assert_close_rel(pn(x, cand, bn_statistics(crop), fixed_shapes=True), crop(x))


def test_gradient_matches_the_generated_weights_gradient():
    """dL/dweight2[:out, :in] = dL/dW ⊗ h and dL/dbias2[:out, :in] = dL/dW (the crop is a
    slice, so the loss reaches the generator through exactly the cropped entries)."""
    pn = make_pn("test_mobilenet_v1")
    space = pn.space
    cand = space.uniform(12)
    x = image_batch(space, 4, seed=3)
    weights = pn.generate(cand)
    path = "l2.pw"
    leaf = weights[path].detach().requires_grad_()
    # recompute the forward with the generated weight of one layer replaced by a leaf
    original = pn.generate
    pn.generate = lambda c, fixed_shapes=False: {**weights, path: leaf}
    try:
        loss = F.cross_entropy(pn(x, cand), torch.arange(4))
    finally:
        pn.generate = original
    (g_w,) = torch.autograd.grad(loss, leaf)
    pn.zero_grad()
    F.cross_entropy(pn(x, cand), torch.arange(4)).backward()
    gen = pn.generators[_key(path)]
    out, inp = weights[path].shape[:2]
    h = hidden_vector(gen, pn.encoding(cand)[pn.layer_groups[path]])
    torch.testing.assert_close(gen.bias2.grad[:out, :inp], g_w)
    torch.testing.assert_close(gen.weight2.grad[:out, :inp], g_w[..., None] * h)


# --- BN recalibration -----------------------------------------------------------------------


def _bn_inputs(net, batches):
    """Recalibrate while recording the input of every BN for every batch."""
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone()))
        for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        out = recalibrate_bn(net, batches)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("arch", ["test_resnet", "test_mobilenet_v2"])
def test_recalibrate_bn_is_the_exact_cumulative_average(arch):
    space = space_of(arch)
    torch.manual_seed(0)
    net = build(space, random_candidates(space, 1, seed=8)[0])
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    momenta = {}
    for i, (n, bn) in enumerate(bns.items()):
        bn.running_mean.fill_(5.0)  # stale statistics must be discarded
        bn.running_var.fill_(9.0)
        bn.num_batches_tracked.fill_(100)
        bn.momentum = momenta[n] = [0.1, 0.3, None, 0.01][i % 4]
    batches = calibration(space, k=4, n=5, seed=20)
    out, inputs = _bn_inputs(net, batches)
    assert out is net and not net.training
    assert inputs.keys() == bns.keys()
    first = next(iter(bns))
    # the first BN sees the first conv's output: check it by hand, independently of the hook
    with torch.no_grad():
        stem_conv = net.get_submodule(first.removesuffix(".bn") + ".conv")
        by_hand = torch.cat([stem_conv(b) for b in batches])
    torch.testing.assert_close(bns[first].running_mean, by_hand.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    for name, bn in bns.items():
        xs = inputs[name]
        assert len(xs) == 4
        mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == 4
        assert bn.momentum == momenta[name]


def test_recalibrate_bn_differs_from_ema():
    """With momentum=None the result does not depend on batch order's recency (unlike EMA)."""
    space = space_of("test_resnet")
    torch.manual_seed(0)
    net = build(space, space.uniform(10))
    batches = calibration(space, k=3, n=4, seed=30)
    batches[2] = batches[2] * 3 + 1  # a distinct last batch
    recalibrate_bn(net, batches)
    fwd = {k: (m.clone(), v.clone()) for k, (m, v) in bn_statistics(net).items()}
    recalibrate_bn(net, batches[::-1])
    for k, (m, v) in bn_statistics(net).items():
        torch.testing.assert_close(m, fwd[k][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, fwd[k][1], rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_needs_a_batch():
    space = space_of("test_resnet")
    net = build(space, space.uniform(5))
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = 0.25
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(net, [])
    with pytest.raises(ValueError):
        recalibrate_bn(net, (b for b in []))
    assert all(bn.momentum == 0.25 for bn in net.modules() if isinstance(bn, nn.BatchNorm2d))
    pn = make_pn("test_resnet")
    with pytest.raises(ValueError):
        pn.materialise(space.uniform(5), calibration=[])


def test_recalibrate_bn_accepts_any_iterable():
    space = space_of("test_mobilenet_v1")
    net = build(space, space.uniform(20))
    batches = calibration(space, k=2, n=4)
    recalibrate_bn(net, iter(batches))
    a = {k: m.clone() for k, (m, _) in bn_statistics(net).items()}
    recalibrate_bn(net, batches)
    assert all(torch.equal(a[k], m) for k, (m, _) in bn_statistics(net).items())


def test_bn_statistics_keys_match_meta_forward_paths():
    pn = make_pn("test_resnet_bottleneck")
    cand = pn.space.uniform(9)
    net = pn.materialise(cand)
    stats = bn_statistics(net)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(stats) == sorted(c.removesuffix(".conv") + ".bn" for c in convs)
    m, v = stats["stem.conv.bn"]
    assert m is net.get_submodule("stem.conv.bn").running_mean
    assert v is net.get_submodule("stem.conv.bn").running_var


@pytest.mark.parametrize("arch", ["test_mobilenet_v2", "test_resnet"])
def test_evaluator_scores_the_same_with_fixed_shapes(arch):
    from pruning.data import load_dataset
    from pruning.evaluate import CandidateEvaluator

    pn = make_pn(arch)
    data = load_dataset("synthetic", val_size=64, train_limit=256, test_limit=32)
    kwargs = dict(calib_batches=2, batch_size=32, val_images=64)
    crop = CandidateEvaluator(pn, data.train, data.val, fixed_shapes=False, **kwargs)
    full = CandidateEvaluator(pn, data.train, data.val, fixed_shapes=True, **kwargs)
    assert CandidateEvaluator(pn, data.train, data.val, **kwargs).fixed_shapes is False  # CPU
    for cand in random_candidates(pn.space, 3, seed=21):
        assert full(cand) == crop(cand)


def test_evaluator_objectives_accuracy_and_loss():
    """The score is the held-out accuracy, or minus the mean cross-entropy of the very same
    recalibrated network, computed here independently."""
    import torch.nn.functional as F

    from pruning.data import load_dataset
    from pruning.evaluate import CandidateEvaluator

    pn = make_pn("test_mobilenet_v2")
    data = load_dataset("synthetic", val_size=64, train_limit=256, test_limit=32)
    kwargs = dict(calib_batches=2, batch_size=32, val_images=50)
    by_accuracy = CandidateEvaluator(pn, data.train, data.val, **kwargs)
    by_loss = CandidateEvaluator(pn, data.train, data.val, objective="loss", **kwargs)
    x = torch.cat([x for x, _ in by_loss.validation])
    y = torch.cat([y for _, y in by_loss.validation])
    assert len(y) == 50
    for cand in random_candidates(pn.space, 3, seed=8):
        net = by_loss.materialise(cand).eval()
        assert all(t.is_contiguous() for t in net.state_dict().values())  # the default layout
        with torch.no_grad():
            logits = net(x)
        estimates = by_loss.estimates(cand)
        assert estimates == by_accuracy.estimates(cand)
        assert estimates["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert estimates["accuracy"] == (logits.argmax(1) == y).sum().item() / 50
        assert by_loss(cand) == -estimates["loss"]
        assert by_accuracy(cand) == estimates["accuracy"]
    with pytest.raises(ValueError, match="objective must be one of accuracy, loss"):
        CandidateEvaluator(pn, data.train, data.val, objective="top5", **kwargs)


def test_evaluator_scores_channels_last_on_the_cpu_and_puts_the_layout_back(monkeypatch):
    """The scoring pass runs channels-last (faster on the CPU); calibration and the net left
    behind stay in the default layout, also when scoring raises."""
    from pruning.data import load_dataset
    from pruning.evaluate import CandidateEvaluator

    pn = make_pn("test_mobilenet_v2")
    data = load_dataset("synthetic", val_size=64, train_limit=256, test_limit=32)
    evaluator = CandidateEvaluator(pn, data.train, data.val, calib_batches=2, batch_size=32)
    cand = random_candidates(pn.space, 1, seed=3)[0]
    layouts, nets = [], []
    real = evaluator.measure

    def spy(net):
        nets.append(net)
        conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        conv.register_forward_hook(lambda m, i, out: layouts.append(
            out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
        return real(net)

    monkeypatch.setattr(evaluator, "measure", spy)
    evaluator.estimates(cand)
    assert layouts and all(layouts)  # every validation batch

    def boom(net):
        nets.append(net)
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(evaluator, "measure", boom)
    with pytest.raises(RuntimeError, match="scoring failed"):
        evaluator.estimates(cand)
    for net in nets:
        assert all(t.is_contiguous() for t in net.state_dict().values())


def test_evaluator_validation_batch_size_changes_only_the_chunks():
    """The validation pass is in eval mode (each image on its own), so its batch size splits
    the same images differently and gives the same score; on a CPU it defaults to the
    calibration batch size, on CUDA to as many small images as fit ``EVAL_ELEMENTS``."""
    from pruning.data import load_dataset
    from pruning.evaluate import CandidateEvaluator, eval_batch_size_default

    pn = make_pn("test_mobilenet_v2")
    data = load_dataset("synthetic", val_size=80, train_limit=256, test_limit=32)
    kwargs = dict(calib_batches=2, batch_size=32, val_images=70)
    default = CandidateEvaluator(pn, data.train, data.val, **kwargs)
    small = CandidateEvaluator(pn, data.train, data.val, eval_batch_size=9, **kwargs)
    whole = CandidateEvaluator(pn, data.train, data.val, eval_batch_size=1000, **kwargs)
    assert [len(y) for _, y in default.validation] == [32, 32, 6]  # CPU: the batch size
    assert [len(y) for _, y in small.validation] == [9] * 7 + [7]
    assert [len(y) for _, y in whole.validation] == [70]
    for other in (small, whole):  # the very same images, in the same order
        assert torch.equal(torch.cat([x for x, _ in other.validation]),
                           torch.cat([x for x, _ in default.validation]))
    for cand in random_candidates(pn.space, 3, seed=5):
        scores = {default(cand), small(cand), whole(cand)}
        assert max(scores) - min(scores) <= 1 / 70  # at most a near-tie flips between chunkings

    assert eval_batch_size_default((1, 28, 28), 256, "cpu") == 256
    assert eval_batch_size_default((1, 28, 28), 256, "cuda") == 2**22 // 784 > 5000
    assert eval_batch_size_default((3, 224, 224), 256, "cuda") == 256
    with pytest.raises(ValueError, match="eval_batch_size"):
        CandidateEvaluator(pn, data.train, data.val, eval_batch_size=-1, **kwargs)
