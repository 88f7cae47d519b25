"""Exporting a pruned model as a self-describing folder (DESIGN.md §4).

``config.json`` (architecture, widths per group and per layer, MACs, params, metrics, dataset,
seed, library versions, sha256 of every file), ``model.safetensors`` (weights, never a pickle),
``model.ts`` (TorchScript, loads with plain ``torch.jit.load``) and ``model.onnx`` (opset
``ONNX_OPSET``, input ``images`` and output ``logits`` with a dynamic batch dimension; loads in
onnxruntime). Every export is verified at write time: each model file, loaded back (the ONNX one
in onnxruntime, at the sample's batch size and at batch 1), must give the same logits as the
PyTorch model.
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
from pruning.checkpoint import (atomic_write_bytes, atomic_write_json, load_tensors, read_json,
                                read_tensors_metadata, save_tensors)
from pruning.modules import PrunedNet, build
from pruning.space import Candidate, ConvSpec, SearchSpace

FORMAT_VERSION = 1
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
MODEL_FILES = ("model.safetensors", "model.ts", "model.onnx")


class ExportError(RuntimeError):
    """An export whose verification failed (the written file does not reproduce the model)."""


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    from pruning import __version__

    return {"metaprune": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


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


def model_description(space: SearchSpace, candidate: Candidate) -> dict:
    """What ``config.json`` says of the network (all of it follows from the space and the
    candidate)."""
    return {"format_version": FORMAT_VERSION, "space": space.to_dict(),
            "candidate": candidate.key(), "widths": space.widths_by_group(candidate),
            "layer_widths": layer_widths(space, candidate),
            "macs": counting.macs(space, candidate), "params": counting.params(space, candidate),
            "input_shape": list(space.input_shape)}


def export_problem(folder: str | Path) -> str | None:
    """Why the export in ``folder`` is not this run's whole export (``None``: it is): a file
    that ``config.json`` lists is missing or has another sha256, ``model.safetensors`` records
    another network, or ``config.json`` does not describe, as this version would, the network
    of its space and candidate (an edited width, MACs count or input shape). A run's export
    with a problem is written again."""
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
        for name, digest in config["files"].items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if sha256_file(folder / name) != digest:
                return f"{name} does not have the sha256 config.json lists"
        space = SearchSpace.from_dict(config["space"])
        candidate = Candidate.from_key(config["candidate"])
        problem = _weights_problem(folder, config, space)
        if problem is not None:
            return problem
        described = model_description(space, candidate)
        edited = next((k for k, v in described.items() if config.get(k) != v), None)
        if edited is not None:
            return f"config.json's {edited} is not its network's"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"config.json is damaged ({type(e).__name__}: {e})"
    return None


def _weights_problem(folder: Path, config: dict, space: SearchSpace) -> str | None:
    """Whether ``model.safetensors`` is the one ``config.json`` describes: its sha256 (where
    listed) and the architecture and candidate it records."""
    digest = (config.get("files") or {}).get("model.safetensors")
    if digest is not None and sha256_file(folder / "model.safetensors") != digest:
        return "model.safetensors does not have the sha256 config.json lists"
    recorded = read_tensors_metadata(folder / "model.safetensors")
    if (recorded.get("arch"), recorded.get("candidate")) != (space.arch, config["candidate"]):
        return "model.safetensors holds another network than config.json describes"
    return None


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


def _onnx(net: nn.Module, sample: torch.Tensor) -> bytes:
    """The ONNX model of ``net`` (traced on ``sample``), batch dimension dynamic.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs only the ``onnx`` package
    (the dynamo exporter also needs ``onnxscript``) and is exact for these plain conv nets."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    too_large = ValueError(f"the network's {weights / 2**30:.2f} GiB of weights do not fit "
                           f"one ONNX file (at most 2 GiB): prune it further (TorchScript, "
                           f".ts, has no such limit)")
    if weights >= 2**31:
        raise too_large
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated upstream
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(net, (sample,), buf, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                              do_constant_folding=True)
        except RuntimeError as e:
            if "2GiB" in str(e):  # just under the limit: the graph's own bytes tip it over
                raise too_large from None
            raise
    return buf.getvalue()


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported ``model.onnx``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _verify_onnx(path: Path, sample: torch.Tensor, expected: torch.Tensor) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
        session = onnx_session(path)
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [ONNX_INPUT] or outputs != [ONNX_OUTPUT]:
            raise ExportError(f"model.onnx has inputs {inputs} and outputs {outputs}, expected "
                              f"[{ONNX_INPUT!r}] and [{ONNX_OUTPUT!r}]")
        x = sample.detach().cpu().float().contiguous().numpy()
        got = torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0])
        one = torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x[:1]})[0])
    except ExportError:
        raise
    except Exception as e:  # a malformed file or a batch size the graph does not accept
        raise ExportError(f"model.onnx does not load or run in onnxruntime: {e}") from e
    if got.shape != expected.shape or one.shape != expected[:1].shape:
        raise ExportError(f"model.onnx gives logits of shape {tuple(got.shape)} (batch 1: "
                          f"{tuple(one.shape)}), expected {tuple(expected.shape)}")
    # onnxruntime fuses conv and batch norm: allow float rounding, nothing more
    _check_close("model.onnx", expected, got, atol=1e-3, rtol=1e-3)
    _check_close("model.onnx (batch 1)", expected[:1], one, atol=1e-3, rtol=1e-3)


def _check_close(name: str, expected: torch.Tensor, got: torch.Tensor, atol=1e-4, rtol=1e-4):
    if not torch.allclose(expected, got, atol=atol, rtol=rtol):
        diff = (expected - got).abs().max().item()
        raise ExportError(f"{name} does not reproduce the model (max |Δlogit| = {diff:.3g})")


def export_model(folder: str | Path, net: PrunedNet, space: SearchSpace, candidate: Candidate, *,
                 extra: dict | None = None, sample: torch.Tensor | None = None,
                 files: dict[str, bytes] | None = None) -> dict:
    """Write ``model.safetensors``, ``model.ts``, ``model.onnx``, the extra ``files`` (name →
    content) and, last, ``config.json`` into ``folder``; verify the written model files
    reproduce ``net``'s logits on ``sample`` (random inputs if not given). ``config.json`` holds
    the sha256 of exactly the files written here, so stale files of an earlier export are never
    vouched for.
    Returns the config written."""
    for name in files or {}:
        if name == "config.json" or name in MODEL_FILES or Path(name).name != name:
            raise ValueError(f"export: {name!r} is not an allowed extra file name")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu").eval()
    if sample is None:
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(4, *space.input_shape, generator=gen)
    sample = sample.detach().to("cpu", torch.float32)
    if tuple(sample.shape[1:]) != tuple(space.input_shape):
        raise ValueError(f"export: the sample is of {tuple(sample.shape[1:])} images, the "
                         f"network's input is {tuple(space.input_shape)} (the ONNX graph would "
                         f"take only the sample's)")
    with torch.inference_mode():
        expected = net(sample)

    save_tensors(folder / "model.safetensors", net.state_dict(),
                 {"arch": space.arch, "candidate": candidate.key()})
    atomic_write_bytes(folder / "model.ts", _script(net))
    atomic_write_bytes(folder / "model.onnx", _onnx(net, sample))

    reloaded = load_pruned(folder, space=space, candidate=candidate)
    with torch.inference_mode():
        _check_close("model.safetensors", expected, reloaded(sample))
        _check_close("model.ts", expected, load_torchscript(folder / "model.ts")(sample))
    _verify_onnx(folder / "model.onnx", sample, expected)

    config = {**model_description(space, candidate), "versions": library_versions(),
              **(extra or {})}
    for name, data in (files or {}).items():
        atomic_write_bytes(folder / name, data)
    written = [*MODEL_FILES, *(files or {})]
    config["files"] = {name: sha256_file(folder / name) for name in sorted(written)}
    atomic_write_json(folder / "config.json", config)
    return config


def load_pruned(folder: str | Path, *, space: SearchSpace | None = None,
                candidate: Candidate | None = None) -> PrunedNet:
    """Rebuild a :class:`PrunedNet` from an exported folder (safetensors weights; no pickle):
    a run's ``artifacts/``, or the run folder itself."""
    folder = Path(folder)
    if folder.is_file():  # a file of the export: its folder
        folder = folder.parent
    if not (folder / "model.safetensors").is_file() and (folder / "artifacts").is_dir():
        folder = folder / "artifacts"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no exported model (no model.safetensors): give "
                                "a run's artifacts folder, e.g. runs/NAME/artifacts")
    if space is None or candidate is None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no config.json beside its "
                                    "model.safetensors: give a run's artifacts folder")
        config = read_json(folder / "config.json")
        try:
            space = SearchSpace.from_dict(config["space"])
            candidate = Candidate.from_key(config["candidate"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{folder / 'config.json'} is damaged ({type(e).__name__}: "
                             f"{e})") from None
        problem = _weights_problem(folder, config, space)
        if problem is not None:
            raise ValueError(f"the export in {folder} cannot be loaded: {problem}")
    net = build(space, candidate, device="meta")
    state, _ = load_tensors(folder / "model.safetensors")
    try:
        net.load_state_dict(state, assign=True)
    except RuntimeError as e:  # shapes or names of another network: the first line says which
        raise ValueError(f"{folder / 'model.safetensors'} holds weights of another network: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None
    return net.eval()
