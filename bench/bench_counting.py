"""Benchmark: exact MAC/parameter counting per candidate, single-threaded, vs building the net.

The search scores every candidate against its budget, and the repair of random draws counts a
candidate many times, so counting must be cheap: the target is >= 20,000 candidates/s for MACs
on one core. The official MetaPruning code builds a model per candidate and counts its FLOPs;
we compare with that (``build`` + ``FlopCounterMode``, on real CPU tensors and on the ``meta``
device, which skips the arithmetic) in the same run, and check on those candidates that both
give the same numbers.

Command (prints one JSON object)::

    .venv/bin/python bench/bench_counting.py [--n 20000] [--repeat 5] [--build 5]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pruning import counting  # noqa: E402
from pruning.modules import build  # noqa: E402
from pruning.space import SearchSpace  # noqa: E402

TARGET_MACS_PER_S = 20_000


def best_time(fn, repeat: int) -> float:
    """The fastest of ``repeat`` runs (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def build_and_count(space, candidate, device: str, size: int) -> tuple[int, int, float]:
    """What the official code does per candidate: build the net, run it, count FLOPs."""
    t = time.perf_counter()
    net = build(space, candidate, device=device).eval()
    x = torch.zeros(1, space.arch_args.get("in_channels", 3), size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    n_params = sum(p.numel() for p in net.parameters())
    return fc.get_total_flops() // 2, n_params, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="random candidates per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement (best kept)")
    ap.add_argument("--build", type=int, default=5, help="candidates built for the baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus:
        os.sched_setaffinity(0, {cpus[0]})  # one core

    size = 224
    space = SearchSpace.create("mobilenet_v2", num_classes=1000, in_channels=3, input_size=size,
                               max_width_mult=1.4)
    rng = random.Random(args.seed)
    cands = [space.random(rng) for _ in range(args.n)]
    choices = np.array([c.choices for c in cands], dtype=np.int64)
    counting.cost_model(space)  # compile once, outside the timings

    def run_macs():
        for c in cands:
            counting.macs(space, c)

    def run_params():
        for c in cands:
            counting.params(space, c)

    t_macs = best_time(run_macs, args.repeat)
    t_params = best_time(run_params, args.repeat)
    t_many = best_time(lambda: counting.macs_many(space, choices), args.repeat)
    many_ok = bool(np.array_equal(counting.macs_many(space, choices[:200]),
                                  [counting.macs(space, c) for c in cands[:200]]))

    exact = many_ok
    built = {}
    for device in ("cpu", "meta"):
        build_and_count(space, cands[0], device, size)  # warm-up
        times = []
        for c in cands[:args.build]:
            m, p, dt = build_and_count(space, c, device, size)
            times.append(dt)
            exact &= m == counting.macs(space, c) and p == counting.params(space, c)
        built[device] = float(np.median(times))

    per_macs = t_macs / args.n
    out = {
        "bench": "counting",
        "command": " ".join(["python bench/bench_counting.py", *sys.argv[1:]]),
        "arch": "mobilenet_v2", "input_size": size, "num_classes": 1000, "max_width_mult": 1.4,
        "groups": space.num_groups,
        "macs_terms": len(counting.cost_model(space).macs.coef),
        "candidates": args.n, "repeat": args.repeat,
        "threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0))
        if cpus else None,
        "macs_per_s": round(args.n / t_macs),
        "params_per_s": round(args.n / t_params),
        "macs_many_per_s": round(args.n / t_many),
        "macs_many_batch": args.n,
        "macs_us_per_candidate": round(per_macs * 1e6, 2),
        "target_macs_per_s": TARGET_MACS_PER_S,
        "meets_target": args.n / t_macs >= TARGET_MACS_PER_S,
        "build_flopcounter_cpu_s": round(built["cpu"], 4),
        "build_flopcounter_meta_s": round(built["meta"], 4),
        "speedup_macs_vs_build_cpu": round(built["cpu"] / per_macs),
        "speedup_macs_vs_build_meta": round(built["meta"] / per_macs),
        "build_candidates": args.build,
        "exact": bool(exact),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
