"""Atomic files and training checkpoints (safetensors + JSON; never pickle).

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed
over the target with ``os.replace``, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the JSON half of this module needs no PyTorch (the service's API imports it)
    import torch
    from torch import nn


class WriteRefused(Exception):
    """Raised by a :func:`write_fence` check: this thread may no longer change the files (a
    service worker whose lease on the job has ended)."""


_fence = threading.local()


@contextmanager
def write_fence(check: Callable[[], None]) -> Iterator[None]:
    """Within the block, on this thread, ``check()`` runs before every file is put in place
    (:func:`atomic_write_bytes`) or a run's outputs are deleted (:func:`check_write_fence`); it
    raises :class:`WriteRefused` to stop a writer that another has replaced, so two attempts
    of one service job never both write its run folder."""
    before = getattr(_fence, "check", None)
    _fence.check = check
    try:
        yield
    finally:
        _fence.check = before


def check_write_fence() -> None:
    check = getattr(_fence, "check", None)
    if check is not None:
        check()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        check_write_fence()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: str | os.PathLike, min_age_s: float = 600.0) -> int:
    """Delete the temporary files (``.<name>.*.tmp``) that writers killed mid-write (SIGKILL,
    OOM, power loss) left anywhere under ``folder``, if untouched for ``min_age_s``: a writer
    that is still running (one that lost its lease finishes its step) touches its file as it
    writes. Returns how many were removed."""
    removed, cutoff = 0, time.time() - min_age_s
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            if tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except OSError:
            pass  # gone meanwhile, or not ours to remove
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_bytes(obj) -> bytes:
    """``obj`` as the JSON text every file of the project uses (indented, sorted keys)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


class UnreadableFileError(ValueError):
    """A run's file is there but cannot be read back: corrupt or truncated (a disk error, a copy
    cut short; the atomic writes above never leave one)."""

    def __init__(self, path: str | os.PathLike, reason: object):
        self.path, self.reason = path, reason
        super().__init__(f"{path} is unreadable, corrupt or truncated ({reason}); restore it, "
                         "or delete it and run again to redo the step that wrote it")


def read_json(path: str | os.PathLike):
    try:
        return json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFileError(path, e) from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (tensors are made contiguous on the CPU)."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata or {}, sort_keys=True)}
    atomic_write_bytes(path, save(cpu, metadata=meta))


def read_tensors_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a :func:`save_tensors` file, from its header alone (the header check
    covers a truncated file too); raises :class:`UnreadableFileError` for a corrupt one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("json", "{}"))
    except (SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFileError(path, e) from None


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a :func:`save_tensors` file (:class:`UnreadableFileError`
    for a corrupt or truncated one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_tensors_metadata(path)
    try:
        return load_file(str(path), device=str(device)), meta
    except SafetensorError as e:
        raise UnreadableFileError(path, e) from None


def save_training_state(path: str | os.PathLike, module: nn.Module,
                        optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Module weights, buffers and per-parameter optimizer state in one safetensors file."""
    import torch

    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    names = {id(p): n for n, p in module.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{names[id(p)]}.{key}"] = value
    save_tensors(path, tensors, meta)


def load_training_state(path: str | os.PathLike, module: nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_training_state` wrote; returns its metadata."""
    device = next(module.parameters()).device
    tensors, meta = load_tensors(path, device)
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(module.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, state_key = key[6:].rpartition(".")
            optimizer.state[params[name]][state_key] = value
    return meta


def differences(old: dict, new: dict, prefix: str = ""):
    """``(dotted key, old value, new value)`` of every setting that differs between two records,
    nested ones by their own key (``budget.macs_ratio``) rather than as whole dictionaries."""
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from differences(a, b, f"{prefix}{k}.")
        elif a != b:
            yield f"{prefix}{k}", a, b
