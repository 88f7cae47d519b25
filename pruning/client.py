"""A client of the job service's REST API (``metaprune submit | status | jobs | cancel | retry |
delete | watch | download``).

:class:`ApiClient` wraps an :class:`httpx.Client` (one of its own, or one given, e.g. FastAPI's
``TestClient``). Every failure is a :class:`ClientError` with a one-line message: the server
unreachable, or an HTTP error with its status and the server's ``detail``. Requests that are
safe to repeat are retried after transient failures (the connection lost, a timeout, HTTP
502/503/504): every GET, a cancel, a job's retry or deletion, and a submit, which always carries an
``Idempotency-Key`` (one of its own when none is given), so trying again can never queue a
second job.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TRANSIENT_STATUSES = frozenset({502, 503, 504})  # a proxy or the API between two states
STALE_PART_S = 600  # a download's temporary file untouched this long was left by a killed one


class ClientError(Exception):
    """A failed request, as one line for the user. ``status``: the HTTP status, if any;
    ``transient``: the failure may pass (the connection lost, a timeout, HTTP 502/503/504);
    ``sent``: the request (or one of its tries) may have reached the server; ``sent_before``:
    a try before the last one may have."""

    def __init__(self, message: str, status: int | None = None, transient: bool = False,
                 sent: bool = True):
        super().__init__(message)
        self.status, self.transient, self.sent = status, transient, sent
        self.sent_before = False


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
                 client: httpx.Client | None = None, timeout: float = 30.0, retries: int = 3,
                 sleep: Callable[[float], None] | None = None):
        self.base_url = _server_url(base_url or os.environ.get("METAPRUNE_SERVER")
                                    or DEFAULT_SERVER)
        token = token if token is not None else os.environ.get("METAPRUNE_TOKEN")
        self.token = (token or "").strip()  # a pasted token's stray newline or space
        _check_header("the token", self.token)
        self.retries, self.sleep = retries, sleep or time.sleep
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
        """One line for a request that got no answer; never the request's headers (the
        token), which some of httpx's messages quote."""
        if _tls_error(e):  # retrying will not help
            hint = ("its certificate is not trusted here: point SSL_CERT_FILE at the CA bundle "
                    "that signed it" if "CERTIFICATE_VERIFY_FAILED" in str(e)
                    else "does it speak plain HTTP? then use http://")
            return ClientError(f"TLS with the server at {self.base_url} failed ({e}; {hint})")
        if isinstance(e, httpx.ConnectError):
            return ClientError(f"cannot reach the server at {self.base_url} ({e}; is "
                               "`metaprune serve` running there?)", transient=True, sent=False)
        if isinstance(e, httpx.TimeoutException):
            return ClientError(f"the server at {self.base_url} did not answer in time",
                               transient=True, sent=not isinstance(e, httpx.ConnectTimeout))
        if isinstance(e, httpx.LocalProtocolError):
            return ClientError(f"a request to {self.base_url} could not be sent (a header "
                               "value HTTP does not allow)")
        hint = ("; if it serves HTTPS, use https://" if self.base_url.startswith("http://")
                and "without sending a response" in str(e) else "")
        return ClientError(f"request to {self.base_url} failed: {type(e).__name__}: {e}{hint}",
                           transient=isinstance(e, (httpx.NetworkError,
                                                    httpx.RemoteProtocolError)))

    def _check(self, response: httpx.Response) -> httpx.Response:
        code = response.status_code
        if 300 <= code < 400:  # not followed: a changed address is the user's to confirm
            where = response.headers.get("Location", "another address")
            raise ClientError(f"the server at {self.base_url} redirects to {where} "
                              f"(HTTP {code}): give that address as --server", status=code)
        if code >= 400:
            raise ClientError(f"HTTP {code}: {_detail(response)}", status=code,
                              transient=code in TRANSIENT_STATUSES)
        return response

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                **kwargs) -> Any:
        """The JSON body of a successful request; a transient failure is tried again up to
        ``retries`` times, after 0.5, 1, 2… s."""
        sent = False
        for attempt in range(self.retries + 1):
            try:
                try:
                    response = self.http.request(method, path, headers=self._headers(headers),
                                                 **kwargs)
                except httpx.HTTPError as e:
                    raise self._unreachable(e) from None
                self._check(response)
                break
            except ClientError as e:
                e.sent_before = sent
                sent = e.sent = sent or e.sent
                if not (e.transient and attempt < self.retries):
                    raise
                self.sleep(0.5 * 2 ** attempt)
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"the server at {self.base_url} sent a body that is not "
                              f"JSON (HTTP {response.status_code})") from None

    def _job(self, body: Any) -> dict:
        """``body`` if it is a job (an object with an ``id`` and a ``status``)."""
        if isinstance(body, dict) and isinstance(body.get("id"), str) \
                and isinstance(body.get("status"), str):
            return body
        raise ClientError(f"the server at {self.base_url} sent an answer that is not a job "
                          "(is that address the metaprune API?)")

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        """Queue ``spec``; without ``idempotency_key``, a new one of the client's own makes
        the retries safe. A submit whose answer was lost says which key gets its job back."""
        if idempotency_key is None:
            idempotency_key = f"metaprune-client-{uuid.uuid4()}"
        else:
            _check_header("the idempotency key", idempotency_key)
        try:
            return self._job(self.request("POST", "/v1/jobs", json=spec,
                                          headers={"Idempotency-Key": idempotency_key}))
        except ClientError as e:
            if not (e.transient and e.sent):
                raise
            raise ClientError(f"{e}; the job may have been queued all the same: submit again "
                              f"with --idempotency-key {idempotency_key} to get it back "
                              "without queuing another", transient=True) from None

    def job(self, job_id: str) -> dict:
        return self._job(self.request("GET", f"/v1/jobs/{_segment(job_id)}"))

    def jobs(self, statuses: list[str] | None = None, limit: int = 20, offset: int = 0) -> dict:
        params: list[tuple[str, str | int]] = [("limit", limit), ("offset", offset)]
        params += [("status", s) for s in statuses or ()]
        page = self.request("GET", "/v1/jobs", params=params)
        if not (isinstance(page, dict) and isinstance(page.get("items"), list)
                and isinstance(page.get("total"), int)):
            raise ClientError(f"the server at {self.base_url} sent an answer that is not a "
                              "page of jobs (is that address the metaprune API?)")
        for item in page["items"]:
            self._job(item)
        return page

    def cancel(self, job_id: str) -> dict:
        """Cancel the job; one already cancelled (by an earlier try whose answer was lost, or
        by anyone) is no error."""
        try:
            return self._job(self.request("POST", f"/v1/jobs/{_segment(job_id)}/cancel"))
        except ClientError as e:
            if e.status != 409:
                raise
            job = self.job(job_id)
            if job["status"] != "cancelled":
                raise
            return job

    def retry(self, job_id: str) -> dict:
        """Queue a failed or cancelled job again (it resumes from its last checkpoint). A 409
        after an earlier try that may have reached the server (its answer lost) is no error
        when the job is queued or running now: that try queued it."""
        try:
            return self._job(self.request("POST", f"/v1/jobs/{_segment(job_id)}/retry"))
        except ClientError as e:
            if not (e.status == 409 and e.sent_before):
                raise
            job = self.job(job_id)
            if job["status"] not in ("queued", "running"):
                raise
            return job

    def delete(self, job_id: str) -> dict:
        """Delete a finished job and its files (``{"id", "deleted", "freed_bytes"}``). A 404
        after an earlier try that may have reached the server (its answer lost) is no error:
        that try deleted it (``freed_bytes`` is then unknown: ``None``)."""
        try:
            body = self.request("DELETE", f"/v1/jobs/{_segment(job_id)}")
        except ClientError as e:
            if not (e.status == 404 and e.sent_before):
                raise
            return {"id": job_id, "deleted": True, "freed_bytes": None}
        if not (isinstance(body, dict) and body.get("deleted") is True):
            raise ClientError(f"the server at {self.base_url} sent an answer that is not a "
                              "deleted job (is that address the metaprune API?)")
        return body

    def watch(self, job_id: str, interval: float = 1.0,
              sleep: Callable[[float], None] | None = None, patience: float = 600.0,
              on_retry: Callable[[ClientError], None] | None = None,
              clock: Callable[[], float] = time.monotonic) -> Iterator[dict]:
        """The job as polled every ``interval`` seconds, until (and including) a final state.
        Once the job has been seen, polls that fail transiently (the server restarting, a
        proxy's 502) are tried again every ``interval`` (2–10 s), each failure passed to
        ``on_retry``, until they have failed for ``patience`` seconds by ``clock``; a first
        poll that fails (a wrong address) is an error at once."""
        sleep = sleep or self.sleep
        failing_since = None
        job = self.job(job_id)
        while True:
            yield job
            if job["status"] in FINAL_STATUSES:
                return
            sleep(interval)
            while True:
                polled = clock()  # a poll's own retries and timeouts count too
                try:
                    job = self.job(job_id)
                    failing_since = None
                    break
                except ClientError as e:
                    failing_since = polled if failing_since is None else failing_since
                    if not e.transient or clock() - failing_since >= patience:
                        raise
                    if on_retry is not None:
                        on_retry(e)
                    sleep(min(max(interval, 2.0), 10.0))

    # --- artifacts -------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[dict]:
        body = self.request("GET", f"/v1/jobs/{_segment(job_id)}/artifacts")
        items = body.get("items") if isinstance(body, dict) else None
        if not (isinstance(items, list) and all(isinstance(i, dict) for i in items)):
            raise ClientError("the server's artifact list has no items")
        return items

    def download(self, job_id: str, item: dict, dest: Path,
                 on_bytes: Callable[[int], None] | None = None) -> Path:
        """Stream artifact ``item`` ({name, size, sha256}) into ``dest``: written to a temporary
        file beside the target while hashing, checked against the listed sha256 and the
        ``X-Content-SHA256`` header, then renamed into place. On any failure nothing is left.
        A file already there with the listed sha256 is kept as it is (a second download, or
        one that stopped midway, fetches only what is missing)."""
        name = str(item.get("name", ""))
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise ClientError(f"refusing artifact name {name!r} from the server")
        listed = str(item.get("sha256") or "").lower()
        target = dest / name
        if listed and target.is_file() and _sha256_of(target) == listed:
            return target
        _remove_stale_parts(dest, name)
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
                raise ClientError(f"downloading {name}: {self._unreachable(e)}") from None
            got = digest.hexdigest()
            if not header:
                raise ClientError(f"the server sent {name} without its X-Content-SHA256 header "
                                  "(a proxy that drops headers?); nothing was kept")
            if not (got == listed == header):
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
    """A header value must be printable ASCII (HTTP headers carry no other text), without
    spaces at its ends. The message never quotes the value: it may be a secret."""
    bad = next((c for c in value if not " " <= c < "\x7f"), None)
    if bad is not None:
        raise ClientError(f"{what} may hold only printable ASCII characters, not {bad!r}")
    if value != value.strip():
        raise ClientError(f"{what} may not begin or end with a space")


def _server_url(url: str) -> str:
    """The API's base URL, checked: http or https (any case), a host, no query or fragment;
    without its trailing slash."""
    url = url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ClientError(f"the server's URL must start with http:// or https:// "
                          f"(e.g. http://{url}), got {url!r}")
    if scheme.lower() not in ("http", "https"):
        raise ClientError(f"the server's URL must start with http:// or https://, got {url!r}")
    url = f"{scheme.lower()}://{rest}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise ClientError(f"not a valid server URL: {url!r} ({e})") from None
    if not parsed.host:
        raise ClientError(f"the server's URL names no host: {url!r}")
    if parsed.query or parsed.fragment:
        raise ClientError(f"the server's URL may not hold a query or a fragment: {url!r}")
    return url


def _tls_error(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps) is a TLS failure: retrying will not help."""
    while e is not None:
        if isinstance(e, ssl.SSLError) or "[SSL" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale_parts(dest: Path, name: str) -> None:
    """Temporary files of ``name`` that a killed download left in ``dest`` (untouched for
    :data:`STALE_PART_S`; a live download writes to its own all the time)."""
    for part in dest.glob(f".{name}.*.part"):
        try:
            if time.time() - part.stat().st_mtime > STALE_PART_S:
                part.unlink()
        except OSError:
            pass


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
