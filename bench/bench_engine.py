"""Engine speed against its physical limits, in one run; prints JSON.

1. Candidate evaluation (generate weights once → materialise → recalibrate BN → score) against
   the forward time of the same materialised plain net over the same images (the physical
   limit of evaluating a candidate). Target ≤ 1.3×. And against itself scoring in NCHW.
2. One PruningNet training step (random candidate, weight generation, backward through the
   generators, optimizer step) against one step of the plain max-width network at the same
   batch size. Target ≤ 1.5×. Random candidates are smaller than the max-width net on
   average, so the generators' own overhead is also reported: the same candidates trained
   through the PruningNet vs as plain nets.
3. The plain nets' layout (:func:`pruning.modules.inference_layout`): the max-width net's
   eval-mode forward pass over the validation images in NCHW against the layout the pipeline
   scores and tests in (channels-last on a CPU; the limit of 1 is measured so), and its
   training step in both (training keeps NCHW).

    python bench/bench_engine.py [--arch mobilenet_v2] [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import unittest.mock

import torch
import torch.nn.functional as F
from timing import median_seconds  # bench/timing.py (the script's folder is on sys.path)

import pruning.evaluate
from metanet import PruningNet
from pruning import SearchSpace, build, macs
from pruning.evaluate import CandidateEvaluator
from pruning.modules import inference_layout


class RandomSplit:
    """Random images of the dataset's shape (speed does not depend on pixel values)."""

    def __init__(self, n, shape, classes, device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *shape, generator=g).to(device)
        self.y = torch.randint(0, classes, (n,), generator=g).to(device)

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size, *, shuffle=False, seed=None, device=None, **_):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


@contextlib.contextmanager
def nchw_scoring():
    """The evaluator as it was before :func:`~pruning.modules.inference_layout`: NCHW."""
    with unittest.mock.patch.object(pruning.evaluate, "inference_layout",
                                    lambda net, device: contextlib.nullcontext(net)):
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--input-size", type=int, default=28)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--val-images", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    space = SearchSpace.create(a.arch, num_classes=10, in_channels=a.in_channels,
                               input_size=a.input_size, width_mult=a.width_mult)
    shape = (a.in_channels, a.input_size, a.input_size)
    torch.manual_seed(0)
    pnet = PruningNet(space).to(device)
    train = RandomSplit(a.calib_batches * a.batch_size, shape, 10, device)
    val = RandomSplit(a.val_images, shape, 10, device)
    evaluator = CandidateEvaluator(pnet, train, val, calib_batches=a.calib_batches,
                                   batch_size=a.batch_size, device=device)
    rng = random.Random(0)
    cands = [space.random(rng) for _ in range(a.candidates)]

    # 1. candidate evaluation vs the forward passes of the same plain net over the same images
    evaluator(cands[0])  # warm-up
    eval_ratios, eval_s, limit_s, nchw_s = [], [], [], []
    for cand in cands:
        net = evaluator.materialise(cand)

        def forward_only():  # as the evaluator computes them: scoring in inference_layout
            with torch.inference_mode():
                net.train()
                for x in evaluator.calibration:
                    net(x)
                net.eval()
            with inference_layout(net, device), torch.inference_mode():
                for x, _ in evaluator.validation:
                    net(x)

        t_eval = median_seconds(lambda: evaluator(cand), device, a.repeat)
        t_limit = median_seconds(forward_only, device, a.repeat)
        with nchw_scoring():
            nchw_s.append(median_seconds(lambda: evaluator(cand), device, a.repeat))
        eval_s.append(t_eval)
        limit_s.append(t_limit)
        eval_ratios.append(t_eval / t_limit)

    # 2. PruningNet training step vs the plain max-width network's step, same batch
    x, y = train.x[:a.train_batch], train.y[:a.train_batch]
    opt = torch.optim.SGD(pnet.parameters(), lr=1e-3, momentum=0.9)
    step_rng = random.Random(1)

    def meta_step():
        loss = F.cross_entropy(pnet(x, space.random(step_rng)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain = build(space, space.largest()).to(device).train()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

    def plain_step():
        loss = F.cross_entropy(plain(x), y)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    @torch.inference_mode()
    def plain_forward():
        plain.eval()
        for x_val, _ in evaluator.validation:
            plain(x_val)
        plain.train()

    meta_step()
    t_meta = median_seconds(meta_step, device, a.repeat * 2)
    t_nchw = {fn.__name__: median_seconds(fn, device, a.repeat * 2, warmup=1)
              for fn in (plain_step, plain_forward)}
    with inference_layout(plain, device):  # the training step too: why training keeps NCHW
        t_fast = {fn.__name__: median_seconds(fn, device, a.repeat * 2, warmup=1)
                  for fn in (plain_step, plain_forward)}
    t_plain = t_nchw["plain_step"]

    # the generators' own overhead: the same candidates as plain nets vs through the PruningNet
    same = [space.random(random.Random(100 + i)) for i in range(a.repeat * 2)]
    t_meta_same = t_plain_same = 0.0
    for cand in same:
        net = build(space, cand).to(device).train()
        o = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def cand_meta_step():
            loss = F.cross_entropy(pnet(x, cand), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def cand_plain_step():
            loss = F.cross_entropy(net(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

        t_meta_same += median_seconds(cand_meta_step, device, 2)
        t_plain_same += median_seconds(cand_plain_step, device, 2)

    images = a.calib_batches * a.batch_size + len(val)
    print(json.dumps({
        "bench": "engine", "arch": a.arch, "width_mult": a.width_mult, "input": list(shape),
        "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                               if device.type == "cuda" else platform.processor()
                                               or platform.machine()),
        "threads": a.threads, "torch": torch.__version__,
        "full_macs": macs(space, space.largest()),
        "generator_params": sum(p.numel() for p in pnet.parameters()),
        "evaluation": {"images_per_candidate": images, "candidates": len(cands),
                       "seconds_per_candidate": [round(t, 4) for t in eval_s],
                       "forward_limit_seconds": [round(t, 4) for t in limit_s],
                       "ratio_vs_limit": [round(r, 3) for r in eval_ratios],
                       "median_ratio": round(statistics.median(eval_ratios), 3),
                       "nchw_seconds_per_candidate": [round(t, 4) for t in nchw_s],
                       "speedup_vs_nchw": round(sum(nchw_s) / sum(eval_s), 3),
                       "target": 1.3},
        "training_step": {"batch": a.train_batch, "pruningnet_s": round(t_meta, 4),
                          "plain_max_width_s": round(t_plain, 4),
                          "ratio": round(t_meta / t_plain, 3), "target": 1.5,
                          "same_candidates": len(same),
                          "ratio_vs_same_candidate_plain": round(t_meta_same / t_plain_same, 3)},
        "layout": {"inference": ("channels_last" if device.type == "cpu" else "default"),
                   "nchw_s": {k: round(v, 4) for k, v in t_nchw.items()},
                   "inference_layout_s": {k: round(v, 4) for k, v in t_fast.items()},
                   "speedup": {k: round(t_nchw[k] / t_fast[k], 3) for k in t_nchw}},
    }, indent=1))


if __name__ == "__main__":
    main()
