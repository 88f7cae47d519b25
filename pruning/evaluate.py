"""Scoring a candidate during the search (MetaPruning §3.3).

Generate the candidate's weights once, materialise the plain pruned network, recalibrate its
BatchNorm statistics on K training batches, and measure top-1 accuracy on the held-out
sub-validation split (never the test split). The batches are drawn once and kept on the device,
so every candidate sees the same images and the only work per candidate is one weight
generation plus the forward passes of the plain pruned net — its physical limit. On CUDA the
net is computed at full width with zero-padded weights (``fixed_shapes``, see
:mod:`metanet.pruningnet`): the same scores without a new cuDNN plan per candidate.
"""

from __future__ import annotations

import torch

from metanet.pruningnet import PruningNet, fixed_shapes_default
from pruning.space import Candidate


class CandidateEvaluator:
    """``evaluator(candidate) -> accuracy`` on fixed calibration and validation batches."""

    def __init__(self, pnet: PruningNet, train_split, val_split, *, calib_batches: int = 10,
                 batch_size: int = 256, val_images: int | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", fixed_shapes: bool | None = None):
        if calib_batches < 1:
            raise ValueError("calib_batches must be at least 1")
        self.pnet = pnet
        self.device = torch.device(device)
        self.fixed_shapes = (fixed_shapes_default(self.device) if fixed_shapes is None
                             else fixed_shapes)
        calib = train_split.batches(batch_size, shuffle=True, seed=seed, device=self.device)
        self.calibration = [x for x, _ in _take(calib, calib_batches)]
        limit = len(val_split) if val_images is None else min(val_images, len(val_split))
        val = val_split.batches(batch_size, device=self.device)
        self.validation, seen = [], 0
        for x, y in val:
            if seen >= limit:
                break
            x, y = x[:limit - seen], y[:limit - seen]
            self.validation.append((x, y))
            seen += len(y)
        if not self.validation:
            raise ValueError("the validation split is empty")

    def materialise(self, candidate: Candidate, fixed_shapes: bool = False):
        """The candidate's plain net with recalibrated BN (full width when
        ``fixed_shapes``)."""
        return self.pnet.materialise(candidate, self.calibration, fixed_shapes)

    @torch.inference_mode()
    def score(self, net) -> float:
        correct = seen = 0
        for x, y in self.validation:
            correct += (net(x).argmax(1) == y).sum()
            seen += len(y)
        return float(correct) / seen

    def __call__(self, candidate: Candidate) -> float:
        was_training = self.pnet.training
        self.pnet.eval()
        try:
            with torch.autocast(self.device.type, torch.bfloat16,
                                enabled=self.device.type == "cuda"):
                return self.score(self.materialise(candidate, self.fixed_shapes))
        finally:
            self.pnet.train(was_training)


def _take(iterator, n):
    for i, item in enumerate(iterator):
        if i >= n:
            break
        yield item
