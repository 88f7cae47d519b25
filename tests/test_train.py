"""Training loops: settings, LR schedule, learning, exact resume, divergence, sampling.

Everything runs on the tiny ``test_*`` architectures and the ``synthetic`` dataset (16 px
gratings in noise), on one CPU thread.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from metanet.pruningnet import PruningNet
from pruning.checkpoint import load_tensors
from pruning.data import load_dataset
from pruning.modules import build
from pruning.space import SearchSpace
from pruning.train import (
    Cancelled,
    GraphedStep,
    TrainConfig,
    accuracy,
    candidate_for_step,
    cuda_graphs_default,
    fit,
    sgd_update,
    train_network,
    train_pruningnet,
)
from tests.conftest import EagerGraphs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(single_thread):
    return load_dataset("synthetic", train_limit=704, test_limit=256, val_size=64, seed=0)


def space_for(arch: str) -> SearchSpace:
    return SearchSpace.create(arch, num_classes=10, in_channels=1, input_size=16)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_close_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """The same weights and buffers up to float noise (another order of the same arithmetic)."""
    sw, sg = want.state_dict(), got.state_dict()
    for k in sw:
        torch.testing.assert_close(sg[k], sw[k], rtol=1e-4, atol=1e-5, msg=k)


# --- settings -------------------------------------------------------------------------------


def test_train_config_defaults_are_valid():
    c = TrainConfig()
    assert c.epochs == 1.0 and c.batch_size == 128 and c.checkpoint_every == 200
    assert TrainConfig.from_dict({"epochs": 2, "lr": 0.05}) == TrainConfig(epochs=2, lr=0.05)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"epochs": -1}, {"epochs": float("nan")}, {"epochs": "2"},
    {"batch_size": 0}, {"batch_size": 1.5}, {"batch_size": True}, {"batch_size": 70_000},
    {"lr": 0}, {"lr": float("inf")}, {"lr": 101},
    {"momentum": 1.0}, {"momentum": -0.1},
    {"weight_decay": -1e-4}, {"weight_decay": 2},
    {"warmup_epochs": -1}, {"warmup_epochs": 2, "epochs": 1},
    {"label_smoothing": 1.0}, {"label_smoothing": -0.1},
    {"max_steps": 0}, {"max_steps": 2.5},
    {"checkpoint_every": 0}, {"checkpoint_every": 1.5},
    {"nesterov": 1}, {"augment": "yes"},
])
def test_train_config_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="invalid training settings") as e:
        TrainConfig(**bad)
    assert next(k for k in bad if k != "epochs" or len(bad) == 1) in str(e.value)
    assert "\n" not in str(e.value)


def test_an_invalid_epochs_is_the_only_error_named():
    """warmup_epochs is checked against epochs only when epochs itself is valid."""
    with pytest.raises(ValueError) as e:
        TrainConfig(epochs=-1, warmup_epochs=0.3)
    assert str(e.value) == ("invalid training settings: epochs=-1 (must be a number in "
                            "(0, 10000])")


def test_train_config_from_dict_names_unknown_settings():
    with pytest.raises(ValueError, match="unknown training settings: bogus, epoch "):
        TrainConfig.from_dict({"epoch": 3, "bogus": 1})


def test_total_steps():
    c = TrainConfig(epochs=2.5, batch_size=10)
    assert c.total_steps(100) == 25           # 10 steps per epoch (drop_last)
    assert c.total_steps(105) == 25           # the partial batch is dropped
    assert c.total_steps(5) == 3              # at least one step per epoch
    assert TrainConfig(epochs=2.5, batch_size=10, max_steps=7).total_steps(100) == 7
    assert TrainConfig(epochs=0.01, batch_size=10).total_steps(100) == 1


def test_lr_schedule_cosine_to_zero():
    c = TrainConfig(lr=0.4, epochs=3)
    total, per_epoch = 30, 10
    lrs = [c.lr_at(s, total, per_epoch) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[15] == pytest.approx(0.2)                 # half way: half the peak
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)   # ends at zero
    assert 0 < lrs[total - 1] < 0.01
    for s in range(total):  # exactly ½·lr·(1 + cos(π s / total))
        assert lrs[s] == pytest.approx(0.2 * (1 + math.cos(math.pi * s / total)))


def test_lr_schedule_linear_warmup_then_cosine():
    c = TrainConfig(lr=0.4, epochs=4, warmup_epochs=1)
    total, per_epoch = 40, 10
    lrs = [c.lr_at(s, total, per_epoch) for s in range(total + 1)]
    assert lrs[:10] == pytest.approx([0.04 * (k + 1) for k in range(10)])  # linear up to the peak
    assert lrs[9] == lrs[10] == pytest.approx(0.4)
    assert max(lrs) == pytest.approx(0.4)
    tail = lrs[10:]
    assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert tail[15] == pytest.approx(0.2)  # half way through the 30 cosine steps
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)


def test_lr_schedule_linear_to_zero_as_in_the_official_code():
    c = TrainConfig(lr=0.4, epochs=3, schedule="linear")
    total, per_epoch = 30, 10
    lrs = [c.lr_at(s, total, per_epoch) for s in range(total + 1)]
    assert lrs == pytest.approx([0.4 * (1 - s / total) for s in range(total + 1)])
    with pytest.raises(ValueError,
                       match="schedule='exp' \\(must be 'cosine' or 'linear' or 'step'\\)"):
        TrainConfig(schedule="exp")


def test_lr_schedule_step_as_in_the_official_resnet_code():
    """×0.1 at a quarter, half and three quarters of the steps after the warm-up."""
    c = TrainConfig(lr=0.2, epochs=5, warmup_epochs=1, schedule="step")
    total, per_epoch = 50, 10
    lrs = [c.lr_at(s, total, per_epoch) for s in range(total)]
    assert lrs[:10] == pytest.approx([0.02 * (k + 1) for k in range(10)])
    assert lrs[10:20] == pytest.approx([0.2] * 10)        # 40 decay steps: drops at 20, 30, 40
    assert lrs[20:30] == pytest.approx([0.02] * 10)
    assert lrs[30:40] == pytest.approx([0.002] * 10)
    assert lrs[40:] == pytest.approx([0.0002] * 10)


def test_the_paper_preset_is_the_official_mobilenet_recipe():
    """64 PruningNet and 256 final epochs, linear decay, plain momentum, label smoothing 0.1;
    MobileNetV2 searched up to 1.4×, the other families up to 1.0× unless asked."""
    from pruning.spec import Budget, PipelineSpec

    def resolved(arch, **kw):
        return PipelineSpec(arch=arch, preset="paper", budget=Budget(macs_ratio=0.5),
                            **kw).resolved()

    r = resolved("mobilenet_v2")
    for config, epochs in ((r.metanet, 64), (r.final, 256)):
        assert (config.epochs, config.schedule, config.nesterov, config.label_smoothing,
                config.warmup_epochs) == (epochs, "linear", False, 0.1, 0.0)
    assert r.max_width_mult == 1.4
    assert resolved("mobilenet_v1").max_width_mult == 1.0
    assert resolved("resnet18", max_width_mult=1.4).max_width_mult == 1.4
    # the resnet family takes the official ResNet recipe: 32 and 128 epochs, step decay
    r = resolved("resnet50", final={"epochs": 90})
    assert (r.metanet.epochs, r.metanet.batch_size, r.metanet.lr, r.metanet.schedule,
            r.metanet.weight_decay, r.metanet.label_smoothing) == (32, 256, 0.1, "step", 1e-4, 0.1)
    assert (r.final.epochs, r.final.batch_size, r.final.lr, r.final.schedule,
            r.final.nesterov) == (90, 512, 0.2, "step", False)   # overrides still win
    assert r.max_width_mult == 1.0


def test_fit_follows_the_schedule(data):
    """The LR reported for every step is ``lr_at(step)``: warm-up, then cosine."""
    space = space_for("test_mobilenet_v1")
    torch.manual_seed(0)
    net = build(space, space.smallest())
    config = TrainConfig(epochs=1, batch_size=64, lr=0.2, warmup_epochs=0.5, augment=False)
    events = []
    stats = train_network(net, data.train, config, progress=events.append)
    per_epoch = len(data.train) // 64
    total = config.total_steps(len(data.train))
    assert stats["steps"] == total == len(events) == per_epoch
    assert [e["step"] for e in events] == list(range(1, total + 1))
    assert [e["lr"] for e in events] == pytest.approx(
        [config.lr_at(s, total, per_epoch) for s in range(total)])
    assert events[0]["lr"] < events[per_epoch // 2 - 1]["lr"] == pytest.approx(0.2)
    assert all(e["stage"] == "train" and e["total"] == total for e in events)


def test_eta_leaves_out_the_first_steps_set_up(data, monkeypatch):
    """The first step pays for set-up (allocation, the first batches); an ETA from the average
    rate would overstate the rest. A fake clock: the first step takes 100 s, every later one 1 s,
    so after step k the remaining ``total - k`` steps take ``total - k`` seconds."""
    import pruning.train

    class Clock:
        now = 0.0
        reads = 0

        @classmethod
        def perf_counter(cls):
            cls.reads += 1
            if cls.reads > 1:  # the first read is the start; each later one ends a step
                cls.now += 100.0 if cls.reads == 2 else 1.0
            return cls.now

    monkeypatch.setattr(pruning.train, "time", Clock)
    space = space_for("test_mobilenet_v1")
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, augment=False)
    events = []
    train_network(build(space, space.smallest()), data.train, config, progress=events.append)
    total = events[0]["total"]
    assert total > 3 and events[0]["eta_s"] is None  # no steady rate after one step
    assert [e["eta_s"] for e in events[1:]] == pytest.approx(
        [float(total - e["step"]) for e in events[1:]])


# --- learning -------------------------------------------------------------------------------


def test_fit_learns_the_synthetic_task(data):
    space = space_for("test_mobilenet_v1")
    torch.manual_seed(0)
    net = build(space, space.largest())
    before = accuracy(net, data.test)
    stats = train_network(net, data.train, TrainConfig(epochs=4, batch_size=32, lr=0.1,
                                                       warmup_epochs=0.5), seed=0)
    after = accuracy(net, data.test)
    assert stats["steps"] == 4 * (len(data.train) // 32)
    assert math.isfinite(stats["loss"]) and stats["loss"] < 1.5
    assert after > 0.6 > before + 0.2, (before, after)  # chance is 0.1


def test_testing_computes_channels_last_on_the_cpu_and_the_net_keeps_its_layout(data):
    """Eval-mode passes run the convs channels-last on the CPU (faster oneDNN kernels); training
    does not, and the net comes back in the default layout, trainable (not made of inference
    tensors): what is saved and exported is unchanged."""
    space = space_for("test_mobilenet_v2")
    torch.manual_seed(0)
    net = build(space, space.largest())
    seen = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
    conv.register_forward_hook(lambda m, i, out: seen.append(
        out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    config = TrainConfig(epochs=1, batch_size=64)
    train_network(net, data.train, config, seed=0)
    trained = len(seen)
    accuracy(net, data.test)
    assert trained > 0 and not any(seen[:trained]) and all(seen[trained:])
    assert all(t.is_contiguous() for t in net.state_dict().values())
    train_network(net, data.train, config, seed=0)  # trains on


@pytest.mark.timeout(60)
def test_fit_refuses_a_split_smaller_than_one_batch(data):
    """Each epoch drops its last partial batch: with fewer samples than one batch no step
    would ever run (the loop used to spin for ever); it is an error at once instead."""
    space = space_for("test_mobilenet_v1")
    net = build(space, space.smallest())
    config = TrainConfig(epochs=1, batch_size=len(data.val) + 1, lr=0.1)
    with pytest.raises(ValueError, match=rf"{len(data.val)} training samples are fewer than "
                                         rf"one batch \(batch_size {len(data.val) + 1}\)"):
        train_network(net, data.val, config, seed=0)


# --- checkpoints and exact resume -----------------------------------------------------------

RESUME_CONFIG = TrainConfig(epochs=2, batch_size=64, lr=0.1, warmup_epochs=0.5,
                            checkpoint_every=4, label_smoothing=0.1)


def _pruningnet() -> PruningNet:
    torch.manual_seed(1)
    return PruningNet(space_for("test_mobilenet_v2"))


def _interrupt_at(step: int):
    """A progress callback that interrupts the training at ``step`` (as Ctrl-C would)."""
    def progress(event):
        if event["step"] == step:
            raise KeyboardInterrupt
    return progress


def _plain_net() -> torch.nn.Module:
    space = space_for("test_resnet")
    torch.manual_seed(1)
    return build(space, space.uniform(20))


def test_resume_after_should_stop_is_exact(data, tmp_path):
    """PruningNet training stopped by ``should_stop`` (Ctrl-C in the CLI, a worker's shutdown)
    after 7 steps, between the checkpoints of steps 4 and 8: the state of step 7 is saved, not
    lost, and the resumed training (across an epoch boundary) ends bit-for-bit where an
    uninterrupted run ends."""
    ref = _pruningnet()
    ref_stats = train_pruningnet(ref, data.train, RESUME_CONFIG, seed=3,
                                 checkpoint=tmp_path / "ref.safetensors")
    ckpt = tmp_path / "run.safetensors"
    net = _pruningnet()
    calls = []
    with pytest.raises(Cancelled):
        train_pruningnet(net, data.train, RESUME_CONFIG, seed=3, checkpoint=ckpt,
                         should_stop=lambda: calls.append(1) or len(calls) > 7)
    assert load_tensors(ckpt)[1]["step"] == 7  # saved at the stop
    resumed = _pruningnet()  # a fresh process: new module, weights only from the file
    events = []
    stats = train_pruningnet(resumed, data.train, RESUME_CONFIG, seed=3, checkpoint=ckpt,
                             progress=events.append)
    assert events[0]["step"] == 8 and events[-1]["step"] == ref_stats["steps"] == 20
    assert same_state(resumed, ref)
    assert stats["steps"] == ref_stats["steps"]
    assert stats["loss"] == ref_stats["loss"]  # the loss EMA is restored too
    assert not same_state(resumed, _pruningnet())  # it did train


def test_resume_after_a_failing_progress_callback_is_exact(data, tmp_path):
    """A plain net interrupted by its progress callback right after a checkpoint step."""
    ref = _plain_net()
    ref_stats = train_network(ref, data.train, RESUME_CONFIG, seed=5)  # no checkpoint at all
    ckpt = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_network(_plain_net(), data.train, RESUME_CONFIG, seed=5, checkpoint=ckpt,
                      progress=_interrupt_at(8))
    assert load_tensors(ckpt)[1]["step"] == 8
    net = _plain_net()
    stats = train_network(net, data.train, RESUME_CONFIG, seed=5, checkpoint=ckpt)
    assert same_state(net, ref)  # BN running statistics included
    assert stats["loss"] == ref_stats["loss"]
    # a finished checkpoint resumes to a no-op, whose throughput is the whole training's
    again = _plain_net()
    done = train_network(again, data.train, RESUME_CONFIG, seed=5, checkpoint=ckpt)
    assert done["steps"] == 20 and same_state(again, ref)
    meta = load_tensors(ckpt)[1]
    assert meta["images"] == 20 * RESUME_CONFIG.batch_size and meta["seconds"] > 0
    assert done["images_per_s"] == pytest.approx(meta["images"] / meta["seconds"], rel=0.05)
    assert stats["images_per_s"] == pytest.approx(done["images_per_s"], rel=0.05)  # all of it


def test_checkpoint_of_another_run_length_is_refused(data, tmp_path):
    ckpt = tmp_path / "state.safetensors"
    short = TrainConfig(epochs=1, batch_size=64, max_steps=2)
    train_network(_plain_net(), data.train, short, checkpoint=ckpt)
    with pytest.raises(ValueError, match="belongs to a run of 2 steps"):
        train_network(_plain_net(), data.train, TrainConfig(epochs=1, batch_size=64,
                                                            max_steps=3), checkpoint=ckpt)


def test_nan_loss_is_an_actionable_error(data, tmp_path):
    net = _plain_net()
    ckpt = tmp_path / "state.safetensors"

    def forward(x, step):
        out = net(x)
        return out * float("nan") if step >= 5 else out

    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, checkpoint_every=2)
    with pytest.raises(FloatingPointError) as e:
        fit(net, forward, data.train, config, checkpoint=ckpt, stage="final")
    msg = str(e.value)
    assert msg.startswith("final: the loss became nan by step 6 of 10")
    assert "lower the learning rate" in msg and "warmup_epochs" in msg and "\n" not in msg
    state, meta = load_tensors(ckpt)  # the checkpoint keeps the last finite state
    assert meta["step"] == 4
    assert all(torch.isfinite(v.float()).all() for v in state.values())


# --- PruningNet training samples the step's candidate ---------------------------------------


def test_train_pruningnet_samples_candidate_for_step(data, tmp_path):
    pnet = _pruningnet()
    space = pnet.space
    seen = []
    forward = pnet.forward

    def recording(x, candidate, *args, **kwargs):
        seen.append(candidate)
        return forward(x, candidate, *args, **kwargs)

    pnet.forward = recording
    config = TrainConfig(epochs=1, batch_size=64, max_steps=6, checkpoint_every=3)
    ckpt = tmp_path / "state.safetensors"
    with pytest.raises(Cancelled):
        train_pruningnet(pnet, data.train, config, seed=11, checkpoint=ckpt,
                         should_stop=lambda: len(seen) >= 4)
    pnet.forward = recording
    train_pruningnet(pnet, data.train, config, seed=11, checkpoint=ckpt)
    expected = [candidate_for_step(space, 11, s) for s in range(6)]
    assert seen == expected  # steps 0-3, stopped (state saved after 4 steps), then steps 4-5
    assert len({c.key() for c in expected}) == 6  # a different candidate every step
    for c in expected:
        space.check(c)
    # (seed, step) alone decides: the same call again, another seed differs
    assert candidate_for_step(space, 11, 2) == candidate_for_step(space, 11, 2)
    assert [candidate_for_step(space, 12, s) for s in range(6)] != expected
    assert expected[0] == space.random(random.Random(11 * 1_000_003))


def test_budget_biased_sampling_trains_only_feasible_candidates(data):
    """``constraints`` bias the PruningNet's candidates towards the budget: every trained
    candidate meets it, the draw is still decided by (seed, step), and it differs from the
    uniform draw wherever that one breaks the budget."""
    from pruning import counting
    from pruning.constraints import MacsConstraint

    pnet = _pruningnet()
    space = pnet.space
    limit = (counting.macs(space, space.smallest()) + counting.macs(space, space.largest())) // 4
    budget = (MacsConstraint(limit),)
    uniform = [candidate_for_step(space, 5, s) for s in range(20)]
    biased = [candidate_for_step(space, 5, s, budget) for s in range(20)]
    assert all(counting.macs(space, c) <= limit for c in biased)
    assert biased == [candidate_for_step(space, 5, s, budget) for s in range(20)]
    over = [i for i, c in enumerate(uniform) if counting.macs(space, c) > limit]
    assert over and all(biased[i] != uniform[i] for i in over)
    assert all(biased[i] == uniform[i] for i in range(20) if i not in over)

    seen = []
    forward = pnet.forward
    pnet.forward = lambda x, c, *a, **k: (seen.append(c), forward(x, c, *a, **k))[1]
    train_pruningnet(pnet, data.train, TrainConfig(epochs=1, batch_size=64, max_steps=5),
                     seed=5, constraints=budget)
    assert seen == biased[:5]


def test_budget_biased_pruningnet_is_tied_to_its_budget():
    """A uniformly trained PruningNet serves any budget; a budget-biased one only its own."""
    from pruning.pipeline import Budget, PipelineSpec, metanet_identity

    def identity(sampling, ratio):
        return metanet_identity(PipelineSpec(arch="test_resnet", dataset="synthetic",
                                             preset="smoke", metanet_sampling=sampling,
                                             budget=Budget(macs_ratio=ratio)))

    assert identity("uniform", 0.3) == identity("uniform", 0.5)
    assert identity("budget", 0.3) != identity("budget", 0.5)
    assert identity("budget", 0.3) != identity("uniform", 0.3)


def test_image_size_is_part_of_the_pruningnet_s_identity_only_when_given():
    """Another image size, another PruningNet; a spec without one keeps the identity (and the
    service's reuse key) it had before image_size existed."""
    from pruning.pipeline import PipelineSpec, metanet_identity

    base = dict(arch="test_resnet", dataset="synthetic", preset="smoke")
    assert "image_size" not in metanet_identity(PipelineSpec(**base))
    assert metanet_identity(PipelineSpec(**base, image_size=16))["image_size"] == 16
    assert metanet_identity(PipelineSpec(**base, image_size=16)) != \
        metanet_identity(PipelineSpec(**base, image_size=24))


def test_the_pruningnet_fingerprint_is_stable_across_versions():
    """Jobs store it when submitted and later jobs look lenders up by it: a fingerprint that
    moves with an upgrade orphans every stored PruningNet. These are the values of 2a1c640."""
    from pruning.pipeline import PipelineSpec, metanet_fingerprint

    assert metanet_fingerprint(PipelineSpec()).startswith("8025fb53")
    assert metanet_fingerprint(PipelineSpec(arch="test_mobilenet_v2", dataset="synthetic",
                                            preset="smoke")).startswith("3682eb9d")


def test_loss_is_read_every_few_steps_on_a_gpu(data, tmp_path, monkeypatch):
    """On CUDA the loss is read (progress, divergence check) every few steps, always at step 1,
    at checkpoints and at the end; a NaN is still caught, and the checkpoint stays finite."""
    import pruning.train

    monkeypatch.setattr(pruning.train, "_sync_every", lambda device: 3)
    net = _plain_net()
    seen = []
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, checkpoint_every=4)
    fit(net, lambda x, step: net(x), data.train, config, progress=seen.append,
        checkpoint=tmp_path / "a.safetensors")
    assert [e["step"] for e in seen] == [1, 3, 4, 6, 8, 9, 10]
    assert all(math.isfinite(e["loss"]) for e in seen)

    def forward(x, step):
        out = net(x)
        return out * float("nan") if step >= 4 else out  # the 5th step's loss is NaN

    with pytest.raises(FloatingPointError, match="became nan by step 6 of 10"):
        fit(net, forward, data.train, config, checkpoint=tmp_path / "b.safetensors")
    _, meta = load_tensors(tmp_path / "b.safetensors")
    assert meta["step"] == 4


def test_pruningnet_training_is_the_same_with_fixed_shapes(data):
    """Full width with zero-padded weights (the CUDA default) trains exactly like cropping:
    the same candidates, losses and updated generators (weight decay and momentum included)."""
    space = space_for("test_mobilenet_v2")
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_steps=3)
    trained = []
    for fixed in (False, True):
        torch.manual_seed(0)
        pnet = PruningNet(space)
        stats = train_pruningnet(pnet, data.train, config, seed=4, fixed_shapes=fixed)
        trained.append((stats["loss"], pnet.state_dict()))
    (crop_loss, crop), (fixed_loss, fixed) = trained
    assert fixed_loss == pytest.approx(crop_loss, rel=1e-4)
    for name, value in crop.items():
        torch.testing.assert_close(fixed[name], value, rtol=1e-3, atol=2e-4, msg=name)  # float noise


# --- CUDA graphs (the plumbing, on the CPU: the capture runs the step eagerly) ---------------


class BrokenGraphs(EagerGraphs):
    @classmethod
    def capture(cls, body):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")


@pytest.mark.parametrize("nesterov,momentum", [(True, 0.9), (False, 0.9), (False, 0.0)])
def test_sgd_update_is_torch_sgd(nesterov, momentum):
    """The update captured in the graph (lr from a tensor) equals ``torch.optim.SGD.step``,
    weight decay per group included, over several steps with changing learning rates."""
    torch.manual_seed(0)
    ref = [torch.randn(4, 3), torch.randn(5)]
    ours = [t.clone() for t in ref]

    def sgd(params):
        return torch.optim.SGD([{"params": [params[0]], "weight_decay": 4e-5},
                                {"params": [params[1]], "weight_decay": 0.0}],
                               lr=0.1, momentum=momentum, nesterov=nesterov)

    opt_ref, opt = sgd(ref), sgd(ours)
    neg_lr = torch.zeros(())
    for step, lr in enumerate([0.1, 0.05, 0.2, 0.01]):
        grads = [torch.randn_like(t) for t in ref]
        for a, b, g in zip(ref, ours, grads):
            a.grad, b.grad = g.clone(), g.clone()
        for group in opt_ref.param_groups + opt.param_groups:
            group["lr"] = lr
        opt_ref.step()
        if step == 0:
            opt.step()  # the eager warm-up step creates the momentum buffers
        else:
            neg_lr.fill_(-lr)
            sgd_update(opt, neg_lr)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_graphed_training_equals_eager_training(data, tmp_path):
    """A plain net trained through :class:`GraphedStep` (warm-up, capture, replays with the
    scheduled learning rate; label smoothing, weight decay, BN statistics) ends where eager
    training ends; interrupted after a checkpoint, it resumes (eagerly) to the same end: the
    checkpoint holds the momentum the graph updated."""
    config = TrainConfig(epochs=2, batch_size=64, lr=0.1, warmup_epochs=0.5,
                         label_smoothing=0.1, checkpoint_every=8)
    ref = _plain_net()
    ref_stats = train_network(ref, data.train, config, seed=5, cuda_graphs=False)
    EagerGraphs.captures = 0
    net, events = _plain_net(), []
    stats = train_network(net, data.train, config, seed=5, cuda_graphs=True, graphs=EagerGraphs,
                          progress=events.append)
    assert EagerGraphs.captures == 1 and stats["steps"] == ref_stats["steps"] == 20
    assert not [e for e in events if "message" in e]  # no fallback
    assert_close_state(net, ref)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-4)
    assert not same_state(net, _plain_net())  # it did train

    ckpt = tmp_path / "state.safetensors"

    def stop_at_12(event):
        if event["step"] == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_network(_plain_net(), data.train, config, seed=5, cuda_graphs=True,
                      graphs=EagerGraphs, checkpoint=ckpt, progress=stop_at_12)
    assert load_tensors(ckpt)[1]["step"] == 8
    resumed = _plain_net()
    train_network(resumed, data.train, config, seed=5, cuda_graphs=False, checkpoint=ckpt)
    assert_close_state(resumed, ref)


def test_a_failed_capture_falls_back_to_eager_steps(data):
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1)
    ref = _plain_net()
    train_network(ref, data.train, config, seed=2, cuda_graphs=False)
    net, events = _plain_net(), []
    stats = train_network(net, data.train, config, seed=2, cuda_graphs=True,
                          graphs=BrokenGraphs, progress=events.append)
    assert stats["steps"] == len(data.train) // 64
    notes = [e["message"] for e in events if "message" in e]
    assert notes == ["CUDA graph capture failed (operation not permitted when stream is "
                     "capturing); training eagerly"]
    assert same_state(net, ref)  # every step eager: bit for bit the eager run


def test_cuda_graphs_default(monkeypatch):
    assert not cuda_graphs_default("cpu")
    monkeypatch.delenv("METAPRUNE_CUDA_GRAPHS", raising=False)
    assert cuda_graphs_default("cuda")
    for off in ("0", "false", "False", " NO "):
        monkeypatch.setenv("METAPRUNE_CUDA_GRAPHS", off)
        assert not cuda_graphs_default("cuda"), off


def test_graphed_step_warms_up_eagerly_before_capturing():
    calls = []
    step = GraphedStep(lambda x, y, extra, cache: x.sum(), lambda s: None, opt=None,
                       eager=lambda x, y, s: calls.append(s) or x.sum(), graphs=BrokenGraphs)
    for s in range(GraphedStep.WARMUP):
        step(torch.ones(2), torch.zeros(2), 0.1, s)
    assert calls == list(range(GraphedStep.WARMUP)) and step.replay is None
    assert not step.failed


def test_pruningnet_training_from_a_graph_equals_eager_training(data):
    """The fixed-shape PruningNet step takes its candidate as one input tensor, so it can be
    replayed from a graph: the same weights as eager fixed-shape training (itself equal to
    cropped training, see test_pruningnet_training_is_the_same_with_fixed_shapes)."""
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, warmup_epochs=0.3)
    ref = _pruningnet()
    train_pruningnet(ref, data.train, config, seed=4, fixed_shapes=True, cuda_graphs=False)
    EagerGraphs.captures = 0
    net = _pruningnet()
    train_pruningnet(net, data.train, config, seed=4, fixed_shapes=True, cuda_graphs=True,
                     graphs=EagerGraphs)
    assert EagerGraphs.captures == 1
    assert_close_state(net, ref)
    assert not same_state(net, _pruningnet())
    with pytest.raises(ValueError, match="fixed_shapes"):
        train_pruningnet(_pruningnet(), data.train, config, fixed_shapes=False, cuda_graphs=True)


def test_a_checkpoint_of_another_network_is_one_clear_error(data, tmp_path):
    """A run folder begun by a version whose preset gave other widths: not a traceback."""
    ckpt = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_network(_plain_net(), data.train, RESUME_CONFIG, seed=5, checkpoint=ckpt,
                      progress=_interrupt_at(8))  # a checkpoint at step 8
    space = space_for("test_resnet")
    wider = build(space, space.uniform(30))
    with pytest.raises(ValueError, match="holds another network than this run trains "
                                         r"\(Error\(s\) in loading state_dict"):
        train_network(wider, data.train, RESUME_CONFIG, seed=5, checkpoint=ckpt)
