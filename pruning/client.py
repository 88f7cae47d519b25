"""A client of the job service's REST API (``metaprune submit | status | jobs | cancel | watch |
download``).

:class:`ApiClient` wraps an :class:`httpx.Client` (one of its own, or one given, e.g. FastAPI's
``TestClient``). Every failure is a :class:`ClientError` with a one-line message: the server
unreachable, or an HTTP error with its status and the server's ``detail``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ClientError(Exception):
    """A failed request, as one line for the user."""


def _detail(response: httpx.Response) -> str:
    """The server's ``detail`` on one line (a 422 list as ``loc: msg; …``), else the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
                msg = str(err.get("msg", "")).removeprefix("Value error, ")
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(err))
        text = "; ".join(parts)
    elif detail is not None:
        text = str(detail)
    else:
        text = response.text or response.reason_phrase
    return " ".join(text.split())[:500]


class ApiClient:
    """The REST API at ``base_url`` (default ``$METAPRUNE_SERVER``, else 127.0.0.1:8000), with
    ``token`` (default ``$METAPRUNE_TOKEN``) as the bearer token when there is one."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *,
                 client: httpx.Client | None = None, timeout: float = 30.0):
        self.base_url = (base_url or os.environ.get("METAPRUNE_SERVER")
                         or DEFAULT_SERVER).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ClientError(f"the server's URL must start with http:// or https:// "
                              f"(e.g. http://{self.base_url}), got {self.base_url!r}")
        self.token = token if token is not None else os.environ.get("METAPRUNE_TOKEN")
        _check_header("the token", self.token or "")
        self._own = client is None
        self.http = client if client is not None else httpx.Client(base_url=self.base_url,
                                                                    timeout=timeout)

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return {**headers, **(extra or {})}

    def _unreachable(self, e: Exception) -> ClientError:
        if isinstance(e, httpx.ConnectError):
            return ClientError(f"cannot reach the server at {self.base_url} ({e}; is "
                               "`metaprune serve` running there?)")
        if isinstance(e, httpx.TimeoutException):
            return ClientError(f"the server at {self.base_url} did not answer in time")
        return ClientError(f"request to {self.base_url} failed: {type(e).__name__}: {e}")

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise ClientError(f"HTTP {response.status_code}: {_detail(response)}")
        return response

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                **kwargs) -> Any:
        """The JSON body of a successful request."""
        try:
            response = self.http.request(method, path, headers=self._headers(headers), **kwargs)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        self._check(response)
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"the server at {self.base_url} sent a body that is not "
                              f"JSON (HTTP {response.status_code})") from None

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        if idempotency_key is not None:
            _check_header("the idempotency key", idempotency_key)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.request("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{_segment(job_id)}")

    def jobs(self, statuses: list[str] | None = None, limit: int = 20, offset: int = 0) -> dict:
        params: list[tuple[str, str | int]] = [("limit", limit), ("offset", offset)]
        params += [("status", s) for s in statuses or ()]
        return self.request("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def watch(self, job_id: str, interval: float = 1.0,
              sleep: Callable[[float], None] | None = None) -> Iterator[dict]:
        """The job as polled every ``interval`` seconds, until (and including) a final state."""
        import time

        sleep = sleep or time.sleep
        while True:
            job = self.job(job_id)
            yield job
            if job.get("status") in FINAL_STATUSES:
                return
            sleep(interval)

    # --- artifacts -------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[dict]:
        body = self.request("GET", f"/v1/jobs/{_segment(job_id)}/artifacts")
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ClientError("the server's artifact list has no items")
        return items

    def download(self, job_id: str, item: dict, dest: Path,
                 on_bytes: Callable[[int], None] | None = None) -> Path:
        """Stream artifact ``item`` ({name, size, sha256}) into ``dest``: written to a temporary
        file beside the target while hashing, checked against the listed sha256 and the
        ``X-Content-SHA256`` header, then renamed into place. On any failure nothing is left."""
        name = str(item.get("name", ""))
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise ClientError(f"refusing artifact name {name!r} from the server")
        listed = str(item.get("sha256") or "").lower()
        target = dest / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        try:
            digest = hashlib.sha256()
            try:
                with self.http.stream("GET", f"/v1/jobs/{_segment(job_id)}/artifacts/{name}",
                                      headers=self._headers({"Accept": "*/*"})) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    header = response.headers.get("X-Content-SHA256", "").lower()
                    with os.fdopen(fd, "wb") as f:
                        fd = -1
                        for chunk in response.iter_bytes():
                            f.write(chunk)
                            digest.update(chunk)
                            if on_bytes is not None:
                                on_bytes(len(chunk))
                        f.flush()
                        os.fsync(f.fileno())
            except httpx.HTTPError as e:
                raise self._unreachable(e) from None
            got = digest.hexdigest()
            if not listed or not header or not (got == listed == header):
                raise ClientError(f"sha256 mismatch for {name}")
            os.chmod(tmp, _new_file_mode())  # mkstemp's 0600 would hide it from other users
            os.replace(tmp, target)
            tmp = None
            return target
        finally:
            if fd != -1:
                os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass


def _check_header(what: str, value: str) -> None:
    """A header value must be printable ASCII (HTTP headers carry no other text)."""
    bad = next((c for c in value if not " " <= c < "\x7f"), None)
    if bad is not None:
        raise ClientError(f"{what} may hold only printable ASCII characters, not {bad!r}")


def _new_file_mode() -> int:
    """The mode a plain ``open(…, "w")`` gives a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _segment(job_id: str) -> str:
    """``job_id`` as one URL path segment (no ``/``, ``?`` or ``..`` smuggled in)."""
    from urllib.parse import quote

    if not job_id or job_id in (".", ".."):
        raise ClientError(f"not a job id: {job_id!r}")
    return quote(job_id, safe="")
