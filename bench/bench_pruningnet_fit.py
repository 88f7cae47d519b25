"""How well the PruningNet fits, against the same candidates trained as plain networks; prints
JSON.

The search ranks candidates by the accuracy of the PruningNet's generated weights (after BN
recalibration), so a PruningNet that fits badly ranks them badly. For each ``--epochs`` value,
a PruningNet is trained by the pipeline's loop (``train_pruningnet``: a uniformly random
candidate per step) and ``--candidates`` fixed random candidates are scored by the pipeline's
``CandidateEvaluator`` on held-out images; the first ``--plain`` of them are also trained as
plain networks with the same recipe (the smallest epoch count) and scored on the same images:
the accuracy the estimates should approach. The PruningNet's training-loss curve is reported too.
With several ``--seeds`` (the PruningNet's init and its candidate draws; the data, the scored
candidates and the plain nets stay the same) each epoch count is trained once per seed and
summarised as mean ± std: a few hundred steps of PruningNet training vary a lot from seed to seed.

    python bench/bench_pruningnet_fit.py --device cpu     # CPU-2 defaults (3 seeds): ~16 min
    python bench/bench_pruningnet_fit.py --tiny           # a check of the script; NOT a result
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (bench/common.py, beside this script)
import torch  # noqa: E402

T0 = time.perf_counter()
DEFAULTS = dict(arch="mobilenet_v2", width_mult=0.35, dataset="fashion-mnist", train_limit=11000,
                val_size=1000, epochs="2,6", seeds="0,1,2", batch_size=128, lr=0.1,
                warmup_epochs=0.5, max_steps=None, candidates=6, plain=2, calib_batches=4, threads=2)
TINY = dict(arch="test_mobilenet_v2", width_mult=1.0, dataset="synthetic", train_limit=400,
            val_size=64, epochs="1", seeds="0", batch_size=32, max_steps=3, candidates=2, plain=1,
            calib_batches=1, threads=1)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a check of the script; not a result")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch")
    ap.add_argument("--width-mult", type=float)
    ap.add_argument("--dataset", help="fashion-mnist (default) or synthetic")
    ap.add_argument("--train-limit", type=int, help="stratified subset of the train set")
    ap.add_argument("--val-size", type=int, help="held-out images the candidates are scored on")
    ap.add_argument("--epochs", help="comma-separated PruningNet epoch counts")
    ap.add_argument("--seeds", help="comma-separated PruningNet seeds (init and candidate draws)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup-epochs", type=float)
    ap.add_argument("--max-steps", type=int, help="cap on every training's steps")
    ap.add_argument("--candidates", type=int, help="random candidates scored by the PruningNet")
    ap.add_argument("--plain", type=int, help="of those, how many are trained as plain nets")
    ap.add_argument("--calib-batches", type=int, help="BN recalibration batches per candidate")
    ap.add_argument("--threads", type=int)
    return common.parse_args(ap, argv, DEFAULTS, TINY)


def summary(epochs: float, runs: list[dict]) -> dict:
    """Mean ± std over the seeds of one epoch count (std 0 for one seed)."""
    def stats(values):
        return {"mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    return {"epochs": epochs, "seeds": len(runs), "steps": runs[0]["steps"],
            "mean_estimate": stats([r["mean_estimate"] for r in runs]),
            "final_loss": stats([r["final_loss"] for r in runs])}


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from metanet.pruningnet import PruningNet
    from pruning.data import load_dataset
    from pruning.evaluate import CandidateEvaluator
    from pruning.modules import build
    from pruning.space import SearchSpace
    from pruning.train import TrainConfig, accuracy, train_network, train_pruningnet

    data = load_dataset(a.dataset, val_size=a.val_size, train_limit=a.train_limit,
                        test_limit=64, seed=0, device=a.device)
    meta = data.meta
    space = SearchSpace.create(a.arch, num_classes=meta.num_classes, in_channels=meta.in_channels,
                               input_size=meta.input_size, width_mult=a.width_mult,
                               min_channels=4)
    rng = random.Random(123)
    cands = [space.random(rng) for _ in range(a.candidates)]
    epochs = [float(e) for e in a.epochs.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]

    def recipe(e: float) -> TrainConfig:
        return TrainConfig(epochs=e, batch_size=a.batch_size, lr=a.lr,
                           warmup_epochs=min(a.warmup_epochs, e), max_steps=a.max_steps)

    runs = []
    for e, seed in ((e, seed) for e in epochs for seed in seeds):
        torch.manual_seed(seed)
        pnet = PruningNet(space).to(a.device)
        curve = []
        t = time.perf_counter()
        stats = train_pruningnet(pnet, data.train, recipe(e), seed=seed, device=a.device,
                                 progress=lambda ev: curve.append(round(ev["loss"], 3))
                                 if "loss" in ev else None)
        evaluator = CandidateEvaluator(pnet, data.train, data.val, calib_batches=a.calib_batches,
                                       batch_size=a.batch_size, device=a.device)
        est = [round(evaluator(c), 4) for c in cands]
        runs.append({"epochs": e, "seed": seed, "steps": stats["steps"],
                     "final_loss": round(stats["loss"], 4),
                     "loss_curve": curve[::max(1, len(curve) // 10)],
                     "estimates": est, "mean_estimate": round(statistics.fmean(est), 4),
                     "largest_estimate": round(evaluator(space.largest()), 4),
                     "seconds": round(time.perf_counter() - t, 1)})
        log(f"PruningNet {e:g} epochs, seed {seed}: loss {stats['loss']:.3f}, mean estimate "
            f"{runs[-1]['mean_estimate']:.4f}")
    plain = []
    for c in cands[:a.plain]:
        torch.manual_seed(0)
        net = build(space, c).to(a.device)
        train_network(net, data.train, recipe(min(epochs)), seed=0, device=a.device)
        plain.append(round(accuracy(net, data.val, device=a.device), 4))
        log(f"plain candidate {len(plain)}: {plain[-1]:.4f}")
    result = {
        "bench": "pruningnet_fit", "tiny": a.tiny,
        "note": "--tiny: a check of the script; NOT a result" if a.tiny else None,
        "device": a.device, "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "arch": a.arch, "width_mult": a.width_mult, "dataset": a.dataset,
        "train_images": len(data.train), "val_images": len(data.val),
        "recipe": {"batch_size": a.batch_size, "lr": a.lr, "warmup_epochs": a.warmup_epochs,
                   "max_steps": a.max_steps},
        "candidates": [c.key() for c in cands], "pruningnet": runs,
        "by_epochs": [summary(e, [r for r in runs if r["epochs"] == e]) for e in epochs],
        "plain": {"epochs": min(epochs), "val_accuracy": plain},
        "elapsed_s": round(time.perf_counter() - T0, 1)}
    return common.emit(result, a.out)


if __name__ == "__main__":
    main()
