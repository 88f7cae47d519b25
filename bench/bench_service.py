"""Service load: status polls and job submissions from N concurrent clients on loopback while a
worker trains, on SQLite and on PostgreSQL; prints one JSON object.

For each backend the real server runs as a subprocess (``metaprune serve --workers 1`` with API
tokens required, in a temporary folder). A long PruningNet training job is submitted first and
the measurement starts once the worker is in its ``metanet`` stage; then ``--clients``
concurrent clients send ``GET /v1/jobs/{id}`` status polls (of the training job and of other
queued jobs of the same owner) and, a ``--submit-fraction`` of the time, ``POST /v1/jobs``
submissions, for ``--duration-s`` seconds per load. A load is an ``--interval-ms`` value: 0 is a
closed loop (each client sends its next request as soon as the previous one is answered: the
saturation throughput), a positive value paces each client to one request per interval (latency
is then counted from the request's scheduled time, so a stalled server is not hidden). Any
non-2xx answer or failed request is an error. The load generator runs on the same machine as the
server and the training worker and shares their CPU.

    .venv/bin/python bench/bench_service.py                     # both backends, 100 clients
    .venv/bin/python bench/bench_service.py --db sqlite --clients 5 --duration-s 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_DEFAULT_URL = os.environ.get("METAPRUNE_TEST_POSTGRES_URL",
                                "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TRAINING_STAGE = "metanet"


# --- machine and process accounting -----------------------------------------------------------


def machine_info() -> dict:
    from pruning.machine import cpu_model

    model = cpu_model()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": usable, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg())}


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``; empty elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of all cores, wall seconds) so far, from ``/proc/stat``."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, time.monotonic()
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


class CpuMeter:
    """CPU seconds used by the API process, the worker process(es) and this client over a
    window, and how busy the whole machine was (other people's work included)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid

    def snapshot(self) -> dict:
        pids = _children(self.server_pid)
        busy, wall = machine_busy_seconds()
        return {"api": cpu_seconds(self.server_pid),
                "worker": sum(cpu_seconds(p) for p in pids if p != self.server_pid),
                "client": time.process_time(), "busy": busy, "wall": wall}

    @staticmethod
    def between(start: dict, end: dict) -> dict:
        wall = max(end["wall"] - start["wall"], 1e-9)
        out = {k: round(end[k] - start[k], 2) for k in ("api", "worker", "client")}
        out["machine_busy_cores"] = round((end["busy"] - start["busy"]) / wall, 2)
        return out


# --- a minimal HTTP/1.1 keep-alive client (cheap on the shared CPU) ---------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection: a few microseconds of Python per request, so that the
    load generator takes as little CPU as possible from the server it measures."""

    def __init__(self, host: str, port: int, token: str):
        self.host, self.port = host, port
        self.fixed = (f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                      "Accept: application/json\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if body is not None:
            extra += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        try:
            self.writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + self.fixed
                              + extra.encode() + b"\r\n" + (body or b""))
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    fields[name.strip().lower()] = value.strip()
            if "content-length" in fields:
                data = await self.reader.readexactly(int(fields["content-length"]))
            elif fields.get("transfer-encoding", "").lower() == "chunked":
                data = await self._chunked()
            else:
                raise ConnectionError("response without a length")
            if fields.get("connection", "").lower() == "close":
                self.close()
            return status, data
        except BaseException:
            self.close()
            raise

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class HttpxConnection:
    """The same interface over a shared ``httpx.AsyncClient`` (``--client httpx``)."""

    def __init__(self, client, token: str):
        self.client, self.auth = client, {"Authorization": f"Bearer {token}"}

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        h = {**self.auth, **(headers or {})}
        if body is not None:
            h["Content-Type"] = "application/json"
        r = await self.client.request(method, path, content=body, headers=h)
        return r.status_code, r.content

    def close(self) -> None:
        pass


# --- the load -----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]) of an ascending list."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summarise(samples: list[tuple[float, float]], errors: dict[str, int], window_s: float,
              goal_ms: float = 50.0) -> dict:
    """Counts and latency percentiles of ``(start offset s, latency s)`` samples; the slowest
    five with their start offsets show whether slow requests cluster in time (a stall)."""
    ms = sorted(lat * 1000 for _, lat in samples)
    slowest = sorted(samples, key=lambda x: -x[1])[:5]
    n_err = sum(errors.values())
    count = len(ms) + sum(v for k, v in errors.items() if not k.startswith("HTTP "))
    r = lambda v: None if v is None else round(v, 2)  # noqa: E731
    return {"count": count, "throughput_per_s": round(count / window_s, 1),
            "p50_ms": r(percentile(ms, 0.5)), "p90_ms": r(percentile(ms, 0.9)),
            "p99_ms": r(percentile(ms, 0.99)), "max_ms": r(ms[-1] if ms else None),
            "over_goal": sum(v > goal_ms for v in ms),
            "slowest": [[round(t, 2), round(lat * 1000, 1)] for t, lat in slowest],
            "errors": n_err, "error_kinds": dict(sorted(errors.items()))}


class Load:
    """``clients`` concurrent clients; each owner's job ids are shared by its clients, so
    a client's polls also reach jobs that its neighbours submitted."""

    def __init__(self, a, tokens: list[str], jobs_by_owner: list[list[str]], training_job: str,
                 interval_s: float):
        self.a, self.tokens = a, tokens
        self.jobs_by_owner, self.training_job = jobs_by_owner, training_job
        self.interval_s = interval_s
        self.lat = {"poll": [], "submit": []}
        self.err = {"poll": {}, "submit": {}}
        self.training_polls = 0
        self.submitted = 0

    def spec_body(self, rng: random.Random) -> bytes:
        return json.dumps({"arch": self.a.submit_arch, "dataset": "synthetic", "preset": "smoke",
                           "budget": {"macs_ratio": 0.5}, "device": "cpu",
                           "seed": rng.randrange(2**31)}).encode()

    async def client(self, i: int, conn, start: float, deadline: float, record: bool) -> None:
        rng = random.Random(i)
        owner = i % len(self.tokens)
        jobs = self.jobs_by_owner[owner]
        # stagger paced clients over one interval, so that they do not fire in lockstep
        due = start + (rng.random() * self.interval_s if self.interval_s else 0.0)
        while True:
            if self.interval_s:
                if due >= deadline:
                    return
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            t0 = due if self.interval_s else time.perf_counter()
            if t0 >= deadline:
                return
            submit = rng.random() < self.a.submit_fraction
            kind = "submit" if submit else "poll"
            job = None if submit else rng.choice(jobs)
            try:
                if submit:
                    status, body = await asyncio.wait_for(conn.request(
                        "POST", "/v1/jobs", self.spec_body(rng),
                        {"Idempotency-Key": uuid.uuid4().hex}), self.a.timeout_s)
                else:
                    status, body = await asyncio.wait_for(
                        conn.request("GET", f"/v1/jobs/{job}"), self.a.timeout_s)
                elapsed = time.perf_counter() - t0
                if record:
                    self.lat[kind].append((t0 - start, elapsed))
                    if not 200 <= status < 300:
                        key = f"HTTP {status}"
                        self.err[kind][key] = self.err[kind].get(key, 0) + 1
                if submit and 200 <= status < 300:
                    jobs.append(json.loads(body)["id"])
                    self.submitted += record
                if record and job == self.training_job:
                    self.training_polls += 1
            except Exception as e:  # noqa: BLE001 — any failed request is an error, counted
                if record:
                    key = type(e).__name__
                    self.err[kind][key] = self.err[kind].get(key, 0) + 1
            if self.interval_s:
                due += self.interval_s

    async def run(self, connections: list, seconds: float, record: bool) -> float:
        start = time.perf_counter()  # not loop.time(): uvloop's clock ticks in milliseconds
        await asyncio.gather(*(self.client(i, c, start, start + seconds, record)
                               for i, c in enumerate(connections)))
        return time.perf_counter() - start


async def measure(a, port: int, tokens: list[str], jobs_by_owner: list[list[str]],
                  training_job: str, interval_s: float, meter: CpuMeter) -> dict:
    """Warm up (connections opened, results dropped), then one timed window."""
    load = Load(a, tokens, jobs_by_owner, training_job, interval_s)
    httpx_client = None
    if a.client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=a.clients, max_keepalive_connections=a.clients)
        httpx_client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                         timeout=a.timeout_s)
        conns = [HttpxConnection(httpx_client, tokens[i % len(tokens)]) for i in range(a.clients)]
    else:
        conns = [RawConnection("127.0.0.1", port, tokens[i % len(tokens)])
                 for i in range(a.clients)]
    try:
        if a.warmup_s > 0:
            await load.run(conns, a.warmup_s, record=False)
        cpu0 = meter.snapshot()
        window = await load.run(conns, a.duration_s, record=True)
        cpu = CpuMeter.between(cpu0, meter.snapshot())
    finally:
        for c in conns:
            c.close()
        if httpx_client is not None:
            await httpx_client.aclose()
    return {"interval_ms": round(interval_s * 1000, 3),
            "mode": "paced" if interval_s else "closed loop",
            "offered_per_s": round(a.clients / interval_s, 1) if interval_s else None,
            "window_s": round(window, 2),
            "polls": summarise(load.lat["poll"], load.err["poll"], window),
            "submissions": summarise(load.lat["submit"], load.err["submit"], window),
            "training_job_polls": load.training_polls, "jobs_submitted": load.submitted,
            "cpu_seconds": cpu}


# --- the server under test ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict, cwd: Path) -> str:
    """Run ``metaprune ARGS`` (as ``python -m pruning.cli``); its stdout."""
    proc = subprocess.run([sys.executable, "-m", "pruning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"metaprune {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def api(port: int, token: str, method: str, path: str, body: dict | None = None) -> dict:
    """One untimed request of the harness (set-up, checks, cancel)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s} s: {log.read_text()[-2000:]}")


def wait_training(port: int, token: str, job: str, timeout_s: float) -> dict:
    t_end = time.monotonic() + timeout_s
    while True:
        j = api(port, token, "GET", f"/v1/jobs/{job}")
        if j["status"] == "running" and j["stage"] == TRAINING_STAGE:
            return j
        if j["status"] in ("succeeded", "failed", "cancelled"):
            raise RuntimeError(f"training job ended before the measurement: {j['status']} "
                               f"{j.get('error_kind')}: {j.get('error_message')}")
        if time.monotonic() > t_end:
            raise RuntimeError(f"worker not training after {timeout_s} s: {j['status']} "
                               f"{j['stage']}")
        time.sleep(0.25)


def job_state(j: dict) -> dict:
    return {"status": j["status"], "stage": j["stage"], "progress": round(j["progress"], 4),
            "detail": j["detail"]}


@contextmanager
def postgres_database(admin_url: str):
    """A fresh, empty database on the server of ``admin_url``; dropped afterwards."""
    from sqlalchemy import make_url, text

    from app.db import make_engine

    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT",
                        connect_args={"connect_timeout": 5})
    name = f"metaprune_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 — say which server, not a driver traceback
        admin.dispose()
        u = make_url(admin_url)
        raise SystemExit(f"bench_service: cannot create a database on PostgreSQL at "
                         f"{u.host}:{u.port} ({type(e).__name__}); see --postgres-url") from None
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in reversed(_children(proc.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait()


def run_backend(a, backend: str, url: str, workdir: Path) -> dict:
    """Serve on ``url``, start the training job, run every load; the backend's results."""
    env = {**os.environ, "METAPRUNE_DATABASE_URL": url,
           "METAPRUNE_ARTIFACT_DIR": str(workdir / "artifacts"),
           "METAPRUNE_REQUIRE_AUTH": "true",
           "METAPRUNE_MAX_QUEUED_PER_OWNER": str(a.max_queued),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.monotonic()
    cli("db", "upgrade", env=env, cwd=workdir)
    makers = [subprocess.Popen([sys.executable, "-m", "pruning.cli", "token", "create",
                                "--owner", f"bench-{k}", "--name", "bench"], cwd=workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for k in range(a.owners)]
    tokens = []
    for p in makers:
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"token create failed: {err.strip()[-2000:]}")
        tokens.append(out.strip().splitlines()[-1])
    port = free_port()
    log = workdir / f"serve-{backend}.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "pruning.cli", "serve", "--host",
                                   "127.0.0.1", "--port", str(port), "--workers",
                                   str(a.workers), "--quiet"],
                                  cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, server, a.ready_timeout_s, log)
        spec = {"arch": a.train_arch, "width_mult": a.train_width_mult, "dataset": "synthetic",
                "preset": "smoke", "budget": {"macs_ratio": 0.5}, "device": "cpu",
                "metanet": {"epochs": 10_000}}
        training_job = api(port, tokens[0], "POST", "/v1/jobs", spec)["id"]
        jobs_by_owner = [[training_job] if k == 0 else [] for k in range(a.owners)]
        rng = random.Random(0)
        for k in range(a.owners):
            for _ in range(a.seed_jobs):
                body = {"arch": a.submit_arch, "dataset": "synthetic", "preset": "smoke",
                        "budget": {"macs_ratio": 0.5}, "device": "cpu",
                        "seed": rng.randrange(2**31)}
                jobs_by_owner[k].append(api(port, tokens[k], "POST", "/v1/jobs", body)["id"])
        before = (wait_training(port, tokens[0], training_job, a.train_timeout_s) if a.workers
                  else api(port, tokens[0], "GET", f"/v1/jobs/{training_job}"))
        setup_s = time.monotonic() - t0
        meter = CpuMeter(server.pid)
        loads = []
        for interval_ms in a.interval_ms:
            at_start = job_state(api(port, tokens[0], "GET", f"/v1/jobs/{training_job}"))
            result = asyncio.run(measure(a, port, tokens, jobs_by_owner, training_job,
                                         interval_ms / 1000, meter))
            at_end = job_state(api(port, tokens[0], "GET", f"/v1/jobs/{training_job}"))
            result["training_job"] = {
                "at_start": at_start, "at_end": at_end,
                "training_throughout": all(s["status"] == "running"
                                           and s["stage"] == TRAINING_STAGE
                                           for s in (at_start, at_end))}
            loads.append(result)
            print(f"[bench_service] {backend} interval {interval_ms} ms: polls p99 "
                  f"{result['polls']['p99_ms']} ms, {result['polls']['throughput_per_s']}/s",
                  file=sys.stderr)
        cancel = api(port, tokens[0], "POST", f"/v1/jobs/{training_job}/cancel")
        return {"database": backend, "setup_s": round(setup_s, 1),
                "training_job": {"id": training_job, "arch": a.train_arch,
                                 "width_mult": a.train_width_mult,
                                 "when_measurement_began": job_state(before),
                                 "cancel_answer": cancel["status"]},
                "loads": loads}
    finally:
        stop(server)


def parse_intervals(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError("comma-separated milliseconds ≥ 0, e.g. 0,1000")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both",
                    help="backend(s), one after the other")
    ap.add_argument("--postgres-url", default=PG_DEFAULT_URL,
                    help="PostgreSQL server (admin database) on which a throw-away database is "
                         "created and dropped afterwards (env METAPRUNE_TEST_POSTGRES_URL)")
    ap.add_argument("--clients", type=int, default=100, help="concurrent clients")
    ap.add_argument("--duration-s", type=float, default=20.0, help="timed window per load")
    ap.add_argument("--warmup-s", type=float, default=2.0,
                    help="untimed load before each window (opens the connections)")
    ap.add_argument("--interval-ms", type=parse_intervals, default="0,1000",
                    help="loads, comma-separated: 0 = closed loop (saturation), else each "
                         "client sends one request per interval (1000: like `metaprune watch`)")
    ap.add_argument("--submit-fraction", type=float, default=0.1,
                    help="share of requests that are POST /v1/jobs (the rest: status polls)")
    ap.add_argument("--owners", type=int, default=4,
                    help="API tokens of distinct owners; client i uses owner i mod N")
    ap.add_argument("--seed-jobs", type=int, default=10,
                    help="queued jobs per owner made before the load (poll targets)")
    ap.add_argument("--max-queued", type=int, default=10_000,
                    help="METAPRUNE_MAX_QUEUED_PER_OWNER of the server (so no 429)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="raw: a minimal asyncio HTTP/1.1 keep-alive client (cheapest); httpx: "
                         "one shared httpx.AsyncClient")
    ap.add_argument("--workers", type=int, default=1,
                    help="`serve --workers`: 1 trains the long job during the load; 0 serves the "
                         "API only (a diagnostic: the same load with no training beside it)")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="per-request timeout (error)")
    ap.add_argument("--train-arch", default="mobilenet_v1", help="the training job's arch")
    ap.add_argument("--train-width-mult", type=float, default=0.25)
    ap.add_argument("--submit-arch", default="test_mobilenet_v2",
                    help="arch of the submitted (and seeded) jobs; they stay queued")
    ap.add_argument("--ready-timeout-s", type=float, default=90.0)
    ap.add_argument("--train-timeout-s", type=float, default=180.0,
                    help="how long to wait for the worker to reach its training stage")
    ap.add_argument("--work-dir", help="keep the server's folders and logs here (default: a "
                                       "temporary folder, removed)")
    a = ap.parse_args()
    if (a.clients < 1 or a.owners < 1 or a.workers < 0 or a.duration_s <= 0
            or not 0 <= a.submit_fraction <= 1):
        ap.error("--clients and --owners must be ≥ 1, --workers ≥ 0, --duration-s > 0, "
                 "--submit-fraction in [0, 1]")
    if a.owners > 1 and a.seed_jobs < 1:
        ap.error("--seed-jobs must be ≥ 1 when --owners > 1 (the other owners' poll targets)")
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        client_loop = "uvloop"
    except ImportError:
        client_loop = "asyncio"
    sys.path.insert(0, str(ROOT))

    out = {"bench": "service", "clients": a.clients, "duration_s": a.duration_s,
           "warmup_s": a.warmup_s, "interval_ms": a.interval_ms,
           "submit_fraction": a.submit_fraction, "owners": a.owners, "seed_jobs": a.seed_jobs,
           "client": a.client, "client_loop": client_loop, "server_workers": a.workers,
           "auth": "required", "machine": machine_info(), "backends": {}}
    backends = ["sqlite", "postgres"] if a.db == "both" else [a.db]
    with tempfile.TemporaryDirectory(prefix="bench_service_") as tmp:
        base = Path(a.work_dir) if a.work_dir else Path(tmp)
        for backend in backends:
            workdir = base / backend
            workdir.mkdir(parents=True, exist_ok=True)
            if backend == "sqlite":
                url = f"sqlite:///{workdir / 'metaprune.db'}"
                out["backends"][backend] = run_backend(a, backend, url, workdir)
            else:
                with postgres_database(a.postgres_url) as url:
                    out["backends"][backend] = run_backend(a, backend, url, workdir)
    out["goal"] = {"poll_p99_ms_max": 50, "errors": 0}
    out["goal_met"] = {
        f"{name} interval {load['interval_ms']:g} ms": (
            load["polls"]["p99_ms"] is not None and load["polls"]["p99_ms"] <= 50
            and load["polls"]["errors"] == 0 and load["submissions"]["errors"] == 0)
        for name, b in out["backends"].items() for load in b["loads"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
