"""Accuracy benchmark: MetaPruning's pick vs the uniform baseline at several MACs budgets, over
seeds, plus the Kendall tau of the PruningNet's estimates against trained accuracy. Prints JSON.

For every seed, one pipeline run per budget (``pruning.pipeline.run`` with
``train_baseline=True``, so both networks get the same final recipe); the PruningNet is trained
once per seed and reused by the other budgets of that seed (``PipelineSpec.metanet_from``;
``--reuse none`` trains one per run). From the first seed's trained PruningNet,
``--tau-candidates`` feasible candidates spread over MACs are scored with the run's
``CandidateEvaluator`` settings and trained with the final recipe for a short schedule
(``--tau-epochs``); the JSON gives Kendall's tau-b between estimate and trained test accuracy
(and, for reference, between MACs and trained accuracy).

The defaults are meant to fit one H100-class GPU in under 10 minutes; measured on an H200
(2026-11-27) a seed took ~250 s, so three in turn need ~13 min: ``--jobs`` (3) runs the seeds
at once, each in its own process on the same device, and the tau part in this process as soon
as the first seed's PruningNet is trained. On CUDA the pipeline trains plain nets and the
PruningNet from CUDA graphs; :func:`check_cuda_graphs` first verifies on small ones, in a
process of its own, that a graphed training ends where an eager one does, and turns graphs off
for the run otherwise (``cuda_graphs`` in the JSON). ``--time-budget-s`` skips whole seeds
(and then tau candidates) that would not fit, cancels a stage running past it, and says so in
the JSON. ``--tiny`` runs a tiny test architecture on a few hundred images on a CPU in well
under 3 minutes: it checks the script, its numbers are not a result. ``--cpu-quick`` runs the
same design at the ``quick`` preset's scale on a CPU (MobileNetV2 0.35×, 5,000 images; ~10 min
per seed on 2 cores): a CPU result, not the GPU benchmark.

    python bench/bench_quality.py [--out FILE] [--seeds 0,1,2] [--budgets 0.5,0.25,0.1] ...
    python bench/bench_quality.py --tiny
    python bench/bench_quality.py --cpu-quick [--final-init generated]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_quality.py` from a bare checkout
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (bench/common.py, beside this script)
import torch  # noqa: E402

from pruning.machine import cpu_description  # noqa: E402  (no PyTorch, no pipeline)

T0 = time.perf_counter()

# The pipeline's own requirements (export writes TorchScript and ONNX and verifies them).
REQUIRED = ("numpy", "pydantic", "safetensors", "onnx", "onnxruntime")

# Seeds at once: how long past the time budget their processes may still run (a stage stops at
# its next check: a training step, a search generation) before they are stopped and what they
# wrote is merged; with the driver's 40 s between --time-budget-s and its kill, the merged JSON
# is written before the kill.
CHILD_GRACE_S = 20.0

# GPU defaults: MobileNetV2 on Fashion-MNIST, the `standard` preset with shorter schedules and
# a smaller search (3 seeds × 3 budgets + tau: ~13 min on an H200, see docs/benchmarks.md). The
# learning rate follows the batch (the preset's 0.1 at 256 → 0.2 at 512).
GPU_DEFAULTS = dict(
    arch="mobilenet_v2", dataset="fashion-mnist", preset="standard", device="auto",
    seeds="0,1,2", budgets="0.5,0.25,0.1",
    epochs_metanet=4.0, epochs_final=4.0, batch_size=512, lr=0.2, warmup_epochs=0.5,
    max_steps=None, train_limit=None, test_limit=None, val_size=5000, eval_images=5000,
    calib_batches=8, calib_batch_size=256, search_population=24, search_generations=6,
    tau_candidates=10, tau_epochs=1.0, tau_max_steps=None,
    time_budget_s=540.0, tau_reserve_s=60.0, threads=None, jobs=3)

TINY_DEFAULTS = dict(
    arch="test_mobilenet_v2", preset="smoke", device="cpu", seeds="0,1", threads=1, jobs=1,
    epochs_metanet=1.0, epochs_final=1.0, batch_size=64, lr=0.05, warmup_epochs=0.0,
    max_steps=4, train_limit=320, test_limit=128, val_size=64, eval_images=64,
    calib_batches=1, calib_batch_size=64, search_population=6, search_generations=2,
    tau_candidates=10, tau_epochs=1.0, tau_max_steps=2, time_budget_s=170.0, tau_reserve_s=20.0)


# The same design on a CPU (`--cpu-quick`): MobileNetV2 0.35× and the `quick` preset's data,
# recipe (batch 64, lr 0.05) and search (16 × 6), seeds in turn on all cores, no tau.
CPU_QUICK_DEFAULTS = dict(
    arch="mobilenet_v2", width_mult=0.35, preset="quick", device="cpu", jobs=1,
    epochs_metanet=6.0, epochs_final=5.0, batch_size=64, lr=0.05, warmup_epochs=0.3,
    train_limit=5000, test_limit=2000, val_size=500, eval_images=500, calib_batches=2,
    calib_batch_size=128, search_population=16, search_generations=6, tau_candidates=0,
    time_budget_s=4 * 3600.0, tau_reserve_s=0.0)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    profile = ap.add_mutually_exclusive_group()
    profile.add_argument("--tiny", action="store_true",
                         help="CPU check of the script (test architecture, tiny data); not a "
                              "result")
    profile.add_argument("--cpu-quick", action="store_true",
                         help="the benchmark's design at the quick preset's scale on a 2-core "
                              "CPU: MobileNetV2 0.35×, 5,000 images, ~10 min per seed")
    ap.add_argument("--check-cuda-graphs", action="store_true",
                    help="only check CUDA-graph training (JSON verdict; the benchmark runs it in "
                         "a process of its own before the seeds)")
    ap.add_argument("--out", help="also write the JSON to this file (rewritten after every run)")
    ap.add_argument("--arch")
    ap.add_argument("--width-mult", type=float, help="the architecture's width multiplier")
    ap.add_argument("--dataset")
    ap.add_argument("--data-root", help="dataset folder (default: .data/fashion-mnist when it "
                                        "exists, else the loader's default / env variable)")
    ap.add_argument("--preset", help="the pipeline preset the settings below override")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--budgets", help="comma-separated MACs ratios of the full 1.0× network")
    ap.add_argument("--epochs-metanet", type=float)
    ap.add_argument("--epochs-final", type=float, help="final recipe (MetaPruning and uniform)")
    ap.add_argument("--batch-size", type=int, help="PruningNet and final training batch")
    ap.add_argument("--lr", type=float, help="peak learning rate (PruningNet and final)")
    ap.add_argument("--warmup-epochs", type=float)
    ap.add_argument("--max-steps", type=int, help="cap on the steps of every training stage")
    ap.add_argument("--train-limit", type=int, help="use a stratified subset of the train set")
    ap.add_argument("--test-limit", type=int)
    ap.add_argument("--val-size", type=int, help="held-out images the search scores on")
    ap.add_argument("--eval-images", type=int)
    ap.add_argument("--calib-batches", type=int)
    ap.add_argument("--calib-batch-size", type=int)
    ap.add_argument("--search-population", type=int)
    ap.add_argument("--search-generations", type=int)
    ap.add_argument("--objective", choices=["accuracy", "loss"],
                    help="what the search maximises: the estimated held-out accuracy or minus "
                         "the estimated held-out cross-entropy (default: the preset's)")
    ap.add_argument("--include-uniform", choices=["yes", "no"],
                    help="the search's first generation holds the uniform baseline (default: "
                         "the preset's)")
    ap.add_argument("--min-budget-use", type=float,
                    help="every candidate the search scores uses at least this share of the "
                         "budget (default: the preset's, 0: the paper's search)")
    ap.add_argument("--final-init", choices=["scratch", "generated"],
                    help="final training of both networks from scratch (the paper) or from the "
                         "PruningNet's generated weights (default: the pipeline's, scratch)")
    ap.add_argument("--tau-candidates", type=int, help="0 skips the Kendall tau part")
    ap.add_argument("--tau-epochs", type=float, help="short final-recipe schedule per candidate")
    ap.add_argument("--tau-max-steps", type=int)
    ap.add_argument("--tau-range", help="LO,HI: MACs ratios the tau candidates spread over "
                                        "(default: the budgets' range; LO=HI: one budget)")
    ap.add_argument("--time-budget-s", type=float,
                    help="wall-clock budget of the whole script; seeds/tau candidates that "
                         "would not fit are skipped, a stage running past it is cancelled")
    ap.add_argument("--tau-reserve-s", type=float,
                    help="seconds kept free for the tau part when deciding to start a seed")
    ap.add_argument("--reuse", choices=["auto", "none"], default="auto",
                    help="reuse each seed's PruningNet across budgets (auto) or train it per run")
    ap.add_argument("--work-dir", help="run folders go here (default: a temporary folder, "
                                       "removed at the end unless --keep-runs)")
    ap.add_argument("--keep-runs", action="store_true")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; with "
                                                "--jobs, the CPU's cores shared out)")
    ap.add_argument("--jobs", type=int,
                    help="seeds run at once, each in its own process on the same device (a "
                         "launch-bound GPU has room for several)")
    return common.parse_args(ap, argv, GPU_DEFAULTS, TINY_DEFAULTS,
                             cpu_quick=CPU_QUICK_DEFAULTS)


# --- statistics ---------------------------------------------------------------------------

def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (ties in either variable handled as scipy does)."""
    try:
        from scipy.stats import kendalltau
    except ImportError:
        kendalltau = None
    if kendalltau is not None:
        value = kendalltau(x, y).statistic
        return None if value is None or math.isnan(value) else float(value)
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denom == 0 else (concordant - discordant) / denom


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"n": len(values),
            "mean": round(statistics.fmean(values), 5) if values else None,
            "std": round(statistics.stdev(values), 5) if len(values) > 1 else None}


# --- CUDA graphs, checked before they are trusted ----------------------------------------

def check_cuda_graphs(arch: str, device: str = "cuda", steps: int = 12, **graphs) -> dict:
    """The pipeline trains plain nets and the fixed-shape PruningNet from CUDA graphs on a GPU
    (``pruning/train.py``). Before the benchmark relies on that, a small plain net and a small
    PruningNet (``arch`` at width 0.35) are each trained ``steps`` steps three times from the
    same weights on the same batches — eagerly twice (the run-to-run noise of the GPU's kernels)
    and once from a graph — and ``ok`` says whether, for both, the graphed weights lie as close
    to the eager ones as ``max(0.02, 3 × noise)`` of the distance training moved them, and
    neither capture failed (a failed capture trains eagerly: its weights would match)."""
    from metanet.pruningnet import PruningNet
    from pruning.data import DatasetMeta, TensorSplit
    from pruning.modules import build
    from pruning.space import SearchSpace
    from pruning.train import TrainConfig, train_network, train_pruningnet

    space = SearchSpace.create(arch, num_classes=10, in_channels=1, input_size=28,
                               width_mult=0.35, min_channels=4)
    meta = DatasetMeta("random-28x28", 10, 1, 28, (0.286,), (0.353,),
                       tuple(f"class{i}" for i in range(10)), hflip=True, crop_padding=4)
    batch = 128
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (batch * steps, 1, 28, 28), generator=g,
                                      dtype=torch.uint8),
                        torch.randint(0, 10, (batch * steps,), generator=g), meta).to(device)
    config = TrainConfig(epochs=1, batch_size=batch, lr=0.1, warmup_epochs=0.3,
                         checkpoint_every=10**9)

    def flat(net: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten().float() for p in net.parameters()])

    def compare(init: torch.nn.Module, train) -> dict:
        messages: list[str] = []  # a failed capture says so here, then trains eagerly

        def trained(cuda_graphs: bool) -> torch.Tensor:
            net = copy.deepcopy(init)
            train(net, split, config, device=device, cuda_graphs=cuda_graphs,
                  progress=lambda ev: "message" in ev and messages.append(ev["message"]),
                  **(graphs if cuda_graphs else {}))
            return flat(net)

        start = flat(init)
        eager, eager_again, graphed = trained(False), trained(False), trained(True)
        moved = float((eager - start).norm())
        noise = float((eager_again - eager).norm()) / moved
        distance = float((graphed - eager).norm()) / moved
        # a capture that failed fell back to eager steps: their weights match, but the graph,
        # which the benchmark's own processes would then try, is what the check is for
        result = {"ok": distance <= max(0.02, 3 * noise) and not messages,
                  "relative_distance": round(distance, 6), "eager_noise": round(noise, 6)}
        if messages:
            result["error"] = messages[0]
        return result

    torch.manual_seed(0)
    plain = compare(build(space, space.uniform(space.num_levels // 3)).to(device),
                    train_network)
    pnet = compare(PruningNet(space).to(device),
                   lambda *args, **kw: train_pruningnet(*args, fixed_shapes=True, **kw))
    return {"ok": plain["ok"] and pnet["ok"], "steps": steps, "plain": plain, "pruningnet": pnet}


def cuda_graphs_verdict(command: list[str], timeout_s: float = 180.0) -> dict:
    """:func:`check_cuda_graphs` run by ``command`` (this script with ``--check-cuda-graphs``)
    in a process of its own: a failed capture can leave a CUDA context unusable, or end its
    process, and a GPU run is one shot — there it costs only the graphs, not the benchmark.
    Any failure is a verdict against graphs, with the reason."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"the check took over {timeout_s:g} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"the check ended with status {done.returncode}: {last}"}
    try:
        verdict = json.loads(done.stdout)
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("ok"), bool):
        return {"ok": False, "error": "the check printed no verdict"}
    return verdict


# --- the benchmark ------------------------------------------------------------------------

class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="bench_q_"))
        self.data_root = a.data_root
        if self.data_root is None and a.dataset == "fashion-mnist":
            local = ROOT / ".data" / "fashion-mnist"
            if local.is_dir():
                self.data_root = str(local)
        self.reuse = "none" if a.reuse == "none" else "metanet_from"
        self.runs: list[dict] = []
        self.seed_times: list[float] = []
        self.seeds_done: list[int] = []
        self.seeds_skipped: list[dict] = []
        self.cancelled: list[dict] = []  # runs stopped by the time budget
        self.failures: list[dict] = []  # seeds whose runs raised (the error, not a traceback)
        self.tau: dict | None = None
        self.cuda_graphs: dict | None = None  # check_cuda_graphs() (parent process, CUDA only)
        self.first_run_dir: Path | None = None  # seed 0's first run: holds the PruningNet

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def over_time(self) -> bool:
        return self.elapsed() > self.a.time_budget_s

    def recipe(self, epochs: float) -> dict:
        a = self.a
        d = {"epochs": epochs, "batch_size": a.batch_size, "lr": a.lr,
             "warmup_epochs": min(a.warmup_epochs, epochs)}
        if a.max_steps:
            d["max_steps"] = a.max_steps
        return d

    def spec(self, seed: int, budget: float, metanet_from: Path | None):
        from pruning.spec import Budget, PipelineSpec

        a = self.a
        pop = a.search_population
        search = {"population": pop, "keep_top": pop, "parents": max(2, min(pop, pop // 4)),
                  "mutants": int(pop * 0.4), "crossovers": int(pop * 0.4),
                  "generations": a.search_generations}
        if a.objective:
            search["objective"] = a.objective
        if a.include_uniform:
            search["include_uniform"] = a.include_uniform == "yes"
        if a.min_budget_use is not None:
            search["min_budget_use"] = a.min_budget_use
        fields = dict(arch=a.arch, width_mult=a.width_mult or 1.0, dataset=a.dataset,
                      data_root=self.data_root,
                      budget=Budget(macs_ratio=budget), preset=a.preset, seed=seed,
                      device=a.device, train_limit=a.train_limit, test_limit=a.test_limit,
                      val_size=a.val_size, eval_images=a.eval_images,
                      calib_batches=a.calib_batches, calib_batch_size=a.calib_batch_size,
                      train_baseline=True, metanet=self.recipe(a.epochs_metanet),
                      search=search, final=self.recipe(a.epochs_final))
        if metanet_from is not None:
            fields["metanet_from"] = str(metanet_from)
        if a.final_init:
            fields["final_init"] = a.final_init
        return PipelineSpec(**fields)

    @staticmethod
    def full_macs(metanet_dir: Path) -> int:
        """MACs of the full 1.0× network of the space a trained PruningNet was built on."""
        from pruning import counting
        from pruning.checkpoint import load_tensors
        from pruning.space import SearchSpace

        _, meta = load_tensors(metanet_dir / "metanet" / "pruningnet.safetensors")
        return counting.macs(*SearchSpace.from_dict(meta["space"]).full_network())

    def progress(self, label: str):
        state = {"stage": None, "t": 0.0}

        def notify(ev: dict) -> None:
            stage, now = ev.get("stage"), time.perf_counter()
            if stage == state["stage"] and now - state["t"] < 15 and stage != "done":
                return
            state["stage"], state["t"] = stage, now
            if "step" in ev:
                detail = (f"step {ev['step']}/{ev['total']} loss {ev['loss']:.3f} "
                          f"{ev.get('images_per_s', 0):.0f} img/s")
            elif "generation" in ev:
                detail = (f"generation {ev['generation']}/{ev.get('generations')} "
                          f"best {ev.get('best_score')}")
            elif stage == "done":
                detail = "done"
            else:
                detail = ev.get("message", "")
            log(f"{label}: {stage}: {detail}")

        return notify

    def one_run(self, seed: int, budget: float, first: Path | None) -> tuple[Path, dict]:
        from pruning.pipeline import run
        from pruning.train import Cancelled

        run_dir = self.work / f"seed{seed}" / f"macs{budget:g}"
        metanet_from = first if self.reuse == "metanet_from" else None
        spec = self.spec(seed, budget, metanet_from)
        t = time.perf_counter()
        entry = {"seed": seed, "macs_ratio": budget,
                 "metanet_reused": first is not None and self.reuse != "none"}
        try:
            report = run(spec, run_dir, progress=self.progress(f"seed {seed} macs {budget:g}"),
                         should_stop=self.over_time)
            entry["search_evaluated"] = report["search"]["evaluated"]
        except Exception as e:  # noqa: BLE001 — a GPU run is one shot: keep what was measured
            if isinstance(e, Cancelled) or not (run_dir / "evaluation.json").is_file():
                raise
            # export (stage 5) failed after the test accuracies were written: report them
            report = {**json.loads((run_dir / "evaluation.json").read_text()),
                      "full_network": {"macs": self.full_macs(first or run_dir)}}
            entry["error"] = f"stage after evaluation failed: {e!r}"
            log(f"seed {seed} macs {budget:g}: {entry['error']}")
        entry["elapsed_s"] = round(time.perf_counter() - t, 1)
        full = report["full_network"]["macs"]
        for name in ("metapruning", "uniform"):
            r = report[name]
            entry[name] = {"test_accuracy": r.get("test_accuracy"),
                           "estimated_val_accuracy": r.get("estimated_val_accuracy"),
                           "macs": r["macs"], "macs_vs_full": round(r["macs"] / full, 4),
                           "candidate": r["candidate"]}
        entry["full_macs"] = full
        log(f"seed {seed} macs {budget:g}: MetaPruning "
            f"{entry['metapruning']['test_accuracy']:.4f} vs uniform "
            f"{entry['uniform']['test_accuracy']:.4f} ({entry['elapsed_s']} s)")
        return run_dir, entry

    def seeds(self) -> None:
        if self.a.jobs > 1 and len(ints(self.a.seeds)) > 1:
            self.seeds_in_parallel()
        else:
            self.seeds_in_turn()

    def seeds_in_parallel(self) -> None:
        """Every seed in its own process (this script with ``--seeds S --jobs 1``), at once,
        then their JSON merged; the runs stay in the shared work folder. The tau part runs
        here meanwhile, as soon as the first seed's PruningNet is trained."""
        a = self.a
        seeds = ints(a.seeds)
        budget = a.time_budget_s - self.elapsed()
        threads = a.threads or max(1, (os.cpu_count() or 1) // len(seeds))
        children = []
        for seed in seeds:
            out = self.child_out(seed)
            out.unlink(missing_ok=True)  # an earlier benchmark's: not to be merged
            argv = [sys.executable, __file__, *self.child_args(), "--seeds", str(seed),
                    "--out", str(out), "--work-dir", str(self.work), "--jobs", "1",
                    "--threads", str(threads), "--time-budget-s", f"{budget:.0f}",
                    "--tau-candidates", "0"]
            children.append((seed, out, subprocess.Popen(argv, stdout=subprocess.DEVNULL)))
        log(f"{len(seeds)} seeds started in parallel, {threads} CPU thread(s) each")
        if a.tau_candidates:
            first_budget = floats(a.budgets)[0]
            first = self.work / f"seed{seeds[0]}" / f"macs{first_budget:g}"
            pnet_file = first / "metanet" / "pruningnet.safetensors"
            while (not pnet_file.is_file() and children[0][2].poll() is None
                   and not self.over_time()):
                time.sleep(1.0)
            if pnet_file.is_file():
                try:
                    self.kendall_from(seeds[0], first_budget, first)
                except Exception as e:  # noqa: BLE001 — the seeds still run: keep them
                    self.tau = {"error": repr(e)}
                    log(f"tau failed:\n{traceback.format_exc()}")
            else:
                self.tau = {"skipped": f"seed {seeds[0]} ended before its PruningNet was trained"
                            if children[0][2].poll() is not None else
                            f"time budget {a.time_budget_s:.0f} s exceeded before seed "
                            f"{seeds[0]}'s PruningNet was trained"}
            self.emit(partial=True)  # tau in --out before the seeds end
        deadline = a.time_budget_s + CHILD_GRACE_S
        for seed, out, child in children:
            try:
                code = child.wait(timeout=max(0.0, deadline - self.elapsed()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = None
                self.failures.append({"seed": seed, "error": f"its process still ran "
                                      f"{CHILD_GRACE_S:g} s after the time budget: stopped"})
                log(f"seed {seed}: {self.failures[-1]['error']}")
            if code:  # what it finished before (its partial JSON) is still merged
                self.failures.append({"seed": seed, "error": f"its process exited with {code}"})
            if not out.is_file():
                continue
            part = json.loads(out.read_text())
            self.runs += part["runs"]
            self.seeds_done += part["seeds_done"]
            self.seeds_skipped += part["seeds_skipped"]
            self.cancelled += part["cancelled"]
            self.failures += part["failures"]
            self.seed_times += part["seed_seconds"]
            self.emit(partial=True)
        order = {b: i for i, b in enumerate(floats(a.budgets))}
        self.runs.sort(key=lambda r: (seeds.index(r["seed"]), order[r["macs_ratio"]]))
        if self.runs:
            first = self.runs[0]
            self.first_run_dir = self.work / f"seed{first['seed']}" / f"macs{first['macs_ratio']:g}"

    def child_out(self, seed: int) -> Path:
        """Where a seed's own process writes its JSON, rewritten after each of its runs: beside
        ``--out`` (``quality.seed0.json``), so that a benchmark killed before it merged them
        still leaves the seeds' finished runs there; without ``--out``, in the work folder."""
        if not self.a.out:
            return self.work / f"seed{seed}.json"
        out = Path(self.a.out)
        return out.with_name(f"{out.stem}.seed{seed}{out.suffix}")

    def child_args(self) -> list[str]:
        """This run's settings as command-line options (those a child sets itself left out)."""
        own = {"seeds", "out", "work_dir", "jobs", "threads", "time_budget_s", "tau_candidates",
               "tiny", "cpu_quick", "keep_runs", "check_cuda_graphs"}
        args = ["--tiny"] if self.a.tiny else []
        for key, value in vars(self.a).items():
            if key not in own and value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        return args

    def seeds_in_turn(self) -> None:
        from pruning.train import Cancelled

        a = self.a
        for k, seed in enumerate(ints(a.seeds)):
            if self.cancelled:
                self.seeds_skipped.append({"seed": seed, "reason": "an earlier run was cancelled"})
                continue
            estimate = max(self.seed_times) if self.seed_times else 0.0
            reserve = a.tau_reserve_s if a.tau_candidates else 0.0
            if k > 0 and self.elapsed() + estimate > a.time_budget_s - reserve:
                self.seeds_skipped.append({
                    "seed": seed, "reason": f"time budget: {self.elapsed():.0f} s spent, a seed "
                    f"takes ~{estimate:.0f} s, {reserve:.0f} s reserved for tau"})
                log(f"skipping seed {seed}: {self.seeds_skipped[-1]['reason']}")
                continue
            t, first = time.perf_counter(), None
            try:
                for budget in floats(a.budgets):
                    run_dir, entry = self.one_run(seed, budget, first)
                    self.runs.append(entry)
                    if first is None:
                        first = run_dir
                        if self.first_run_dir is None:
                            self.first_run_dir = run_dir
                    self.emit(partial=True)
            except Cancelled as e:
                self.cancelled.append({"seed": seed, "stage": str(e), "reason":
                                       f"time budget {a.time_budget_s:.0f} s exceeded"})
                log(f"seed {seed} cancelled in stage {e}: time budget exceeded")
                continue
            except Exception as e:  # noqa: BLE001 — record it, go on with the next seed
                self.failures.append({"seed": seed, "error": repr(e)})
                log(f"seed {seed} failed:\n{traceback.format_exc()}")
                continue
            self.seed_times.append(time.perf_counter() - t)
            self.seeds_done.append(seed)

    def kendall(self) -> None:
        """Tau from the first finished run's PruningNet (after the seeds, when they ran in turn;
        seeds in parallel start it themselves, see :meth:`seeds_in_parallel`)."""
        if self.tau is not None:
            return
        if not self.a.tau_candidates:
            self.tau = {"skipped": "--tau-candidates 0"}
        elif self.first_run_dir is None:
            self.tau = {"skipped": "no finished pipeline run to take a PruningNet from"}
        else:
            self.kendall_from(self.runs[0]["seed"], self.runs[0]["macs_ratio"],
                              self.first_run_dir)

    def kendall_from(self, seed: int, budget: float, run_dir: Path) -> None:
        from metanet.pruningnet import PruningNet
        from pruning.checkpoint import load_tensors
        from pruning.constraints import MacsConstraint
        from pruning.data import load_dataset
        from pruning.evaluate import CandidateEvaluator
        from pruning.modules import build
        from pruning.pipeline import pick_device
        from pruning.search import random_feasible
        from pruning.space import SearchSpace
        from pruning.train import Cancelled, accuracy, train_network
        from pruning import counting

        a = self.a
        n = a.tau_candidates
        path = run_dir / "metanet" / "pruningnet.safetensors"
        if not path.is_file():
            self.tau = {"skipped": f"{path} not found (run-folder layout changed?)"}
            return
        spec = self.spec(seed, budget, None)
        r = spec.resolved()
        device = pick_device(a.device)
        state, meta = load_tensors(path, device)
        space = SearchSpace.from_dict(meta["space"])
        pnet = PruningNet(space).to(device)
        pnet.load_state_dict(state)
        data = load_dataset(spec.dataset, root=spec.data_root, image_size=spec.image_size,
                            device=device, val_size=r.val_size,
                            train_limit=r.train_limit, test_limit=r.test_limit, seed=seed)
        evaluator = CandidateEvaluator(pnet, data.train, data.val, calib_batches=r.calib_batches,
                                       batch_size=r.calib_batch_size, val_images=r.eval_images,
                                       seed=seed, device=device)
        full = self.full_macs(run_dir)
        budgets = floats(a.tau_range) if a.tau_range else floats(a.budgets)
        lo, hi = min(budgets), max(budgets)
        rng = random.Random(10_000 + seed)
        smallest = counting.macs(space, space.smallest())
        cands = []
        for i in range(n):
            ratio = lo + (hi - lo) * i / max(1, n - 1)
            limit = max(int(ratio * full), smallest)
            # random draws repaired under the limit; of 64 draws keep the one closest below it,
            # so the candidates spread over [lo, hi] of the full MACs, not around a random
            # draw's mean
            draws = [random_feasible(space, [MacsConstraint(limit)], rng) for _ in range(64)]
            cands.append(max(draws, key=lambda c: counting.macs(space, c)))
        cfg = dataclasses.replace(
            r.final, epochs=a.tau_epochs, warmup_epochs=min(r.final.warmup_epochs, a.tau_epochs),
            max_steps=a.tau_max_steps or r.final.max_steps)
        log(f"tau: {n} candidates from seed {seed}'s PruningNet, {a.tau_epochs:g} epoch(s) each")
        rows, skipped, last = [], [], 0.0
        for i, cand in enumerate(cands):
            if self.elapsed() + last > a.time_budget_s:
                skipped.append(i)
                continue
            t = time.perf_counter()
            estimate = evaluator.estimates(cand)
            torch.manual_seed(seed)
            net = build(space, cand).to(device)
            try:
                train_network(net, data.train, cfg, seed=seed, device=device, stage="tau",
                              should_stop=self.over_time)
            except Cancelled:
                skipped.append(i)
                continue
            trained = accuracy(net, data.test, device=device)
            last = time.perf_counter() - t
            macs = counting.macs(space, cand)
            rows.append({"candidate": cand.key(), "macs": macs,
                         "macs_vs_full": round(macs / full, 4),
                         "estimated_val_accuracy": round(estimate["accuracy"], 5),
                         "estimated_val_loss": round(estimate["loss"], 5),
                         "trained_test_accuracy": round(trained, 5), "seconds": round(last, 1)})
            log(f"tau {i + 1}/{n}: {macs / full:.3f} of full MACs, estimate "
                f"{estimate['accuracy']:.4f} (loss {estimate['loss']:.4f}), trained {trained:.4f}")
        est = [row["estimated_val_accuracy"] for row in rows]
        neg_loss = [-row["estimated_val_loss"] for row in rows]
        acc = [row["trained_test_accuracy"] for row in rows]
        mac = [row["macs"] for row in rows]
        ok = len(rows) >= 3
        self.tau = {
            "seed": seed, "macs_range": [lo, hi], "candidates": len(rows),
            "skipped_candidates": skipped,
            "epochs": a.tau_epochs, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "evaluator": {"calib_batches": r.calib_batches, "calib_batch_size": r.calib_batch_size,
                          "eval_images": r.eval_images},
            "kendall_tau": kendall_tau(est, acc) if ok else None,
            "kendall_tau_loss": kendall_tau(neg_loss, acc) if ok else None,
            "kendall_tau_macs_vs_trained": kendall_tau(mac, acc) if ok else None,
            "implementation": ("scipy.stats.kendalltau"
                               if importlib.util.find_spec("scipy") else "own tau-b"),
            "rows": rows}

    def summary(self) -> dict:
        out = {}
        for budget in floats(self.a.budgets):
            rs = [r for r in self.runs if r["macs_ratio"] == budget]
            if not rs:
                continue
            mp = [r["metapruning"]["test_accuracy"] for r in rs]
            un = [r["uniform"]["test_accuracy"] for r in rs]
            out[f"{budget:g}"] = {
                "seeds": [r["seed"] for r in rs],
                "metapruning_test_accuracy": mean_std(mp),
                "uniform_test_accuracy": mean_std(un),
                "difference": mean_std([m - u for m, u in zip(mp, un)]),
                "metapruning_macs_vs_full": mean_std([r["metapruning"]["macs_vs_full"]
                                                      for r in rs]),
                "uniform_macs_vs_full": mean_std([r["uniform"]["macs_vs_full"] for r in rs]),
                "metapruning_estimated_val_accuracy": mean_std(
                    [r["metapruning"]["estimated_val_accuracy"] for r in rs]),
                "uniform_estimated_val_accuracy": mean_std(
                    [r["uniform"]["estimated_val_accuracy"] for r in rs])}
        return out

    def emit(self, partial: bool = False) -> dict:
        a = self.a
        device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if a.device == "auto" else a.device))
        result = {
            "bench": "quality",
            "status": "partial" if partial else (
                "complete" if not self.seeds_skipped and not self.cancelled
                and not self.failures and not any("error" in r for r in self.runs)
                and not (self.tau or {}).get("skipped_candidates")
                and "error" not in (self.tau or {}) else "incomplete"),
            "tiny": a.tiny, "cpu_quick": a.cpu_quick,
            "note": ("--tiny: a check of the script on a test architecture and a few hundred "
                     "images; NOT a result") if a.tiny else None,
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else cpu_description()),
            "torch": torch.__version__, "python": platform.python_version(),
            "arch": a.arch, "width_mult": a.width_mult or 1.0, "dataset": a.dataset,
            "preset": a.preset,
            "budgets_macs_ratio": floats(a.budgets), "seeds_requested": ints(a.seeds),
            "seeds_done": self.seeds_done, "seeds_skipped": self.seeds_skipped,
            "cancelled": self.cancelled, "failures": self.failures,
            "cuda_graphs": self.cuda_graphs or (
                {"environment": os.environ["METAPRUNE_CUDA_GRAPHS"]}
                if "METAPRUNE_CUDA_GRAPHS" in os.environ else None),
            "metanet_reuse": self.reuse, "metanet_reuse_note": (
                "one PruningNet per seed, shared by its budgets" if self.reuse != "none"
                else "every run trained its own PruningNet (separate runs)"),
            "settings": {k: getattr(a, k) for k in (
                "epochs_metanet", "epochs_final", "batch_size", "lr", "warmup_epochs",
                "max_steps", "train_limit", "test_limit", "val_size", "eval_images",
                "calib_batches", "calib_batch_size", "search_population", "search_generations",
                "objective", "include_uniform", "min_budget_use", "final_init",
                "tau_candidates", "tau_epochs",
                "tau_max_steps", "time_budget_s", "tau_reserve_s", "jobs")},
            "summary": self.summary(),
            "kendall": self.tau,
            "runs": self.runs,
            "seed_seconds": [round(t, 1) for t in self.seed_times],
            "elapsed_s": round(self.elapsed(), 1),
        }
        if a.out:
            out = Path(a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(out)
        return result


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.check_cuda_graphs:  # the child of cuda_graphs_verdict
        verdict = check_cuda_graphs(a.arch)
        print(json.dumps(verdict))
        return verdict
    if a.threads:  # one thread on a shared 2-core machine: spinning OpenMP threads cost 10×
        torch.set_num_threads(a.threads)
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"bench_quality: missing Python packages the pipeline needs: {', '.join(missing)} "
                 "(see docs/benchmarks.md, 'Running the GPU benchmarks')")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_quality: --device cuda but no CUDA device is available")
    bench = Bench(a)
    log(f"bench_quality: {a.arch} on {a.dataset}, seeds {a.seeds}, budgets {a.budgets}, "
        f"PruningNet reuse: {bench.reuse}, runs in {bench.work}")
    use_cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if use_cuda and "METAPRUNE_CUDA_GRAPHS" not in os.environ:  # children inherit the verdict
        bench.cuda_graphs = cuda_graphs_verdict(
            [sys.executable, __file__, "--check-cuda-graphs", "--arch", a.arch])
        os.environ["METAPRUNE_CUDA_GRAPHS"] = "1" if bench.cuda_graphs["ok"] else "0"
        log(f"CUDA graphs for plain-net training: {bench.cuda_graphs}")
    try:
        bench.seeds()
        bench.kendall()
    finally:
        if not a.work_dir and not a.keep_runs:
            shutil.rmtree(bench.work, ignore_errors=True)
    result = bench.emit()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
