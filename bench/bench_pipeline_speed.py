"""Pipeline speed on the device, against the plain network, in one run; prints JSON.

With a preset's settings (default ``standard``: MobileNetV2 1.0×, Fashion-MNIST shapes
1×28×28, 10 classes), measured with warm-up and ``torch.cuda.synchronize``:

1. PruningNet training throughput (images/s) through the pipeline's own loop
   (``train_pruningnet``: random candidate per step, augmentation on the device, bf16 autocast on
   CUDA, SGD) against the plain max-width network trained by the same loop at the same batch
   (``train_network``); in both shape modes (``fixed_shapes``, the default on CUDA, and
   ``cropped``, the default on a CPU: see ``metanet/pruningnet.py``). On CUDA the plain nets
   (max width, and the uniform net of the search's budget, what the final training trains)
   are timed eager and from a CUDA graph (``plain_by_mode``), and the fixed-shape PruningNet
   eager too (``pruningnet_by_mode.fixed_shapes_eager``): graphs are the pipeline's default on
   CUDA (``pruning/train.py``).
2. Search throughput (candidates/s): ``CandidateEvaluator`` on the preset's calibration and
   validation images (generate weights → materialise → recalibrate BN → score), in both shape
   modes, and the whole
   evolutionary search (``evolve``, the preset's search settings, a few generations), against
   the forward passes over the same images per candidate of (a) the plain max-width network and
   (b) the very same candidates as plain networks (the physical limit of scoring a candidate).
3. Layouts (``layouts``; measured, not used by the pipeline): the plain max-width network's
   forward over the validation images at the calibration batch and 4× it, in NCHW and
   channels-last memory format, and its training in channels-last format.
4. Profiles (``profiles``, ``torch.profiler``): for a few training steps of the budget's uniform
   net (eager, and graphed on CUDA), of the PruningNet, and for two candidate evaluations — the
   share of the wall time the GPU was busy and the longest kernels: bound by the GPU's work or
   by launches and the host.

The images are random tensors of the dataset's shape on the device (speed does not depend on
pixel values), so no dataset is needed.

    python bench/bench_pipeline_speed.py [--device cuda] [--out FILE]
    python bench/bench_pipeline_speed.py --device cpu --tiny     # a check of the script
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_pipeline_speed.py` from a bare checkout
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (bench/common.py and bench/timing.py, beside this script)
import torch  # noqa: E402
from timing import median_seconds, profile, seconds  # noqa: E402  (bench/timing.py, beside this script)

T0 = time.perf_counter()

GPU_DEFAULTS = dict(arch="mobilenet_v2", preset="standard", budget_ratio=0.25, train_images=50000,
                    warmup_steps=15, train_steps=100, other_mode_steps=40,
                    warmup_candidates=3, candidates=20,
                    same_candidates=5, search_generations=2, batch_size=None, calib_batches=None,
                    calib_batch_size=None, eval_images=None, population=None, repeat=3,
                    profile_steps=20)
TINY_DEFAULTS = dict(arch="test_mobilenet_v2", threads=1, train_images=256,
                     warmup_steps=1, train_steps=3, other_mode_steps=3,
                     warmup_candidates=1, candidates=3, same_candidates=2, search_generations=1,
                     batch_size=32, calib_batches=2, calib_batch_size=32, eval_images=64,
                     population=4, repeat=1, profile_steps=2)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="a check of the script (test architecture, a few steps); not a result")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch")
    ap.add_argument("--preset", help="pipeline preset whose settings are measured")
    ap.add_argument("--budget-ratio", type=float,
                    help="MACs budget (share of the full network) of the searched candidates")
    ap.add_argument("--train-images", type=int, help="size of the synthetic train split "
                                                     "(Fashion-MNIST's sub-train split: 50,000)")
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--train-steps", type=int, help="timed training steps per network")
    ap.add_argument("--other-mode-steps", type=int,
                    help="timed PruningNet steps in the shape mode that is not the device's "
                         "default (cropped on CUDA, fixed shapes on a CPU)")
    ap.add_argument("--warmup-candidates", type=int)
    ap.add_argument("--candidates", type=int, help="timed candidate evaluations")
    ap.add_argument("--same-candidates", type=int,
                    help="of those, how many are also timed as plain nets (forward limit)")
    ap.add_argument("--search-generations", type=int,
                    help="generations of the timed evolutionary search (0: skip it)")
    ap.add_argument("--repeat", type=int, help="repeats of each forward-limit timing (median)")
    ap.add_argument("--batch-size", type=int, help="override the preset's PruningNet batch")
    ap.add_argument("--calib-batches", type=int)
    ap.add_argument("--calib-batch-size", type=int)
    ap.add_argument("--eval-images", type=int)
    ap.add_argument("--eval-batch-size", type=int,
                    help="validation batch of the evaluator (default: the device's, "
                         "pruning.evaluate.eval_batch_size_default)")
    ap.add_argument("--population", type=int, help="override the search population")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--profile-steps", type=int, help="training steps per profile")
    return common.parse_args(ap, argv, GPU_DEFAULTS, TINY_DEFAULTS)


def main(argv=None) -> dict:
    a = parse_args(argv)
    import importlib.util
    missing = [m for m in ("numpy", "pydantic", "safetensors")
               if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"bench_pipeline_speed: missing Python packages: {', '.join(missing)} "
                 "(see docs/benchmarks.md, 'Running the GPU benchmarks')")
    if a.threads:  # one thread on a shared 2-core machine: spinning OpenMP threads cost 10×
        torch.set_num_threads(a.threads)
    from metanet.pruningnet import PruningNet, fixed_shapes_default
    from pruning import counting
    from pruning.constraints import MacsConstraint
    from pruning.data import DatasetMeta, TensorSplit
    from pruning.evaluate import CandidateEvaluator
    from pruning.modules import build
    from pruning.spec import PRESETS
    from pruning.search import SearchConfig, evolve, random_feasible, uniform_baseline
    from pruning.space import SearchSpace
    from pruning.train import TrainConfig, train_network, train_pruningnet

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_pipeline_speed: --device cuda but no CUDA device is available")
    p = PRESETS[a.preset]
    batch = a.batch_size or p["metanet"]["batch_size"]
    calib_batches = a.calib_batches or p["calib_batches"]
    calib_bs = a.calib_batch_size or p["calib_batch_size"]
    eval_images = a.eval_images or p["eval_images"]
    search_cfg = {**SearchConfig().to_dict(), **p["search"]}
    if a.population:
        pop = a.population
        search_cfg.update(population=pop, keep_top=pop, parents=max(1, pop // 4),
                          mutants=pop // 2, crossovers=pop // 4)
    search_cfg.update(generations=max(1, a.search_generations), seed=0)

    meta = DatasetMeta("fashion-mnist-shaped", 10, 1, 28, (0.286,), (0.353,),
                       tuple(f"class{i}" for i in range(10)), hflip=True, crop_padding=4)
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n,), generator=g)
        return TensorSplit(x, y, meta).to(device)

    train = split(max(a.train_images, batch, calib_batches * calib_bs))
    val = split(eval_images)
    space = SearchSpace.create(a.arch, num_classes=10, in_channels=1, input_size=28,
                               max_width_mult=p.get("max_width_mult", 1.0))
    full = SearchSpace.create(a.arch, num_classes=10, in_channels=1, input_size=28)
    full_macs = counting.macs(full, full.largest())
    log(f"{a.arch} on {device}: batch {batch}, {calib_batches}×{calib_bs} calibration + "
        f"{eval_images} validation images per candidate")

    # 1. training throughput: PruningNet vs the plain max-width network, same loop and batch
    recipe = {k: v for k, v in p["metanet"].items() if k != "epochs"}
    recipe.update(batch_size=batch, checkpoint_every=10**9)

    def train_rate(fn, module, steps=a.train_steps, **kwargs) -> dict:
        fn(module, train, TrainConfig.from_dict({**recipe, "max_steps": a.warmup_steps}),
           seed=1, device=device, **kwargs)
        stats = {}
        elapsed = seconds(lambda: stats.update(fn(
            module, train, TrainConfig.from_dict({**recipe, "max_steps": steps}),
            seed=2, device=device, **kwargs)), device)
        return {"steps": stats["steps"], "seconds": round(elapsed, 4),
                "images_per_s": round(stats["steps"] * batch / elapsed, 1)}

    # the PruningNet in both shape modes (metanet/pruningnet.py): the device's default one is
    # the pipeline's and gets the full step count
    default_fixed = fixed_shapes_default(device)
    torch.manual_seed(0)
    pnet = PruningNet(space).to(device)
    by_mode = {}
    for fixed in (default_fixed, not default_fixed):
        name = "fixed_shapes" if fixed else "cropped"
        by_mode[name] = train_rate(train_pruningnet, pnet, fixed_shapes=fixed,
                                   steps=a.train_steps if fixed == default_fixed
                                   else a.other_mode_steps)
        log(f"PruningNet training ({name}): {by_mode[name]['images_per_s']:.0f} img/s")
    if device.type == "cuda":  # the default fixed-shape steps replay a CUDA graph: without it
        by_mode["fixed_shapes_eager"] = train_rate(train_pruningnet, pnet, fixed_shapes=True,
                                                   cuda_graphs=False, steps=a.other_mode_steps)
        log(f"PruningNet training (fixed shapes, eager): "
            f"{by_mode['fixed_shapes_eager']['images_per_s']:.0f} img/s")
    meta_train = by_mode["fixed_shapes" if default_fixed else "cropped"]
    plain = build(space, space.largest()).to(device)
    plain_train = train_rate(train_network, plain)
    log(f"plain max-width training: {plain_train['images_per_s']:.0f} img/s")
    # eager vs CUDA graph (CUDA only): the max-width net and the budget's uniform net
    constraint = MacsConstraint(int(a.budget_ratio * full_macs))
    budget_uniform = uniform_baseline(space, [constraint])  # what final training trains
    plain_by_mode = {}
    if device.type == "cuda":
        for name, cand in (("max_width", space.largest()),
                           ("budget_uniform", budget_uniform)):
            net = build(space, cand).to(device)
            plain_by_mode[name] = {mode: train_rate(train_network, net, cuda_graphs=graphed,
                                                    steps=a.other_mode_steps)
                                   for mode, graphed in (("eager", False), ("graphed", True))}
            plain_by_mode[name]["macs"] = counting.macs(space, cand)
            log(f"plain {name} training: " + ", ".join(
                f"{m} {plain_by_mode[name][m]['images_per_s']:.0f} img/s"
                for m in ("eager", "graphed")))

    # 2. search throughput vs the forward passes over the same images per candidate
    def make_evaluator(eval_batch_size=a.eval_batch_size, **mode) -> CandidateEvaluator:
        return CandidateEvaluator(pnet, train, val, calib_batches=calib_batches,
                                  batch_size=calib_bs, val_images=eval_images, seed=0,
                                  device=device, eval_batch_size=eval_batch_size, **mode)

    evaluator = make_evaluator()  # the device's default shape mode
    images_per_candidate = (sum(len(x) for x in evaluator.calibration)
                            + sum(len(y) for _, y in evaluator.validation))
    rng = random.Random(0)
    cands = [random_feasible(space, [constraint], rng)
             for _ in range(a.warmup_candidates + a.candidates)]
    for c in cands[:a.warmup_candidates]:
        evaluator(c)
    per_candidate = [seconds(lambda: evaluator(c), device) for c in cands[a.warmup_candidates:]]
    eval_rate = len(per_candidate) / sum(per_candidate)
    log(f"candidate evaluation ({'fixed shapes' if default_fixed else 'cropped'}): "
        f"{eval_rate:.2f} candidates/s")
    other = make_evaluator(fixed_shapes=not default_fixed)
    per_candidate_other = [seconds(lambda: other(c), device) for c in cands]
    other_rate = len(per_candidate_other) / sum(per_candidate_other)
    log(f"candidate evaluation ({'cropped' if default_fixed else 'fixed shapes'}): "
        f"{other_rate:.2f} candidates/s")
    small_batches = None  # the validation pass in calibration-sized batches (the default before)
    if evaluator.eval_batch_size != calib_bs:
        small = make_evaluator(eval_batch_size=calib_bs)
        per_candidate_small = [seconds(lambda: small(c), device) for c in cands]
        small_rate = len(per_candidate_small) / sum(per_candidate_small)
        small_batches = {
            "eval_batch_size": calib_bs, "candidates": len(per_candidate_small),
            "seconds_per_candidate_median": round(statistics.median(per_candidate_small), 5),
            "candidates_per_s": round(small_rate, 3),
            "default_speedup": round(eval_rate / small_rate, 3)}
        log(f"candidate evaluation, validation in batches of {calib_bs}: "
            f"{small_batches['candidates_per_s']:.2f} candidates/s")

    def forward_time(net) -> float:
        @torch.inference_mode()
        def once():
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                net.train()  # BN recalibration pass, as the evaluator does
                for x in evaluator.calibration:
                    net(x)
                net.eval()
                for x, _ in evaluator.validation:
                    net(x)

        return median_seconds(once, device, a.repeat, warmup=1)

    plain_fwd = build(space, space.largest()).to(device)
    t_plain_fwd = forward_time(plain_fwd)
    same = cands[a.warmup_candidates:a.warmup_candidates + a.same_candidates]
    t_same = [forward_time(build(space, c).to(device)) for c in same]
    t_eval_same = per_candidate[:len(same)]
    log(f"plain max-width forward over the same images: {1 / t_plain_fwd:.2f} candidates/s")

    search = None
    if a.search_generations > 0:
        cfg = SearchConfig.from_dict(search_cfg)
        found = []
        elapsed = seconds(lambda: found.append(evolve(space, evaluator, [constraint], cfg)),
                          device)
        evaluated = len(found[0].history)
        search = {"generations": cfg.generations, "population": cfg.population,
                  "evaluated": evaluated, "seconds": round(elapsed, 3),
                  "candidates_per_s": round(evaluated / elapsed, 3),
                  "slowdown_vs_evaluator": round(eval_rate * elapsed / evaluated, 3)}
        log(f"evolutionary search: {search['candidates_per_s']:.2f} candidates/s")

    # 3. the plain max-width network in other layouts and batch sizes: what the search's
    # forward passes and the final training could gain (measured, not used by the pipeline)
    images = torch.cat([x for x, _ in evaluator.validation])
    channels_last = torch.channels_last

    def forward_rate(net, batch_size: int, nhwc: bool) -> float:
        batches = [b.contiguous(memory_format=channels_last) if nhwc else b
                   for b in images.split(batch_size)]

        @torch.inference_mode()
        def once():
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                for b in batches:
                    net(b)

        return round(len(images) / median_seconds(once, device, a.repeat, warmup=1), 1)

    layouts = {"forward_images": len(images), "forward_images_per_s": {}}
    for nhwc in (False, True):
        net = build(space, space.largest()).to(device).eval()
        if nhwc:
            net = net.to(memory_format=channels_last)
        for bs in (calib_bs, 4 * calib_bs):
            name = f"batch{bs}_{'channels_last' if nhwc else 'nchw'}"
            layouts["forward_images_per_s"][name] = forward_rate(net, bs, nhwc)
    nhwc_net = build(space, space.largest()).to(device).to(memory_format=channels_last)
    layouts["plain_max_width_training_channels_last"] = train_rate(train_network, nhwc_net)
    log(f"layouts: forward img/s {layouts['forward_images_per_s']}, channels-last training "
        f"{layouts['plain_max_width_training_channels_last']['images_per_s']:.0f} img/s")

    # 4. where the time goes (torch.profiler): GPU busy share and the longest kernels
    small = build(space, budget_uniform).to(device)
    short = TrainConfig.from_dict({**recipe, "max_steps": a.profile_steps})
    profiles = {
        "budget_uniform_training_eager": profile(lambda: train_network(
            small, train, short, seed=3, device=device, cuda_graphs=False), device),
        "pruningnet_training": profile(lambda: train_pruningnet(
            pnet, train, short, seed=3, device=device), device),
        "candidate_evaluation": profile(lambda: [evaluator(c) for c in cands[:2]], device)}
    if device.type == "cuda":  # the defaults above are graphed for the PruningNet, not here
        profiles["budget_uniform_training_graphed"] = profile(lambda: train_network(
            small, train, short, seed=3, device=device, cuda_graphs=True), device)
        profiles["pruningnet_training_eager"] = profile(lambda: train_pruningnet(
            pnet, train, short, seed=3, device=device, cuda_graphs=False), device)
    log("profiles: " + ", ".join(f"{k} GPU busy {v['gpu_busy_share']}"
                                 for k, v in profiles.items()))

    ratio_same = [te / tf for te, tf in zip(t_eval_same, t_same)]
    result = {
        "bench": "pipeline_speed", "tiny": a.tiny,
        "note": "--tiny: a check of the script; NOT a result" if a.tiny else None,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "arch": a.arch, "preset": a.preset, "input": [1, 28, 28], "classes": 10,
        "max_width_mult": p.get("max_width_mult", 1.0), "full_macs": full_macs,
        "training": {
            "batch": batch, "warmup_steps": a.warmup_steps,
            "pruningnet": meta_train, "plain_max_width": plain_train,
            "pruningnet_default_mode": "fixed_shapes" if default_fixed else "cropped",
            "pruningnet_by_mode": by_mode, "plain_by_mode": plain_by_mode,
            "throughput_ratio_pruningnet_vs_plain": round(meta_train["images_per_s"]
                                               / plain_train["images_per_s"], 3)},
        "search": {
            "budget_macs_ratio": a.budget_ratio,
            "calibration_images": sum(len(x) for x in evaluator.calibration),
            "validation_images": sum(len(y) for _, y in evaluator.validation),
            "images_per_candidate": images_per_candidate,
            "evaluator": {"candidates": len(per_candidate),
                          "seconds_per_candidate_median": round(statistics.median(per_candidate),
                                                                5),
                          "candidates_per_s": round(eval_rate, 3),
                          "mode": "fixed_shapes" if default_fixed else "cropped",
                          "eval_batch_size": evaluator.eval_batch_size},
            "evaluator_calibration_sized_batches": small_batches,
            "evaluator_other_mode": {
                "mode": "cropped" if default_fixed else "fixed_shapes",
                "candidates": len(per_candidate_other),
                "seconds_per_candidate_median": round(statistics.median(per_candidate_other), 5),
                "candidates_per_s": round(other_rate, 3)},
            "plain_max_width_forward": {
                "seconds_per_candidate": round(t_plain_fwd, 5),
                "candidates_per_s": round(1 / t_plain_fwd, 3),
                "images_per_s": round(images_per_candidate / t_plain_fwd, 1)},
            # seconds per candidate ÷ seconds of the forward passes over the same images
            "slowdown_vs_plain_max_width_forward": round(1 / (eval_rate * t_plain_fwd), 3),
            "same_candidates_forward": {
                "candidates": len(same),
                "seconds_per_candidate": [round(t, 5) for t in t_same],
                "evaluation_seconds": [round(t, 5) for t in t_eval_same],
                "median_slowdown": (round(statistics.median(ratio_same), 3)
                                                       if ratio_same else None)},
            "evolve": search},
        "layouts": layouts,
        "profiles": {"steps": a.profile_steps, "candidates": 2, **profiles},
        "elapsed_s": round(time.perf_counter() - T0, 1),
    }
    return common.emit(result, a.out)


if __name__ == "__main__":
    main()
