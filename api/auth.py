"""Optional API keys: a Bearer token whose SHA-256 digest is in DAWET_API_KEYS."""
from __future__ import annotations

import hashlib

from flask import g, request

from api.errors import APIError
from api.services import services


def require_api_key() -> None:
    """Reject the request with a 401 unless auth is off or it carries an accepted key."""
    scopes = services().api_key_scopes
    if not scopes:
        return
    # Digests, not keys, are compared: a timing difference reveals nothing about a key.
    digest = _digest(_bearer_token() or _websocket_token())
    if digest not in scopes:
        raise APIError(401, "a valid API key is required: send `Authorization: Bearer <key>`",
                       "invalid_api_key")
    g.api_key_digest = digest


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
