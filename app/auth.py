"""API tokens (DESIGN.md §5, security).

A token is ``secrets.token_urlsafe(32)`` (256 random bits), shown once when it is made; only its
sha256 is stored. A request sends ``Authorization: Bearer <token>``; the server hashes it, looks
the hash up (an index on a unique column) and compares the stored hash with
:func:`hmac.compare_digest`, so neither the lookup key nor the comparison is the secret itself.
A fast hash is right here: the token has 256 bits of entropy, nothing to brute-force.

When auth is not required (a server bound only to loopback), requests without a token belong
to the owner ``"local"`` if they are addressed to loopback (``Host: localhost``, ``127.0.0.1``,
``[::1]``): a web page whose own name an attacker points at 127.0.0.1 (DNS rebinding) sends its
name instead, and needs a token. So does a request that a proxy says it forwarded (a
``Forwarded``, ``X-Forwarded-For``, ``X-Forwarded-Host`` or ``X-Real-IP`` header); a proxy on the
same machine that adds none of them needs ``METAPRUNE_REQUIRE_AUTH=true``. A token that is sent
is still checked.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.deps import SettingsDep
from app.models import ApiToken
from app.services import NotFound

LOCAL_OWNER = "local"
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")

bearer = HTTPBearer(auto_error=False, description="an API token from `metaprune token create`")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, owner: str, name: str) -> str:
    """Store a new token of ``owner`` (its hash only) and return the token (caller commits)."""
    token = secrets.token_urlsafe(32)
    session.add(ApiToken(owner=owner, name=name, token_sha256=hash_token(token)))
    session.flush()
    return token


def list_tokens(session: Session, owner: str | None = None) -> list[dict]:
    """``{owner, name, created_at}`` of every token (of ``owner``), oldest first; never a token
    or its hash."""
    stmt = select(ApiToken.owner, ApiToken.name, ApiToken.created_at).order_by(
        ApiToken.created_at, ApiToken.id)
    if owner is not None:
        stmt = stmt.where(ApiToken.owner == owner)
    return [row._asdict() for row in session.execute(stmt)]


def revoke_token(session: Session, owner: str, name: str) -> bool:
    """Delete ``owner``'s token ``name`` (its next request gets 401); whether there was one
    (caller commits)."""
    return session.execute(delete(ApiToken).where(ApiToken.owner == owner,
                                                  ApiToken.name == name)).rowcount == 1


def owner_of_token(session: Session, token: str) -> str | None:
    """The owner of ``token``, or ``None`` for an unknown one."""
    digest = hash_token(token)
    row = session.execute(select(ApiToken.owner, ApiToken.token_sha256)
                          .where(ApiToken.token_sha256 == digest)).one_or_none()
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    return row.owner


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail,
                         headers={"WWW-Authenticate": "Bearer"})


def addressed_to_loopback(host_header: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost`` (or a name under
    it), or a loopback address, with or without a port."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def current_owner(request: Request,
                  settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                  ) -> str:
    """The owner the request acts for (a FastAPI dependency)."""
    if credentials is None:
        if request.headers.get("authorization"):
            raise _unauthorized("malformed Authorization header; send 'Bearer <token>'")
        if settings.require_auth:
            raise _unauthorized("an API token is required (Authorization: Bearer <token>)")
        if not addressed_to_loopback(request.headers.get("host")):
            raise _unauthorized("without a token this server answers only requests addressed "
                                "to localhost or a loopback address (e.g. http://127.0.0.1:8000)")
        if any(name in request.headers for name in PROXY_HEADERS):
            raise _unauthorized("without a token this server answers only requests made on "
                                "its machine, not ones a proxy forwards")
        return LOCAL_OWNER
    with request.app.state.sessions() as session:
        owner = owner_of_token(session, credentials.credentials)
    if owner is None:
        raise _unauthorized("invalid API token")
    return owner


Owner = Annotated[str, Depends(current_owner)]


def job_id_of_path(job_id: Annotated[str, Path(description="the job id")],
                   _owner: Owner) -> str:
    """The ``{job_id}`` of a path, checked after auth (so a bad token is 401 first). One with a
    NUL character or over 64 characters is no job's (ids are UUIDs), and PostgreSQL refuses to
    compare text holding a NUL (a 500): 404 without a query."""
    if "\x00" in job_id or len(job_id) > 64:
        raise NotFound("job not found")
    return job_id


JobId = Annotated[str, Depends(job_id_of_path)]
