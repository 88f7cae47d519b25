"""Exporting a pruned model as a self-describing folder (DESIGN.md §4).

``config.json`` (architecture, widths per group and per layer, MACs, params, metrics, dataset,
seed, library versions, sha256 of every file), ``model.safetensors`` (weights, never a pickle)
and ``model.ts`` (TorchScript, loads with plain ``torch.jit.load``). Every export is verified at
write time: the TorchScript file, loaded back, must give the same logits as the PyTorch model.
"""

from __future__ import annotations

import hashlib
import io
import platform
import warnings
from pathlib import Path

import torch
from torch import nn

from pruning import counting
from pruning.checkpoint import atomic_write_bytes, atomic_write_json, load_tensors, read_json, save_tensors
from pruning.modules import PrunedNet, build
from pruning.space import Candidate, ConvSpec, SearchSpace

FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """An export whose verification failed (the written file does not reproduce the model)."""


def library_versions() -> dict[str, str]:
    import torchvision

    from pruning import __version__

    return {"metaprune": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def layer_widths(space: SearchSpace, candidate: Candidate) -> dict[str, dict[str, int]]:
    """``{conv path: {"in": c_in, "out": c_out}}`` for every conv and the classifier."""
    from pruning.modules import conv_path

    widths = space.widths(candidate)
    out = {}
    for block in space.plan.blocks:
        for in_short, layers in ((False, block.body), (True, block.shortcut or ())):
            for spec in layers:
                if isinstance(spec, ConvSpec):
                    out[conv_path(block, spec, in_short)] = {
                        "in": space.resolve(spec.cin, widths), "out": space.resolve(spec.cout, widths)}
    head = space.plan.head
    out[f"{head.name}.fc"] = {"in": space.resolve(head.cin, widths), "out": head.cout}
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _script(net: nn.Module) -> bytes:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but still the format
        warnings.simplefilter("ignore", FutureWarning)  # that loads with no project code
        scripted = torch.jit.script(net)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _check_close(name: str, expected: torch.Tensor, got: torch.Tensor, atol=1e-4, rtol=1e-4):
    if not torch.allclose(expected, got, atol=atol, rtol=rtol):
        diff = (expected - got).abs().max().item()
        raise ExportError(f"{name} does not reproduce the model (max |Δlogit| = {diff:.3g})")


def export_model(folder: str | Path, net: PrunedNet, space: SearchSpace, candidate: Candidate, *,
                 extra: dict | None = None, sample: torch.Tensor | None = None,
                 files: dict[str, bytes] | None = None) -> dict:
    """Write ``model.safetensors``, ``model.ts``, the extra ``files`` (name → content) and, last,
    ``config.json`` into ``folder``; verify the written model files reproduce ``net``'s logits on
    ``sample`` (random inputs if not given). ``config.json`` holds the sha256 of exactly the
    files written here, so stale files of an earlier export are never vouched for.
    Returns the config written."""
    for name in files or {}:
        if name in ("config.json", "model.safetensors", "model.ts") or Path(name).name != name:
            raise ValueError(f"export: {name!r} is not an allowed extra file name")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu").eval()
    args = space.arch_args
    if sample is None:
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(4, args.get("in_channels", 3), args.get("input_size", 224),
                             args.get("input_size", 224), generator=gen)
    with torch.inference_mode():
        expected = net(sample)

    save_tensors(folder / "model.safetensors", net.state_dict(),
                 {"arch": space.arch, "candidate": candidate.key()})
    atomic_write_bytes(folder / "model.ts", _script(net))

    reloaded = load_pruned(folder, space=space, candidate=candidate)
    with torch.inference_mode():
        _check_close("model.safetensors", expected, reloaded(sample))
        _check_close("model.ts", expected, load_torchscript(folder / "model.ts")(sample))

    config = {
        "format_version": FORMAT_VERSION,
        "space": space.to_dict(),
        "candidate": candidate.key(),
        "widths": space.widths_by_group(candidate),
        "layer_widths": layer_widths(space, candidate),
        "macs": counting.macs(space, candidate),
        "params": counting.params(space, candidate),
        "input_shape": [args.get("in_channels", 3), args.get("input_size", 224),
                        args.get("input_size", 224)],
        "versions": library_versions(),
        **(extra or {}),
    }
    for name, data in (files or {}).items():
        atomic_write_bytes(folder / name, data)
    written = ["model.safetensors", "model.ts", *(files or {})]
    config["files"] = {name: sha256_file(folder / name) for name in sorted(written)}
    atomic_write_json(folder / "config.json", config)
    return config


def load_pruned(folder: str | Path, *, space: SearchSpace | None = None,
                candidate: Candidate | None = None) -> PrunedNet:
    """Rebuild a :class:`PrunedNet` from an exported folder (safetensors weights; no pickle)."""
    folder = Path(folder)
    if space is None or candidate is None:
        config = read_json(folder / "config.json")
        space = SearchSpace.from_dict(config["space"])
        candidate = Candidate.from_key(config["candidate"])
    net = build(space, candidate, device="meta")
    state, _ = load_tensors(folder / "model.safetensors")
    net.load_state_dict(state, assign=True)
    return net.eval()
