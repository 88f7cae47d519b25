"""What a pruning run is, without running it: the job specification (:class:`PipelineSpec`:
architecture, data, budget, preset and overrides), the presets, the training recipe
(:class:`TrainConfig`) and the PruningNet fingerprint that lets runs share a PruningNet.

No PyTorch here: the service's API validates specs with this module alone, and the pipeline
(:mod:`pruning.pipeline`) runs them.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from pruning import counting
from pruning.checkpoint import json_bytes
from pruning.constraints import (BudgetError, InfeasibleBudgetError, MacsConstraint,
                                 ParamsConstraint, TightBudgetError, check_binding,
                                 check_feasible, one_step_wider)
from pruning.archs import INPUT_SIZE_RANGE
from pruning.registry import arch_digest, arch_family, get_arch
from pruning.search import SearchConfig
from pruning.space import DEFAULT_LEVELS, SearchSpace

DATASETS = ("fashion-mnist", "imagefolder", "synthetic")
# (classes, channels, image size) of the datasets whose shape needs no file read: what a
# budget can be checked against before any data is loaded (an image folder's shape is its own)
DATASET_SHAPES = {"fashion-mnist": (10, 1, 28), "synthetic": (10, 1, 16)}


def error_message(e: BaseException, names: dict[str, str] | None = None) -> str:
    """``e``'s message on one line; a pydantic ``ValidationError`` (a bad spec) as
    ``field: reason; field: reason`` instead of its multi-line report, a field named as
    ``names`` says where given (the CLI's option for it, e.g. ``--max-macs``)."""
    errors = getattr(e, "errors", None)
    if callable(errors) and type(e).__name__ == "ValidationError":
        parts = []
        for err in errors():
            msg = err["msg"].removeprefix("Value error, ")
            where = ".".join(str(x) for x in err["loc"])
            where = (names or {}).get(where, where)
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return " ".join(str(e).split())


def list_datasets() -> list[str]:
    """The dataset names a spec may give (loaded by :func:`pruning.data.load_dataset`)."""
    return list(DATASETS)


MAX_STEPS = 10**9  # bound of max_steps and checkpoint_every (every setting is bounded)
SCHEDULES = ("cosine", "linear", "step")  # learning-rate decays (TrainConfig.lr_at)
STEP_MILESTONES = (0.25, 0.5, 0.75)  # "step": ×0.1 at these shares of the decay (official ResNet)


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. ``epochs`` may be fractional; ``max_steps`` caps the step count."""

    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    max_steps: int | None = None
    checkpoint_every: int = 200
    schedule: str = "cosine"  # after the warm-up: "cosine" or "linear" to zero, or "step"

    def __post_init__(self):
        def number(v, integer=False):
            kind = numbers.Integral if integer else numbers.Real
            # an int is finite (math.isfinite would raise OverflowError on a huge one)
            return (isinstance(v, kind) and not isinstance(v, bool)
                    and (isinstance(v, numbers.Integral) or math.isfinite(v)))

        epochs_ok = number(self.epochs) and 0 < self.epochs <= 10_000
        checks = {
            "epochs": (epochs_ok, "a number in (0, 10000]"),
            "batch_size": (number(self.batch_size, True) and 1 <= self.batch_size <= 65_536,
                           "an integer in [1, 65536]"),
            "lr": (number(self.lr) and 0 < self.lr <= 100, "a number in (0, 100]"),
            "momentum": (number(self.momentum) and 0 <= self.momentum < 1, "a number in [0, 1)"),
            "nesterov": (isinstance(self.nesterov, bool), "true or false"),
            "weight_decay": (number(self.weight_decay) and 0 <= self.weight_decay <= 1,
                             "a number in [0, 1]"),
            "warmup_epochs": (number(self.warmup_epochs) and 0 <= self.warmup_epochs
                              and (not epochs_ok or self.warmup_epochs <= self.epochs),
                              "a number in [0, epochs]"),
            "label_smoothing": (number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                                "a number in [0, 1)"),
            "augment": (isinstance(self.augment, bool), "true or false"),
            "schedule": (self.schedule in SCHEDULES, " or ".join(map(repr, SCHEDULES))),
            "max_steps": (self.max_steps is None
                          or (number(self.max_steps, True) and 1 <= self.max_steps <= MAX_STEPS),
                          f"an integer in [1, {MAX_STEPS}] or null"),
            "checkpoint_every": (number(self.checkpoint_every, True)
                                 and 1 <= self.checkpoint_every <= MAX_STEPS,
                                 f"an integer in [1, {MAX_STEPS}]"),
        }
        bad = [f"{k}={getattr(self, k)!r} (must be {want})" for k, (ok, want) in checks.items()
               if not ok]
        if bad:
            raise ValueError(f"invalid training settings: {'; '.join(bad)}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from JSON-like settings; unknown names are a ``ValueError`` (not a TypeError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**d)

    def total_steps(self, num_examples: int) -> int:
        per_epoch = max(1, num_examples // self.batch_size)
        steps = max(1, math.ceil(self.epochs * per_epoch))
        return min(steps, self.max_steps) if self.max_steps else steps

    def lr_at(self, step: int, total: int, per_epoch: int) -> float:
        """Linear warm-up, then the decay of ``schedule``: "cosine" to zero,
        ½·lr·(1 + cos πt); "linear" to zero, lr·(1 − t) (the official MetaPruning code's
        MobileNet recipe); "step", lr·0.1^k after k of :data:`STEP_MILESTONES` (its ResNet
        recipe). ``t`` is the share of the steps after the warm-up; ``step`` counts from 0."""
        warmup = int(self.warmup_epochs * per_epoch)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if self.schedule == "linear":
            return self.lr * (1 - t)
        if self.schedule == "step":
            return self.lr * 0.1 ** sum(t >= m for m in STEP_MILESTONES)
        return 0.5 * self.lr * (1 + math.cos(math.pi * t))


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
                         "crossovers": 6, "generations": 6, "include_uniform": True},
              "final": {"epochs": 5, "batch_size": 64, "lr": 0.05}},
    # the GPU benchmark: all of Fashion-MNIST, the paper's search started from the uniform
    # network
    "standard": {"val_size": 10000, "calib_batches": 10, "calib_batch_size": 256,
                 "eval_images": 10000,
                 "metanet": {"epochs": 10, "batch_size": 256, "lr": 0.1, "warmup_epochs": 0.5},
                 "search": {"include_uniform": True},
                 "final": {"epochs": 10, "batch_size": 256, "lr": 0.1, "warmup_epochs": 0.5}},
    # the official code's MobileNet recipe (64 PruningNet and 256 final epochs, linear decay,
    # plain momentum, label smoothing 0.1; its learning rates scaled to batch 512), its search,
    # and its widths: MobileNetV2 searched up to 1.4× (the others up to 1.0×, resolved()); the
    # resnet family trains with the official ResNet recipe instead (PAPER_RESNET)
    "paper": {"val_size": 10000, "calib_batches": 20, "calib_batch_size": 256,
              "eval_images": 10000, "max_width_mult": 1.4,
              "metanet": {"epochs": 64, "batch_size": 512, "lr": 0.25, "nesterov": False,
                          "schedule": "linear", "label_smoothing": 0.1},
              "search": {},
              "final": {"epochs": 256, "batch_size": 512, "lr": 0.25, "nesterov": False,
                        "schedule": "linear", "label_smoothing": 0.1}},
}
# the official code's ResNet recipe, which the paper preset takes for the resnet family (the
# rest as above): 32 PruningNet epochs at batch 256, 128 final ones at batch 512, step decay,
# weight decay 1e-4
PAPER_RESNET = {"metanet": {"epochs": 32, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4,
                            "schedule": "step"},
                "final": {"epochs": 128, "batch_size": 512, "lr": 0.2, "weight_decay": 1e-4,
                          "schedule": "step"}}


MAX_IMAGES = 10**9  # bound of train_limit, test_limit, val_size and eval_images


def _whole_floats_as_ints(data, names):
    """Strict models take a count as JSON's 9001.0 too, as the schema's "integer" does (a bool
    or a string stays refused)."""
    if isinstance(data, dict) and any(isinstance(data.get(k), float) for k in names):
        data = {k: int(v) if k in names and isinstance(v, float) and v.is_integer() else v
                for k, v in data.items()}
    return data


_INT_FIELDS = ("seed", "image_size", "channel_divisor", "min_channels", "train_limit",
               "test_limit", "calib_batches", "calib_batch_size", "eval_images")


class Budget(BaseModel):
    """Exactly one budget: absolute (MACs, params, milliseconds) or relative to the full 1.0×
    network. Latency is predicted from a per-layer table measured on the run's device at
    batch size 1 (:mod:`pruning.latency`)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not a count, true no seed
    macs: int | None = Field(None, gt=0, le=10**13)
    params: int | None = Field(None, gt=0, le=10**11)
    macs_ratio: float | None = Field(None, gt=0, le=4, allow_inf_nan=False)
    params_ratio: float | None = Field(None, gt=0, le=4, allow_inf_nan=False)
    latency_ms: float | None = Field(None, gt=0, le=10**6, allow_inf_nan=False)
    latency_ratio: float | None = Field(None, gt=0, le=4, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data):
        return _whole_floats_as_ints(data, ("macs", "params"))

    @model_validator(mode="after")
    def _one(self):
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget: macs, params, macs_ratio, params_ratio, "
                             f"latency_ms or latency_ratio (got {given or 'none'})")
        return self

    @property
    def is_latency(self) -> bool:
        return self.latency_ms is not None or self.latency_ratio is not None

    def check_ratio_base(self, max_width_mult: float) -> None:
        """A latency ratio is relative to the full (1.0×) network, whose latency the space's
        table measures only if the space holds it (``max_width_mult`` at least 1)."""
        if self.latency_ratio is not None and max_width_mult < 1:
            raise BudgetError(
                f"a latency_ratio is relative to the full (1.0×) network, which a space of "
                f"max_width_mult {max_width_mult:g} does not hold (its latency table measures "
                f"no wider): give latency_ms (--max-latency-ms) instead")

    def count_constraint(self, space: SearchSpace) -> MacsConstraint | ParamsConstraint:
        """The MACs or params constraint of this budget on ``space``; ratios are of the full
        1.0× network (:meth:`SearchSpace.full_network`). Latency budgets need a device's
        latency table: :func:`pruning.pipeline.resolve_budget`."""
        if self.is_latency:
            raise ValueError("a latency budget is not a count")
        if self.macs is not None:
            return MacsConstraint(self.macs)
        if self.params is not None:
            return ParamsConstraint(self.params)
        full, top = space.full_network()
        # at least 1, so a tiny ratio reads as an infeasible budget (with the smallest reachable)
        if self.macs_ratio is not None:
            return MacsConstraint(max(1, int(self.macs_ratio * counting.macs(full, top))))
        return ParamsConstraint(max(1, int(self.params_ratio * counting.params(full, top))))

    def check_usable(self, space: SearchSpace, constraints) -> None:
        """:func:`~pruning.constraints.check_feasible` and
        :func:`~pruning.constraints.check_binding`; for a ratio budget an infeasible one also
        gives the smallest ratio that is feasible (rounded up), in the terms it was given."""
        try:
            check_feasible(space, constraints)
            check_binding(space, constraints)
        except (InfeasibleBudgetError, TightBudgetError) as e:
            name = next((k for k in ("macs_ratio", "params_ratio", "latency_ratio")
                         if getattr(self, k) is not None), None)
            if name is None:
                raise
            (c,) = constraints
            full, top = space.full_network()
            whole = (c.table.predict_widths(full.widths(top)) if name == "latency_ratio"
                     else c.value(full, top))  # (a latency table belongs to the run's space)
            # what admits a network beside the smallest: something to search
            least = min((c.value(space, s) for s in one_step_wider(space)),
                        default=c.value(space, space.smallest())) / whole
            raise type(e)(f"{e}; as a {name} (--{name.replace('_', '-')}): at least "
                          f"{math.ceil(least * 1000) / 1000:g}") from None


class PipelineSpec(BaseModel):
    """Everything a pruning run needs; the preset fills what is not given."""

    model_config = ConfigDict(extra="forbid", strict=True)
    arch: str = "mobilenet_v2"
    dataset: str = "fashion-mnist"
    data_root: str | None = Field(None, min_length=1, max_length=4096)
    image_size: int | None = Field(
        None, ge=INPUT_SIZE_RANGE[0], le=INPUT_SIZE_RANGE[1],
        description="side (px) the images are resized to (shorter side, then a centre crop); "
                    "default: the dataset's own (an image folder's most common shorter side)")
    budget: Budget = Budget(macs_ratio=0.25)
    preset: Literal["smoke", "quick", "standard", "paper"] = "quick"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    width_mult: float = Field(1.0, ge=0.05, le=4, allow_inf_nan=False)
    metanet_sampling: Literal["uniform", "budget"] = Field(
        "uniform", description="PruningNet training candidates: uniform per group (the paper) "
                               "or biased towards this run's budget (not reusable across budgets)")
    max_width_mult: float | None = Field(None, gt=0, le=4, allow_inf_nan=False)
    levels: list[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=256,
        description="width scales of a group's maximum, increasing, each in (0, 1] "
                    "(default: 31 levels 0.10…1.00)")
    channel_divisor: int = Field(1, ge=1, le=64)
    min_channels: int = Field(4, ge=1, le=64,
                              description="no layer narrower than this (or its maximum): 1–3 "
                                          "channel layers are bottlenecks whose ReLU can die "
                                          "when trained from scratch")
    train_limit: int | None = Field(None, ge=16, le=MAX_IMAGES)
    test_limit: int | None = Field(None, ge=16, le=MAX_IMAGES)
    val_size: Annotated[int, Field(ge=16, le=MAX_IMAGES)] | Annotated[
        float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = Field(
        None, description="held-out images that score the search: a count, or a fraction in "
                          "(0, 1) of the training data")
    calib_batches: int | None = Field(None, ge=1, le=1000)
    calib_batch_size: int | None = Field(None, ge=1, le=4096)
    eval_images: int | None = Field(None, ge=16, le=MAX_IMAGES)
    final_init: Literal["scratch", "generated"] = "scratch"
    train_baseline: bool = False
    metanet_from: str | None = Field(None, min_length=1, max_length=4096,
                                     description="a run folder whose trained PruningNet this run "
                                                 "reuses (same architecture, data and seed); "
                                                 "the command line's alone: the service refuses "
                                                 "it and reuses its own jobs' PruningNets")
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

    @field_validator("data_root", "metanet_from")
    @classmethod
    def _no_nul(cls, path: str | None) -> str | None:
        if path is not None and "\0" in path:
            raise ValueError("a path cannot contain a NUL character")
        return path

    @field_validator("data_root")
    @classmethod
    def _read_by_the_dataset(cls, root: str | None, info: ValidationInfo) -> str | None:
        if root is not None and info.data.get("dataset") == "synthetic":
            raise ValueError("the synthetic dataset is generated and reads no folder")
        return root

    @field_validator("val_size", mode="before")
    @classmethod
    def _count_or_fraction(cls, v):
        """One message for both forms (the union's branches would each report their own)."""
        ok = (v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)
                            and (isinstance(v, numbers.Integral) or math.isfinite(v))
                            and (0 < v < 1 or (v == int(v) and 16 <= v <= MAX_IMAGES))))
        if not ok:
            raise ValueError(f"val_size must be a count of held-out images (16 to "
                             f"{MAX_IMAGES:,}) or a fraction in (0, 1) of the training data, "
                             f"got {v!r}")
        return int(v) if isinstance(v, float) and v >= 1 else v

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data):
        return _whole_floats_as_ints(data, _INT_FIELDS)

    @field_validator("levels")
    @classmethod
    def _increasing(cls, levels: list[float] | None) -> list[float] | None:
        if levels is not None and levels != sorted(set(levels)):
            raise ValueError("levels must be strictly increasing")
        return levels

    @field_validator("metanet", "search", "final")
    @classmethod
    def _settings_resolve(cls, overrides: dict, info: ValidationInfo) -> dict:
        """Unknown or out-of-range training/search settings fail here, each under its own
        field (the preset's settings, updated by these, must make a valid config)."""
        preset, seed = info.data.get("preset"), info.data.get("seed")
        if preset is None or seed is None:
            return overrides  # already invalid; the preset or the seed is reported
        if info.field_name == "search" and "seed" in overrides:
            raise ValueError("seed is not a search setting: the search uses the spec's seed")
        try:
            _settings(info.field_name, PRESETS[preset], overrides, seed)
        except ValueError as e:  # a message naming a key with a lone surrogate ("\ud800" in
            # JSON) could not become a validation error: escape it
            raise ValueError(str(e).encode("utf-8", "backslashreplace").decode()) from None
        return overrides

    def _configs(self, family: str | None) -> tuple[TrainConfig, SearchConfig, TrainConfig]:
        """The metanet, search and final settings: the preset's (for the ``paper`` preset,
        ``family``'s), updated by this spec's."""
        p = PRESETS[self.preset]
        if self.preset == "paper" and family == "resnet":
            p = {**p, **{name: {**p[name], **PAPER_RESNET[name]} for name in PAPER_RESNET}}
        return tuple(_settings(name, p, getattr(self, name), self.seed)
                     for name in ("metanet", "search", "final"))

    def search_space(self, num_classes: int, in_channels: int, input_size: int) -> SearchSpace:
        """The run's search space for data of this shape."""
        return SearchSpace.create(self.arch, num_classes=num_classes, in_channels=in_channels,
                                  input_size=input_size, width_mult=self.width_mult,
                                  max_width_mult=self.resolved().max_width_mult,
                                  levels=tuple(self.levels or DEFAULT_LEVELS),
                                  channel_divisor=self.channel_divisor,
                                  min_channels=self.min_channels)

    def check_budget(self) -> None:
        """Raise :class:`~pruning.constraints.BudgetError` for a budget that is infeasible or
        prunes nothing, where that is known before any data or device: a MACs or params budget
        on a dataset of :data:`DATASET_SHAPES`. The service refuses such a job when it is
        submitted; the pipeline checks every budget once its data is loaded. A ``ValueError``
        for an architecture whose plan does not hold together (a plugin's), on such a dataset
        with any budget."""
        self.budget.check_ratio_base(self.resolved().max_width_mult)
        shape = DATASET_SHAPES.get(self.dataset)
        if shape is None:
            return
        num_classes, in_channels, size = shape
        space = self.search_space(num_classes, in_channels, self.image_size or size)
        if self.budget.is_latency:
            return
        constraints = [self.budget.count_constraint(space)]
        self.budget.check_usable(space, constraints)

    def resolved(self) -> ResolvedSpec:
        p = PRESETS[self.preset]
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else p.get(name)  # noqa: E731
        family = arch_family(self.arch) if self.preset == "paper" else None  # builds a plan
        metanet, search, final = self._configs(family)
        max_width_mult = pick("max_width_mult") or 1.0
        if self.preset == "paper" and self.max_width_mult is None and family != "mobilenet_v2":
            max_width_mult = 1.0  # the official code widens MobileNetV2's PruningNet alone
        return ResolvedSpec(
            spec=self, max_width_mult=max_width_mult,
            train_limit=pick("train_limit"), test_limit=pick("test_limit"),
            val_size=pick("val_size"), calib_batches=pick("calib_batches"),
            calib_batch_size=pick("calib_batch_size"), eval_images=pick("eval_images"),
            metanet=metanet, search=search, final=final)


def _settings(name: str, preset: dict, overrides: dict,
              seed: int) -> TrainConfig | SearchConfig:
    """The ``metanet``, ``search`` or ``final`` config of ``preset`` updated by ``overrides``."""
    merged = {**preset[name], **overrides}
    if name == "search":
        return SearchConfig.from_dict({**merged, "seed": seed})
    return TrainConfig.from_dict(merged)


class ResolvedSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: PipelineSpec
    max_width_mult: float
    train_limit: int | None
    test_limit: int | None
    val_size: int | float
    calib_batches: int
    calib_batch_size: int
    eval_images: int
    metanet: TrainConfig
    search: SearchConfig
    final: TrainConfig



# --- "train once, search many" ---------------------------------------------------------------


def read_spec(path) -> PipelineSpec:
    """A run folder's ``spec.json``. ``ValueError`` if this version cannot read it, naming an
    architecture this process does not know (a plugin's, without ``METAPRUNE_PLUGINS``)."""
    from pydantic import ValidationError

    from pruning.checkpoint import read_json
    from pruning.registry import PLUGINS_ENV

    message = f"{path} is not a run specification this version can read"
    try:
        return PipelineSpec.model_validate(read_json(path))
    except ValidationError as e:
        arch = [err["msg"].removeprefix("Value error, ") for err in e.errors()
                if tuple(err["loc"]) == ("arch",)]
        if arch:
            message += f" ({arch[0]}: a plugin's? set {PLUGINS_ENV} as for the run)"
        raise ValueError(message) from None
    except ValueError:
        raise ValueError(message) from None


def metanet_identity(spec: PipelineSpec) -> dict:
    """Everything that determines a run's trained PruningNet: the architecture and its widths,
    the data and its split, the seed and the PruningNet training recipe."""
    r = spec.resolved()
    return {"arch": spec.arch, "dataset": spec.dataset, "data_root": spec.data_root,
            "seed": spec.seed, "width_mult": spec.width_mult,
            "max_width_mult": r.max_width_mult,
            "levels": [float(x) for x in (spec.levels or DEFAULT_LEVELS)],
            "channel_divisor": spec.channel_divisor, "min_channels": spec.min_channels,
            "train_limit": r.train_limit,
            "val_size": r.val_size, "metanet": _recipe_identity(r.metanet),
            "metanet_sampling": spec.metanet_sampling,
            # a budget-biased PruningNet is trained for its budget only
            "budget": spec.budget.model_dump() if spec.metanet_sampling == "budget" else None,
            # only when given: the fingerprints of specs without it stay what they were
            **({"image_size": spec.image_size} if spec.image_size is not None else {}),
            # a plugin's architecture, as its plan is now (the built-in ones have none)
            **({"arch_sha256": digest} if (digest := arch_digest(spec.arch)) else {})}


def _recipe_identity(config: TrainConfig) -> dict:
    """A recipe's settings, less a default ``schedule`` (the setting came later: the
    fingerprints of the recipes without it stay what they were)."""
    d = asdict(config)
    if d["schedule"] == "cosine":
        del d["schedule"]
    return d


def metanet_fingerprint(spec: PipelineSpec) -> str:
    """sha256 of :func:`metanet_identity` (canonical JSON): equal fingerprints, interchangeable
    PruningNets. The service stores it on every job to find a finished one to reuse."""
    return hashlib.sha256(json_bytes(metanet_identity(spec))).hexdigest()
