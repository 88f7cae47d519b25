"""NCHW vs channels-last (NHWC) on the CPU, over pruned networks; prints JSON.

For each architecture, the uniform networks at three widths and two random candidates (odd
channel counts, as the search picks them): one training step at batch 64 and one eval-mode
forward pass over 256 images, in each layout (the median of six timed calls after one
warm-up). The pipeline scores and tests in channels-last on a CPU
(:func:`pruning.modules.inference_layout`) and trains in NCHW; this is the measurement behind
that choice.

    python bench/bench_layout.py [--threads 2] [--archs mobilenet_v1:0.25,mobilenet_v2:1.0]

On a CPU where channels-last training crashes PyTorch (:func:`channels_last_training_fault`),
only the eval-mode passes are compared, and ``channels_last_training_fault`` says why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from timing import median_seconds  # bench/timing.py (the script's folder is on sys.path)

from pruning import SearchSpace, build, macs
from pruning.machine import cpu_description
from pruning.modules import inference_layout

ARCHS = "mobilenet_v1:0.25,mobilenet_v2:0.35,mobilenet_v2:1.0,resnet18:0.25"


# 1x1 stride-2 convolutions with few channels (ResNet's downsampling shortcut in a pruned net),
# trained in channels-last: torch 2.14.1 aborts on some CPUs ("double free or corruption")
_PROBE = """
import torch
torch.set_num_threads(1)
for cin, cout in ((2, 4), (3, 4), (4, 8)):
    x = torch.randn(64, cin, 16, 16).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(cin, cout, 1, stride=2, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    for _ in range(20):
        conv(x).sum().backward()
"""


def channels_last_training_fault() -> str | None:
    """Why training steps cannot be timed in channels-last on this machine, or ``None``. Seen
    with torch 2.14.1 on an AMD EPYC (Zen 3, AVX2; 2026-12-06): oneDNN's weight gradient of a
    channels-last 1x1 stride-2 convolution from 2, 3 or 4 channels corrupts the heap and the
    process aborts (8 channels and more, stride 1, NCHW and eval-mode passes are fine; an Intel
    Xeon with AVX-512 ran the whole benchmark). Probed in a child process, as a crash cannot be
    caught."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode == 0:
        return None
    said = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
    return (f"a channels-last training step crashes PyTorch {torch.__version__} on this CPU "
            f"(1x1 stride-2 convolution from 2-4 channels: {said}); training steps are timed "
            "in NCHW only")


def timings(net, channels_last: bool, x, y, images, train: bool = True) -> dict:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        net.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    def eval_forward():
        net.eval()
        with torch.inference_mode():
            net(images)

    cpu = torch.device("cpu")  # a warm-up first: oneDNN builds its kernels for these shapes
    with inference_layout(net, cpu) if channels_last else contextlib.nullcontext():
        return {fn.__name__: median_seconds(fn, cpu, 6, warmup=1)
                for fn in ((train_step, eval_forward) if train else (eval_forward,))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--archs", default=ARCHS, help="arch:width_mult, comma-separated")
    ap.add_argument("--input-size", type=int, default=28)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, a.input_size, a.input_size, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    images = torch.randn(256, 1, a.input_size, a.input_size, generator=g)
    fault = channels_last_training_fault()
    rows = []
    for item in a.archs.split(","):
        arch, width_mult = item.split(":")
        space = SearchSpace.create(arch, num_classes=10, in_channels=1,
                                   input_size=a.input_size, width_mult=float(width_mult))
        rng = random.Random(0)
        top = space.num_levels - 1
        for cand in [space.uniform(top // 6), space.uniform(top // 2), space.uniform(top),
                     space.random(rng), space.random(rng)]:
            torch.manual_seed(0)
            net = build(space, cand)
            nchw = timings(net, False, x, y, images)
            nhwc = timings(net, True, x, y, images, train=fault is None)
            rows.append({"arch": arch, "width_mult": float(width_mult), "candidate": cand.key(),
                         "macs": macs(space, cand),
                         **{f"{k}_speedup": round(nchw[k] / nhwc[k], 3) for k in nhwc},
                         "nchw_s": {k: round(v, 5) for k, v in nchw.items()}})
    summary = {k: {"median": statistics.median(r[k] for r in rows),
                   "min": min(r[k] for r in rows), "max": max(r[k] for r in rows),
                   "faster_in": sum(r[k] > 1 for r in rows), "of": len(rows)}
               for k in ("train_step_speedup", "eval_forward_speedup") if k in rows[0]}
    print(json.dumps({"bench": "layout", "machine": cpu_description(), "threads": a.threads,
                      "torch": torch.__version__, "channels_last_training_fault": fault,
                      "summary": summary, "nets": rows}, indent=1))


if __name__ == "__main__":
    main()
