"""Pure ASGI middleware: :class:`RequestBodyGuard` and :class:`RequestLog`.

What a request body may be, enforced while it streams in: at most ``max_bytes``,
JSON only (``application/json`` or ``application/*+json``), UTF-8, nested at most
``MAX_JSON_DEPTH`` arrays and objects deep.

Nothing else is parsed, so nothing else can be deserialised: a body of any other media type
(a pickle, a form, an upload) is refused with 415 before a byte of it is read, and a "JSON" body
that is not UTF-8 (a binary payload sent as ``application/json``) with 422 as it arrives
(FastAPI would answer it with a 400, or a 500 where it echoes the bytes in a validation error).
"""

from __future__ import annotations

import codecs
import email.message
import json
import logging
import re
import time
import uuid
from urllib.parse import quote, unquote_plus

from starlette.exceptions import HTTPException


class BodyRejected(HTTPException):
    """Raised from ``receive``; an HTTPException, so that FastAPI's body parsing passes it on
    (it turns other exceptions into 400) and the exception middleware answers with it."""


class BodyTooLarge(BodyRejected):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyNotUtf8(BodyRejected):
    def __init__(self):
        # the shape of FastAPI's own validation errors, so that clients parse one format
        super().__init__(422, [{"loc": ["body"], "type": "json_invalid",
                                "msg": "request body is not UTF-8 (JSON bodies must be)"}])


MAX_JSON_DEPTH = 32  # a job spec nests 3 deep; Python's json and FastAPI's echo of a 422
# recurse once a level, and fail (400, 500) somewhere between 500 and 1,000


class BodyTooDeep(BodyRejected):
    def __init__(self):
        super().__init__(422, [{"loc": ["body"], "type": "json_invalid",
                                "msg": f"JSON nested more than {MAX_JSON_DEPTH} levels deep"}])


class JsonDepth:
    """Tracks how deep the arrays and objects of a JSON text nest, fed in chunks of UTF-8 bytes
    (every structural character is ASCII, and no byte of a multi-byte character is)."""

    _SPECIAL = re.compile(rb'[][{}"\\]')

    def __init__(self, limit: int):
        self.limit = limit
        self.depth = 0
        self.in_string = False
        self.offset = 0  # bytes fed so far
        self.escaped_at = -1  # the byte a backslash in a string escapes

    def feed(self, chunk: bytes) -> bool:
        """Whether the text so far, ``chunk`` included, nests at most ``limit`` deep."""
        for m in self._SPECIAL.finditer(chunk):
            at = self.offset + m.start()
            c = m.group()
            if self.in_string:
                if at == self.escaped_at:
                    continue
                if c == b"\\":
                    self.escaped_at = at + 1
                elif c == b'"':
                    self.in_string = False
            elif c == b'"':
                self.in_string = True
            elif c in b"[{":
                self.depth += 1
                if self.depth > self.limit:
                    return False
            elif c in b"]}":
                self.depth -= 1
        self.offset += len(chunk)
        return True


def is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` is a JSON media type (as FastAPI decides it)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


class RequestBodyGuard:
    """Refuse bodies over ``max_bytes``: at once when ``Content-Length`` says so, else by
    counting the bytes of the ``http.request`` messages as they arrive (chunked uploads, and a
    ``Content-Length`` that lies, included), so an oversized body is never buffered whole.
    Refuse a body that is not JSON (415, unread), not UTF-8 or nested too deep (422, as it
    arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        has_body = False
        content_type = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None  # unknown: count the bytes instead
                if length is not None and length > limit:
                    return await _send_error(send, BodyTooLarge(limit))
                has_body = has_body or length != 0
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        if has_body and not is_json(content_type):
            return await _send_error(send, HTTPException(
                415, "request bodies must be JSON (Content-Type: application/json), got "
                     + (repr(content_type) if content_type else "no Content-Type")))
        seen = 0
        started = False
        utf8 = codecs.getincrementaldecoder("utf-8")()
        depth = JsonDepth(MAX_JSON_DEPTH)

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen += len(body)
                if seen > limit:
                    raise BodyTooLarge(limit)
                try:
                    utf8.decode(body, final=not message.get("more_body", False))
                except UnicodeDecodeError:
                    raise BodyNotUtf8() from None
                if not depth.feed(body):
                    raise BodyTooDeep()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyRejected as e:
            if started:
                raise
            await _send_error(send, e)


async def _send_error(send, exc: HTTPException) -> None:
    body = json.dumps({"detail": exc.detail}).encode()
    await send({"type": "http.response.start", "status": exc.status_code,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _printable(text: str) -> str:
    """``text`` with control characters percent-encoded (the raw path and query may hold any
    byte but these)."""
    return re.sub(r"[\x00-\x20\x7f-\xff]", lambda m: f"%{ord(m.group()):02X}", text)


access_log = logging.getLogger("metaprune.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SECRET_PARAM = re.compile(r"token|key|secret|pass|auth|sig", re.IGNORECASE)


_QUERY_PARAM = re.compile(r"(^|[&;])([^=&;]*)=([^&;]*)")


def loggable_query(query: str) -> str:
    """``query`` (as sent, percent-encoded) with the values of parameters that may hold a
    secret (``?token=…``, which the API never reads, but a client may still send) replaced by
    ``REDACTED``; ``&`` and ``;`` both separate parameters."""
    return _QUERY_PARAM.sub(
        lambda m: m.group(0) if not _SECRET_PARAM.search(unquote_plus(m.group(2)))
        else f"{m.group(1)}{m.group(2)}=REDACTED", query)


class RequestLog:
    """One log line a request (``metaprune.access``: method, path, status, milliseconds,
    request id), written when its response ends; the request id is the client's
    ``X-Request-ID`` when it is a plain one, else a new one, and is sent back in the response's
    ``X-Request-ID``. A query parameter that may hold a secret is logged redacted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope["request_id"] = request_id  # for the answer to a bug, sent from outside this
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # the path as sent (percent-encoded: a decoded %0A would start a forged line)
            raw = scope.get("raw_path") or quote(scope.get("path", "")).encode()
            query = scope.get("query_string", b"").decode("latin-1")
            path = _printable(raw.decode("latin-1") + ("?" + loggable_query(query) if query
                                                       else ""))
            client = scope.get("client") or ("-", 0)
            access_log.info("%s %s %s %d %.1fms id=%s", client[0], scope.get("method"), path,
                            status, (time.perf_counter() - start) * 1000, request_id)
