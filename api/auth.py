"""Optional API keys: a Bearer token whose SHA-256 digest is an accepted key (api/keys.py).

Every /v1 request gets `g.principal`, the key's holder, whom ownership, model scopes, usage
and budgets are about. With authentication off, everyone is EVERYONE, who sees everything.
"""
from __future__ import annotations

import hashlib

from flask import g, request

from api.errors import APIError
from api.keys import EVERYONE, Principal
from api.services import services


def require_api_key() -> None:
    """Reject the request with a 401 unless auth is off or it carries an accepted key."""
    keys = services().keys
    if not keys.enabled:
        g.principal = EVERYONE
        return
    # Digests, not keys, are looked up: a timing difference reveals nothing about a key.
    principal = keys.principal(_digest(_bearer_token() or _websocket_token()))
    if principal is None:
        raise APIError(401, "a valid API key is required: send `Authorization: Bearer <key>`",
                       "invalid_api_key")
    g.principal = principal


def principal() -> Principal:
    """Who the current request is."""
    return g.principal


def require_api_key_under_v1() -> None:
    """The check above, for a blueprint that also serves open pages outside /v1."""
    if request.path.startswith("/v1/"):
        require_api_key()


def _bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _websocket_token() -> str:
    """Browsers cannot set headers on a WebSocket, so its handshake may carry ?access_token=."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return ""
    return request.args.get("access_token", "")


def _digest(token: str) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None
