"""Training loops: the PruningNet (a random candidate per step) and plain pruned networks.

One loop serves both: SGD with Nesterov momentum, linear warm-up then cosine decay, label
smoothing, checkpoints every ``checkpoint_every`` steps so a killed run resumes losing at most
one interval. Randomness is derived from ``(seed, step)``, so a resumed run continues exactly.

On CUDA every step with static shapes — a plain network's, and the PruningNet's in the
fixed-shape mode, where the step's candidate is one small input tensor — trains from a **CUDA
graph**: after a few eager steps the whole step (forward, loss, backward, SGD update) is
captured once and replayed, one launch per step instead of hundreds (small nets and the
PruningNet's generators are bound by launches, not by the GPU). The
update in the graph is SGD's own arithmetic with the learning rate read from a device tensor
(:func:`sgd_update`); the optimizer's momentum buffers are the ones the graph updates, so
checkpoints are unchanged. ``METAPRUNE_CUDA_GRAPHS=0`` turns graphs off; a capture that fails
falls back to eager steps and says so in the progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metanet.pruningnet import fixed_shapes_default
from pruning.checkpoint import load_training_state, save_training_state
from pruning.constraints import Constraint
from pruning.modules import inference_layout
from pruning.search import random_feasible
from pruning.space import Candidate, SearchSpace
from pruning.spec import TrainConfig  # the recipe lives with the spec; re-exported here

Progress = Callable[[dict], None]

SYNC_EVERY = 25  # on CUDA, steps between reads of the loss (progress, divergence check)


def _sync_every(device: torch.device) -> int:
    """Steps between reads of the loss. A read waits for the GPU; reading every few steps lets
    the host queue the next steps meanwhile (a CPU has nothing to overlap: every step)."""
    return SYNC_EVERY if device.type == "cuda" else 1


def cuda_graphs_default(device: torch.device | str) -> bool:
    """Graphs for static-shape training: on CUDA unless ``METAPRUNE_CUDA_GRAPHS=0``."""
    off = os.environ.get("METAPRUNE_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "no")
    return torch.device(device).type == "cuda" and not off


@torch.no_grad()
def sgd_update(opt: torch.optim.SGD, neg_lr: torch.Tensor) -> None:
    """``torch.optim.SGD.step`` (momentum, Nesterov, per-group weight decay, no dampening) with
    the learning rate taken from the device tensor ``neg_lr`` (= −lr) instead of a Python float,
    so the step can be captured once and replayed with any learning rate:
    ``d = g + wd·p;  b = μ·b + d;  d = d + μ·b (Nesterov) or b;  p = p + (−lr)·d``.
    The momentum buffers must exist (one eager ``opt.step()`` creates them)."""
    for group in opt.param_groups:
        wd, mu = group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=wd) if wd else p.grad
            if mu:
                buf = opt.state[p]["momentum_buffer"]
                buf.mul_(mu).add_(d)
                d = d.add(buf, alpha=mu) if group["nesterov"] else buf
            p.addcmul_(d, neg_lr)


class CudaGraphs:
    """Capture and replay on CUDA (tests substitute an object that runs ``body`` eagerly)."""

    needs_cuda = True

    @staticmethod
    @contextlib.contextmanager
    def side_stream():
        """Eager warm-up steps run on a side stream, as capture requires."""
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    @staticmethod
    def capture(body: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph.replay


class GraphedStep:
    """One training step with static shapes, captured after ``WARMUP`` eager steps.

    ``step(x, y, lr, step)`` returns the loss. The captured step computes
    ``loss(x, y, inputs(step), cache=False)`` (autocast's weight cache must be off in a graph);
    ``inputs(step)`` is ``None`` or a tensor of fixed shape (copied into the graph's input before
    each replay). Until capture, and for good if capture fails, the step is
    ``eager(x, y, step)``."""

    WARMUP = 3

    def __init__(self, loss: Callable, inputs: Callable[[int], torch.Tensor | None],
                 opt: torch.optim.SGD, eager: Callable, graphs=CudaGraphs,
                 notify: Callable[[str], None] = lambda msg: None):
        self.loss_of, self.inputs, self.opt, self.eager = loss, inputs, opt, eager
        self.graphs, self.notify = graphs, notify
        self.warm, self.replay, self.failed = 0, None, False

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, step: int) -> torch.Tensor:
        if self.replay is None and not self.failed:
            if self.warm < self.WARMUP:
                self.warm += 1
                with self.graphs.side_stream():
                    return self.eager(x, y, step)
            self._capture(x, y, step)
        if self.failed:
            return self.eager(x, y, step)
        self.x.copy_(x)
        self.y.copy_(y)
        if self.extra is not None:  # from the host without waiting for the GPU
            self.extra.copy_(self.inputs(step), non_blocking=True)
        self.neg_lr.fill_(-lr)
        self.replay()
        return self.loss.clone()  # the next replay overwrites self.loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        self.x, self.y = x.clone(), y.clone()
        extra = self.inputs(step)
        self.extra = None if extra is None else extra.to(x.device).clone()
        self.neg_lr = torch.zeros((), device=x.device)
        self.loss = torch.zeros((), device=x.device)
        params = [p for g in self.opt.param_groups for p in g["params"]]

        def body() -> None:
            for p in params:  # backward writes fresh gradients (the graph's own memory)
                p.grad = None
            loss = self.loss_of(self.x, self.y, self.extra, cache=False)
            loss.backward()
            sgd_update(self.opt, self.neg_lr)
            self.loss.copy_(loss.detach())

        try:
            self.replay = self.graphs.capture(body)
        except RuntimeError as e:  # e.g. an operation that cannot be captured
            self.failed, self.replay = True, None
            for p in params:
                p.grad = None
            self.notify(f"CUDA graph capture failed ({str(e).splitlines()[0]}); "
                        "training eagerly")


class Cancelled(Exception):
    """Raised inside a loop when the caller's ``should_stop`` says so (a training loop with a
    checkpoint saves its state first, so nothing done is lost)."""


def candidate_for_step(space: SearchSpace, seed: int, step: int,
                       constraints: Sequence[Constraint] = ()) -> Candidate:
    """The candidate the PruningNet trains at ``step``: uniform per group (MetaPruning §3.2),
    drawn from an RNG seeded by ``(seed, step)`` so a resumed run samples the same ones.

    With ``constraints``, the draw is biased towards the budget: a uniform draw that violates it
    is repaired as the search repairs its random candidates
    (:func:`pruning.search.random_feasible`), so training concentrates on the region the search
    explores."""
    rng = random.Random(seed * 1_000_003 + step)
    return random_feasible(space, constraints, rng) if constraints else space.random(rng)


def fit(module: nn.Module, forward: Callable[[torch.Tensor, object], torch.Tensor], split,
        config: TrainConfig, *, inputs: Callable[[int], object] = lambda step: step,
        seed: int = 0, device: torch.device | str = "cpu",
        checkpoint: str | Path | None = None, progress: Progress | None = None,
        stage: str = "train", should_stop: Callable[[], bool] | None = None,
        cuda_graphs: bool = False, graphs=None) -> dict:
    """Train ``module`` with ``loss = CE(forward(x, inputs(step)), y)`` over ``split`` (a
    tensor from ``inputs`` is moved to the device first).

    ``cuda_graphs``: ``forward`` has static shapes and ``inputs(step)`` is ``None`` or a tensor
    of fixed shape, so the step may be replayed from a CUDA graph (:class:`GraphedStep`;
    ``graphs`` is for tests).

    With ``checkpoint``, state is saved every ``config.checkpoint_every`` steps, at the end and
    when ``should_stop`` stops the loop, and an existing checkpoint is resumed. Returns
    ``{"steps", "loss", "images_per_s"}``: the throughput of the whole training, the processes
    before a resume included (as far as their checkpoints recorded it; ``None`` if nothing was
    timed).
    """
    device = torch.device(device)
    graphs = graphs or CudaGraphs
    if cuda_graphs and getattr(graphs, "needs_cuda", False) and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, not {device}")
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov and config.momentum > 0)
    if len(split) < config.batch_size:  # every epoch drops its last, partial batch: no steps
        raise ValueError(f"{stage}: {len(split)} training samples are fewer than one batch "
                         f"(batch_size {config.batch_size})")
    per_epoch = len(split) // config.batch_size
    total = config.total_steps(len(split))
    step, loss_ema = 0, None
    before = {"images": 0, "seconds": 0.0}  # trained by the processes before a resume
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.exists():
        try:
            meta = load_training_state(ckpt, module, opt)
        except RuntimeError as e:  # load_state_dict: tensors of other shapes or names
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise ValueError(f"{stage}: checkpoint {ckpt} holds another network than this run "
                             f"trains ({str(e).splitlines()[0].strip()[:200]}): it was begun by "
                             "a version whose preset gave other widths; finish it with that "
                             "version, or remove the checkpoint") from None
        step, loss_ema = meta["step"], meta.get("loss")
        before = {k: meta.get(k, before[k]) for k in before}
        if meta.get("total", total) != total:
            raise ValueError(f"{stage}: checkpoint {ckpt} belongs to a run of {meta['total']} "
                             f"steps, this one has {total}; remove it or use the same settings")
    use_amp = device.type == "cuda"
    sync_every = _sync_every(device)
    ema = None if loss_ema is None else torch.tensor(loss_ema, device=device)
    saved_step = step

    def loss_of(x, y, extra, cache=True):
        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp, cache_enabled=cache):
            return F.cross_entropy(forward(x, extra), y, label_smoothing=config.label_smoothing)

    def eager_step(x, y, step):
        extra = inputs(step)
        if torch.is_tensor(extra):
            extra = extra.to(device, non_blocking=True)
        loss = loss_of(x, y, extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    graphed = (GraphedStep(loss_of, inputs, opt, eager_step, graphs,
                           lambda msg: progress and progress({"stage": stage, "message": msg}))
               if cuda_graphs else None)
    module.train()
    t0, images = time.perf_counter(), 0

    def record(loss: float | None) -> dict:  # a checkpoint's metadata
        return {"step": step, "total": total, "loss": loss,
                "images": before["images"] + images,
                "seconds": before["seconds"] + time.perf_counter() - t0}
    steady = None  # (elapsed, images) at the first report: the ETA leaves out the set-up
    while step < total:
        epoch = step // per_epoch
        skip = step - epoch * per_epoch
        batches = split.batches(config.batch_size, shuffle=True, augment=config.augment,
                                seed=seed * 10_007 + epoch, drop_last=True, device=device)
        for i, (x, y) in enumerate(batches):
            if i < skip:
                continue
            if should_stop is not None and should_stop():
                if ckpt and step > saved_step:
                    loss_ema = loss_ema if ema is None else ema.item()
                    save_training_state(ckpt, module, opt, record(loss_ema))
                raise Cancelled(stage)
            lr = config.lr_at(step, total, per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = graphed(x, y, lr, step) if graphed else eager_step(x, y, step)
            step += 1
            images += len(x)
            value = loss.float()
            ema = value if ema is None else ema * 0.9 + value * 0.1  # NaN/inf stay in it
            save = ckpt and (step % config.checkpoint_every == 0 or step == total)
            if not (save or step == total or step == 1 or step % sync_every == 0):
                continue
            loss_ema = ema.item()
            if not math.isfinite(loss_ema):
                raise FloatingPointError(
                    f"{stage}: the loss became {loss_ema} by step {step} of {total} (learning "
                    f"rate {opt.param_groups[0]['lr']:.3g}); training diverged: lower the "
                    "learning rate (lr) or add warm-up (warmup_epochs) and start a new run (the "
                    "checkpoint holds the last finite state)")
            elapsed = time.perf_counter() - t0
            if save:
                save_training_state(ckpt, module, opt, record(loss_ema))
                saved_step = step
            if progress:
                rate = images / elapsed if elapsed > 0 else 0.0
                eta = None
                if steady is None:
                    steady = (elapsed, images)
                elif elapsed > steady[0]:
                    eta = ((total - step) * config.batch_size
                           * (elapsed - steady[0]) / (images - steady[1]))
                progress({"stage": stage, "step": step, "total": total,
                          "epoch": step / per_epoch, "loss": loss_ema,
                          "lr": opt.param_groups[0]["lr"], "images_per_s": rate, "eta_s": eta})
            if step >= total:
                break
    done = record(loss_ema)
    rate = done["images"] / done["seconds"] if done["images"] and done["seconds"] > 0 else None
    return {"steps": step, "loss": loss_ema, "images_per_s": rate}


def train_pruningnet(pnet, split, config: TrainConfig, *, seed: int = 0,
                     constraints: Sequence[Constraint] = (), fixed_shapes: bool | None = None,
                     cuda_graphs: bool | None = None, **kwargs) -> dict:
    """Train the PruningNet's generators, one random candidate per step (uniform, or biased
    towards the budget ``constraints``: see :func:`candidate_for_step`). ``fixed_shapes``
    (default: on CUDA) computes each candidate at full width with zero-padded weights, the
    same function (:mod:`metanet.pruningnet`); its steps are replayed from a CUDA graph
    (``cuda_graphs``, default :func:`cuda_graphs_default`)."""
    constraints = tuple(constraints)
    device = kwargs.get("device", "cpu")
    if fixed_shapes is None:
        fixed_shapes = fixed_shapes_default(device)
    if cuda_graphs is None:
        cuda_graphs = fixed_shapes and cuda_graphs_default(device)
    if cuda_graphs and not fixed_shapes:
        raise ValueError("cuda_graphs needs fixed_shapes (a cropped candidate changes shapes)")

    def candidate(step: int) -> Candidate:
        return candidate_for_step(pnet.space, seed, step, constraints)

    if fixed_shapes:
        return fit(pnet, pnet.forward_fixed, split, config,
                   inputs=lambda step: pnet.fixed_inputs(candidate(step)), seed=seed,
                   stage="metanet", cuda_graphs=cuda_graphs, **kwargs)
    return fit(pnet, pnet, split, config, inputs=candidate, seed=seed, stage="metanet",
               **kwargs)


def train_network(net: nn.Module, split, config: TrainConfig, *, seed: int = 0,
                  cuda_graphs: bool | None = None, **kwargs) -> dict:
    """Train a plain (pruned) network; from a CUDA graph by default on CUDA
    (:func:`cuda_graphs_default`)."""
    if cuda_graphs is None:
        cuda_graphs = cuda_graphs_default(kwargs.get("device", "cpu"))
    return fit(net, lambda x, _: net(x), split, config, inputs=lambda step: None, seed=seed,
               cuda_graphs=cuda_graphs, **kwargs)


@torch.inference_mode()
def accuracy(net: nn.Module, split, *, batch_size: int = 512,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``net`` (in eval mode, channels-last on the CPU:
    :func:`~pruning.modules.inference_layout`) on ``split``."""
    net.eval()
    device = torch.device(device)
    correct = seen = 0
    with (inference_layout(net, device),
          torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")):
        for x, y in split.batches(batch_size, device=device):
            correct += (net(x).argmax(1) == y).sum().item()
            seen += len(y)
    return correct / max(1, seen)
