"""Who may call the API: credentials (HTTP basic or bearer) and the cross-site check on changes.

Basic auth is what a browser sends by itself once the user typed it, so a change (any method
but GET, HEAD, OPTIONS) is also checked for where it comes from, with the standard request
headers browsers set (OWASP's "verifying origin with standard headers"): a change whose
``Origin`` is not the server's own (or one listed in ``cors_origins``), or that the browser marks
``Sec-Fetch-Site: cross-site``, is refused with 403. Non-browser clients send neither header.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from urllib.parse import urlsplit

from fastapi import Request

from lightning_queue.core.errors import AuthenticationRequiredError, CrossSiteRequestError
from lightning_queue.ops.server.config import ServerConfig

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _same(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())


def authenticated(config: ServerConfig, authorization: str | None) -> str | None:
    """The user the ``Authorization`` header proves (``token`` for the bearer token), or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and config.token is not None:
        return "token" if _same(value, config.token.get_secret_value()) else None
    if scheme.lower() == "basic" and config.password is not None:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Both compared, always: the time taken says nothing about which one was wrong.
        ok = _same(user, config.user) & _same(password, config.password.get_secret_value())
        return user if sep and ok else None
    return None


def check_request(config: ServerConfig, request: Request) -> str | None:
    """Raise :class:`AuthenticationRequiredError` or :class:`CrossSiteRequestError` when the
    request may not go on; return the user it is made by (None: an anonymous read)."""
    changing = request.method not in SAFE_METHODS
    user = authenticated(config, request.headers.get("authorization"))
    if user is None and (changing or not config.loopback or request.headers.get("authorization")):
        raise AuthenticationRequiredError(changing)
    if changing:
        _check_origin(config, request)
    return user


def _check_origin(config: ServerConfig, request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own and origin not in config.cors_origins:
            raise CrossSiteRequestError(origin)
    elif request.headers.get("sec-fetch-site") == "cross-site":
        referer = request.headers.get("referer", "")
        raise CrossSiteRequestError(f"{urlsplit(referer).scheme}://{urlsplit(referer).netloc}" if referer else "?")
