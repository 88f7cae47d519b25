"""Scoring a candidate during the search (MetaPruning §3.3).

Generate the candidate's weights once, materialise the plain pruned network, recalibrate its
BatchNorm statistics on K training batches, and measure top-1 accuracy and cross-entropy on the
held-out sub-validation split (never the test split). The search's score is the accuracy (the
paper) or, with ``objective="loss"``, minus the mean cross-entropy: a proper scoring rule that
uses each image's whole prediction instead of a right/wrong bit, so it is less noisy on a small
held-out split, where a search among many near-equal candidates keeps the one that split's
noise favours (``docs/benchmarks.md``). The batches are drawn once and kept on the device, so
every candidate sees the same images and the only work per candidate is one weight
generation plus the forward passes of the plain pruned net — its physical limit. On CUDA the
net is computed at full width with zero-padded weights (``fixed_shapes``, see
:mod:`metanet.pruningnet`): the same scores without a new cuDNN plan per candidate.

The validation pass runs in eval mode, where every image is computed on its own, so its batch
size changes nothing but speed: on CUDA, where a small net's forward over a batch of small
images costs its kernel launches more than its arithmetic, it is as large as
:func:`eval_batch_size_default` allows (5,349 Fashion-MNIST images a batch).
The calibration batches keep ``batch_size``: BN statistics are averaged over them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metanet.pruningnet import PruningNet, fixed_shapes_default
from pruning.modules import inference_layout
from pruning.search import check_objective
from pruning.space import Candidate


EVAL_ELEMENTS = 2**22  # input values per validation batch on CUDA (28×28×1: 5,349 images)


def eval_batch_size_default(image_shape: tuple[int, ...], batch_size: int,
                            device: torch.device | str) -> int:
    """Validation batch size: ``batch_size`` on a CPU (compute-bound: larger batches gain
    nothing); on CUDA the most images whose inputs hold ``EVAL_ELEMENTS`` values, never fewer
    than ``batch_size`` (a 224×224×3 image set keeps 256)."""
    if torch.device(device).type != "cuda":
        return batch_size
    return max(batch_size, EVAL_ELEMENTS // max(1, math.prod(image_shape)))


class CandidateEvaluator:
    """``evaluator(candidate) -> score`` (higher is better: the accuracy, or minus the loss for
    ``objective="loss"``) on fixed calibration and validation batches; ``estimates(candidate)``
    gives both measures."""

    def __init__(self, pnet: PruningNet, train_split, val_split, *, calib_batches: int = 10,
                 batch_size: int = 256, val_images: int | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", fixed_shapes: bool | None = None,
                 eval_batch_size: int | None = None, objective: str = "accuracy"):
        if calib_batches < 1:
            raise ValueError("calib_batches must be at least 1")
        self.objective = check_objective(objective)
        self.pnet = pnet
        self.device = torch.device(device)
        self.fixed_shapes = (fixed_shapes_default(self.device) if fixed_shapes is None
                             else fixed_shapes)
        calib = train_split.batches(batch_size, shuffle=True, seed=seed, device=self.device)
        self.calibration = [x for x, _ in _take(calib, calib_batches)]
        limit = len(val_split) if val_images is None else min(val_images, len(val_split))
        xs, ys, seen = [], [], 0
        for x, y in val_split.batches(batch_size, device=self.device):
            if seen >= limit:
                break
            xs.append(x[:limit - seen])
            ys.append(y[:limit - seen])
            seen += len(ys[-1])
        if not xs:
            raise ValueError("the validation split is empty")
        self.eval_batch_size = (eval_batch_size_default(tuple(xs[0].shape[1:]), batch_size,
                                                        self.device)
                                if eval_batch_size is None else eval_batch_size)
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be at least 1")
        if self.eval_batch_size == batch_size:  # the batches as drawn (no copy of a large set)
            self.validation = list(zip(xs, ys))
        else:
            x, y = torch.cat(xs), torch.cat(ys)
            self.validation = list(zip(x.split(self.eval_batch_size),
                                       y.split(self.eval_batch_size)))

    def materialise(self, candidate: Candidate, fixed_shapes: bool = False):
        """The candidate's plain net with recalibrated BN (full width when
        ``fixed_shapes``)."""
        return self.pnet.materialise(candidate, self.calibration, fixed_shapes)

    @torch.inference_mode()
    def measure(self, net) -> dict:
        """``{"accuracy", "loss"}`` of ``net`` on the validation batches (one read of the
        device at the end)."""
        correct = loss = 0
        seen = 0
        for x, y in self.validation:
            logits = net(x)
            correct += (logits.argmax(1) == y).sum()
            loss += F.cross_entropy(logits.float(), y, reduction="sum")
            seen += len(y)
        return {"accuracy": float(correct) / seen, "loss": float(loss) / seen}

    def estimates(self, candidate: Candidate) -> dict:
        """``{"accuracy", "loss"}`` of the candidate's generated weights."""
        was_training = self.pnet.training
        self.pnet.eval()
        try:
            with torch.autocast(self.device.type, torch.bfloat16,
                                enabled=self.device.type == "cuda"):
                net = self.materialise(candidate, self.fixed_shapes)
                with inference_layout(net, self.device):
                    return self.measure(net)
        finally:
            self.pnet.train(was_training)

    def __call__(self, candidate: Candidate) -> float:
        return score_of(self.estimates(candidate), self.objective)


def score_of(estimates: dict, objective: str) -> float:
    """The search's score of ``{"accuracy", "loss"}`` estimates: higher is better."""
    return estimates["accuracy"] if objective == "accuracy" else -estimates["loss"]


def entry_score(entry: dict, objective: str) -> float:
    """:func:`score_of` a report entry's estimates (``estimated_val_accuracy`` and
    ``estimated_val_loss``; runs of versions before the loss objective have no loss)."""
    return score_of({"accuracy": entry["estimated_val_accuracy"],
                     "loss": entry.get("estimated_val_loss")}, objective)


def _take(iterator, n):
    for i, item in enumerate(iterator):
        if i >= n:
            break
        yield item
