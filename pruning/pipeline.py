"""The end-to-end MetaPruning pipeline: PruningNet training → search → final training → export.

:func:`run` = :func:`prepare` (data, search space, budget; claims the folder) followed by the
stages :func:`stage_metanet`, :func:`stage_search`, :func:`stage_train`, :func:`stage_evaluate`
and :func:`stage_export`. Each stage skips the work whose output the run folder already holds,
and fails with a :class:`StageError` when the stage it needs has not run, so the stages can also
be run one at a time (``metaprune train-metanet / search / train / evaluate / export``) and
``run(..., resume=True)`` continues a killed run where it stopped. A stage that has work to do
first deletes what the later stages wrote (:data:`LATER_OUTPUTS`): a deleted output is made
again, and so is everything made from it, as ``make`` would:

    run/spec.json                       the resolved specification
    run/data.json                       what identifies its data (a resumed run needs the same)
    run/metanet/state.safetensors       PruningNet training state (every checkpoint interval)
    run/metanet/pruningnet.safetensors  the trained PruningNet ("train once, search many")
    run/metanet/source.json             where it came from, when reused (``metanet_from``)
    run/search/state.json               search state, one write per generation
    run/final/state.safetensors         final training state of the winner
    run/final/model.safetensors         the trained winner
    run/baseline/…                      the same for the uniform baseline (when asked, unless
                                        the search picked it: then it is the winner)
    run/evaluation.json                 test accuracy (and latency) of the trained networks
    run/artifacts/…                     config.json, model.safetensors, model.ts, search.json,
                                        report.json, model.onnx, pareto.png

"Train once, search many": ``metanet_from`` names a run whose trained PruningNet this run
copies instead of training one, after checking that everything that determines it
(:func:`metanet_identity`) is the same; only the search and the final training run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from metanet.pruningnet import PruningNet
from pruning import counting
from pruning.checkpoint import (UnreadableFileError, atomic_write_bytes, atomic_write_json,
                                check_write_fence, differences, json_bytes, load_tensors,
                                read_json, read_tensors_metadata, remove_stale_temporaries,
                                save_tensors)
from pruning.constraints import MacsConstraint, budget_use
from pruning.data import DataBundle, DatasetError, DatasetMeta, load_dataset
from pruning.evaluate import CandidateEvaluator, entry_score
from pruning.export import export_model
from pruning.machine import cpu_description
from pruning.report import pareto_png
from pruning.search import SearchConfig, SearchResult, evolve, uniform_baseline
from pruning.space import Candidate, SearchSpace, same_space
# the specification lives in pruning.spec (no PyTorch there); re-exported here
from pruning.spec import (Budget, PipelineSpec, ResolvedSpec, read_spec,  # noqa: F401
                          metanet_fingerprint, metanet_identity)
from pruning.train import accuracy, train_network, train_pruningnet

Progress = Callable[[dict], None]

SHORT_TRAINING_STEPS = 100  # a final training this short is not expected to learn (smoke runs)


class RunFolderError(ValueError):
    """The run folder holds another run, or a finished stage is missing its files."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _stop_if_asked(should_stop: Callable[[], bool] | None, stage: str) -> None:
    """Raise :class:`~pruning.train.Cancelled` when ``should_stop`` says so."""
    if should_stop is not None and should_stop():
        from pruning.train import Cancelled
        raise Cancelled(stage)


def resolve_budget(space: SearchSpace, budget: Budget, *, device: torch.device | str = "cpu",
                   table_path: str | Path | None = None,
                   progress: Callable[[dict], None] | None = None) -> list:
    """Constraints for a budget; ratios are relative to the full (1.0×) network.

    A latency budget needs the space's latency table on ``device`` (batch 1): read from
    ``table_path`` when that file exists (a resumed run keeps the table its search used),
    otherwise loaded from the cache or measured (:meth:`LatencyTable.build`, which reports its
    layers to ``progress``).
    """
    if budget.is_latency:
        from pruning.latency import LatencyConstraint, LatencyTable

        budget.check_ratio_base(space.max_width_mult)  # before a table is measured
        if table_path is not None and Path(table_path).exists():
            table = LatencyTable.load(table_path, space)
        else:
            table = LatencyTable.build(space, device, batch=1, progress=progress)
        if budget.latency_ms is not None:
            return [LatencyConstraint(budget.latency_ms, table)]
        full, top = space.full_network()
        full_ms = table.predict_widths(full.widths(top))
        return [LatencyConstraint(budget.latency_ratio * full_ms, table)]
    return [budget.count_constraint(space)]


@dataclass
class RunContext:
    """What every stage of one run needs: the resolved spec, the run folder, the device, the
    data, the search space and the budget. Built by :func:`prepare`; the PruningNet, the search
    result and the trained networks are loaded from the run folder on first use (or kept from
    the stage that produced them in this process)."""

    spec: PipelineSpec
    r: ResolvedSpec
    run_dir: Path
    device: torch.device
    data: DataBundle
    space: SearchSpace
    constraints: list
    baseline: Candidate
    notify: Progress
    should_stop: Callable[[], bool] | None
    t_start: float
    pnet_: PruningNet | None = None
    evaluator_: CandidateEvaluator | None = None
    result_: SearchResult | None = None
    search_config_: SearchConfig | None = None
    trained: dict = field(default_factory=dict)
    locked: bool = False  # this context took the run folder's lock (lock_run_dir)

    def check_recipe(self, stage: str) -> None:
        """Before ``stage`` ("metanet", "search" or "final") trains or searches: its settings
        must be those the run began with (``recipe.json``; older runs have none)."""
        path = self.path(RECIPE_FILE)
        if not path.exists():
            return
        recipe = read_json(path)
        if not isinstance(recipe, dict):
            raise UnreadableFileError(path, "not a recipe (an object of the stages' settings)")
        then, now = recipe.get(stage), run_recipe(self.r)[stage]
        difference = next(differences(then or {}, now, f"{stage}."), None)
        if difference is not None:
            key, a, b = difference
            raise RunFolderError(
                f"{self.run_dir} began with other {stage} settings than this version's "
                f"{self.spec.preset!r} preset gives ({key}: {a!r} then, {b!r} now): finish it "
                "with the metaprune version that began it, or start a new run")

    def stop_if_asked(self, stage: str) -> None:
        _stop_if_asked(self.should_stop, stage)

    @property
    def latency(self):
        return next((c for c in self.constraints if c.name == "latency"), None)

    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def require(self, rel: str, command: str) -> Path:
        path = self.run_dir / rel
        if path.exists():
            return path
        if command == "train-metanet":  # the first stage takes the run's options again
            raise StageError(f"{self.run_dir} has no {rel} yet: run `metaprune resume --out "
                             f"{self.run_dir}` (the whole run), or the `metaprune train-metanet` "
                             "command that started it again with --resume, first")
        raise StageError(f"{self.run_dir} has no {rel} yet: run `metaprune {command} --out "
                         f"{self.run_dir}` first")

    @property
    def pnet(self) -> PruningNet:
        if self.pnet_ is None:
            path = self.require(METANET_FILE, "train-metanet")
            torch.manual_seed(self.spec.seed)
            pnet = PruningNet(self.space).to(self.device)
            state, _ = load_tensors(path, self.device)
            pnet.load_state_dict(state)
            self.pnet_ = pnet
        return self.pnet_

    @property
    def evaluator(self) -> CandidateEvaluator:
        """Scores candidates on the held-out sub-validation split (built on first use)."""
        if self.evaluator_ is None:
            r = self.r
            self.evaluator_ = CandidateEvaluator(
                self.pnet, self.data.train, self.data.val, calib_batches=r.calib_batches,
                batch_size=r.calib_batch_size, val_images=r.eval_images, seed=self.spec.seed,
                device=self.device, objective=self._search_config().objective)
        return self.evaluator_

    def search_result(self) -> SearchResult:
        """The finished search (read back from ``search/state.json``)."""
        if self.result_ is None:
            path = self.require(SEARCH_FILE, "search")
            if not read_json(path).get("finished"):
                raise StageError(f"the search in {self.run_dir} is unfinished: run `metaprune "
                                 f"search --out {self.run_dir}` first")
            self.result_ = self._evolve(progress=None)
        return self.result_

    def _evolve(self, progress) -> SearchResult:
        # the evaluator is built only when a candidate is scored (a finished search scores none)
        return evolve(self.space, lambda c: self.evaluator(c), self.constraints,
                      self._search_config(), state_path=self.path(SEARCH_FILE),
                      progress=progress)

    def _search_config(self) -> SearchConfig:
        """The settings a started search recorded, else the resolved ones: a resumed run has
        the same spec, but a newer version's preset may set the search otherwise. Read once:
        a search started later in this process records the resolved ones."""
        if self.search_config_ is None:
            self.search_config_ = self.r.search
            path = self.path(SEARCH_FILE)
            if path.exists():
                try:
                    self.search_config_ = SearchConfig.from_dict(read_json(path)["config"])
                except (OSError, KeyError, TypeError, ValueError):
                    pass  # evolve reports the unreadable file
        return self.search_config_

    def final_trainings(self) -> list[tuple[str, str, Candidate]]:
        """``(key, folder, candidate)`` of each network the final stage trains: MetaPruning's
        pick in ``final/`` and, when asked, the uniform baseline in ``baseline/`` — or in
        ``final/`` too when the search picked the uniform network itself (trained once)."""
        best = Candidate(tuple(self.search_result().best.choices))
        todo = [("metapruning", "final", best)]
        if self.spec.train_baseline:
            todo.append(("uniform", "final" if self.baseline == best else "baseline",
                         self.baseline))
        return todo

    def trained_nets(self) -> dict:
        """``{"metapruning": net, "uniform": net}`` (the latter when the baseline is trained),
        as trained in this process or loaded from the run folder."""
        for key, folder, cand in self.final_trainings():
            if key not in self.trained:
                from pruning.modules import build

                path = self.require(f"{folder}/model.safetensors", "train")
                net = build(self.space, cand).to(self.device)
                state, _ = load_tensors(path, self.device)
                net.load_state_dict(state)
                self.trained[key] = net.eval()
        return dict(self.trained)


class StageError(RunFolderError):
    """A stage was asked for before the stage it needs has run."""


METANET_FILE = "metanet/pruningnet.safetensors"
SEARCH_FILE = "search/state.json"
SCORE_LABELS = {"accuracy": "score (estimated held-out accuracy)",
                "loss": "score (minus the estimated held-out cross-entropy)"}
EVALUATION_FILE = "evaluation.json"
DATA_FILE = "data.json"  # DataBundle.fingerprint() of the data the run started with
# what the stages after each one wrote, deleted when that stage has work to do again
LATER_OUTPUTS = {"metanet": ("search", "final", "baseline", EVALUATION_FILE, "artifacts"),
                 "search": ("final", "baseline", EVALUATION_FILE, "artifacts"),
                 "train": (EVALUATION_FILE, "artifacts"),
                 "evaluate": ("artifacts",)}


def _discard_later_outputs(ctx: RunContext, stage: str) -> None:
    """Before ``stage`` does work: delete the outputs of the stages after it, made from what
    ``stage`` is about to replace."""
    check_write_fence()
    for rel in LATER_OUTPUTS[stage]:
        path = ctx.path(rel)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


ENVIRONMENT_FILE = "environment.json"  # where the run began: see run_environment()
RECIPE_FILE = "recipe.json"  # the settings its preset gave when it began: see run_recipe()


def run_recipe(r: ResolvedSpec) -> dict:
    """The settings a run's preset and overrides resolve to, per stage (``max_width_mult``
    shapes the PruningNet). A preset may change between versions; a run keeps the recipe it
    began with: :meth:`RunContext.check_recipe` refuses a stage that would train otherwise."""
    widths = {"max_width_mult": r.max_width_mult}  # the space every stage works in
    scoring = {"eval_images": r.eval_images, "calib_batches": r.calib_batches,
               "calib_batch_size": r.calib_batch_size}
    return json.loads(json_bytes({"metanet": {**widths, **asdict(r.metanet)},
                                  "search": {**widths, **scoring, **r.search.to_dict()},
                                  "final": {**widths, **asdict(r.final)}}))


def run_environment(device: torch.device) -> dict:
    """What a run's numbers depend on beyond its spec and data: the device (its model), the CPU
    threads (they set the order of floating-point sums) and PyTorch's version. The same seed
    gives bit-identical results only where all of these are the same."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_description()
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _environment_change(run_dir: Path, now: dict) -> str | None:
    """How the environment of a resumed run differs from the one it began in (``None``: it
    does not, or the run predates the record)."""
    path = run_dir / ENVIRONMENT_FILE
    try:
        then = read_json(path) if path.exists() else None
    except UnreadableFileError:  # informational only: a damaged record stops nothing
        then = None
    if not isinstance(then, dict):
        return None
    changes = [f"{k} {then.get(k)!r} then, {now[k]!r} now" for k in ("device", "device_name",
                                                                      "threads", "torch")
               if then.get(k) != now[k]]
    return "; ".join(changes) or None


def holds_other_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but hidden files (``.DS_Store``, ``.gitkeep``, the
    ``.<name>.*.tmp`` of a writer killed before ``spec.json`` existed)."""
    return run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir())


def prepare(spec: PipelineSpec, run_dir: str | Path, *, resume: bool = False,
            progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None, lock: bool = True) -> RunContext:
    """Check the run folder, load the data, build the space and the budget, and claim the folder
    (``spec.json``; with ``lock``, :func:`lock_run_dir` too: the service's workers fence their
    writes by their lease instead). Nothing is written when the folder holds another run, the
    data is missing, the budget is infeasible or prunes nothing, or ``metanet_from`` names an
    unusable run."""
    run_dir = Path(run_dir)
    notify = progress or (lambda event: None)
    r = spec.resolved()
    _check_run_dir(run_dir, spec, resume)
    # the PruningNet to adopt (not yet adopted): checked whole before the folder is claimed
    lender = (Path(spec.metanet_from) if spec.metanet_from is not None
              and not (run_dir / METANET_FILE).exists() else None)
    if lender is not None:
        check_metanet_source(spec, run_dir)
    device = pick_device(spec.device)
    t_start = time.perf_counter()

    notify({"stage": "data", "message": f"loading {spec.dataset}"})
    try:
        data = load_dataset(spec.dataset, root=spec.data_root, image_size=spec.image_size,
                            device=device, val_size=r.val_size,
                            train_limit=r.train_limit, test_limit=r.test_limit, seed=spec.seed)
    except DatasetError as e:
        if not (run_dir / "spec.json").is_file():
            raise
        raise DatasetError(f"{e} If this run's data has moved, give its new folder: "
                           f"--data-root NEW") from None
    _check_batches(data, r)
    if r.eval_images is not None and r.eval_images > len(data.val):
        notify({"stage": "data", "message": f"eval_images {r.eval_images} is more than the "
                f"{len(data.val)} held-out images: the search scores all {len(data.val)}"})
    data_fingerprint = data.fingerprint()
    notify({"stage": "data", "message": _data_summary(data.meta, data_fingerprint)})
    _check_data(run_dir, data_fingerprint)
    environment = run_environment(device)
    change = _environment_change(run_dir, environment)
    if change is not None:
        notify({"stage": "data", "message": f"this run continues elsewhere than it began "
                f"({change}): its result can differ from an uninterrupted run's"})
    if lender is not None:
        _check_data(lender, data_fingerprint, lender=True)
    meta = data.meta
    space = spec.search_space(meta.num_classes, meta.in_channels, meta.input_size)
    if lender is not None:
        _check_lender_space(lender, space)
    table_path = run_dir / "latency_table.json"
    if spec.budget.is_latency and not table_path.exists():
        notify({"stage": "latency", "message": "latency table: from the cache, else measured "
                                               "(once per device)"})

    def on_layer(event: dict) -> None:  # a table takes seconds to minutes to measure
        notify(event)
        _stop_if_asked(should_stop, "latency")

    constraints = resolve_budget(space, spec.budget, device=device, table_path=table_path,
                                 progress=on_layer)
    latency = next((c for c in constraints if c.name == "latency"), None)
    spec.budget.check_usable(space, constraints)  # fail before any training
    baseline = uniform_baseline(space, constraints)
    # claimed only now: a typo in the data folder or an unusable budget leaves no run behind
    run_dir.mkdir(parents=True, exist_ok=True)
    locked = lock and lock_run_dir(run_dir)
    try:
        if locked:
            _check_run_dir(run_dir, spec, resume)  # again: another process may have begun it
        remove_stale_temporaries(run_dir)  # left by a run killed mid-write (resumed runs only)
        if not (run_dir / "spec.json").exists():  # a new run: where it begins, kept on resume
            atomic_write_json(run_dir / "spec.json", spec.model_dump())
            atomic_write_json(run_dir / ENVIRONMENT_FILE, environment)
            atomic_write_json(run_dir / RECIPE_FILE, run_recipe(r))
        else:
            _record_moved_data(run_dir, spec, notify)
        if _data_record_outdated(run_dir, data_fingerprint):  # none yet, or an older version's
            atomic_write_json(run_dir / DATA_FILE, data_fingerprint)
        if latency is not None and not table_path.exists():
            latency.table.save(table_path)  # a resumed search must see the very same table
    except BaseException:
        if locked:
            unlock_run_dirs(run_dir)
        raise
    return RunContext(spec=spec, r=r, run_dir=run_dir, device=device, data=data, space=space,
                      constraints=constraints, baseline=baseline, notify=notify,
                      should_stop=should_stop, t_start=t_start, locked=locked)


def _record_moved_data(run_dir: Path, spec: PipelineSpec, notify) -> None:
    """A resumed run whose data was found (and checked: the same images) under another
    ``data_root``: its ``spec.json`` names the new place, for the commands that follow."""
    saved = read_spec(run_dir / "spec.json")
    then, now = (_absolute_paths(s).data_root for s in (saved, spec))
    if now is not None and then != now:
        atomic_write_json(run_dir / "spec.json", saved.model_copy(
            update={"data_root": now}).model_dump())
        notify({"stage": "data", "message": f"the run's data has moved from "
                                            f"{then or 'its default place'} to {now} (the same "
                                            f"images); spec.json now names {now}"})


def _data_summary(meta: DatasetMeta, fingerprint: dict) -> str:
    """What was loaded, e.g. ``imagefolder: 3 classes, 1 × 28 × 28 px, 900/100/250
    train/val/test images (streamed from disk)``."""
    n = fingerprint["images"]
    return (f"{meta.name}: {meta.num_classes} classes, {' × '.join(map(str, fingerprint['shape']))}"
            f" px, {n['train']}/{n['val']}/{n['test']} train/val/test images"
            + (" (streamed from disk)" if fingerprint["version"] == 2 else ""))


def _data_change(saved: dict, now: dict) -> str | None:
    """How the data of two :meth:`DataBundle.fingerprint` records differ (``None``: it does
    not). Hashes of another version (streamed data recorded by an older version, or data that
    is streamed now and was held in memory then) cover other things: then only the counts, the
    image shape and the classes (records that have them) can be compared."""
    for key, what in (("shape", "images of {} px"), ("num_classes", "{} classes")):
        if saved.get(key, now[key]) != now[key]:
            shown = [" × ".join(map(str, r[key])) if key == "shape" else r[key]
                     for r in (saved, now)]
            return f"{what.format(shown[0])} then, {what.format(shown[1])} now"
    same_version = saved.get("version", 1) == now["version"]
    if same_version and saved.get("sha256") == now["sha256"]:
        return None

    def images(record: dict) -> str:  # in this order: data.json has its keys sorted
        counts = record.get("images") or {}
        return "/".join(str(counts.get(k, "?")) for k in ("train", "val", "test"))

    then, counts = images(saved), images(now)
    if then == counts:
        if not same_version:
            return None
        return f"the same numbers of train/val/test images ({counts}), but other images or labels"
    return f"train/val/test images: {then} then, {counts} now"


def _read_data_record(path: Path) -> dict:
    record = read_json(path)
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
            and isinstance(record.get("images"), dict)):
        raise UnreadableFileError(path, "not a record of the run's data; deleted, the data "
                                        "found next is taken for the run's own")
    return record


def _data_record_outdated(run_dir: Path, fingerprint: dict) -> bool:
    """No record yet, or an older version's (one without what this version records)."""
    path = run_dir / DATA_FILE
    if not path.exists():
        return True
    saved = _read_data_record(path)
    return saved.get("version", 1) != fingerprint["version"] or fingerprint.keys() - saved.keys()


class MetanetDataError(RunFolderError):
    """``metanet_from`` names a run whose PruningNet was trained on other data."""


class MetanetGoneError(RunFolderError):
    """The run ``metanet_from`` names is gone (deleted before its PruningNet was copied)."""


def _check_data(run_dir: Path, fingerprint: dict, *, lender: bool = False) -> None:
    """A run continues only on the data it started with (``data.json``; runs of older versions
    have none): the PruningNet, the search scores and the trained networks all came from it.
    ``lender``: ``run_dir`` is ``metanet_from``, whose PruningNet must come from our data."""
    path = run_dir / DATA_FILE
    if not path.exists():
        return
    saved = _read_data_record(path)
    if lender and saved.get("train_val_sha256") is not None and \
            saved["train_val_sha256"] == fingerprint["train_val_sha256"]:
        return  # the PruningNet never saw the test split: another one does not matter
    change = _data_change(saved, fingerprint)
    if change is None:
        return
    if lender:
        raise MetanetDataError(f"metanet_from: the PruningNet of {run_dir} was trained on other "
                               f"data ({change})")
    raise RunFolderError(f"the data differs from the data the run in {run_dir} started with "
                         f"({change}); restore it, or start a new run in another folder")


def _check_batches(data: DataBundle, r: ResolvedSpec) -> None:
    """Training drops each epoch's last partial batch, so the sub-train split must hold at
    least one batch of each recipe (a small image folder would otherwise train no step)."""
    n = len(data.train)
    for name, recipe in (("metanet", r.metanet), ("final", r.final)):
        if n < recipe.batch_size:
            raise DatasetError(
                f"the sub-train split holds {n} images, fewer than one batch of the {name} "
                f"recipe ({name}.batch_size {recipe.batch_size}): use more images, a smaller "
                f"val_size or a smaller {name}.batch_size")


def stage_metanet(ctx: RunContext) -> dict:
    """1. Train the PruningNet (or adopt the one of ``spec.metanet_from``); returns its stats."""
    final_path = ctx.path(METANET_FILE)
    stats_path = ctx.path("metanet/stats.json")
    if final_path.exists():
        return read_json(stats_path)
    ctx.check_recipe("metanet")
    _discard_later_outputs(ctx, "metanet")
    spec = ctx.spec
    if spec.metanet_from is not None:
        ctx.notify({"stage": "metanet", "message": f"reusing the PruningNet of "
                                                   f"{spec.metanet_from}"})
        return _adopt_metanet(ctx, Path(spec.metanet_from))
    torch.manual_seed(spec.seed)
    pnet = PruningNet(ctx.space).to(ctx.device)
    stats = train_pruningnet(pnet, ctx.data.train, ctx.r.metanet, seed=spec.seed,
                             constraints=(ctx.constraints if spec.metanet_sampling == "budget"
                                          else ()),
                             device=ctx.device, checkpoint=ctx.path("metanet/state.safetensors"),
                             progress=ctx.notify, should_stop=ctx.should_stop)
    # stats first: the PruningNet file marks the stage as done
    atomic_write_json(stats_path, stats)
    save_tensors(final_path, pnet.state_dict(), {"space": ctx.space.to_dict()})
    ctx.pnet_ = pnet
    return stats


def stage_search(ctx: RunContext) -> SearchResult:
    """2. Evolutionary search, scored on the held-out sub-validation split (resumes an
    interrupted search; a finished one is read back)."""
    ctx.require(METANET_FILE, "train-metanet")
    if not _search_finished(ctx):
        ctx.check_recipe("search")
        _discard_later_outputs(ctx, "search")

    start = time.perf_counter()
    first_done: list[int] = []  # the first generation finished by this process
    objective = ctx._search_config().objective  # what best_score measures

    def on_generation(event: dict) -> None:
        # ETA from this process's pace (a resumed search starts counting anew)
        done = event["generation"] + 1
        if not first_done:
            first_done.append(done)
        per_gen = (time.perf_counter() - start) / (done - first_done[0] + 1)
        ctx.notify({"stage": "search", **event, "objective": objective,
                    "eta_s": round(per_gen * (event["generations"] - done), 1)})
        ctx.stop_if_asked("search")

    ctx.result_ = ctx._evolve(progress=on_generation)
    return ctx.result_


def _search_finished(ctx: RunContext) -> bool:
    """Whether the search state says the search finished (an unreadable one: as if it did, so
    that :func:`~pruning.search.evolve` reports it and nothing is deleted)."""
    path = ctx.path(SEARCH_FILE)
    try:
        return path.exists() and bool(read_json(path).get("finished"))
    except (UnreadableFileError, AttributeError):
        return True


def stage_train(ctx: RunContext) -> dict:
    """3. Final training of the winner (and of the uniform baseline, when asked); returns
    ``{"metapruning": net, "uniform": net}``."""
    todo = ctx.final_trainings()
    if not all(ctx.path(f"{folder}/model.safetensors").exists() for _, folder, _ in todo):
        _discard_later_outputs(ctx, "train")
    for key, folder, cand in todo:
        if key not in ctx.trained:
            ctx.trained[key] = _train_final(cand, folder, ctx)
    return dict(ctx.trained)


CHANCE_MARGIN = 0.01  # a test accuracy within this of chance level gets a warning


def _chance_warning(test_accuracy: float, chance: float, steps: int, preset: str) -> str:
    """Why a trained network is at or near chance level (within :data:`CHANCE_MARGIN`): too
    few steps to learn, or a collapse."""
    step_count = f"{steps} step" if steps == 1 else f"{steps} steps"
    why = (f"the training was too short to learn ({step_count} with the {preset} preset's "
           "final.epochs and data); train longer" if steps < SHORT_TRAINING_STEPS else
           "its training collapsed; a larger budget, a higher min_channels or final_init "
           "'generated' may help")
    return (f"test accuracy {100 * test_accuracy:.2f}% is at or near chance level "
            f"({100 * chance:.1f}%): {why}")


def stage_evaluate(ctx: RunContext) -> dict:
    """4. Test accuracy (and latency) of the trained networks, with their MACs, params, share of
    the budget (``budget_use``: the largest value / limit over the budgets) and estimated
    accuracy: ``{"metapruning": {...}, "uniform": {...}}`` (also ``evaluation.json``)."""
    path = ctx.path(EVALUATION_FILE)
    if path.exists():
        return _read_evaluation(path)
    ctx.stop_if_asked("evaluate")
    _discard_later_outputs(ctx, "evaluate")
    result = ctx.search_result()
    trained = ctx.trained_nets()
    ctx.notify({"stage": "evaluate", "message": "evaluating on the test split"})
    space, latency, meta = ctx.space, ctx.latency, ctx.data.meta
    best = Candidate(tuple(result.best.choices))
    steps = ctx.r.final.total_steps(len(ctx.data.train))
    entries = {}
    for name, cand in (("metapruning", best), ("uniform", ctx.baseline)):
        ctx.stop_if_asked("evaluate")
        net = trained.get(name)
        if name == "uniform" and cand == best and net is not None:
            # the search picked it: one network, measured once; its own entry, as when read back
            entries[name] = dict(entries["metapruning"])
            continue
        estimates = ctx.evaluator.estimates(cand)
        entry = {"candidate": cand.key(), "widths": space.widths_by_group(cand),
                 "macs": counting.macs(space, cand), "params": counting.params(space, cand),
                 "budget_use": round(budget_use(space, cand, ctx.constraints), 4),
                 "estimated_val_accuracy": estimates["accuracy"],
                 "estimated_val_loss": round(estimates["loss"], 6)}
        if net is not None:
            entry["test_accuracy"] = accuracy(net, ctx.data.test, device=ctx.device)
            chance = 1 / meta.num_classes
            if entry["test_accuracy"] <= chance + CHANCE_MARGIN:
                entry["warning"] = _chance_warning(entry["test_accuracy"], chance, steps,
                                                   ctx.spec.preset)
        if latency is not None:
            from pruning.latency import predicted_and_measured
            from pruning.modules import build

            entry["latency_ms"] = predicted_and_measured(
                latency.table, space, cand, net if net is not None else build(space, cand),
                ctx.device)
        entries[name] = entry
    atomic_write_json(path, entries)
    return entries


def _read_evaluation(path: Path) -> dict:
    """``evaluation.json``, refused as damaged unless it holds both networks' entries."""
    entries = read_json(path)
    if not (isinstance(entries, dict) and all(
            isinstance(entries.get(name), dict) and "candidate" in entries[name]
            for name in ("metapruning", "uniform"))):
        raise UnreadableFileError(path, "no metapruning and uniform entries")
    return entries


def stage_export(ctx: RunContext) -> dict:
    """5. Export the winner and write the artifacts; returns the report (also
    ``artifacts/report.json``). An export already written, whole (every file ``config.json``
    lists, with its sha256), is read back; one with a file missing or changed is written
    again."""
    art = ctx.path("artifacts")
    if _export_intact(art):
        return read_json(art / "report.json")
    ctx.stop_if_asked("export")
    spec, space, constraints, latency = ctx.spec, ctx.space, ctx.constraints, ctx.latency
    entries = _read_evaluation(ctx.require(EVALUATION_FILE, "evaluate"))
    result = ctx.search_result()
    net = ctx.trained_nets()["metapruning"]
    ctx.notify({"stage": "export", "message": "exporting"})
    report = {
        "arch": spec.arch, "dataset": spec.dataset, "seed": spec.seed, "preset": spec.preset,
        "device": str(ctx.device),
        "budget": {c.name: c.limit for c in constraints},
        "metanet": read_json(ctx.path("metanet/stats.json")),
        "final": {"init": spec.final_init, "epochs": ctx.r.final.epochs,
                  "steps": ctx.r.final.total_steps(len(ctx.data.train))},
        "search": {"evaluated": len(result.history), "generations": result.generations,
                   "stopped_early": result.stopped_early,
                   "objective": result.config.objective, "best_score": result.best.score,
                   "val_images": min(ctx.r.eval_images or len(ctx.data.val), len(ctx.data.val))},
        "elapsed_s": None,
        **entries,
    }
    if spec.metanet_from is not None:
        report["metanet_from"] = read_json(ctx.path("metanet/source.json"))
    if latency is not None:
        report["latency_table"] = {"device": latency.table.key["device"], "batch": 1,
                                   "limit_ms": latency.limit,
                                   "measured_s": round(latency.table.measured_s, 3)}
    full, top = space.full_network()
    report["full_network"] = {"macs": counting.macs(full, top),
                              "params": counting.params(full, top)}
    meta = ctx.data.meta
    sample = next(iter(ctx.data.test.batches(8, device="cpu")))[0]
    best = Candidate(tuple(result.best.choices))
    mp, uniform = report["metapruning"], report["uniform"]
    budget_macs = next((c.limit for c in constraints if isinstance(c, MacsConstraint)), None)
    uniform_score = entry_score(uniform, result.config.objective)
    # up to the export: report.json is one of the files the export writes and hashes
    report["elapsed_s"] = round(time.perf_counter() - ctx.t_start, 3)
    export_model(art, net, space, best, sample=sample,
                 extra={"dataset": {"name": spec.dataset, **asdict(meta)}, "seed": spec.seed,
                        "metrics": {k: mp[k] for k in ("test_accuracy", "estimated_val_accuracy",
                                                        "estimated_val_loss") if k in mp}},
                 files={"search.json": json_bytes(result.to_dict()),
                        "report.json": json_bytes(report),
                        "pareto.png": pareto_png(
                            result.history, result.best,
                            (uniform["macs"], uniform_score), budget_macs,
                            title=f"{spec.arch} on {spec.dataset}: score vs MACs" + (
                                "" if budget_macs else  # else the plot draws no budget line
                                f" ({'; '.join(c.describe() for c in constraints)})"),
                            score_label=SCORE_LABELS[result.config.objective])})
    return report


def _export_intact(art: Path) -> bool:
    from pruning.export import export_problem

    try:
        return "report.json" in read_json(art / "config.json")["files"] \
            and export_problem(art) is None
    except (OSError, ValueError, KeyError, TypeError):
        return False


STAGES = (stage_metanet, stage_search, stage_train, stage_evaluate, stage_export)


def run(spec: PipelineSpec, run_dir: str | Path, *, resume: bool = False,
        progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
        lock: bool = True) -> dict:
    """Run (or resume) the whole pipeline; returns the report (also ``artifacts/report.json``).
    The stages run in order, each skipping what the run folder already holds."""
    ctx = prepare(spec, run_dir, resume=resume, progress=progress, should_stop=should_stop,
                  lock=lock)
    try:
        for stage in STAGES[:-1]:
            stage(ctx)
        report = stage_export(ctx)
    finally:
        if ctx.locked:
            unlock_run_dirs(ctx.run_dir)
    ctx.notify({"stage": "done", "report": report})
    return report


def _train_final(cand: Candidate, name: str, ctx: RunContext):
    """Train one candidate from scratch (the paper) or from its generated weights."""
    from pruning.modules import build

    r, device = ctx.r, ctx.device
    torch.manual_seed(r.spec.seed)
    done = ctx.path(f"{name}/model.safetensors")
    if not done.exists():
        ctx.check_recipe("final")
    if r.spec.final_init == "generated" and not done.exists():
        net = ctx.evaluator.materialise(cand).to(device)
    else:
        net = build(ctx.space, cand).to(device)
    if done.exists():
        state, _ = load_tensors(done, device)
        net.load_state_dict(state)
    else:
        train_network(net, ctx.data.train, r.final, seed=r.spec.seed, device=device,
                      checkpoint=ctx.path(f"{name}/state.safetensors"), progress=ctx.notify,
                      stage=name, should_stop=ctx.should_stop)
        save_tensors(done, net.state_dict())
    return net.eval()


# --- "train once, search many" --------------------------------------------------------------


def check_metanet_source(spec: PipelineSpec, run_dir: Path) -> Path:
    """The run folder ``spec.metanet_from``, checked: a run whose PruningNet is trained, with the
    same :func:`metanet_identity` as ``spec``."""
    src = Path(spec.metanet_from)
    if src.resolve() == run_dir.resolve():
        raise RunFolderError(f"metanet_from: {src} is this run's own folder")
    if not src.exists():
        raise MetanetGoneError(f"metanet_from: {src} does not exist")
    if not (src / "spec.json").is_file():
        raise RunFolderError(f"metanet_from: {src} is not a run folder (no spec.json)")
    try:
        other = read_spec(src / "spec.json")
    except ValueError as e:
        raise RunFolderError(f"metanet_from: {e}") from None
    if not (src / METANET_FILE).is_file() or not (src / "metanet" / "stats.json").is_file():
        raise RunFolderError(f"metanet_from: the run in {src} has no trained PruningNet yet; "
                             "finish it first (the command that started it, with --resume)")
    try:
        read_tensors_metadata(src / METANET_FILE)
        read_json(src / "metanet" / "stats.json")
    except UnreadableFileError as e:
        raise RunFolderError(
            f"metanet_from: {e.path} is unreadable, corrupt or truncated ({e.reason}); reuse "
            f"another run, or delete {src / METANET_FILE} and train it again (the command that "
            "started that run, with --resume)") from None
    theirs, ours = metanet_identity(other), metanet_identity(spec)
    for identity in (theirs, ours):  # how often it was saved does not change the PruningNet
        identity["metanet"].pop("checkpoint_every", None)
        if (src / DATA_FILE).exists():  # the data itself is compared once loaded (data.json):
            identity.pop("data_root")   # the same images under another path are the same data
    difference = next(differences(theirs, ours), None)  # nested: the setting itself
    if difference is not None:
        key, there, here = difference
        raise RunFolderError(
            f"metanet_from: the PruningNet of {src} was trained with other settings "
            f"({key}: {there!r} there, {here!r} here); it can be reused only "
            "with the same architecture, widths, data, split, seed and metanet settings")
    return src


def _adopt_metanet(ctx: RunContext, src: Path) -> dict:
    """Copy the PruningNet of ``src`` (and its stats), checked by :func:`prepare`, into this
    run's folder, so the run stays complete if ``src`` changes or goes;
    ``metanet/source.json`` records the origin."""
    try:
        stats = read_json(src / "metanet" / "stats.json")
        data = (src / METANET_FILE).read_bytes()
    except FileNotFoundError:
        raise MetanetGoneError(f"metanet_from: {src} was deleted before its PruningNet could "
                               "be copied") from None
    atomic_write_json(ctx.path("metanet/stats.json"), stats)
    atomic_write_json(ctx.path("metanet/source.json"),
                      {"run": str(src.resolve()), "sha256": hashlib.sha256(data).hexdigest()})
    atomic_write_bytes(ctx.path(METANET_FILE), data)  # last: it marks the stage as done
    return stats


def _absolute_paths(spec: PipelineSpec) -> PipelineSpec:
    """``spec`` with a relative ``data_root`` or ``metanet_from`` (as older versions recorded
    them, and as Python callers may give them) made absolute, for comparing two specs."""
    relative = {k: os.path.abspath(v) for k in ("metanet_from", "data_root")
                if (v := getattr(spec, k)) is not None and not os.path.isabs(v)}
    return spec.model_copy(update=relative) if relative else spec


def _check_lender_space(src: Path, space: SearchSpace) -> None:
    """The PruningNet of ``src`` must have been built for ``space``."""
    try:
        meta = read_tensors_metadata(src / METANET_FILE)
    except FileNotFoundError:
        raise MetanetGoneError(f"metanet_from: {src} was deleted") from None
    if not same_space(meta.get("space"), space.to_dict()):
        raise RunFolderError(f"metanet_from: the PruningNet of {src} was built for another "
                             "search space")


LOCK_FILE = ".lock"  # hidden: a folder holding only it holds no run (holds_other_files)
_held_locks: dict[Path, int] = {}  # run folder → the open lock file of this process


def lock_run_dir(run_dir: Path) -> bool:
    """Hold ``run_dir/.lock`` (an advisory ``flock``, gone with this process) so that a second
    process on the same folder is refused, naming the first one's pid, instead of both writing
    it. Re-entrant within a process; returns whether this call took it."""
    import fcntl

    key = run_dir.resolve()
    if key in _held_locks:
        return False
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder (a finished run to export again, another's): unguarded
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process holds it
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunFolderError(f"another metaprune process{f' (pid {holder})' if holder else ''} "
                             f"is using {run_dir}; wait for it to end, or stop it") from None
    except OSError:  # a file system without locks: run unguarded, as before there were any
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held_locks[key] = fd
    return True


def unlock_run_dirs(*run_dirs: Path) -> None:
    """Let go of the locks this process holds on ``run_dirs`` (none given: on all)."""
    for key in [d.resolve() for d in run_dirs] if run_dirs else list(_held_locks):
        fd = _held_locks.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the file releases the flock


def _check_run_dir(run_dir: Path, spec: PipelineSpec, resume: bool) -> None:
    """Refuse a folder that holds a run, unless resuming that same run, or that holds other files
    (nothing is written)."""
    saved = run_dir / "spec.json"
    if not saved.exists():
        if holds_other_files(run_dir):
            raise RunFolderError(f"{run_dir} is not empty and holds no run (no spec.json); "
                                 "choose a new or empty folder (a run folder that lost its "
                                 "spec.json cannot be resumed: delete it and start again)")
        return
    if not resume:
        raise RunFolderError(f"{run_dir} already holds a run; pass --resume to continue it "
                             "or choose another folder")
    try:
        previous = read_spec(saved)
    except ValueError as e:
        raise RunFolderError(f"{e}; choose another folder") from None
    # a data_root named anew: the data is compared itself once loaded (data.json), the same
    # images may have moved there (none named: the recorded one, compared as any setting)
    moved = {"data_root"} if spec.data_root is not None and (run_dir / DATA_FILE).exists() \
        else set()
    old, new = (_absolute_paths(s).model_dump(exclude={"device", *moved})
                for s in (previous, spec))
    if old != new:
        diff = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in differences(old, new))
        raise RunFolderError(f"{run_dir} holds a run with a different specification ({diff}); "
                             "resume it with the same settings or choose another folder")
