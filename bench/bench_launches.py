"""Operator launches per step: the PruningNet's training step against the plain network's,
counted with ``torch.profiler``; prints JSON.

A step whose operators are small is bound by how many it launches, not by arithmetic: then its
time follows its launch count. On CUDA this counts the GPU kernels of one forward + backward
(the optimiser excluded: on CUDA it is a few multi-tensor kernels); on a CPU, the outermost ATen
operators that compute (views, allocations and queries excluded). Counted for the
plain max-width network, the PruningNet in both shape modes (``fixed_shapes``, cropped; see
``metanet/pruningnet.py``) and a plain network of the same candidates, at ``--batch`` images
(the counts do not depend on it).

    python bench/bench_launches.py [--arch mobilenet_v2] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_launches.py` from a bare checkout
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (bench/common.py, beside this script)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

# ATen operators that launch no computation (views, allocations, queries, dispatch helpers)
NOT_COMPUTE = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "_reshape_alias", "select", "slice", "t", "transpose", "expand",
    "detach", "as_strided", "unsqueeze", "squeeze", "permute", "empty", "empty_strided",
    "empty_like", "resize_", "lift_fresh", "alias", "_unsafe_view", "unflatten", "flatten",
    "result_type", "to", "_to_copy", "item", "_local_scalar_dense", "resolve_conj",
    "resolve_neg", "_nnpack_available", "is_nonzero", "size", "stride", "contiguous"))


def count_launches(fn, device: torch.device) -> tuple[int, dict]:
    """Launches of one call of ``fn`` (after one untimed call), and the most frequent names."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = list(prof.events())
    if device.type == "cuda":
        names = [e.name for e in events if e.device_type.name == "CUDA"]
    else:  # the outermost ATen call of each chain (its own callees are its implementation)
        names = [e.name for e in events if e.name.startswith("aten::")
                 and e.name not in NOT_COMPUTE
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(names), dict(Counter(names).most_common(6))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", help="also write the JSON to this file")
    a = ap.parse_args(argv)
    from metanet.pruningnet import PruningNet
    from pruning.modules import build
    from pruning.space import SearchSpace

    torch.set_num_threads(1)
    device = torch.device(a.device)
    space = SearchSpace.create(a.arch, num_classes=10, in_channels=1, input_size=28)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(0)
    pnet = PruningNet(space).to(device)
    cand = space.random(random.Random(0))

    def step(module, forward):
        def run():
            module.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss = F.cross_entropy(forward(), y)
            loss.backward()
        return run

    plain = build(space, space.largest()).to(device)
    same = build(space, cand).to(device)
    counts = {
        "plain_max_width": count_launches(step(plain, lambda: plain(x)), device),
        "plain_same_candidate": count_launches(step(same, lambda: same(x)), device),
        "pruningnet_fixed_shapes": count_launches(
            step(pnet, lambda: pnet(x, cand, fixed_shapes=True)), device),
        "pruningnet_cropped": count_launches(step(pnet, lambda: pnet(x, cand)), device),
    }
    base = counts["plain_max_width"][0]
    result = {
        "bench": "launches", "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "arch": a.arch, "batch": a.batch,
        "counted": "CUDA kernels" if device.type == "cuda" else "computing ATen operators",
        "forward_backward_launches": {k: n for k, (n, _) in counts.items()},
        "ratio_vs_plain_max_width": {k: round(n / base, 3) for k, (n, _) in counts.items()},
        "most_frequent": {k: top for k, (_, top) in counts.items()},
        "parameter_tensors": {"plain_max_width": len(list(plain.parameters())),
                              "pruningnet": len(list(pnet.parameters()))},
    }
    return common.emit(result, a.out)


if __name__ == "__main__":
    main()
