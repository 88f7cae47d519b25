"""The end-to-end MetaPruning pipeline: PruningNet training → search → final training → export.

Every stage leaves a checkpoint in the run folder, so ``run(..., resume=True)`` continues a
killed run where it stopped:

    run/spec.json                       the resolved specification
    run/metanet/state.safetensors       PruningNet training state (every checkpoint interval)
    run/metanet/pruningnet.safetensors  the trained PruningNet ("train once, search many")
    run/search/state.json               search state, one write per generation
    run/final/state.safetensors         final training state of the winner
    run/baseline/state.safetensors      the same for the uniform baseline (when asked)
    run/artifacts/…                     config.json, model.safetensors, model.ts, search.json,
                                        report.json, model.onnx, pareto.png
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from metanet.pruningnet import PruningNet
from pruning import counting
from pruning.checkpoint import (atomic_write_json, json_bytes, load_tensors, read_json,
                                save_tensors)
from pruning.constraints import MacsConstraint, ParamsConstraint, check_feasible
from pruning.data import list_datasets, load_dataset
from pruning.evaluate import CandidateEvaluator
from pruning.export import export_model
from pruning.registry import get_arch
from pruning.report import pareto_png
from pruning.search import SearchConfig, SearchResult, evolve, uniform_baseline
from pruning.space import DEFAULT_LEVELS, Candidate, SearchSpace
from pruning.train import TrainConfig, accuracy, train_network, train_pruningnet

Progress = Callable[[dict], None]

PRESETS: dict[str, dict] = {
    # seconds on a CPU: for tests and for trying the tool
    "smoke": {"train_limit": 512, "test_limit": 256, "val_size": 128, "calib_batches": 2,
              "calib_batch_size": 64, "eval_images": 128,
              "metanet": {"epochs": 1, "batch_size": 64, "lr": 0.05},
              "search": {"population": 8, "keep_top": 8, "parents": 4, "mutants": 4,
                         "crossovers": 4, "generations": 2},
              "final": {"epochs": 1, "batch_size": 64, "lr": 0.05}},
    # a few minutes on a 2-core CPU with a small network (the README's demo)
    "quick": {"train_limit": 5000, "test_limit": 2000, "val_size": 500, "calib_batches": 2,
              "calib_batch_size": 128, "eval_images": 500,
              "metanet": {"epochs": 6, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0.3},
              "search": {"population": 16, "keep_top": 16, "parents": 5, "mutants": 6,
                         "crossovers": 6, "generations": 6},
              "final": {"epochs": 5, "batch_size": 64, "lr": 0.05}},
    # the GPU benchmark: all of Fashion-MNIST, the paper's search
    "standard": {"val_size": 10000, "calib_batches": 10, "calib_batch_size": 256,
                 "eval_images": 10000,
                 "metanet": {"epochs": 10, "batch_size": 256, "lr": 0.1, "warmup_epochs": 0.5},
                 "search": {},
                 "final": {"epochs": 10, "batch_size": 256, "lr": 0.1, "warmup_epochs": 0.5}},
    # the paper's search and width settings (PruningNet up to 1.4×, label smoothing 0.1), its
    # PruningNet/final epoch ratio, and learning rates scaled to the batch size
    "paper": {"val_size": 10000, "calib_batches": 20, "calib_batch_size": 256,
              "eval_images": 10000, "max_width_mult": 1.4,
              "metanet": {"epochs": 32, "batch_size": 512, "lr": 0.25, "warmup_epochs": 1,
                          "label_smoothing": 0.1},
              "search": {},
              "final": {"epochs": 64, "batch_size": 512, "lr": 0.25, "warmup_epochs": 1,
                        "label_smoothing": 0.1}},
}


class Budget(BaseModel):
    """Exactly one budget: absolute (MACs, params, milliseconds) or relative to the full 1.0×
    network. Latency is predicted from a per-layer table measured on the run's device at
    batch size 1 (:mod:`pruning.latency`)."""

    model_config = ConfigDict(extra="forbid")
    macs: int | None = Field(None, gt=0, le=10**13)
    params: int | None = Field(None, gt=0, le=10**11)
    macs_ratio: float | None = Field(None, gt=0, le=4)
    params_ratio: float | None = Field(None, gt=0, le=4)
    latency_ms: float | None = Field(None, gt=0, le=10**6, allow_inf_nan=False)
    latency_ratio: float | None = Field(None, gt=0, le=4)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget: macs, params, macs_ratio, params_ratio, "
                             f"latency_ms or latency_ratio (got {given or 'none'})")
        return self


class PipelineSpec(BaseModel):
    """Everything a pruning run needs; the preset fills what is not given."""

    model_config = ConfigDict(extra="forbid")
    arch: str = "mobilenet_v2"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    budget: Budget = Budget(macs_ratio=0.25)
    preset: Literal["smoke", "quick", "standard", "paper"] = "quick"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    width_mult: float = Field(1.0, ge=0.05, le=4)
    max_width_mult: float | None = Field(None, gt=0, le=4)
    levels: list[float] | None = Field(None, min_length=1, max_length=256,
                                       description="width scales of a group's maximum "
                                                   "(default: 31 levels 0.10…1.00)")
    channel_divisor: int = Field(1, ge=1, le=64)
    train_limit: int | None = Field(None, ge=16)
    test_limit: int | None = Field(None, ge=16)
    val_size: int | None = Field(None, ge=16)
    calib_batches: int | None = Field(None, ge=1, le=1000)
    calib_batch_size: int | None = Field(None, ge=1, le=4096)
    eval_images: int | None = Field(None, ge=16)
    final_init: Literal["scratch", "generated"] = "scratch"
    train_baseline: bool = False
    metanet: dict = Field(default_factory=dict)
    search: dict = Field(default_factory=dict)
    final: dict = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, name: str) -> str:
        try:
            get_arch(name)
        except KeyError as e:  # pydantic reports ValueErrors only
            raise ValueError(str(e)) from None
        return name

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in list_datasets():
            raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
        return name

    @model_validator(mode="after")
    def _settings_resolve(self):
        self._configs()  # unknown or out-of-range training/search settings fail here
        return self

    def _configs(self) -> tuple[TrainConfig, SearchConfig, TrainConfig]:
        """The metanet, search and final settings: the preset's, updated by this spec's."""
        p = PRESETS[self.preset]

        def part(name, make):
            try:
                return make({**p[name], **getattr(self, name)})
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

        return (part("metanet", TrainConfig.from_dict),
                part("search", lambda d: SearchConfig.from_dict({**d, "seed": self.seed})),
                part("final", TrainConfig.from_dict))

    def resolved(self) -> ResolvedSpec:
        p = PRESETS[self.preset]
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else p.get(name)  # noqa: E731
        metanet, search, final = self._configs()
        return ResolvedSpec(
            spec=self, max_width_mult=pick("max_width_mult") or 1.0,
            train_limit=pick("train_limit"), test_limit=pick("test_limit"),
            val_size=pick("val_size"), calib_batches=pick("calib_batches"),
            calib_batch_size=pick("calib_batch_size"), eval_images=pick("eval_images"),
            metanet=metanet, search=search, final=final)


class ResolvedSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: PipelineSpec
    max_width_mult: float
    train_limit: int | None
    test_limit: int | None
    val_size: int
    calib_batches: int
    calib_batch_size: int
    eval_images: int
    metanet: TrainConfig
    search: SearchConfig
    final: TrainConfig


class RunFolderError(ValueError):
    """The run folder holds another run, or a finished stage is missing its files."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_budget(space: SearchSpace, budget: Budget, *, device: torch.device | str = "cpu",
                   table_path: str | Path | None = None) -> list:
    """Constraints for a budget; ratios are relative to the full (1.0×) network.

    A latency budget needs the space's latency table on ``device`` (batch 1): read from
    ``table_path`` when that file exists (a resumed run keeps the table its search used),
    otherwise loaded from the cache or measured (:meth:`LatencyTable.build`).
    """
    if budget.latency_ms is not None or budget.latency_ratio is not None:
        from pruning.latency import LatencyConstraint, LatencyTable

        if table_path is not None and Path(table_path).exists():
            table = LatencyTable.load(table_path, space)
        else:
            table = LatencyTable.build(space, device, batch=1)
        if budget.latency_ms is not None:
            return [LatencyConstraint(budget.latency_ms, table)]
        full = SearchSpace.create(space.arch, **space.arch_args)  # max_width_mult 1.0
        full_ms = table.predict_widths(full.widths(full.largest()))
        return [LatencyConstraint(budget.latency_ratio * full_ms, table)]
    if budget.macs is not None:
        return [MacsConstraint(budget.macs)]
    if budget.params is not None:
        return [ParamsConstraint(budget.params)]
    full = SearchSpace.create(space.arch, **space.arch_args)  # max_width_mult 1.0
    if budget.macs_ratio is not None:
        return [MacsConstraint(int(budget.macs_ratio * counting.macs(full, full.largest())))]
    return [ParamsConstraint(int(budget.params_ratio * counting.params(full, full.largest())))]


def run(spec: PipelineSpec, run_dir: str | Path, *, resume: bool = False,
        progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run (or resume) the whole pipeline; returns the report (also ``artifacts/report.json``)."""
    run_dir = Path(run_dir)
    notify = progress or (lambda event: None)
    r = spec.resolved()
    _check_run_dir(run_dir, spec, resume)
    device = pick_device(spec.device)
    t_start = time.perf_counter()

    notify({"stage": "data", "message": f"loading {spec.dataset}"})
    data = load_dataset(spec.dataset, root=spec.data_root, device=device, val_size=r.val_size,
                        train_limit=r.train_limit, test_limit=r.test_limit, seed=spec.seed)
    meta = data.meta
    space = SearchSpace.create(spec.arch, num_classes=meta.num_classes,
                               in_channels=meta.in_channels, input_size=meta.input_size,
                               width_mult=spec.width_mult, max_width_mult=r.max_width_mult,
                               levels=tuple(spec.levels or DEFAULT_LEVELS),
                               channel_divisor=spec.channel_divisor)
    table_path = run_dir / "latency_table.json"
    if spec.budget.latency_ms is not None or spec.budget.latency_ratio is not None:
        notify({"stage": "latency", "message": "building the latency table (cached per device)"})
    constraints = resolve_budget(space, spec.budget, device=device, table_path=table_path)
    latency = next((c for c in constraints if c.name == "latency"), None)
    check_feasible(space, constraints)  # fail before any training
    baseline = uniform_baseline(space, constraints)
    # claimed only now: a typo in the data folder or an infeasible budget leaves no run behind
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "spec.json").exists():
        atomic_write_json(run_dir / "spec.json", spec.model_dump())
    if latency is not None and not table_path.exists():
        latency.table.save(table_path)  # a resumed search must see the very same table

    # 1. PruningNet
    torch.manual_seed(spec.seed)
    pnet = PruningNet(space).to(device)
    final_path = run_dir / "metanet" / "pruningnet.safetensors"
    if final_path.exists():
        state, _ = load_tensors(final_path, device)
        pnet.load_state_dict(state)
        metanet_stats = read_json(run_dir / "metanet" / "stats.json")
    else:
        metanet_stats = train_pruningnet(pnet, data.train, r.metanet, seed=spec.seed, device=device,
                                         checkpoint=run_dir / "metanet" / "state.safetensors",
                                         progress=notify, should_stop=should_stop)
        # stats first: the PruningNet file marks the stage as done
        atomic_write_json(run_dir / "metanet" / "stats.json", metanet_stats)
        save_tensors(final_path, pnet.state_dict(), {"space": space.to_dict()})

    # 2. evolutionary search, scored on the held-out sub-validation split
    evaluator = CandidateEvaluator(pnet, data.train, data.val, calib_batches=r.calib_batches,
                                   batch_size=r.calib_batch_size, val_images=r.eval_images,
                                   seed=spec.seed, device=device)

    def on_generation(event: dict) -> None:
        notify({"stage": "search", **event})
        if should_stop is not None and should_stop():
            from pruning.train import Cancelled
            raise Cancelled("search")

    result: SearchResult = evolve(space, evaluator, constraints, r.search,
                                  state_path=run_dir / "search" / "state.json",
                                  progress=on_generation)
    best = Candidate(tuple(result.best.choices))
    baseline_estimate = evaluator(baseline)

    # 3. final training of the winner (and of the uniform baseline, when asked)
    trained = {"metapruning": _train_final(best, "final", pnet, evaluator, data, r, run_dir,
                                           device, notify, should_stop)}
    if spec.train_baseline:
        trained["uniform"] = _train_final(baseline, "baseline", pnet, evaluator, data, r, run_dir,
                                          device, notify, should_stop)

    # 4. evaluation on the test split and export
    notify({"stage": "export", "message": "evaluating on the test split and exporting"})
    report = {
        "arch": spec.arch, "dataset": spec.dataset, "seed": spec.seed, "preset": spec.preset,
        "device": str(device),
        "budget": {c.name: c.limit for c in constraints},
        "metanet": metanet_stats,
        "search": {"evaluated": len(result.history), "generations": r.search.generations},
        "elapsed_s": None,
    }
    for name, (cand, net) in {"metapruning": (best, trained["metapruning"]),
                              "uniform": (baseline, trained.get("uniform"))}.items():
        entry = {"candidate": cand.key(), "widths": space.widths_by_group(cand),
                 "macs": counting.macs(space, cand), "params": counting.params(space, cand),
                 "estimated_val_accuracy": (result.best.score if name == "metapruning"
                                            else baseline_estimate)}
        if net is not None:
            entry["test_accuracy"] = accuracy(net, data.test, device=device)
        if latency is not None:
            from pruning.latency import measure_latency
            from pruning.modules import build

            timed = net if net is not None else build(space, cand)
            entry["latency_ms"] = {
                "predicted": round(latency.table.predict(space, cand), 4),
                "measured": round(measure_latency(
                    timed, (meta.in_channels, meta.input_size, meta.input_size), device), 4)}
        report[name] = entry
    if latency is not None:
        report["latency_table"] = {"device": latency.table.key["device"], "batch": 1,
                                   "limit_ms": latency.limit,
                                   "measured_s": round(latency.table.measured_s, 3)}
    full = SearchSpace.create(spec.arch, **space.arch_args)
    report["full_network"] = {"macs": counting.macs(full, full.largest()),
                              "params": counting.params(full, full.largest())}
    sample = next(iter(data.test.batches(8, device="cpu")))[0]
    report["elapsed_s"] = round(time.perf_counter() - t_start, 3)
    export_model(run_dir / "artifacts", trained["metapruning"], space, best, sample=sample,
                 extra={"dataset": {"name": spec.dataset, **asdict(meta)}, "seed": spec.seed,
                        "metrics": {"test_accuracy": report["metapruning"]["test_accuracy"],
                                    "estimated_val_accuracy": result.best.score}},
                 files={"search.json": json_bytes(result.to_dict()),
                        "report.json": json_bytes(report),
                        "pareto.png": pareto_png(
                            result.history, result.best,
                            (report["uniform"]["macs"], baseline_estimate),
                            next((c.limit for c in constraints
                                  if isinstance(c, MacsConstraint)), None),
                            title=f"{spec.arch} on {spec.dataset}: score vs MACs")})
    notify({"stage": "done", "report": report})
    return report


def _train_final(cand: Candidate, name: str, pnet: PruningNet, evaluator: CandidateEvaluator,
                 data, r: ResolvedSpec, run_dir: Path, device, notify, should_stop):
    """Train one candidate from scratch (the paper) or from its generated weights."""
    from pruning.modules import build

    torch.manual_seed(r.spec.seed)
    if r.spec.final_init == "generated":
        net = evaluator.materialise(cand).to(device)
    else:
        net = build(pnet.space, cand).to(device)
    done = run_dir / name / "model.safetensors"
    if done.exists():
        state, _ = load_tensors(done, device)
        net.load_state_dict(state)
    else:
        train_network(net, data.train, r.final, seed=r.spec.seed, device=device,
                      checkpoint=run_dir / name / "state.safetensors", progress=notify,
                      stage=name, should_stop=should_stop)
        save_tensors(done, net.state_dict())
    return net.eval()


def _check_run_dir(run_dir: Path, spec: PipelineSpec, resume: bool) -> None:
    """Refuse a folder that holds a run, unless resuming that same run (nothing is written)."""
    saved = run_dir / "spec.json"
    if not saved.exists():
        return
    if not resume:
        raise RunFolderError(f"{run_dir} already holds a run; pass --resume to continue it "
                             "or choose another folder")
    try:
        previous = PipelineSpec.model_validate(read_json(saved))
    except ValueError:
        raise RunFolderError(f"{saved} is not a run specification this version can read; "
                             "choose another folder") from None
    old, new = previous.model_dump(exclude={"device"}), spec.model_dump(exclude={"device"})
    if old != new:
        diff = ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} now"
                         for k in sorted(old) if old[k] != new[k])
        raise RunFolderError(f"{run_dir} holds a run with a different specification ({diff}); "
                             "resume it with the same settings or choose another folder")
