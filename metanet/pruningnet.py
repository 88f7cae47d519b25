"""PruningNet: a meta-network that generates the weights of any pruned candidate.

MetaPruning (Liu et al., ICCV 2019, §3.2): for every layer, a block of two fully connected
layers takes the *network encoding* the layer touches — the normalised widths
``c_g / c_g^max`` of its input and output groups — and emits the layer's full-size weight,
which is cropped to the candidate's widths:

    W = crop(FC₂(ReLU(FC₁(code))), [:c_out, :c_in/groups])

Only the cropped rows of FC₂ are computed (they are the only ones that reach the loss). BatchNorm
in the meta-network has no affine parameters and uses batch statistics, because the statistics
of different candidates differ; a candidate's own statistics are recalibrated later.
Training samples a random candidate each step, so every width combination gets trained weights,
and the gradient flows back through the crop into the generators.

*Fixed shapes* (the default on CUDA, :func:`fixed_shapes_default`): every candidate is
computed at full width, with the full-size generated weights whose rows past the candidate's
output width are zeroed. This is the same function with the same gradients: a zeroed output
channel stays exactly 0 through batch-statistics BN (``(0 - 0) / √(0 + ε)``), ReLU, residual
adds and pooling, so the next layer's columns past its input width meet exact zeros — they add
nothing and get no gradient, as if cropped. On a GPU it is much faster, because cuDNN builds an
execution plan for every new convolution shape and a random candidate per step is a new shape
nearly every step; on a CPU cropping does less arithmetic and wins. In this mode the candidate
enters as one small tensor (:meth:`PruningNet.fixed_inputs`: its encoding and every layer's
output width), so a whole training step has static shapes and static inputs and can be
captured in a CUDA graph (:mod:`pruning.train`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from metanet.bn import recalibrate_bn
from pruning.modules import PrunedNet, build, conv_path
from pruning.space import Candidate, Channels, ConvSpec, MaxPoolSpec, SearchSpace

BN_EPS = 1e-5  # nn.BatchNorm2d's default, so the plain net matches the meta forward
BNStats = dict[str, tuple[torch.Tensor, torch.Tensor]]

_ACT = {"relu": F.relu, "relu6": F.relu6, None: lambda x: x}


class WeightGenerator(nn.Module):
    """``FC(k → hidden) → ReLU → FC(hidden → prod(max_shape))``: ``forward`` computes only the
    crop, ``full`` the whole weight (the fixed-shape mode).

    FC₂ is stored as ``weight2[*max_shape, hidden]`` so a crop is a slice. Its weight and bias
    start uniform ±1/√fan_in (the plain layer's default bound), so the generated weights of
    every candidate start near a sensible init. The hidden vector enters FC₂ scaled by
    1/√hidden: an SGD step moves a generated weight by
    ``lr·(1 + |h|²/hidden)·∂L/∂W`` instead of ``lr·(1 + |h|²)·∂L/∂W``, so the PruningNet trains
    stably with the plain network's learning rate (a reparametrisation; the function class is
    the paper's).
    """

    def __init__(self, num_inputs: int, max_shape: tuple[int, ...], hidden: int = 32):
        super().__init__()
        self.max_shape = tuple(max_shape)
        self.fc1 = nn.Linear(num_inputs, hidden)
        self.scale = 1.0 / math.sqrt(hidden)
        self.weight2 = nn.Parameter(torch.empty(*max_shape, hidden))
        self.bias2 = nn.Parameter(torch.empty(*max_shape))
        fan_in = math.prod(max_shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias2, -bound, bound)
        nn.init.uniform_(self.weight2, -bound, bound)

    def forward(self, code: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        """The ``[:out, :inp]`` crop of the weight (only the cropped rows are computed)."""
        h = F.relu(self.fc1(code))
        return self.weight2[:out, :inp] @ (h * self.scale) + self.bias2[:out, :inp]

    def full(self, code: torch.Tensor) -> torch.Tensor:
        """The full-size weight, flattened: one fused product (the fixed-shape mode masks its
        rows; slicing would cost a copy per slice and a zero fill in the backward pass)."""
        h = F.relu(self.fc1(code))
        return torch.addmv(self.bias2.flatten(), self.weight2.flatten(0, -2), h, alpha=self.scale)


def fixed_shapes_default(device: torch.device | str) -> bool:
    """Compute candidates at full width with zero-padded weights on CUDA, cropped elsewhere
    (see the module docstring)."""
    return torch.device(device).type == "cuda"


def _key(path: str) -> str:
    return path.replace(".", "/")  # ModuleDict keys may not contain dots


class PruningNet(nn.Module):
    """The meta-network of a search space: ``forward(x, candidate)`` and ``materialise``."""

    def __init__(self, space: SearchSpace, hidden: int = 32):
        super().__init__()
        self.space = space
        self.hidden = hidden
        self.generators = nn.ModuleDict()
        self.layer_groups: dict[str, list[int]] = {}  # layer path → the groups of its code
        self._code_slices: dict[str, slice] = {}  # layer path → its part of the gathered code
        self._code_index: list[int] = []  # group indices per layer; -1 = the constant 1
        self._blocks = []  # (block, [(spec, path)], shortcut [(spec, path)] | None)
        for block in space.plan.blocks:
            body = [(s, conv_path(block, s) if isinstance(s, ConvSpec) else None)
                    for s in block.body]
            short = (None if block.shortcut is None
                     else [(s, conv_path(block, s, True)) for s in block.shortcut])
            self._blocks.append((block, body, short))
            for spec, path in body + (short or []):
                if path is not None:
                    cin = 1 if spec.depthwise else self._max(spec.cin)
                    self._add(path, (spec.cin, spec.cout),
                              (self._max(spec.cout), cin, spec.kernel, spec.kernel))
        head = space.plan.head
        self.head_path = f"{head.name}.fc"
        self._add(self.head_path, (head.cin, head.cout), (head.cout, self._max(head.cin)))
        self.classifier_bias = nn.Parameter(torch.zeros(head.cout))
        # one gather on the device gives every layer's code (no per-layer host transfers)
        self.register_buffer("code_index", torch.tensor(
            [i if i >= 0 else space.num_groups for i in self._code_index]), persistent=False)
        # fixed shapes: row r of a generated weight is kept while r < the layer's output width
        rows = max(g.max_shape[0] for g in self.generators.values())
        self.register_buffer("row_index", torch.arange(rows, dtype=torch.float32),
                             persistent=False)

    def _max(self, c: Channels) -> int:
        return c if isinstance(c, int) else self.space.max_widths[self.space.group_index[c]]

    def _add(self, path: str, refs: tuple[Channels, ...], max_shape: tuple[int, ...]) -> None:
        groups = list(dict.fromkeys(self.space.group_index[c] for c in refs if isinstance(c, str)))
        self.layer_groups[path] = groups
        start = len(self._code_index)
        self._code_index += groups or [-1]
        self._code_slices[path] = slice(start, len(self._code_index))
        self.generators[_key(path)] = WeightGenerator(max(1, len(groups)), max_shape, self.hidden)

    # --- weights ----------------------------------------------------------------------------
    def encoding(self, candidate: Candidate) -> torch.Tensor:
        """Normalised width of every group, ``c_g / c_g^max`` (the network encoding vector)."""
        return self._encoding_and_one(candidate)[:-1]

    def _encoding_and_one(self, candidate: Candidate) -> torch.Tensor:
        """The encoding followed by a constant 1 (the code of a layer that touches no group),
        sent to the device in one transfer."""
        return torch.tensor(self._code(self.space.widths(candidate))).to(
            self.code_index.device, non_blocking=True)

    def _code(self, widths: tuple[int, ...]) -> list[float]:
        return [w / m for w, m in zip(widths, self.space.max_widths)] + [1.0]

    def generate(self, candidate: Candidate, fixed_shapes: bool = False
                 ) -> dict[str, torch.Tensor]:
        """Generated weights of every conv and of the classifier, keyed by layer path; with
        ``fixed_shapes``, zero-padded to the maximum widths."""
        if fixed_shapes:
            return self._generate_fixed(self.fixed_inputs(candidate).to(
                self.code_index.device, non_blocking=True))
        codes = self._encoding_and_one(candidate)[self.code_index]
        return {path: self.generators[_key(path)](codes[self._code_slices[path]], out, inp)
                for path, (out, inp) in self._shapes(self.space.widths(candidate)).items()}

    def fixed_inputs(self, candidate: Candidate) -> torch.Tensor:
        """The candidate as the fixed-shape mode reads it, one float tensor on the CPU: the
        encoding, a constant 1, then the output width of every generated weight."""
        widths = self.space.widths(candidate)
        return torch.tensor(self._code(widths) + [out for out, _ in self._shapes(widths).values()])

    def _generate_fixed(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-size weights with the rows past each layer's output width zeroed, from
        :meth:`fixed_inputs` on the device (no Python value depends on the candidate)."""
        n = self.space.num_groups + 1
        codes, outs = inputs[:n][self.code_index], inputs[n:]
        weights, keep = {}, None
        for i, path in enumerate(self._code_slices):
            gen = self.generators[_key(path)]
            w = gen.full(codes[self._code_slices[path]])
            if keep is None:  # every layer's row mask at once, in the weights' dtype
                keep = (self.row_index < outs[:, None]).to(w.dtype)
            rows = keep[i, :gen.max_shape[0]].view(-1, *(1,) * (len(gen.max_shape) - 1))
            weights[path] = w.view(gen.max_shape) * rows
        return weights

    def _shapes(self, widths: tuple[int, ...]) -> dict[str, tuple[int, int]]:
        """(out, in / groups) of every generated weight at these widths."""
        sp = self.space
        shapes = {}
        for _, body, short in self._blocks:
            for spec, path in body + (short or []):
                if path is not None:
                    shapes[path] = (sp.resolve(spec.cout, widths),
                                    1 if spec.depthwise else sp.resolve(spec.cin, widths))
        head = sp.plan.head
        shapes[self.head_path] = (head.cout, sp.resolve(head.cin, widths))
        return shapes

    # --- meta forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, candidate: Candidate, bn_stats: BNStats | None = None,
                fixed_shapes: bool = False) -> torch.Tensor:
        """Logits of ``candidate`` with generated weights (at full width with zero-padded
        weights when ``fixed_shapes``: the same logits).

        BN uses batch statistics, or, when ``bn_stats`` (``{"<conv path>.bn": (mean, var)}``,
        as :func:`metanet.bn.bn_statistics` returns) is given, those running statistics.
        """
        return self._run(x, self.generate(candidate, fixed_shapes), bn_stats)

    def forward_fixed(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``forward(x, candidate, fixed_shapes=True)`` with the candidate given as
        ``fixed_inputs(candidate)`` on the device: static shapes, nothing read on the host."""
        return self._run(x, self._generate_fixed(inputs), None)

    def _run(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
             bn_stats: BNStats | None) -> torch.Tensor:
        for block, body, short in self._blocks:
            y = self._chain(body, x, weights, bn_stats)
            if short is not None:
                y = y + (self._chain(short, x, weights, bn_stats) if short else x)
                y = _ACT[block.act](y)
            x = y
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, weights[self.head_path], self.classifier_bias)

    @staticmethod
    def _chain(layers, x, weights, bn_stats):
        for spec, path in layers:
            if isinstance(spec, MaxPoolSpec):
                x = F.max_pool2d(x, 3, 2, 1)
                continue
            x = F.conv2d(x, weights[path], stride=spec.stride, padding=spec.kernel // 2,
                         groups=x.shape[1] if spec.depthwise else 1)
            mean, var = bn_stats[path + ".bn"] if bn_stats is not None else (None, None)
            if mean is not None and len(mean) < x.shape[1]:  # fixed shapes: pad as identity
                mean = F.pad(mean, (0, x.shape[1] - len(mean)))
                var = F.pad(var, (0, x.shape[1] - len(var)), value=1.0)
            x = F.batch_norm(x, mean, var, training=bn_stats is None, eps=BN_EPS)
            x = _ACT[spec.act](x)
        return x

    # --- materialisation --------------------------------------------------------------------
    @torch.no_grad()
    def materialise(self, candidate: Candidate,
                    calibration: Iterable[torch.Tensor] | None = None,
                    fixed_shapes: bool = False) -> PrunedNet:
        """The plain pruned network of ``candidate`` carrying the generated weights (with
        ``fixed_shapes``, the full-width network carrying them zero-padded: the same function).

        BN affine parameters are the identity (the meta BN has none); with ``calibration``
        batches, running statistics are recalibrated (:func:`metanet.bn.recalibrate_bn`), so in
        eval mode the net computes what ``forward(x, candidate, bn_statistics(net))`` does.
        Returns the net in eval mode, on this PruningNet's device.
        """
        weights = self.generate(candidate, fixed_shapes)
        net = build(self.space, self.space.largest() if fixed_shapes else candidate,
                    device="meta")
        device = self.code_index.device
        state = {}
        for name, module in net.named_modules():
            if isinstance(module, nn.Conv2d):
                state[name + ".weight"] = weights[name.removesuffix(".conv")].detach()
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                state.update({name + ".weight": torch.ones(c, device=device),
                              name + ".bias": torch.zeros(c, device=device),
                              name + ".running_mean": torch.zeros(c, device=device),
                              name + ".running_var": torch.ones(c, device=device),
                              name + ".num_batches_tracked": torch.zeros((), dtype=torch.long,
                                                                         device=device)})
        state[self.head_path + ".weight"] = weights[self.head_path].detach()
        state[self.head_path + ".bias"] = self.classifier_bias.detach().clone()
        net.load_state_dict(state, assign=True)
        if calibration is not None:
            recalibrate_bn(net, calibration)
        return net.eval()
