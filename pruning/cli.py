"""The ``metaprune`` command line.

    metaprune archs                       list architectures
    metaprune space ARCH [...]            groups, levels, largest/smallest/full MACs (JSON)
    metaprune measure ARCH --widths JSON  MACs and params (and --latency) of a width assignment
    metaprune build ARCH --out model.ts   a randomly initialised pruned model (TorchScript/ONNX)
    metaprune prune [...]                 the whole MetaPruning pipeline
    metaprune train-metanet [...]         the pipeline stage by stage on a run folder --out:
    metaprune search|train|evaluate|export --out RUN
    metaprune resume --out RUN            every stage still to do, with the run's spec.json
    metaprune db upgrade [--database-url URL]   create or migrate the service's database
    metaprune serve | worker | token create|list|revoke   run the job service
    metaprune submit [prune options] | status JOB | jobs | cancel JOB | retry JOB | delete JOB |
              watch JOB | download JOB [--dest DIR]    the service's client (--server, --token)

Errors in what the user typed are reported in one line with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import unicodedata
import warnings
from pathlib import Path

from pruning import __version__, counting
from pruning.constraints import format_count, parse_count
from pruning.machine import MachineBusyError
from pruning.registry import list_archs
from pruning.space import DEFAULT_LEVELS, Candidate, SearchSpace
from pruning.spec import DATASETS, Budget, PipelineSpec, error_message, read_spec


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2."""


def _space_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("arch", help="architecture name (see `metaprune archs`)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="classifier outputs (default: %(default)s, as Fashion-MNIST)")
    p.add_argument("--in-channels", type=int, default=1,
                   help="image channels (default: %(default)s, grey; 3 for colour)")
    p.add_argument("--input-size", type=int, default=28,
                   help="image side in px (default: %(default)s; ImageNet's is 224)")
    p.add_argument("--width-mult", type=float, default=1.0,
                   help="scale the family's base widths (e.g. MobileNetV2 0.35)")
    p.add_argument("--max-width-mult", type=float, default=1.0,
                   help="search up to this multiple of the base widths (paper: 1.4)")
    p.add_argument("--channel-divisor", type=int, default=1)
    p.add_argument("--min-channels", type=int,
                   default=PipelineSpec.model_fields["min_channels"].default,
                   help="no group narrower than this (or its maximum; default: %(default)s, as "
                        "in runs, so a run's candidate keys name the same networks here)")
    p.add_argument("--scales", help="comma-separated width levels as fractions of each group's "
                                    "maximum (default: 31 levels 0.10, 0.13, …, 1.00)")


def _space(a) -> SearchSpace:
    try:
        return SearchSpace.create(a.arch, num_classes=a.num_classes, in_channels=a.in_channels,
                                  input_size=a.input_size, width_mult=a.width_mult,
                                  max_width_mult=a.max_width_mult, levels=_scales(a.scales),
                                  channel_divisor=a.channel_divisor,
                                  min_channels=a.min_channels)
    except ValueError as e:  # the space's "levels" are this command's --scales
        if str(e).startswith("levels "):
            raise UserError(f"--scales: {e}") from None
        raise


def _scales(text: str | None) -> tuple[float, ...]:
    if text is None:
        return DEFAULT_LEVELS
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--scales must be comma-separated numbers, got {text!r}") from None


def _candidate(space: SearchSpace, a) -> Candidate:
    if a.widths is not None and a.levels is not None:
        raise UserError("give either --widths or --levels, not both")
    if a.widths is not None:
        try:
            widths = json.loads(a.widths)
        except json.JSONDecodeError as e:
            raise UserError(f"--widths is not valid JSON: {e}") from None
        if not isinstance(widths, dict):
            raise UserError('--widths must be a JSON object like {"stem": 16, ...}')
        return space.from_widths(widths)
    if a.levels is not None:
        return space.check(Candidate.from_key(a.levels))
    return space.largest()


def cmd_archs(a) -> dict:
    return {"archs": list_archs(include_test=a.all)}


def cmd_space(a) -> dict:
    """The space's groups and width choices, the MACs and params of its largest and smallest
    networks, and of the full (1.0×) network that ratio budgets are relative to."""
    space = _space(a)
    full, top = space.full_network()
    return {"arch": space.arch, "settings": space.to_dict(), "levels": list(space.levels),
            "groups": [{"name": g.name, "base": g.base, "choices": list(widths)}
                       for g, widths in zip(space.groups, space.width_table)],
            "size": space.size,  # encodings; levels that round to one width are one network:
            "networks": math.prod(len(set(widths)) for widths in space.width_table),
            "max_macs": counting.macs(space, space.largest()),
            "max_params": counting.params(space, space.largest()),
            "min_macs": counting.macs(space, space.smallest()),
            "min_params": counting.params(space, space.smallest()),
            "full_network": {"macs": counting.macs(full, top),
                             "params": counting.params(full, top)}}


def cmd_measure(a) -> dict:
    space = _space(a)
    cand = _candidate(space, a)
    out = {"arch": space.arch, "input_shape": list(space.input_shape), "candidate": cand.key(),
           "widths": space.widths_by_group(cand), "macs": counting.macs(space, cand),
           "params": counting.params(space, cand)}
    if getattr(a, "latency", False) or getattr(a, "latency_table", None):
        from pruning.latency import LatencyTable, predicted_and_measured
        from pruning.modules import build

        if a.latency_table:
            table = LatencyTable.load(a.latency_table, space)
        else:
            printer = ProgressPrinter()  # measuring a table takes seconds to minutes
            try:
                table = LatencyTable.build(space, "cpu", batch=1, progress=printer)
            finally:
                printer.close()
        out["latency_ms"] = {**predicted_and_measured(table, space, cand, build(space, cand)),
                             "device": table.key["device"], "batch": 1}
    return out


def _count(option: str, text: str) -> int:
    """A count such as ``10M`` given on the command line (:func:`parse_count`)."""
    try:
        return parse_count(text)
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None


def _milliseconds(option: str, text: str) -> float:
    """A positive, finite number of milliseconds (or a ratio) given on the command line."""
    try:
        value = float(text)
    except ValueError:
        unit = (" (a plain number: milliseconds, or a ratio)" if text.strip()[-1:].isalpha()
                else "")
        raise UserError(f"{option}: not a number: {text!r}{unit}") from None
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{option}: must be a positive finite number, got {text!r}")
    return value


def cmd_build(a) -> dict:
    import torch

    from pruning.checkpoint import atomic_write_bytes
    from pruning.export import _onnx, _script
    from pruning.modules import build

    space = _space(a)
    cand = _candidate(space, a)
    if not Path(a.out).parent.is_dir():
        raise UserError(f"--out: folder {Path(a.out).parent} does not exist")
    if Path(a.out).is_dir():
        raise UserError(f"--out: {a.out} is a folder; name the file to write, e.g. "
                        f"{Path(a.out) / 'model.ts'}")
    if os.path.lexists(a.out) and (os.path.islink(a.out) or not Path(a.out).is_file()):
        raise UserError(f"--out: {a.out} is a symlink, a device or a pipe, which writing the "
                        "model would replace; name a new file or a regular one")
    torch.manual_seed(a.seed)
    net = build(space, cand).eval()
    if Path(a.out).suffix.lower() == ".onnx":
        data = _onnx(net, torch.zeros(1, *space.input_shape))
    else:
        data = _script(net)
    try:
        atomic_write_bytes(a.out, data)
    except OSError as e:  # not the temporary file's name: the user named a.out
        raise UserError(f"--out: cannot write {a.out}: {e.strerror or e}") from None
    return {"out": a.out, "input_shape": list(space.input_shape), "candidate": cand.key(),
            "macs": counting.macs(space, cand), "params": counting.params(space, cand)}


def _local_spec(a):
    """:func:`_spec` for a run on this machine: a relative ``--data-root`` or ``--metanet-from``
    made absolute, so that the stage commands and ``--resume`` find it from anywhere."""
    spec = _spec(a)
    relative = {name: os.path.abspath(value) for name in ("data_root", "metanet_from")
                if (value := getattr(spec, name)) is not None and not os.path.isabs(value)}
    return spec.model_copy(update=relative) if relative else spec


def _spec(a):
    """The :class:`PipelineSpec` that the options of ``prune`` / ``train-metanet`` describe."""
    from pydantic import ValidationError

    try:
        overrides = json.loads(a.set or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"--set is not valid JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise UserError('--set must be a JSON object like \'{"metanet": {"epochs": 2}}\'')
    clash = sorted(set(overrides) & _PRUNE_OPTIONS)
    if "metanet_from" in clash and not hasattr(a, "metanet_from"):  # submit has no such option
        raise UserError("--set may not give metanet_from: the service reuses a PruningNet by "
                        "itself, that of a job of yours with the same network, data and seed")
    if clash:
        raise UserError(f"--set may not give {', '.join(clash)}: use the command-line options")
    known = set(PipelineSpec.model_fields) - _PRUNE_OPTIONS
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"--set: unknown settings: {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known))})")
    budget = {}
    if a.max_macs is not None:
        budget["macs"] = _count("--max-macs", a.max_macs)
    if a.max_params is not None:
        budget["params"] = _count("--max-params", a.max_params)
    if a.macs_ratio is not None:
        budget["macs_ratio"] = a.macs_ratio
    if a.params_ratio is not None:
        budget["params_ratio"] = a.params_ratio
    if a.max_latency_ms is not None:
        budget["latency_ms"] = _milliseconds("--max-latency-ms", a.max_latency_ms)
    if a.latency_ratio is not None:
        budget["latency_ratio"] = _milliseconds("--latency-ratio", a.latency_ratio)
    try:
        budget = Budget(**budget) if budget else Budget(macs_ratio=0.25)
    except ValidationError as e:  # named by the option, not the field
        raise UserError(error_message(e, _BUDGET_OPTIONS)) from None
    try:
        return PipelineSpec(
            arch=a.arch, dataset=a.dataset, data_root=a.data_root, image_size=a.image_size,
            budget=budget,
            preset=a.preset, seed=a.seed, device=a.device, final_init=a.final_init,
            train_baseline=a.baseline, width_mult=a.width_mult, max_width_mult=a.max_width_mult,
            metanet_from=getattr(a, "metanet_from", None),  # not an option of `submit`
            metanet_sampling=a.metanet_sampling, **overrides)
    except ValidationError as e:
        raise UserError(error_message(e, _SPEC_OPTIONS)) from None


def _check_out(a) -> None:
    """``--out`` must be (or be made) a folder. ``--resume`` on a folder with no run starts one
    (the service's workers rely on it): say so, or a typo would quietly train everything again."""
    out = Path(a.out)
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out: {out} is a symlink to {os.readlink(out)}, which does not exist")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out: {existing} is a file, not a folder")
    if a.resume and not (out / "spec.json").exists():
        from pruning.pipeline import holds_other_files

        if not holds_other_files(out):  # else prepare refuses the folder
            print(f"metaprune: note: {a.out} holds no run to resume; starting a new one",
                  file=sys.stderr)


def cmd_prune(a) -> dict:
    from pruning.pipeline import run

    spec = _local_spec(a)
    _check_out(a)
    printer = ProgressPrinter(quiet=a.quiet)
    report = run(spec, a.out, resume=a.resume, progress=printer, should_stop=a.should_stop)
    printer.close()
    if not a.json:
        _print_summary(report, a.out)
        return {}
    return report


# --- stage commands: the pipeline one stage at a time, on a run folder ------------------------


def _saved_spec(a):
    """The specification of the run in ``--out`` (its ``spec.json``), on ``--device`` and with
    the data in ``--data-root`` if given."""
    saved = Path(a.out) / "spec.json"
    if not saved.is_file():
        raise UserError(f"{a.out} holds no run (no spec.json): start one with `metaprune "
                        f"train-metanet ... --out {a.out}` (or `metaprune prune`)")
    try:
        spec = read_spec(saved)
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.device is not None:
        spec = spec.model_copy(update={"device": a.device})
    if a.data_root is not None:
        if spec.dataset == "synthetic":
            raise UserError("the synthetic dataset is generated and reads no folder")
        spec = spec.model_copy(update={"data_root": a.data_root})
    return spec


def _stage(a, spec=None):
    """The run context of ``--out``: its ``spec.json`` (or ``spec``, for ``train-metanet``)."""
    from pruning.pipeline import prepare

    printer = ProgressPrinter(quiet=a.quiet)
    resume = a.resume if spec is not None else True
    spec = spec if spec is not None else _saved_spec(a)
    return prepare(spec, a.out, resume=resume, progress=printer,
                   should_stop=a.should_stop), printer


def cmd_resume(a) -> dict:
    """``resume``: continue the whole run in ``--out`` where it stopped, with the settings of
    its ``spec.json`` (no need to repeat the options that started it)."""
    from pruning.pipeline import run

    spec = _saved_spec(a)
    printer = ProgressPrinter(quiet=a.quiet)
    report = run(spec, a.out, resume=True, progress=printer, should_stop=a.should_stop)
    printer.close()
    if not a.json:
        _print_summary(report, a.out)
        return {}
    return report


def cmd_train_metanet(a) -> dict:
    from pruning.pipeline import stage_metanet

    spec = _local_spec(a)
    _check_out(a)
    ctx, printer = _stage(a, spec)
    stats = stage_metanet(ctx)
    printer.close()
    out = {"run": a.out, "metanet": stats}
    if ctx.spec.metanet_from is not None:
        from pruning.checkpoint import read_json

        out["metanet_from"] = read_json(ctx.path("metanet/source.json"))
    if not a.json:
        print(f"PruningNet ready in {Path(a.out) / 'metanet'}; next: metaprune search --out {a.out}")
        return {}
    return out


def cmd_search(a) -> dict:
    from pruning.pipeline import stage_search

    ctx, printer = _stage(a)
    result = stage_search(ctx)
    printer.close()
    best = result.best
    objective = result.config.objective
    out = {"run": a.out, "best": best.key, "objective": objective, "score": best.score,
           "macs": best.macs, "params": best.params, "widths": best.widths,
           "evaluated": len(result.history), "generations": result.generations}
    if objective == "accuracy":  # the key scripts read before there was a choice
        out["estimated_val_accuracy"] = best.score
    if not a.json:
        shown = (f"est. val {100 * best.score:.2f}%" if objective == "accuracy"
                 else f"est. val loss {-best.score:.4f}")
        print(f"best {best.key}: {shown}, MACs {best.macs / 1e6:.2f}M, "
              f"params {best.params / 1e3:.1f}k ({len(result.history)} evaluated); "
              f"next: metaprune train --out {a.out}")
        return {}
    return out


def cmd_train(a) -> dict:
    from pruning.pipeline import stage_train

    ctx, printer = _stage(a)
    trained = stage_train(ctx)
    printer.close()
    out = {"run": a.out, "trained": {k: str(Path(a.out) / folder / "model.safetensors")
                                     for k, folder, _ in ctx.final_trainings()}}
    if not a.json:
        print(f"trained {', '.join(trained)}; next: metaprune evaluate --out {a.out}")
        return {}
    return out


def cmd_evaluate(a) -> dict:
    from pruning.pipeline import stage_evaluate

    ctx, printer = _stage(a)
    entries = stage_evaluate(ctx)
    printer.close()
    return entries


def cmd_export(a) -> dict:
    from pruning.pipeline import stage_export

    ctx, printer = _stage(a)
    report = stage_export(ctx)
    printer.close()
    if not a.json:
        _print_summary(report, a.out, timed=False)
        return {}
    return report


_STAGE_COMMANDS = (cmd_search, cmd_train, cmd_evaluate, cmd_export, cmd_resume)  # they resume
_PIPELINE_COMMANDS = (cmd_prune, cmd_train_metanet, *_STAGE_COMMANDS)


def _run_pipeline(args) -> dict | int:
    """A pipeline command, stopped gracefully by Ctrl-C or SIGTERM (:class:`_StopOnCtrlC`):
    exit 128 + the signal's number."""
    from pruning.pipeline import unlock_run_dirs
    from pruning.train import Cancelled

    stop = _StopOnCtrlC()
    try:
        with stop as args.should_stop:
            return args.fn(args)
    except Cancelled:
        if (Path(args.out) / "spec.json").exists():
            print(f"metaprune: stopped; checkpoint saved{_how_to_continue(args)}",
                  file=sys.stderr)
        else:  # e.g. while measuring the latency table
            print("metaprune: stopped before the run began; nothing was saved", file=sys.stderr)
        return 128 + stop.signum
    finally:
        unlock_run_dirs()  # the run folder's lock (a command run in-process, as in the tests)


class _Interrupted(KeyboardInterrupt):
    """A second stop signal: leave at once (exit 128 + ``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopOnCtrlC:
    """For the pipeline commands: the first Ctrl-C (or SIGTERM, as `timeout`, `docker stop`
    and batch schedulers send) asks the pipeline to stop at its next training step or search
    generation, after saving a checkpoint there (called as ``should_stop``; the command exits
    128 + the signal's number); a second one stops at once (``KeyboardInterrupt``: the last
    periodic checkpoint remains)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self.previous: dict = {}

    def __call__(self) -> bool:
        return self.requested

    def _on_signal(self, signum, _frame) -> None:
        if self.requested:
            raise _Interrupted(signum)
        self.requested, self.signum = True, signum
        try:
            print(f"\nmetaprune: {signal.Signals(signum).name}: stopping at the next training "
                  "step or search generation, after saving a checkpoint (a second "
                  f"{'Ctrl-C' if signum == signal.SIGINT else 'signal'} stops it at once)",
                  file=sys.stderr, flush=True)
        except OSError:  # stderr gone (a log reader that died): stop all the same
            pass

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(s, handler)


def cmd_db(a) -> dict:
    """``db upgrade``: migrate the service database (default: ``METAPRUNE_DATABASE_URL``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import upgrade
    from app.settings import get_settings

    url = a.database_url or get_settings().database_url
    try:
        revision = upgrade(url)
    except SQLAlchemyError as e:
        raise UserError(f"database upgrade failed: {e.__class__.__name__}: {e}") from None
    return {"database": make_url(url).render_as_string(hide_password=True), "revision": revision}


def _log_to_stderr(quiet: bool) -> None:
    """The service's log lines (``serve``, ``worker``): time, logger, level, message."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines: migration plumbing


def cmd_worker(a) -> dict:
    """``worker``: claim and run queued jobs until SIGTERM/SIGINT (the job running then stops at
    its next checkpoint and goes back to the queue; a second signal gives it back at once and
    exits). Started by ``serve`` (``--parent-pid``), it stops the same way when ``serve`` is
    gone. It waits for a database that is unreachable (``--once``: one line, exit 2)."""
    import logging
    import signal
    import threading

    from sqlalchemy.exc import SQLAlchemyError

    from app.settings import Settings
    from app.worker import Worker, database_error

    overrides = {k: v for k, v in (("database_url", a.database_url),
                                   ("artifact_dir", a.artifact_dir)) if v is not None}
    settings = Settings(**overrides)
    if a.poll_seconds <= 0:
        raise UserError(f"--poll-seconds must be positive, got {a.poll_seconds}")
    if not 0 <= a.nice <= 19:
        raise UserError(f"--nice must be in [0, 19], got {a.nice}")
    list_archs()  # a broken $METAPRUNE_PLUGINS fails the start, not every job
    _existing_database(settings.database_url)
    _log_to_stderr(a.quiet)
    log = logging.getLogger("metaprune.worker")
    if a.nice:
        os.nice(a.nice)
    worker = Worker(settings, worker_id=a.worker_id, device=a.device)
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # the second signal: leave now (Worker.process gives the job back)
            raise SystemExit(128 + signum)
        log.info("signal %d: stopping after the current job's next checkpoint", signum)
        stop.set()

    def watch_parent():
        while not stop.wait(1.0):
            if os.getppid() != a.parent_pid:
                log.warning("serve (pid %d) is gone: stopping after the current job's next "
                            "checkpoint", a.parent_pid)
                stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    if a.parent_pid is not None:
        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    try:
        worker.check_database(wait=not a.once, stop=stop)
        n = worker.run_forever(stop, poll_seconds=a.poll_seconds, once=a.once)
    except SQLAlchemyError as e:  # --once: the claim failed (run_forever waits out the rest)
        raise UserError(f"database: {database_error(e)}") from None
    finally:
        stop.set()  # ends the parent watch
        for s, handler in previous.items():
            signal.signal(s, handler)
        worker.engine.dispose()
    return {"worker": worker.worker_id, "jobs": n} if a.json else {}


# --- client commands: the job service's REST API (pruning/client.py) --------------------------


def _api_client(a):
    """The :class:`pruning.client.ApiClient` of ``--server`` / ``--token`` (tests replace this)."""
    from pruning.client import ApiClient

    return ApiClient(a.server, a.token)


def _client_command(fn):
    """Run ``fn(a, api)`` with a client; a :class:`ClientError` becomes a :class:`UserError`,
    and SIGTERM stops it as Ctrl-C does (a download removes its temporary file)."""
    import functools

    @functools.wraps(fn)
    def wrapper(a):
        from pruning.client import ClientError

        def on_sigterm(signum, _frame):
            raise _Interrupted(signum)

        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread (tests): no handler to install
            previous = None
        try:
            with _api_client(a) as api:
                return fn(a, api)
        except ClientError as e:
            raise UserError(str(e)) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


def _percent(job: dict) -> str:
    return f"{100 * float(job.get('progress') or 0):3.0f}%"


def _result(job: dict, name: str = "metapruning") -> dict | None:
    """An entry (``metapruning`` or ``uniform``) of a succeeded job's stored result
    (``detail.result``), if any."""
    result = ((job.get("detail") or {}).get("result") or {}).get(name)
    return result if isinstance(result, dict) else None


def _entry_phrase(entry: dict) -> str:
    """``test 90.00%, MACs 1.50M, 1.23 ms`` of one result entry (what it has of them)."""
    parts = []
    if entry.get("test_accuracy") is not None:
        parts.append(f"test {100 * entry['test_accuracy']:.2f}%")
    elif entry.get("estimated_val_accuracy") is not None:
        parts.append(f"est. val {100 * entry['estimated_val_accuracy']:.2f}%")
    if entry.get("macs") is not None:
        parts.append(f"MACs {entry['macs'] / 1e6:.2f}M")
    if isinstance(entry.get("latency_ms"), dict) and entry["latency_ms"].get("measured"):
        parts.append(f"{entry['latency_ms']['measured']:.2f} ms")
    return ", ".join(parts)


def _best(job: dict) -> str:
    """Best so far (search) or the result (succeeded) beside the uniform baseline when it was
    trained, as a short phrase; '' when none."""
    result = _result(job)
    if result is not None:
        uniform = _result(job, "uniform")
        if uniform is None or uniform.get("test_accuracy") is None:
            return _entry_phrase(result)
        return f"{_entry_phrase(result)} (uniform: {_entry_phrase(uniform)})"
    best = (job.get("detail") or {}).get("best")
    if isinstance(best, dict) and best.get("score") is not None:
        text = f"best est. val {100 * best['score']:.2f}%"
        if best.get("macs") is not None:
            text += f" at {best['macs'] / 1e6:.2f}M MACs"
        return text
    return ""


def _summary_line(job: dict) -> str:
    parts = [job["id"], job["status"], f"stage {job.get('stage') or '-'}", _percent(job).strip()]
    if job.get("attempt"):
        parts.append(f"attempt {job['attempt']}")
    best = _best(job)
    if best:
        parts.append(best)
    warning = (_result(job) or {}).get("warning")
    if warning:
        parts.append(f"warning: {warning}")
    if job.get("error_kind") or job.get("error_message"):
        parts.append(f"error {job.get('error_kind') or '?'}: {job.get('error_message') or ''}")
    if job.get("waiting_reason"):
        parts.append(f"waiting: {job['waiting_reason']}")
    return "  ".join(p.strip() for p in parts)


@_client_command
def cmd_submit(a, api) -> dict:
    """``submit``: queue a job with the options of ``prune``; prints its id."""
    spec = _spec(a).model_dump(mode="json", exclude_defaults=True)
    job = api.submit(spec, idempotency_key=a.idempotency_key)
    if a.idempotency_key and job.get("status") != "queued":  # a replay of an earlier submit
        print(f"metaprune: note: --idempotency-key {a.idempotency_key!r} already queued job "
              f"{job.get('id')}, now {job.get('status')}; no new job was queued (another key "
              f"queues one)", file=sys.stderr)
    _note_waiting(job)
    if a.json:
        return job
    print(job["id"])
    return {}


def _note_waiting(job: dict) -> None:
    """Why a job just queued cannot start now (no worker running…), on stderr."""
    if job.get("waiting_reason"):
        print(f"metaprune: note: the job is queued, but {job['waiting_reason']}",
              file=sys.stderr)


@_client_command
def cmd_status(a, api) -> dict:
    job = api.job(a.job)
    if a.json:
        return job
    print(_summary_line(job))
    return {}


@_client_command
def cmd_jobs(a, api) -> dict:
    if not 1 <= a.limit <= 100:
        raise UserError(f"--limit must be 1–100, got {a.limit}")
    if a.offset < 0:
        raise UserError(f"--offset must be 0 or more, got {a.offset}")
    page = api.jobs(a.status, limit=a.limit, offset=a.offset)
    if a.json:
        return page
    rows = [("ID", "STATUS", "STAGE", "PROGRESS", "ARCH", "DATASET", "CREATED")]
    for j in page["items"]:
        spec = j.get("spec") or {}
        rows.append((j["id"], j["status"], j.get("stage") or "-", _percent(j).strip(),
                     str(spec.get("arch", "-")), str(spec.get("dataset", "-")),
                     str(j.get("created_at", ""))[:19]))
    try:
        _print_table(rows)
    except BrokenPipeError:  # `metaprune jobs | head -3`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return {}
    more = (f"; next page: --offset {page['next_offset']}"
            if page.get("next_offset") is not None else "")
    print(f"{len(page['items'])} of {page['total']} jobs{more}", file=sys.stderr)
    return {}


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows (the first: the headings) in left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@_client_command
def cmd_cancel(a, api) -> dict:
    job = api.cancel(a.job)
    if a.json:
        return job
    state = ("cancel requested (the worker stops at its next training step or search "
             "generation; a job already evaluating or exporting finishes: it succeeds)"
             if job["status"] == "running" else job["status"])
    print(f"{job['id']}: {state}")
    return {}


@_client_command
def cmd_retry(a, api) -> dict:
    """``retry``: queue a failed or cancelled job again; prints its new status."""
    job = api.retry(a.job)
    _note_waiting(job)
    if a.json:
        return job
    print(f"{job['id']}: {job['status']}")
    return {}


@_client_command
def cmd_delete(a, api) -> dict:
    """``delete``: delete a finished job and its files on the server."""
    gone = api.delete(a.job)
    if a.json:
        return gone
    freed = gone.get("freed_bytes")
    print(f"{gone['id']}: deleted" + (f" ({freed / 1e6:.1f} MB freed)" if freed is not None
                                      else ""))
    return {}


class _StderrPrinter:
    """Progress on stderr: tqdm bars on a terminal, plain lines otherwise, nothing if quiet."""

    def __init__(self, quiet: bool = False):
        self.mode = "off" if quiet else ("bars" if sys.stderr.isatty() else "lines")
        self.bar = None

    def __call__(self, update: dict) -> None:
        """Show ``update``; when stderr has gone (``… 2>&1 | head``), go quiet and carry on:
        a lost progress display must not stop a run."""
        if self.mode == "off":
            return
        try:
            self._show(update)
        except BrokenPipeError:
            self.mode, self.bar = "off", None
            sys.stderr = open(os.devnull, "w")

    def _show(self, update: dict) -> None:
        raise NotImplementedError

    def _note(self, text: str) -> None:
        """A line of its own, above the bar if one is shown."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _WatchPrinter(_StderrPrinter):
    """Job progress on stderr: a tqdm bar (0–100 %) on a TTY, plain lines otherwise."""

    def __init__(self, quiet: bool = False):
        super().__init__(quiet)
        self.last: tuple | None = None
        self.waiting_reason: str | None = None

    def _show(self, job: dict) -> None:
        reason = job.get("waiting_reason")
        if reason and reason != self.waiting_reason:
            self._note(f"metaprune: waiting: {reason}")
        self.waiting_reason = reason
        stage = job.get("stage") or ("starting" if job["status"] == "running" else "-")
        pct, best = int(100 * float(job.get("progress") or 0)), _best(job)
        if self.mode == "bars":
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=100, file=sys.stderr, unit="%", leave=True,
                                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
            self.bar.set_description_str(f"{job['status']} [{stage}]", refresh=False)
            self.bar.n = pct
            self.bar.set_postfix_str(best, refresh=True)
        elif self.mode == "lines":
            # a line when the status or stage changes, or every 10 % of progress
            key = (job["status"], stage, pct // 10)
            if key != self.last:
                self.last = key
                extra = f"  {best}" if best else ""
                eta = _eta(job.get("detail") or {}) if job["status"] == "running" else ""
                eta = f"  (stage{eta})" if eta else ""
                print(f"[{stage}] {job['status']} {pct}%{extra}{eta}", file=sys.stderr,
                      flush=True)


@_client_command
def cmd_watch(a, api) -> int | dict:
    """``watch``: poll the job until it ends; exit 0 if it succeeded, 1 if not."""
    if not (math.isfinite(a.interval) and 0 < a.interval <= 86400):
        raise UserError(f"--interval must be a number of seconds in (0, 86400], got "
                        f"{a.interval}")
    printer = _WatchPrinter(quiet=a.quiet)
    job = None
    failing = []  # the failures since the last answer: a note at the first only

    def on_retry(e) -> None:
        if not failing and printer.mode != "off":
            printer._note(f"metaprune: note: {e}; trying again (the job goes on on the "
                          "server)")
        failing.append(e)

    try:
        for job in api.watch(a.job, interval=a.interval, on_retry=on_retry):
            if failing:
                failing.clear()
                if printer.mode != "off":
                    printer._note("metaprune: note: the server answers again")
            printer(job)
    finally:
        printer.close()
    if a.json:
        print(json.dumps(job, indent=2))
    elif job["status"] == "succeeded":
        print(_summary_line(job))
    if job["status"] != "succeeded":
        print(f"metaprune: job {job['id']} {job['status']}"
              + (f": {job.get('error_kind') or 'error'}: {job.get('error_message')}"
                 if job.get("error_message") else ""), file=sys.stderr)
        return 1
    return 0


@_client_command
def cmd_download(a, api) -> dict:
    """``download``: fetch a job's artifacts into ``--dest``, each verified by its sha256."""
    dest = Path(a.dest)
    items = api.artifacts(a.job)
    if a.only is not None:
        wanted = [n.strip() for n in a.only.split(",") if n.strip()]
        if not wanted:  # not "the job has none": the option named none
            raise UserError(f"--only names no artifact ({a.only!r}); give comma-separated "
                            "names, e.g. model.onnx,report.json")
        names = {str(i.get("name")) for i in items}
        missing = [n for n in wanted if n not in names]
        if missing:
            raise UserError(f"no artifact named {', '.join(missing)} for job {a.job} "
                            f"(it has: {', '.join(sorted(names)) or 'none'})")
        items = [i for i in items if i.get("name") in wanted]
    if not items:
        raise UserError(f"job {a.job} has no artifacts (yet)")
    damaged = sorted(str(i.get("name")) for i in items if i.get("intact") is False)
    if damaged:  # the server would refuse them (409): fetch nothing rather than half a model
        intact = sorted(str(i.get("name")) for i in items if i.get("intact") is not False)
        raise UserError(f"job {a.job}: {', '.join(damaged)} changed on the server since it was "
                        f"written (sha256 mismatch with config.json); nothing was downloaded"
                        + (f" (--only {','.join(intact)} fetches the rest)" if intact else ""))
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--dest {dest} is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty() and not a.quiet
    done = []
    for item in items:
        bar = None
        if tty:
            from tqdm import tqdm

            bar = tqdm(total=item.get("size") or None, desc=str(item.get("name")), unit="B",
                       unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=True)
        try:
            path = api.download(a.job, item, dest, on_bytes=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        if not tty and not a.quiet:
            print(f"{item['name']}: {path.stat().st_size} bytes, sha256 ok", file=sys.stderr,
                  flush=True)
        done.append({"name": item["name"], "path": str(path), "size": path.stat().st_size,
                     "sha256": item["sha256"]})
    if a.json:
        return {"job": a.job, "files": done}
    for d in done:
        print(d["path"])
    return {}


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="the API's base URL (default: $METAPRUNE_SERVER, else "
                                    "http://127.0.0.1:8000)")
    p.add_argument("--token", help="API token (default: $METAPRUNE_TOKEN)")


_BUDGET_OPTIONS = {"macs": "--max-macs", "params": "--max-params", "macs_ratio": "--macs-ratio",
                   "params_ratio": "--params-ratio", "latency_ms": "--max-latency-ms",
                   "latency_ratio": "--latency-ratio"}

# PipelineSpec fields that cmd_prune sets from its own options
_PRUNE_OPTIONS = frozenset({"arch", "dataset", "data_root", "image_size", "budget", "preset",
                            "seed", "device", "final_init", "train_baseline", "width_mult",
                            "max_width_mult", "metanet_from", "metanet_sampling"})
# a spec's error names the option that set the field (--set's fields keep their own names)
_SPEC_OPTIONS = {name: "--" + name.replace("_", "-") for name in _PRUNE_OPTIONS - {"budget"}}
_SPEC_OPTIONS["train_baseline"] = "--baseline"


def _budget_text(limits: dict) -> str:
    """A report's resolved budget, e.g. ``MACs ≤ 3.21M`` or ``latency ≤ 6.25 ms``."""
    names = {"macs": "MACs", "params": "params"}
    return ", ".join(f"latency ≤ {value:.2f} ms (batch 1)" if key == "latency"
                     else f"{names.get(key, key)} ≤ {format_count(value)}"
                     for key, value in limits.items())


NOTED_BUDGET_SHARE = 0.9
"""A pick that uses less of its budget than this (and less than the uniform network) gets a
note: such picks trained better in 9 of 11 seed-runs when the search was held to it
(``search.min_budget_use`` 0.9; MobileNetV1 and V2 on the CPU, ``docs/benchmarks.md``)."""


def _print_summary(report: dict, out: str, timed: bool = True) -> None:
    """The end of ``prune`` (and ``export``, ``timed=False``: its ``elapsed_s`` is the export's
    own seconds, not the run's). A reader that has left (``metaprune prune … | head -1``) is no
    error: the run is done."""
    try:
        _write_summary(report, out, timed)
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")


def _write_summary(report: dict, out: str, timed: bool) -> None:
    from pruning.evaluate import entry_score

    mp, un = report["metapruning"], report["uniform"]
    objective = report["search"].get("objective", "accuracy")  # older runs: the only one

    def line(name, e):
        acc = f"{100 * e['test_accuracy']:.2f}%" if "test_accuracy" in e else "not trained"
        latency = e.get("latency_ms")
        latency = (f"  latency {latency['predicted']:.2f} ms predicted, "
                   f"{latency['measured']:.2f} ms measured" if latency else "")
        estimate = f"est. val {100 * e['estimated_val_accuracy']:.2f}%"
        if objective == "loss" and e.get("estimated_val_loss") is not None:  # what was ranked
            estimate = f"est. val loss {e['estimated_val_loss']:.4f} ({estimate[9:]})"
        return (f"  {name:<12} MACs {format_count(e['macs'], 4):>6}  "
                f"params {format_count(e['params'], 4):>6}  {estimate}  test {acc}{latency}")

    print(f"\n{report['arch']} on {report['dataset']}, budget {_budget_text(report['budget'])}")
    print(line("MetaPruning", mp))
    print(line("uniform", un))
    if mp["candidate"] == un["candidate"]:
        print("  (the search picked the uniform network: no better one found)")
    elif entry_score(mp, objective) < entry_score(un, objective):
        print("  note: the search's pick scores below the uniform network on the held-out "
              "images; a longer search (search.generations) or search.include_uniform finds "
              "one at least as good")
    mp_share, un_share = mp.get("budget_use"), un.get("budget_use")  # older reports lack it
    if mp_share is not None and un_share is not None and \
            mp_share < min(NOTED_BUDGET_SHARE, un_share):
        floor = json.dumps({"search": {"min_budget_use": NOTED_BUDGET_SHARE}})
        print(f"  note: the pick uses {100 * mp_share:.0f}% of the budget, the uniform network "
              f"{100 * un_share:.0f}%; to hold the search to {100 * NOTED_BUDGET_SHARE:.0f}% "
              f"of it, run again with --set '{floor}' (and --metanet-from {out} to reuse this "
              "PruningNet)")
    for name, e in (("MetaPruning", mp), ("uniform", un)):
        for warning in (e.get("warning"), (e.get("latency_ms") or {}).get("warning")):
            if warning:
                print(f"  warning: {name}: {warning}", file=sys.stderr)
    print(f"artifacts in {Path(out) / 'artifacts'}"
          + (f"  ({report['elapsed_s']:.0f} s)" if timed else ""))


def _eta(event: dict) -> str:
    """`` eta 3m05s`` for an event's (or a job detail's) ``eta_s`` of its stage; '' without."""
    eta = event.get("eta_s")
    if not isinstance(eta, int | float) or isinstance(eta, bool) or not math.isfinite(eta) \
            or eta < 0:
        return ""
    s = round(eta)
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
    return f" eta {text}"


def _done(event: dict) -> int | None:
    """Units of work finished: training steps, or search generations (numbered from 0)."""
    if "step" in event:
        return event["step"]
    return event["generation"] + 1 if "generation" in event else None


class ProgressPrinter(_StderrPrinter):
    """Progress bars on stderr for pipeline events (one bar per stage)."""

    def __init__(self, quiet: bool = False):
        super().__init__(quiet)
        self.stage = None
        self.eta_shown: set[str] = set()  # stages whose first ETA has been printed

    def _show(self, event: dict) -> None:
        stage = event.get("stage")
        if self.mode == "lines":
            self._plain(event)
            return
        from tqdm import tqdm

        total = event.get("total") or event.get("generations")
        if stage != self.stage:
            self.close()
            self.stage = stage
            if total:
                self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        if self.bar is not None:
            done = _done(event)
            if done is not None:
                self.bar.n = done
            post = {k: f"{event[k]:.4g}" for k in ("loss", "best_score") if event.get(k) is not None}
            self.bar.set_postfix(post, refresh=True)

    def _plain(self, event: dict) -> None:
        stage = event.get("stage")
        step, total = _done(event), event.get("total", event.get("generations"))
        eta = _eta(event) if step is not None and total and step < total else ""
        first_eta = bool(eta) and stage not in self.eta_shown  # soon, not at the first tenth
        if step is not None and total and stage != "done" and (
                step == total or step == 1 or step % max(1, total // 10) == 0 or first_eta):
            extra = "".join(f" {k}={event[k]:.4g}" for k in ("loss", "best_score")
                            if event.get(k) is not None)
            if eta:
                self.eta_shown.add(stage)
            print(f"[{stage}] {step}/{total}{extra}{eta}", file=sys.stderr, flush=True)
        elif event.get("message"):
            print(f"[{stage}] {event['message']}", file=sys.stderr, flush=True)


def _pipeline_args(p: argparse.ArgumentParser, local: bool = True) -> None:
    """The options of ``prune`` and ``train-metanet`` (what a run's spec.json holds); without
    ``local`` (``submit``) no run folder options: the server decides where a job runs."""
    p.add_argument("--arch", default="mobilenet_v2",
                   help="architecture (`metaprune archs` lists them, $METAPRUNE_PLUGINS adds "
                        "more; default: %(default)s)")
    p.add_argument("--dataset", default="fashion-mnist",
                   help=f"one of {', '.join(DATASETS)}; imagefolder reads a class-per-folder "
                        "tree from --data-root (default: %(default)s)")
    p.add_argument("--data-root", help="dataset folder (default: the dataset's standard place)")
    p.add_argument("--image-size", type=int,
                   help="resize the images to this square side in px (shorter side, then a "
                        "centre crop; default: the dataset's, for an image folder its most "
                        "common shorter side)")
    g = p.add_mutually_exclusive_group()  # none given: the spec's default, --macs-ratio 0.25
    g.add_argument("--max-macs", help="MACs budget, e.g. 10M")
    g.add_argument("--max-params", help="parameter budget, e.g. 500k")
    g.add_argument("--macs-ratio", type=float,
                   help="MACs budget relative to the full network (the default budget: 0.25)")
    g.add_argument("--params-ratio", type=float, help="params budget relative to the full network")
    g.add_argument("--max-latency-ms", help="latency budget in milliseconds on the run's device "
                                            "(batch 1, predicted from a measured per-layer table)")
    g.add_argument("--latency-ratio", help="latency budget relative to the full network")
    p.add_argument("--preset", default="quick", choices=["smoke", "quick", "standard", "paper"],
                   help="settings for the data, PruningNet, search and final training (README, "
                        "Presets; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, the trainings and the search (default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default: %(default)s)")
    p.add_argument("--width-mult", type=float, default=1.0,
                   help="scale the family's base widths (e.g. MobileNetV2 0.35)")
    p.add_argument("--max-width-mult", type=float,
                   help="search up to this multiple of the base widths (paper: 1.4)")
    p.add_argument("--final-init", default="scratch", choices=["scratch", "generated"],
                   help="train the winner from scratch (the paper) or fine-tune generated weights")
    p.add_argument("--baseline", action="store_true",
                   help="also train the uniform-width baseline at the same budget")
    p.add_argument("--metanet-sampling", default="uniform", choices=["uniform", "budget"],
                   help="PruningNet training candidates: uniform per group (the paper) or "
                        "biased towards the budget")
    if local:  # the service finds a reusable PruningNet among the owner's jobs by itself
        p.add_argument("--metanet-from", metavar="RUN_DIR",
                       help="reuse the trained PruningNet of this run folder (same "
                            "architecture, data, split, seed and metanet settings): only search "
                            "and final training")
    p.add_argument("--set", help='JSON overrides, e.g. \'{"metanet": {"epochs": 2}}\'')
    if local:
        p.add_argument("--out", default="runs/prune", type=_path,
                       help="run folder (checkpoints and artifacts; default: %(default)s)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

def _is_loopback(host: str) -> bool:
    """Whether ``host`` binds only to loopback (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


SHUTDOWN_GRACE_S = 5  # the longest serve waits for open requests when it stops


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)


def cmd_serve(a) -> dict:
    """``serve``: migrate the database, start N worker processes, run the API (uvicorn) until
    interrupted, then stop the workers. Binding beyond loopback forces API tokens on; on
    loopback they are off unless ``METAPRUNE_REQUIRE_AUTH`` says otherwise."""
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import upgrade
    from app.main import create_app
    from app.settings import get_settings
    from app.supervisor import WorkerProcesses

    if a.workers < 0:
        raise UserError("--workers must be 0 or more")
    list_archs()  # a broken $METAPRUNE_PLUGINS fails the start, not every job
    settings = get_settings()
    url = a.database_url or settings.database_url
    artifact_dir = Path(a.artifact_dir or settings.artifact_dir).resolve()
    update = {"database_url": url, "artifact_dir": artifact_dir}  # model_copy: no validation
    if not _is_loopback(a.host):
        update["require_auth"] = True
    elif "require_auth" not in settings.model_fields_set:  # not set, in any letter case
        update["require_auth"] = False
    settings = settings.model_copy(update=update)
    if a.workers:
        from app.worker import check_artifact_dir

        check_artifact_dir(artifact_dir)  # else each worker would fail at its start
    try:
        upgrade(url)
    except SQLAlchemyError as e:
        raise UserError(f"database upgrade failed: {e.__class__.__name__}: {e}") from None

    _log_to_stderr(a.quiet)
    app = create_app(settings)
    workers = WorkerProcesses(a.workers, url, str(artifact_dir)).start()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: make that an exit that runs
    # the `finally` below, so the workers are stopped too (`docker stop`, systemd, kill)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.shutting_down.set()  # open event streams end (they never end by themselves)
            super().handle_exit(sig, frame)

    try:
        # uvicorn's lines go to the service's log (with the time), requests' lines come from
        # app.middleware.RequestLog (with an id, a secret in a query string redacted)
        Server(uvicorn.Config(app, host=a.host, port=a.port, log_config=None, access_log=False,
                              log_level="warning" if a.quiet else "info",
                              timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: a normal stop
        pass
    finally:
        workers.stop()  # each running job stops at its next check and is re-queued
    return {}


def _existing_database(url_text: str):
    """The parsed URL of the service's database, for a command that does not make it: a SQLite
    file that is not there is one line (connecting would create an empty one, in the wrong
    place if the URL has a typo)."""
    from app.db import database_url

    url = database_url(url_text)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).exists():
        raise UserError(f"there is no database {url.database}: run `metaprune db upgrade` "
                        "first (or give --database-url)")
    return url


@contextlib.contextmanager
def _token_session(a):
    """A session on the tokens' database, committed at the end; a database error (other than a
    duplicate name, which ``token create`` reports) becomes one line."""
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError
    from sqlalchemy.orm import Session

    from app.db import make_engine
    from app.settings import get_settings
    from app.worker import database_error

    url = _existing_database(a.database_url or get_settings().database_url)
    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        engine.dispose()
        raise UserError(f"the database is unreachable: {database_error(e)}") from None
    try:
        with Session(engine) as session:
            yield session
            session.commit()
    except IntegrityError:
        raise
    except SQLAlchemyError as e:  # a database without the tables
        raise UserError(f"the tokens' table is unreachable ({e.__class__.__name__}); "
                        "run `metaprune db upgrade` first?") from None
    finally:
        engine.dispose()


def _owner_and_name(a, default_name: str | None = None) -> tuple[str, str]:
    owner, name = a.owner.strip(), (a.name or "").strip() or (default_name or "")
    if not owner:
        raise UserError("--owner must not be empty")
    if not name:
        raise UserError("--name must not be empty")
    if len(owner) > 64 or len(name) > 100:
        raise UserError("--owner takes 1–64 characters, --name 1–100")
    for flag, value in (("--owner", owner), ("--name", name)):
        if any(unicodedata.category(c)[0] == "C" for c in value):
            raise UserError(f"{flag} {value!r} holds a control character")
    return owner, name


def cmd_token_create(a) -> dict:
    """``token create``: make an API token, print it once (only its sha256 is stored)."""
    import secrets
    from datetime import datetime, timezone

    from sqlalchemy.exc import IntegrityError

    from app.auth import create_token

    owner, name = _owner_and_name(
        a, f"cli-{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{secrets.token_hex(2)}")
    try:
        with _token_session(a) as session:
            token = create_token(session, owner, name)
    except IntegrityError:
        raise UserError(f"owner {owner!r} already has a token named {name!r}") from None
    print(f"token {name!r} of {owner!r} (shown once; only its hash is stored):",
          file=sys.stderr)
    print(token)
    return {}


def cmd_token_list(a) -> dict:
    """``token list``: owners, names and creation times of the tokens, never a token."""
    from app.auth import list_tokens

    owner = (a.owner or "").strip() or None
    if len(owner or "") > 64:
        raise UserError("--owner takes 1–64 characters")
    with _token_session(a) as session:
        rows = list_tokens(session, owner)
    if a.json:
        return {"tokens": [{**r, "created_at": r["created_at"].isoformat()} for r in rows]}
    _print_table([("OWNER", "NAME", "CREATED")] + [
        (r["owner"], r["name"], f"{r['created_at']:%Y-%m-%d %H:%M:%S}") for r in rows])
    print(f"{len(rows)} tokens", file=sys.stderr)
    return {}


def cmd_token_revoke(a) -> dict:
    """``token revoke``: delete a token; its next request gets 401."""
    from app.auth import revoke_token

    owner, name = _owner_and_name(a)
    with _token_session(a) as session:
        revoked = revoke_token(session, owner, name)
    if not revoked:
        raise UserError(f"owner {owner!r} has no token named {name!r} (see `metaprune "
                        "token list`)")
    print(f"revoked token {name!r} of {owner!r}", file=sys.stderr)
    return {}


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line in one line, like every other error (not the usage). No
    abbreviated options: ``--macs 0.3`` is an error, not ``--macs-ratio 0.3`` (a typo for
    ``--max-macs`` would otherwise start a long run under another budget)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})
        # `--max-macs -5k` is a (bad) value, not an unknown option: the option's own check
        # then says what is wrong with it (argparse takes only plain numbers for values)
        self._negative_number_matcher = re.compile(r"^-(\d[\d_.]*|\.\d+)([eE][-+]?\d+)?[a-zA-Z]?$")

    def error(self, message: str):
        self.exit(2, f"metaprune: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported by the subcommand it was given to
        (its ``--help`` is the one to read)."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            parser = self
            while True:  # down to the (sub)subcommand that was given
                sub = next((a for a in parser._actions
                            if isinstance(a, argparse._SubParsersAction)), None)
                chosen = sub and sub.choices.get(getattr(ns, sub.dest, None))
                if chosen is None:
                    break
                parser = chosen
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {text!r}")
    return port


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metaprune", description="MetaPruning channel pruning: the command "
                                                   "line and the job service's client")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("archs", help="list architectures")
    p.add_argument("--all", action="store_true", help="include the tiny test_* architectures")
    p.set_defaults(fn=cmd_archs)

    p = sub.add_parser("space", help="describe a search space (JSON)")
    _space_args(p)
    p.set_defaults(fn=cmd_space)

    for name, fn, help_ in (("measure", cmd_measure, "MACs and params of a width assignment"),
                            ("build", cmd_build, "a randomly initialised pruned model as TorchScript "
                                                 "(ONNX for an --out ending in .onnx)")):
        p = sub.add_parser(name, help=help_)
        _space_args(p)
        p.add_argument("--widths", help='JSON object of group widths, e.g. \'{"stem": 8, ...}\'')
        p.add_argument("--levels", help="level index per group, e.g. 30-12-4-...")
        if name == "measure":
            p.add_argument("--latency", action="store_true",
                           help="add predicted (per-layer table) and measured latency on the "
                                "CPU, batch 1 (the table is built once and cached)")
            p.add_argument("--latency-table", metavar="FILE",
                           help="predict with this table instead (e.g. a run folder's "
                                "latency_table.json; implies --latency)")
        if name == "build":
            p.add_argument("--out", required=True, type=_path,
                           help="file to write: TorchScript, or ONNX if it ends in .onnx")
            p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)

    for name, fn, help_ in (
            ("prune", cmd_prune, "run the whole MetaPruning pipeline"),
            ("train-metanet", cmd_train_metanet, "stage 1: train (or reuse) the PruningNet of a "
                                                 "new run folder")):
        p = sub.add_parser(name, help=help_)
        _pipeline_args(p)
        p.set_defaults(fn=fn)
    for name, fn, help_ in (
            ("search", cmd_search, "stage 2: the evolutionary search of a run folder"),
            ("train", cmd_train, "stage 3: train the winner (and the baseline) of a run folder"),
            ("evaluate", cmd_evaluate, "stage 4: test accuracy of a run folder's trained "
                                       "networks (JSON)"),
            ("export", cmd_export, "stage 5: export the winner and write the artifacts"),
            ("resume", cmd_resume, "continue a run folder's whole run where it stopped (its "
                                   "spec.json gives the settings)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--out", required=True, type=_path,
                       help="the run folder (its spec.json is used)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help="run on another device than the run's")
        p.add_argument("--data-root", type=_path,
                       help="the run's data has moved here (the same images: checked, then "
                            "recorded in spec.json)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--json", action="store_true", help="print the result as JSON"
                       + (" (evaluate always does)" if name == "evaluate" else ""))
        p.set_defaults(fn=fn)

    p = sub.add_parser("db", help="the service database")
    p.add_argument("action", choices=["upgrade"], help="upgrade: apply the migrations (to head)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: $METAPRUNE_DATABASE_URL, "
                                          "else sqlite:///./metaprune.db)")
    p.set_defaults(fn=cmd_db)

    p = sub.add_parser("serve", help="run the REST API (and worker processes) on this machine")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (beyond loopback, API tokens are required)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes to start beside the API (0: API only)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: $METAPRUNE_DATABASE_URL, "
                                          "else sqlite:///./metaprune.db)")
    p.add_argument("--artifact-dir", help="job run folders (default: $METAPRUNE_ARTIFACT_DIR, "
                                          "else ./artifacts), for the API and its workers")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("token", help="API tokens of the service")
    tsub = p.add_subparsers(dest="token_command", required=True)
    database = {"help": "SQLAlchemy URL (default: $METAPRUNE_DATABASE_URL, else "
                        "sqlite:///./metaprune.db)"}
    t = tsub.add_parser("create", help="make a token and print it once")
    t.add_argument("--owner", required=True, help="whose jobs the token acts on")
    t.add_argument("--name", help="a label, unique per owner (default: cli-<time>-<random>)")
    t.add_argument("--database-url", **database)
    t.set_defaults(fn=cmd_token_create)
    t = tsub.add_parser("list", help="owners, names and dates of the tokens (never a token)")
    t.add_argument("--owner", help="only this owner's tokens")
    t.add_argument("--json", action="store_true", help="print the list as JSON")
    t.add_argument("--database-url", **database)
    t.set_defaults(fn=cmd_token_list)
    t = tsub.add_parser("revoke", help="delete a token: its next request gets 401")
    t.add_argument("--owner", required=True, help="whose token it is")
    t.add_argument("--name", required=True, help="the token's name (see `token list`)")
    t.add_argument("--database-url", **database)
    t.set_defaults(fn=cmd_token_revoke)

    p = sub.add_parser("worker", help="run queued service jobs (until SIGTERM/SIGINT)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: $METAPRUNE_DATABASE_URL)")
    p.add_argument("--artifact-dir", help="job run folders (default: $METAPRUNE_ARTIFACT_DIR); "
                                          "shared by every worker and the API")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: each job's own device setting; cpu/cuda: every job there")
    p.add_argument("--once", action="store_true",
                   help="process at most one job, then exit")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="wait between looks at an empty queue")
    p.add_argument("--worker-id", help="this worker's name in leases (default: host:pid:random)")
    p.add_argument("--nice", type=int, default=0,
                   help="lower this process's CPU priority by N (serve's workers: 10)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # serve's: stop without it
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.add_argument("--json", action="store_true", help="print the number of jobs run as JSON")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("submit", help="queue a pruning job on the service (the options of "
                                      "`prune`); prints its id")
    _pipeline_args(p, local=False)
    p.add_argument("--idempotency-key", type=_path,
                   help="the same key gives back the same job (safe retry)")
    _client_args(p)
    p.set_defaults(fn=cmd_submit)
    for name, fn, help_ in (("status", cmd_status, "a job's status on one line (or --json)"),
                            ("cancel", cmd_cancel, "cancel a job"),
                            ("retry", cmd_retry, "queue a failed or cancelled job again; it "
                                                 "resumes from its last checkpoint"),
                            ("delete", cmd_delete, "delete a finished job with its checkpoints "
                                                   "and artifacts (download them first)"),
                            ("watch", cmd_watch, "follow a job until it ends (exit 0: "
                                                 "succeeded, 1: failed or cancelled)"),
                            ("download", cmd_download, "download a job's artifacts, verifying "
                                                       "each sha256")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job", help="the job id")
        if name == "watch":
            p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
        if name == "download":
            p.add_argument("--dest", default=".", help="folder to write into (made if missing)")
            p.add_argument("--only", help="comma-separated artifact names, e.g. "
                                          "model.onnx,report.json")
        if name in ("watch", "download"):
            p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        _client_args(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("jobs", help="list your jobs on the service, newest first")
    p.add_argument("--status", action="append",
                   choices=["queued", "running", "succeeded", "failed", "cancelled"],
                   help="only jobs in this status (repeatable)")
    p.add_argument("--limit", type=int, default=20, help="jobs per page (1–100)")
    p.add_argument("--offset", type=int, default=0, help="skip this many (see next_offset)")
    p.add_argument("--json", action="store_true", help="print the page as JSON")
    _client_args(p)
    p.set_defaults(fn=cmd_jobs)
    return parser


_OUR_PACKAGES = tuple(Path(__file__).resolve().parents[1] / name
                      for name in ("pruning", "metanet", "app"))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The project's own warnings as one line, like its errors; others as Python shows them."""
    if any(Path(filename).resolve().is_relative_to(p) for p in _OUR_PACKAGES):
        print(f"metaprune: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    try:
        out = _run_pipeline(args) if args.fn in _PIPELINE_COMMANDS else args.fn(args)
    except (UserError, ValueError, KeyError, OSError, MachineBusyError,
            FloatingPointError) as e:  # FloatingPointError: training diverged (it says so)
        message = error_message(e, _setting_names(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            message = f"no space left on the device ({message}){_how_to_continue(args)}"
        print(f"metaprune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"metaprune: interrupted{_how_to_continue(args)}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    if isinstance(out, int) and not isinstance(out, bool):  # an exit status (`watch`)
        return out
    if out:
        try:
            print(json.dumps(out, indent=2))
        except BrokenPipeError:  # `metaprune space … | head`: the reader left; not an error
            sys.stderr = open(os.devnull, "w")
    return 0


def _setting_names(e: BaseException) -> dict[str, str] | None:
    """A service setting that does not validate is named by the environment variable that gave
    it (``METAPRUNE_LEASE_SECONDS``, not ``lease_seconds``)."""
    if type(e).__name__ != "ValidationError" or getattr(e, "title", None) != "Settings":
        return None
    from app.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    return {name: prefix + name.upper() for name in Settings.model_fields}


def _how_to_continue(args) -> str:
    """How a run stopped midway continues from its last checkpoint, if it wrote one:
    ``prune`` and ``train-metanet`` with ``--resume`` (or ``resume``), the later stage commands
    and ``resume`` by running them again."""
    if getattr(args, "resume", None) is not None:
        return ("; to continue where it stopped, run the same command with --resume (or "
                f"`metaprune resume --out {args.out}`)")
    if getattr(args, "fn", None) in _STAGE_COMMANDS:
        return "; to continue where it stopped, run the same command again"
    return ""


if __name__ == "__main__":
    sys.exit(main())
